"""Tiny, random-weight, shape-faithful base models for tests.

Every case in :data:`FAMILY_CASES` is a scaled-down copy of a real architecture
(see ``/work/shared/reference-configs``) that keeps the *shape rules* of the
original: MHA vs GQA, implicit vs explicit ``head_dim`` (including a
``head_dim`` that is not ``hidden_size / num_attention_heads``), tied
embeddings, llama3 rope scaling, Mistral's sliding window, Qwen2's q/k/v
biases, Qwen3's and Gemma 3's q/k norms, Gemma's soft-capping, four norms per
layer and scaled tied embeddings.  All cases have 8 decoder layers, so the default
loramkit pruning (for 8 layers: keep the first 2 and the last 1) prunes layers 2 to 6.

Weights are random but non-trivial: the projections are drawn with a larger
``initializer_range`` than transformers' default (so logits are not flat and
pruning measurably changes them), and every norm weight (``1 + 0.1*randn``) and
every bias (``0.1*randn``) is randomised, so a dropped or mis-sliced norm/bias
shows up in the outputs.

Public API::

    FAMILY_CASES                      # case name -> config overrides
    tiny_config(case, **overrides)    # -> transformers.PretrainedConfig
    tiny_model(case, *, dtype, seed, **overrides)   # in-memory model
    make_base(dir, case, *, dtype, max_shard_size, seed, tokenizer, **overrides)
    tiny_tokenizer(dir=None)          # byte-level BPE, vocab 512, chat template
    sample_texts(n=64, seed=0)        # deterministic English-like sentences

``make_base`` writes the directory the way transformers does
(``save_pretrained``) and then rewrites ``config.json`` in the style of the
published hub files (``config_style="hub"``, the default): ``rope_theta`` at top
level and ``rope_scaling`` instead of transformers 5's ``rope_parameters``,
``torch_dtype`` instead of ``dtype``, no ``layer_types`` list (qwen2/qwen3), and
no ``head_dim`` key for the cases whose real config has none (llama-2,
mistral-7b-v0.1, qwen2.5).  Pass
``config_style="transformers"`` to keep what transformers 5.24 writes.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "FAMILY_CASES",
    "CASE_NAMES",
    "VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "tiny_config",
    "tiny_model",
    "make_base",
    "tiny_tokenizer",
    "sample_texts",
    "expected_shapes",
]

VOCAB_SIZE = 512
# Order gives llama-like ids: <unk>=0, <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Shared by every case.
_COMMON: dict[str, Any] = {
    "num_hidden_layers": 8,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
    # transformers' default 0.02 makes a 64-wide model almost an identity map;
    # 0.1 (~ 1/sqrt(hidden)) gives peaked logits that react to pruning.
    "initializer_range": 0.1,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    # pad_token_id deliberately left unset in the model config (as in llama);
    # setting it would make transformers zero that embedding row.
    "use_cache": True,
}

# Llama-3.x style rope scaling, shrunk so that with head_dim 8-16 and
# rope_theta 5e5 the low-, mid- (smoothed) and high-frequency bands are all hit.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> config overrides (on top of _COMMON).  Keys starting with "_" are
# factory metadata, not config fields:
#   _architecture: transformers class name
#   _implicit_head_dim: the real config has no head_dim key (hub-style json drops it)
#   _rope_theta / _rope_scaling: written into rope_parameters (transformers 5)
FAMILY_CASES: dict[str, dict[str, Any]] = {
    # llama-2: MHA, head_dim implied (= hidden / heads), no rope scaling.
    "llama_mha": {
        "_architecture": "LlamaForCausalLM",
        "_implicit_head_dim": True,
        "_rope_theta": 10000.0,
        "_rope_scaling": None,
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # llama-3.1 style GQA (G=4) with an explicit head_dim that is NOT
    # hidden/heads (16 != 64/16 = 4), so q_proj is 256 x 64.
    "llama_gqa": {
        "_architecture": "LlamaForCausalLM",
        "_implicit_head_dim": False,
        "_rope_theta": 500000.0,
        "_rope_scaling": dict(_LLAMA3_ROPE),
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # llama-3.2-1b: GQA (G=4), explicit head_dim == hidden/heads, tied embeddings.
    "llama_tied": {
        "_architecture": "LlamaForCausalLM",
        "_implicit_head_dim": False,
        "_rope_theta": 500000.0,
        "_rope_scaling": dict(_LLAMA3_ROPE, factor=32.0),
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # mistral-7b-v0.1: GQA (G=4), implicit head_dim, sliding window < max positions.
    "mistral": {
        "_architecture": "MistralForCausalLM",
        "_implicit_head_dim": True,
        "_rope_theta": 10000.0,
        "_rope_scaling": None,
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "sliding_window": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # qwen2.5: GQA with a non-power-of-two group size (G=3), q/k/v bias
    # (hard-wired in Qwen2Attention), implicit head_dim, not tied.
    "qwen2": {
        "_architecture": "Qwen2ForCausalLM",
        "_implicit_head_dim": True,
        "_rope_theta": 1000000.0,
        "_rope_scaling": None,
        "model_type": "qwen2",
        "hidden_size": 96,
        "intermediate_size": 260,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "use_sliding_window": False,
        "max_window_layers": 8,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # qwen3 (0.6b-like): GQA (G=4), explicit head_dim 16 != 64/8, q_norm/k_norm.
    "qwen3": {
        "_architecture": "Qwen3ForCausalLM",
        "_implicit_head_dim": False,
        "_rope_theta": 1000000.0,
        "_rope_scaling": None,
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "attention_bias": False,
        "use_sliding_window": False,
        "max_window_layers": 8,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # gemma-2 (9b-like): GQA (G=2), head_dim 16 != 64/8, query_pre_attn_scalar = head_dim,
    # attention and final-logit soft-capping, sliding window every other layer (short
    # enough to act on test inputs), four (1 + w) norms per layer, scaled tied embeddings.
    "gemma2": {
        "_architecture": "Gemma2ForCausalLM",
        "_implicit_head_dim": False,
        "_rope_theta": 10000.0,
        "_rope_scaling": None,
        "model_type": "gemma2",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 12,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # gemma-3 text (12b-like): GQA (G=4), head_dim 16, q/k norms over head_dim, 5 sliding
    # layers per full one, local and global rope (linear scaling on the global one), tied.
    "gemma3": {
        "_architecture": "Gemma3ForCausalLM",
        "_implicit_head_dim": False,
        "_rope_theta": 1000000.0,
        "_rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "_rope_local_theta": 10000.0,
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 12,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # phi-3-medium: fused qkv_proj [Q | K | V] and gate_up_proj [gate | up], GQA (G=4),
    # implicit head_dim, a sliding window shorter than test inputs, not tied.
    "phi3": {
        "_architecture": "Phi3ForCausalLM",
        "_implicit_head_dim": True,
        "_rope_theta": 10000.0,
        "_rope_scaling": None,
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "sliding_window": 12,
        "pad_token_id": None,  # Phi3Config's default (32000) lies outside the tiny vocabulary
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
CASE_NAMES: tuple[str, ...] = tuple(FAMILY_CASES)

# Mixtures of experts, kept apart from FAMILY_CASES: the parametrized suites speak of dense
# MLP tensors; tests/test_families.py covers these.
MOE_CASES: dict[str, dict[str, Any]] = {
    # qwen3-30b-a3b: Qwen3 attention (GQA G=4, head_dim 16 != 64/8, q/k norms) and in every
    # layer 4 experts of 48 channels, 2 routed per token, normalised top-k weights.
    "qwen3_moe": {
        **FAMILY_CASES["qwen3"],
        "_architecture": "Qwen3MoeForCausalLM",
        "model_type": "qwen3_moe",
        "moe_intermediate_size": 48,  # intermediate_size (172) is unused: every layer is sparse
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
}

_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
    "qwen3_moe": transformers.Qwen3MoeConfig,
}


def _case(case: str) -> dict[str, Any]:
    try:
        return FAMILY_CASES[case] if case in FAMILY_CASES else MOE_CASES[case]
    except KeyError:
        raise KeyError(f"unknown case {case!r}; known: {', '.join([*FAMILY_CASES, *MOE_CASES])}") from None


# --------------------------------------------------------------------------- config


def tiny_config(case: str, **overrides: Any) -> transformers.PretrainedConfig:
    """Config for ``case``; ``overrides`` win over the case's fields.

    Besides ordinary config fields, ``rope_theta=`` and ``rope_scaling=`` are
    accepted (folded into transformers 5's ``rope_parameters``), and
    ``rope_scaling=None`` removes the case's scaling.
    """
    spec = copy.deepcopy(_case(case))
    rope_theta = overrides.pop("rope_theta", spec.pop("_rope_theta"))
    rope_scaling = overrides.pop("rope_scaling", spec.pop("_rope_scaling"))
    arch = spec.pop("_architecture")
    spec.pop("_implicit_head_dim")
    local_theta = spec.pop("_rope_local_theta", None)
    model_type = spec.pop("model_type")

    fields: dict[str, Any] = {**_COMMON, **spec, **overrides}
    if "rope_parameters" not in overrides:
        rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
        if rope_scaling:
            rope.update(copy.deepcopy(rope_scaling))
            rope["rope_theta"] = float(rope_theta)
        fields["rope_parameters"] = rope
        if local_theta is not None:  # Gemma 3: global rope on full layers, local rope on sliding ones
            local = {"rope_type": "default", "rope_theta": float(local_theta)}
            fields["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    # Implicit head_dim: derive it from (possibly overridden) hidden/heads.
    if _case(case)["_implicit_head_dim"] and "head_dim" not in overrides:
        fields.pop("head_dim", None)
    fields.setdefault("architectures", [arch])
    cfg = _CONFIG_CLASSES[model_type](**fields)
    return cfg


def expected_shapes(case_or_config: str | transformers.PretrainedConfig) -> dict[str, Any]:
    """Shape facts a test may want to check a (pruned or original) model against."""
    cfg = tiny_config(case_or_config) if isinstance(case_or_config, str) else case_or_config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": hd,
        "group_size": cfg.num_attention_heads // cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "q_out": cfg.num_attention_heads * hd,
        "kv_out": cfg.num_key_value_heads * hd,
        "qkv_bias": cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        "qk_norm": cfg.model_type in ("qwen3", "gemma3_text"),
        "tied": bool(cfg.tie_word_embeddings),
    }


# --------------------------------------------------------------------------- model


@torch.no_grad()
def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        elif "norm" in name and name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def tiny_model(case: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """Deterministic in-memory model (same weights ``make_base`` saves).

    Weights are always drawn in float32 and then cast, so a bf16 model is the
    rounded fp32 one for the same seed.  The global torch RNG is left untouched.
    """
    cfg = tiny_config(case, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    return model


def _hubify_config(path: Path, case: str, overrides: dict[str, Any]) -> None:
    """Rewrite config.json the way published checkpoints spell it."""
    cfg_path = path / "config.json"
    data = json.loads(cfg_path.read_text())
    rope = data.pop("rope_parameters", None)
    if rope is not None and "full_attention" in rope:  # Gemma 3 spells the local one apart
        data["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    if rope is not None:
        rope = dict(rope)
        data["rope_theta"] = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            data["rope_scaling"] = rope
    if "dtype" in data:
        data["torch_dtype"] = data.pop("dtype")
    # Published qwen2/qwen3 configs have no layer_types (transformers derives it).
    layer_types = data.get("layer_types")
    if layer_types is not None and set(layer_types) == {"full_attention"}:
        data.pop("layer_types")
    if data["model_type"] in ("gemma2", "gemma3_text"):  # the pattern is implied (gemma-3: sliding_window_pattern)
        data.pop("layer_types")
        if data.pop("_sliding_window_pattern", None) is not None:
            data["sliding_window_pattern"] = 6
        if data["model_type"] == "gemma2" and data["tie_word_embeddings"]:
            data.pop("tie_word_embeddings")  # as published: tied is Gemma2Config's default
    if "num_local_experts" in data:  # published Qwen3-MoE configs say num_experts
        data["num_experts"] = data.pop("num_local_experts")
    if _case(case)["_implicit_head_dim"] and "head_dim" not in overrides:
        data.pop("head_dim", None)
    cfg_path.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")


def make_base(
    dir: Path,
    case: str,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    seed: int = 0,
    tokenizer: bool = True,
    config_style: str = "hub",
    **overrides: Any,
) -> Path:
    """Build a tiny random ``case`` model and save it (safetensors) into ``dir``.

    ``max_shard_size`` (e.g. ``"200KB"``) gives a sharded checkpoint with
    ``model.safetensors.index.json``; ``None`` gives a single
    ``model.safetensors``.  ``tokenizer=True`` also saves :func:`tiny_tokenizer`.
    ``config_style``: ``"hub"`` (default, see module doc) or ``"transformers"``.
    Returns ``dir``.
    """
    if config_style not in ("hub", "transformers"):
        raise ValueError(f"config_style must be 'hub' or 'transformers', not {config_style!r}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(case, dtype=dtype, seed=seed, **overrides)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dir, safe_serialization=True, **kwargs)
    if config_style == "hub":
        _hubify_config(dir, case, overrides)
    if tokenizer:
        tiny_tokenizer().save_pretrained(dir)
    return dir


# --------------------------------------------------------------------------- data

_SUBJECTS = [
    "the old farmer",
    "a young doctor",
    "my neighbour",
    "the small cat",
    "our teacher",
    "the tall engineer",
    "a quiet student",
    "the brave pilot",
    "her brother",
    "the busy baker",
    "a clever fox",
    "the river guide",
    "his grandmother",
    "the new manager",
    "a lonely sailor",
]
_VERBS = [
    "walked to",
    "painted",
    "found",
    "cleaned",
    "visited",
    "built",
    "carried",
    "opened",
    "watched",
    "repaired",
    "described",
    "remembered",
    "followed",
    "counted",
    "ordered",
]
_OBJECTS = [
    "the red barn",
    "a wooden table",
    "the city library",
    "an empty bottle",
    "the green garden",
    "a heavy box",
    "the morning train",
    "a yellow kite",
    "the stone bridge",
    "a warm coat",
    "the blue window",
    "a long letter",
    "the northern market",
    "a silver spoon",
    "the quiet lake",
]
_ADVERBS = [
    "slowly",
    "quickly",
    "carefully",
    "happily",
    "again",
    "yesterday",
    "at noon",
    "before dinner",
    "in the rain",
    "after school",
    "with a smile",
    "without a word",
]
_CONNECT = ["because", "although", "while", "so", "and then", "but"]
_CLAUSES = [
    "it was cold outside",
    "the sun was bright",
    "nobody else was awake",
    "the road was long",
    "the bell rang twice",
    "a dog barked loudly",
    "the water was calm",
    "the wind grew stronger",
    "everyone was hungry",
    "the lights went out",
]
_QUESTIONS = [
    "Why did {s} go there?",
    "Where is {o}?",
    "Who {v} {o}?",
    "When will {s} come back?",
    "How many people saw {o}?",
]
_TEMPLATES = [
    "{S} {v} {o} {a}.",
    "{S} {v} {o} {c} {k}.",
    "{A}, {s} {v} {o}.",
    "{S} {v} {o}, {c} {k}.",
    "{Q}",
    "{S} {v} {o} {a}. {K2}.",
    "In {n} {y2}, {s} {v} {o}.",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def sample_texts(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` deterministic English-like sentences (no downloads)."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        a, c, k = rng.choice(_ADVERBS), rng.choice(_CONNECT), rng.choice(_CLAUSES)
        tpl = rng.choice(_TEMPLATES)
        q = rng.choice(_QUESTIONS).format(s=s, o=o, v=v)
        out.append(
            tpl.format(
                S=_cap(s),
                s=s,
                v=v,
                o=o,
                a=a,
                A=_cap(a),
                c=c,
                k=k,
                K2=_cap(rng.choice(_CLAUSES)),
                Q=_cap(q),
                n=rng.choice(["spring", "summer", "autumn", "winter"]),
                y2=str(rng.randint(1950, 2024)),
            )
        )
    return out


# --------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_TOKENIZER_CACHE: dict[str, Any] = {}


def _train_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = sample_texts(2000, seed=12345)
    corpus += [f"<|{r}|>\n" for r in ("system", "user", "assistant")] * 50
    corpus += [" ".join(str(i) for i in range(100)), "0123456789 .,;:!?'\"()-"] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    got = tok.get_vocab_size()
    if got != VOCAB_SIZE:  # pragma: no cover - guards the corpus
        raise RuntimeError(f"tiny tokenizer trained to {got} tokens, expected {VOCAB_SIZE}")
    for t, i in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID, PAD_ID)):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok.to_str()


def tiny_tokenizer(dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 512) with <s>/</s>/<pad>/<unk> and a chat template.

    Trained once per process (cached); each call returns a fresh tokenizer
    object.  Encoding prepends ``<s>`` (like llama); ``apply_chat_template``
    puts ``bos_token`` in the template and so does not double it.  If ``dir``
    is given the tokenizer is also saved there.
    """
    if "json" not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE["json"] = _train_tokenizer_json()
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_TOKENIZER_CACHE["json"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(dir)
    return tok
