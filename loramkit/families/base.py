"""What loramkit needs to know about a model family, as data.

Every supported family is a LLaMA-style decoder: per layer an attention block
(q, k, v, o projections; query heads grouped over key/value heads) and a gated MLP
(gate, up, down). A family table names those modules; the pruning and recovery code
is written once against the roles, never against a family.

Roles that share one module name are *fused* (Phi-3's ``qkv_proj``, ``gate_up_proj``):
the module's rows are its roles' rows one after the other, in role order (q | k | v,
gate | up), each segment as long as the unfused projection would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedModelError

Role = Literal["q", "k", "v", "o", "gate", "up", "down"]

# How each role is coupled to the pruned unit, and along which dimension of its
# weight ([out, in]) the unit lives. "query": the unit's G query heads; "kv": the
# unit's one key/value head; "channel": one MLP intermediate channel.
ATTENTION_ROLES: tuple[tuple[Role, int, str], ...] = (
    ("q", 0, "query"),
    ("k", 0, "kv"),
    ("v", 0, "kv"),
    ("o", 1, "query"),
)
MLP_ROLES: tuple[tuple[Role, int, str], ...] = (
    ("gate", 0, "channel"),
    ("up", 0, "channel"),
    ("down", 1, "channel"),
)


@dataclass(frozen=True)
class Family:
    """One model family: the module names of each role, relative to a decoder layer."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    modules: dict[Role, str]
    # Modules that act over head_dim (Qwen3 q_norm/k_norm): kept whole, never sliced.
    head_norms: tuple[str, ...] = ()
    # Roles that always carry a bias (Qwen2 q/k/v); others follow config's attention_bias / mlp_bias.
    bias_roles: tuple[Role, ...] = ()
    # Hidden-size norms per decoder layer (LLaMA: input + post-attention; Gemma: four).
    layer_norms: int = 2
    # transformers' default when config.json has no tie_word_embeddings (published Gemma 2 configs have none).
    tied_by_default: bool = False
    # Mixture of experts (Qwen3-MoE): the MLP roles' names hold ``{expert}`` (one module per
    # expert on disk, ``mlp.experts.3.gate_proj``); ``experts`` is the module transformers
    # fuses them into (``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] parameters),
    # ``router`` the expert router (never pruned: every expert keeps serving).
    experts: str | None = None
    router: str | None = None
    layers_prefix: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    lm_head: str = "lm_head"  # shares the embeddings' weight when tie_word_embeddings

    def module(self, layer: int, role: Role, expert: int | None = None) -> str:
        """Full module path, e.g. ``model.layers.7.self_attn.q_proj`` (``mlp.experts.3.gate_proj`` with ``expert``)."""
        name = self.modules[role]
        if "{expert}" in name:
            if expert is None:
                raise ValueError(f"{self.name}: role {role} lives once per expert; pass expert=")
            name = name.format(expert=expert)
        return f"{self.layers_prefix}.{layer}.{name}"

    def per_expert(self, role: Role) -> bool:
        """Whether ``role`` lives once per expert (the MLP roles of a mixture of experts)."""
        return "{expert}" in self.modules[role]

    def fused_roles(self, role: Role) -> tuple[Role, ...]:
        """The roles stored in ``role``'s module, in row order (just ``(role,)`` when unfused)."""
        return tuple(r for r in self.modules if self.modules[r] == self.modules[role])

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The Linear projections' module names as PEFT ``target_modules`` (e.g. q_proj ... down_proj)."""
        names = (m for r, m in self.modules.items() if not self.per_expert(r))
        return tuple(dict.fromkeys(m.rsplit(".", 1)[-1] for m in names))

    @property
    def lora_target_parameters(self) -> tuple[str, ...]:
        """PEFT ``target_parameters`` for the fused expert tensors (empty for dense families)."""
        return (f"{self.experts}.gate_up_proj", f"{self.experts}.down_proj") if self.experts else ()

    def projections(self, layer: int) -> list[str]:
        """Full paths of the distinct Linear projection modules of one layer (a fused module once; no experts)."""
        return list(dict.fromkeys(self.module(layer, r) for r in self.modules if not self.per_expert(r)))

    def layer_of(self, module_path: str) -> int | None:
        """Layer index of a module path, or None when outside the decoder layers."""
        prefix = self.layers_prefix + "."
        if not module_path.startswith(prefix):
            return None
        head = module_path[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def role_of(self, module_path: str) -> Role | None:
        """The role of a full module path (a fused module's first role), or None for modules pruning never touches."""
        layer = self.layer_of(module_path)
        if layer is None:
            return None
        rel = module_path[len(f"{self.layers_prefix}.{layer}.") :]
        for role, name in self.modules.items():
            if name == rel or (self.per_expert(role) and _expert_name(name, rel)):
                return role
        return None


def _expert_name(pattern: str, rel: str) -> bool:
    """Whether ``rel`` is ``pattern`` (holding ``{expert}``) for some expert index."""
    head, _, tail = pattern.partition("{expert}")
    middle = rel[len(head) : len(rel) - len(tail)] if rel.startswith(head) and rel.endswith(tail) else ""
    return middle.isdigit()


@dataclass(frozen=True)
class ArchSpec:
    """The uniform (unpruned) shape of a base model, read from its config."""

    family: Family
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    bias_roles: frozenset[str] = frozenset()
    num_experts: int = 0  # 0: a dense MLP; else intermediate_size is each expert's

    @property
    def group_size(self) -> int:
        """G: query heads per key/value head (1 for MHA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_key_value_heads < self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ArchSpec:
        from . import family_for_config  # late: the registry imports this module

        family = family_for_config(config)
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            experts = int(config.get("num_experts") or config.get("num_local_experts") or 0) if family.experts else 0
            if experts and (config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1):
                raise UnsupportedModelError(
                    "mixtures of experts with dense MLP layers (mlp_only_layers, decoder_sparse_step) are unsupported"
                )
            spec = cls(
                family=family,
                architecture=(config.get("architectures") or [family.architectures[0]])[0],
                model_type=config["model_type"],
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["moe_intermediate_size"] if experts else config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", family.tied_by_default)),
                bias_roles=frozenset(family.bias_roles)
                | (frozenset(("q", "k", "v", "o")) if config.get("attention_bias") else frozenset())
                | (frozenset(("gate", "up", "down")) if config.get("mlp_bias") else frozenset()),
                num_experts=experts,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"config.json lacks a usable field ({exc}); is it a causal LM config?") from None
        if heads % kv_heads:
            raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return spec
