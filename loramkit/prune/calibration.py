"""Layer-streamed calibration: run calibration text through a base one decoder layer at a time.

Every calibrated importance (Taylor, activation) needs the base's activations on calibration
text, and Taylor its gradients too. Loading the whole model for that costs the whole model's
memory (140 GB for a 70B base in bf16). Here the model never exists whole:

- the model is built on the meta device (no memory); its decoder layers are swapped for
  recorders, so the model's own forward computes what surrounds the layers (embeddings,
  rotary position embeddings, causal and sliding-window masks, final norm, lm_head) exactly
  as it does for inference, and hands each layer its arguments;
- **forward sweep**: embeddings, then layer by layer: the layer is built as the family's own
  transformers module with its tensors read straight from the checkpoint, run over every
  micro-batch, and freed. The activations at each layer boundary, for every sample, go to a
  :class:`BoundaryStore` (memory up to a byte budget, a temporary directory beyond it);
- **reverse sweep** (Taylor): loss from final norm + lm_head, then from the last layer to the
  first: recompute the layer's forward from its stored input, backpropagate the output
  gradient, accumulate the weight gradients over all micro-batches, reduce them to unit
  scores, and hand the input gradient down (it overwrites the input in the store);
- **pruning sweep** (Wanda, SparseGPT: :func:`sequential_prune`): the forward sweep, where each
  layer to be pruned runs twice over every micro-batch: once with hooks summing its
  projections' input statistics, then, pruned, to produce the next layer's input.

Peak memory: one decoder layer (weights in the compute dtype + gradient accumulators of the
pruned projections) + one micro-batch's activations through it + the in-memory boundaries
(at most ``budget`` bytes). The gradients are exact: the same chain rule as autograd over
the whole model, evaluated one layer at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import progress
from ..bundle.model_dir import Checkpoint
from ..bundle.safetensors_io import DTYPES, tensor_bytes
from ..errors import LoramError
from ..families import ATTENTION_ROLES, MLP_ROLES, ArchSpec
from ..families.geometry import expert_members, expert_part
from .taylor import DEFINITION as TAYLOR_DEFINITION
from .taylor import next_token_targets, taylor_group_scores, token_loss_sum

DEFAULT_SAMPLES = 128  # LLM-Pruner and Minitron calibrate on 128 samples ...
DEFAULT_SEQ_LEN = 512  # ... of 512 tokens (LoRAM's alignment uses the same block size)
DEFAULT_MICRO_BATCH = 4
DEFAULT_BUDGET = 4 << 30  # boundary activations kept in memory before spilling to disk

CALIBRATED = ("taylor", "activation")  # importances that run calibration text through the base
DEFINITIONS = {  # recorded in the manifest as pruning.importance_definition
    "taylor": TAYLOR_DEFINITION,
    "activation": (
        "Minitron activation: KV group = sum over its query heads of the mean over calibration tokens of the "
        "L2 norm of the head's attention output (o_proj input); channel = mean |act(gate) * up| (down_proj input; "
        "an expert's channel: summed over the tokens routed to the expert, over all tokens)"
    ),
}


# --------------------------------------------------------------------------- calibration text


@dataclass(frozen=True)
class Calibration:
    """Calibration token blocks: ``ids`` (N, T), every row a full block of the packed text."""

    ids: torch.Tensor
    sha256: str
    source: str

    @property
    def num_samples(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def record(self) -> dict[str, Any]:
        """The manifest's ``pruning.calibration`` (spec 3.4)."""
        return {
            "sha256": self.sha256,
            "source": self.source,
            "num_samples": self.num_samples,
            "num_tokens": self.ids.numel(),
            "seq_len": self.seq_len,
            "packing": "concatenated",
        }


def read_calibration(path: Path) -> tuple[list[str], str]:
    """Texts of a calibration file (.txt: blank-line separated passages; .jsonl: 'text'), and its sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoramError(f"{path}: cannot read calibration file ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise LoramError(f"{path}:{n}: not a JSON line") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
                    texts.append(row["text"])
    else:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not texts:
        raise LoramError(f"{path}: no calibration text found (.txt passages or .jsonl rows with 'text')")
    return texts, hashlib.sha256(raw).hexdigest()


def load_calibration(
    path: Path, base_dir: Path, max_positions: int | None, num_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN
) -> Calibration:
    """Tokenize a calibration file with the base's tokenizer and pack it into blocks of ``seq_len``.

    Passages are tokenized with the tokenizer's special tokens (a BOS starts each one) and
    concatenated; the first ``num_samples`` full blocks are used, fewer when the file holds
    less. A file shorter than one block gives one block of all its tokens. Packing (as
    LLM-Pruner and Minitron sample fixed-length windows) means no padding: every token
    counts, and the engine needs no attention mask beyond the model's causal one.
    """
    if num_samples < 1:
        raise LoramError(f"--calibration-samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise LoramError(f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise LoramError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_positions}); use at most {max_positions}"
        )
    texts, digest = read_calibration(path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise LoramError(f"{base_dir}: calibrated importance needs the base's tokenizer files ({exc})") from None
    stream: list[int] = []
    wanted = num_samples * seq_len
    for text in texts:
        stream += _leading_ids(tok, text, wanted - len(stream))
        if len(stream) >= wanted:
            break
    blocks = min(num_samples, len(stream) // seq_len)
    if blocks == 0:
        if len(stream) < 2:
            raise LoramError(f"{path}: the calibration text tokenizes to {len(stream)} token(s); give at least 2")
        ids = torch.tensor([stream], dtype=torch.long)  # (1, len): shorter than one block
    else:
        ids = torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)  # (N, T)
    return Calibration(ids, digest, path.name)


def _leading_ids(tok: Any, text: str, needed: int) -> list[int]:
    """The ids of ``text`` (special tokens on), or at least the first ``needed`` of them.

    A fast tokenizer keeps ~450 bytes a token of what it encodes, so a huge one-passage file
    is not encoded whole: a prefix cut before a space or newline (where pre-tokenizers split,
    so its ids are the whole's up to the cut) of 16 characters a needed token, longer until
    it gives enough ids.
    """
    limit = 16 * needed + 1024
    while True:
        if len(text) <= limit:
            return tok(text, add_special_tokens=True, verbose=False)["input_ids"]
        cut = max(text.rfind(" ", 1, limit), text.rfind("\n", 1, limit))
        ids = tok(text[: cut if cut > 0 else limit], add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) >= needed + 2:  # the last ids may be the cut's or an appended EOS: keep those before
            return ids[:needed]
        limit *= 4


# --------------------------------------------------------------------------- boundary store


class BoundaryStore:
    """Activations (or gradients) at layer boundaries: ``slot`` -> (N, T, H), written by micro-batch.

    A slot lives in memory while the slots in memory total at most ``budget`` bytes, else in
    a file of a temporary directory under ``offload_dir``, read back with positioned reads
    into fresh tensors. The directory is removed by :meth:`close`, which the context manager
    calls on any exit, Ctrl-C included.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, budget: int, offload_dir: Path | None):
        self.shape, self.dtype, self.budget = shape, dtype, budget
        self.row_bytes = shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = shape[0] * self.row_bytes
        self.offload_dir = offload_dir
        self._mem: dict[int, torch.Tensor] = {}
        self._fds: dict[int, int] = {}
        self._tmp: Path | None = None
        self.peak_memory = 0  # bytes of slots held in memory at once, for the record
        self.disk_slots = 0

    def _open(self, slot: int) -> None:
        if self.slot_bytes * (len(self._mem) + 1) <= self.budget:
            self._mem[slot] = torch.empty(self.shape, dtype=self.dtype)
            self.peak_memory = max(self.peak_memory, self.slot_bytes * len(self._mem))
            return
        if self._tmp is None:
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix="loramkit-calibration-", dir=self.offload_dir))
            except OSError as exc:
                where = self.offload_dir or tempfile.gettempdir()
                raise LoramError(
                    f"{where}: cannot create a folder for boundary activations ({exc.strerror}); use --offload-dir"
                ) from None
        self._fds[slot] = os.open(self._tmp / f"boundary-{slot}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.disk_slots += 1

    def put(self, slot: int, start: int, t: torch.Tensor) -> None:
        """Write rows ``start : start + len(t)`` of a slot."""
        t = t.detach().to("cpu", self.dtype)
        if slot not in self._mem and slot not in self._fds:
            self._open(slot)
        if slot in self._mem:
            self._mem[slot][start : start + t.shape[0]] = t
            return
        view, offset = tensor_bytes(t), start * self.row_bytes
        try:
            while len(view):
                n = os.pwrite(self._fds[slot], view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:  # a full disk, most likely: one line, and close() still cleans up
            raise LoramError(
                f"{self._tmp}: cannot write boundary activations ({exc.strerror}); free space there, "
                "choose another --offload-dir or raise --activation-budget"
            ) from None

    def get(self, slot: int, start: int, rows: int) -> torch.Tensor:
        """Rows ``start : start + rows`` of a slot, as a fresh tensor (rows, T, H)."""
        if slot in self._mem:
            return self._mem[slot][start : start + rows].clone()
        out = torch.empty((rows, *self.shape[1:]), dtype=self.dtype)
        view, offset = tensor_bytes(out), start * self.row_bytes
        while len(view):
            n = os.preadv(self._fds[slot], [view], offset)
            if n == 0:
                raise LoramError(f"{self._tmp}: boundary file {slot} is shorter than written (removed while in use?)")
            view, offset = view[n:], offset + n
        return out

    def drop(self, slot: int) -> None:
        self._mem.pop(slot, None)
        fd = self._fds.pop(slot, None)
        if fd is not None:
            os.close(fd)
            (self._tmp / f"boundary-{slot}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        for slot in list(self._mem) + list(self._fds):
            self.drop(slot)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> BoundaryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_offload_dir(path: Path | None) -> None:
    """Refuse an --offload-dir that cannot take files, before any long work."""
    if path is None:
        return
    try:
        probe = Path(tempfile.mkdtemp(prefix="loramkit-probe-", dir=path))
        probe.rmdir()
    except OSError as exc:
        raise LoramError(f"--offload-dir {path} is not a writable directory ({exc.strerror}); choose another") from None


# --------------------------------------------------------------------------- the model around the layers


class _Stop(Exception):
    """Ends a forward pass once the last recorder has seen its arguments."""


class _Slot(nn.Module):
    """Stands in for decoder layer ``index``: hands its call to the skeleton's current mode."""

    def __init__(self, index: int, call: Callable[..., torch.Tensor]):
        super().__init__()
        self.index, self._call = index, call

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call(self.index, hidden_states, args, kwargs)


def _read(ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A checkpoint tensor in ``dtype`` on ``device``, converted 16 MiB at a time (no second full copy)."""
    info = ckpt.info(name)
    stored = DTYPES[info.dtype]
    if stored == dtype or info.numel == 0:
        return ckpt.get(name).to(device, dtype)
    out = torch.empty(info.shape, dtype=dtype)
    flat, pos = out.view(-1), 0
    for piece in ckpt.reader_of(name).chunks(name, 16 << 20):
        part = torch.frombuffer(piece, dtype=stored)  # a view of the reader's reused buffer
        flat[pos : pos + part.numel()] = part
        pos += part.numel()
    return out.to(device)


def _set_param(root: nn.Module, name: str, value: torch.Tensor, requires_grad: bool = False) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, nn.Parameter(value, requires_grad=requires_grad))


class _Skeleton:
    """The base's transformers model on the meta device, decoder layers replaced by slots.

    Its forward, run for real, computes what the model computes around its layers: with the
    embeddings loaded it yields the first layer's input and every layer's keyword arguments
    (rotary position embeddings, the mask of that layer's attention type); with the final
    norm and lm_head loaded it turns the last layer's output into logits.
    """

    def __init__(self, base_dir: Path, ckpt: Checkpoint, arch: ArchSpec, dtype: torch.dtype, device: torch.device):
        import transformers

        self.ckpt, self.arch, self.dtype, self.device = ckpt, arch, dtype, device
        self.config = transformers.AutoConfig.from_pretrained(base_dir)
        self.config.use_cache = False
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        if arch.num_experts and dtype == torch.float64:  # transformers' grouped_mm experts have no float64
            self.model.config._experts_implementation = "eager"
        self.model.eval()  # no dropout: scores must not depend on it
        for p in self.model.parameters():
            p.requires_grad_(False)
        prefix = arch.family.layers_prefix
        self.layers: list[nn.Module] = list(self.model.get_submodule(prefix))
        parent, _, attr = prefix.rpartition(".")
        slots = nn.ModuleList(_Slot(i, self._dispatch) for i in range(len(self.layers)))
        setattr(self.model.get_submodule(parent), attr, slots)
        self._real_buffers(self.model)
        self._mode: Callable[..., torch.Tensor] | None = None
        self._layer_args: dict[int, list[tuple[tuple, dict]]] = {}  # rows -> per layer (args, kwargs)

    def _real_buffers(self, root: nn.Module) -> None:
        """Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are in no checkpoint:
        make them real and let the model's own ``_init_weights`` compute them, as from_pretrained does."""
        for module in root.modules():
            meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
            for n in meta:
                module._buffers[n] = torch.empty_like(module._buffers[n], device=self.device)
            if meta:
                self.model._init_weights(module)

    def _dispatch(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self._mode(index, hidden, args, kwargs)

    # -- weights outside the decoder layers

    def _outside_layers(self) -> list[str]:
        inside = self.arch.family.layers_prefix + "."
        return [n for n, _ in self.model.named_parameters() if not n.startswith(inside)]

    def _load(self, names: list[str]) -> None:
        for name in names:
            stored = name
            if name not in self.ckpt.where and name == f"{self.arch.family.lm_head}.weight" and self.arch.tie_word_embeddings:
                stored = f"{self.arch.family.embeddings}.weight"  # tied: lm_head is the embeddings
            if stored not in self.ckpt.where:
                raise LoramError(f"{self.ckpt.path}: tensor {stored} is missing; the checkpoint is incomplete")
            _set_param(self.model, name, _read(self.ckpt, stored, self.dtype, self.device))

    def _unload(self, names: list[str]) -> None:
        for name in names:
            p = self.model.get_parameter(name)
            _set_param(self.model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Yield ``embed(ids) -> first layer's input (rows, T, H)``; records every layer's arguments."""
        names = [n for n in self._outside_layers() if n.startswith(self.arch.family.embeddings + ".")]
        self._load(names)
        last = len(self.layers) - 1
        seen: dict[str, Any] = {}

        def record(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            if index == 0:
                seen["hidden"], seen["per_layer"] = hidden, []
            seen["per_layer"].append((args, kwargs))
            if index == last:
                raise _Stop
            return hidden

        def embed(ids: torch.Tensor) -> torch.Tensor:
            self._mode = record
            try:
                with torch.no_grad():
                    self.model(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                self._mode = None
            self._layer_args.setdefault(ids.shape[0], seen["per_layer"])
            return seen.pop("hidden")

        try:
            yield embed
        finally:
            self._unload(names)

    def layer_args(self, index: int, rows: int) -> tuple[tuple, dict]:
        """Arguments the model passes decoder layer ``index`` for a micro-batch of ``rows`` samples."""
        return self._layer_args[rows][index]

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Yield ``logits(last_hidden (rows, T, H)) -> (rows, T, V)`` through the model's final norm and lm_head."""
        names = [n for n in self._outside_layers() if not n.startswith(self.arch.family.embeddings + ".")]
        self._load(names)
        last = len(self.layers) - 1
        fed: dict[str, torch.Tensor] = {}

        def feed(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            return fed["hidden"] if index == last else hidden

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            fed["hidden"], self._mode = hidden, feed
            try:
                # The model embeds nothing here: its input is a placeholder the last slot replaces.
                dummy = torch.zeros_like(hidden, requires_grad=False)
                return self.model(inputs_embeds=dummy, use_cache=False).logits
            finally:
                self._mode, fed["hidden"] = None, None

        try:
            yield logits
        finally:
            self._unload(names)

    # -- decoder layers

    @contextlib.contextmanager
    def layer(self, index: int, trainable: set[str] = frozenset()) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights read from the checkpoint; freed on exit.

        ``trainable``: parameter names (relative to the layer) that get gradients.
        """
        module = self.layers[index]
        prefix = f"{self.arch.family.layers_prefix}.{index}."
        names = [n for n, _ in module.named_parameters()]
        for n in names:
            members = expert_members(self.arch, prefix + n) if prefix + n not in self.ckpt.where else []
            if members:  # a fused expert tensor, stored one expert weight at a time
                value = torch.empty(module.get_parameter(n).shape, dtype=self.dtype, device=self.device)
                for stored, e, role in members:
                    expert_part(value, e, role).copy_(_read(self.ckpt, stored, self.dtype, self.device))
                _set_param(module, n, value, n in trainable)
                continue
            if prefix + n not in self.ckpt.where:
                raise LoramError(
                    f"{self.ckpt.path}: {self.arch.architecture} layer {index} needs tensor {prefix + n}, "
                    "which the checkpoint lacks; calibrated importance cannot read this layout"
                )
            _set_param(module, n, _read(self.ckpt, prefix + n, self.dtype, self.device), n in trainable)
        self._real_buffers(module)
        try:
            yield module
        finally:
            for n in names:
                p = module.get_parameter(n)
                _set_param(module, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def run_layer(self, module: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.layer_args(index, hidden.shape[0])
        out = module(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs; none of it changes the scores beyond floating-point rounding."""

    micro_batch: int = DEFAULT_MICRO_BATCH
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    budget: int = DEFAULT_BUDGET
    offload_dir: Path | None = None
    show_progress: bool = True


def _batches(n: int, micro_batch: int) -> list[tuple[int, int]]:
    """(start, rows) of each micro-batch."""
    return [(s, min(micro_batch, n - s)) for s in range(0, n, micro_batch)]


def _scored_params(arch: ArchSpec, layer_module: nn.Module) -> list[str]:
    """Layer-relative names of the parameters a unit's Taylor score sums over (projections, row biases)."""
    names = {n for n, _ in layer_module.named_parameters()}
    out = []
    for role, dim, _kind in ATTENTION_ROLES + MLP_ROLES:
        rel = arch.family.modules[role]
        out.append(f"{rel}.weight")
        if dim == 0 and f"{rel}.bias" in names:  # o/down biases live in hidden space, shared by all units
            out.append(f"{rel}.bias")
    out += [f"{arch.family.experts}.{p}" for p in ("gate_up_proj", "down_proj")] if arch.num_experts else []
    return [n for n in dict.fromkeys(out) if n in names]  # a fused module (Phi-3 qkv_proj) once


def _forward_sweep(
    skel: _Skeleton,
    calib: Calibration,
    settings: EngineSettings,
    store: BoundaryStore,
    *,
    upto: int,
    keep_from: int,
    on_layer: Callable[[int, nn.Module], contextlib.AbstractContextManager] | None = None,
    label: str = "calibration: forward",
) -> None:
    """Embeddings, then layers 0..upto-1; slot i holds layer i's input, kept for i >= keep_from (and slot ``upto``)."""
    batches = _batches(calib.num_samples, settings.micro_batch)
    with skel.embeddings() as embed:
        for start, rows in batches:
            store.put(0, start, embed(calib.ids[start : start + rows]))
    with progress.task(label, upto, unit="layers", show=settings.show_progress) as advance:
        for i in range(upto):
            with skel.layer(i) as module, on_layer(i, module) if on_layer else contextlib.nullcontext():
                with torch.no_grad():
                    for start, rows in batches:
                        x = store.get(i, start, rows).to(skel.device)
                        store.put(i + 1, start, skel.run_layer(module, i, x))
            if i < keep_from:
                store.drop(i)
            advance(1)


# Projections that read the same input share one statistic: q, k and v read the attention's
# normed input, gate and up the MLP's; o and down each read their own.
_INPUT_OF_ROLE = {"q": "attention", "k": "attention", "v": "attention", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
STATISTICS = ("squares", "gram")


@dataclass(frozen=True)
class InputStatistic:
    """A projection's input over every calibration token: ``value`` is the sum of x_j^2 per
    feature ``(in,)`` (``squares``) or of x x^T ``(in, in)`` (``gram``), over ``tokens`` rows."""

    value: torch.Tensor
    tokens: int


PruneLayer = Callable[[int, dict[str, tuple[torch.Tensor, InputStatistic]]], dict[str, torch.Tensor]]


def sequential_prune(
    base_dir: Path,
    arch: ArchSpec,
    layers: list[int],
    calib: Calibration,
    statistic: str,
    prune_layer: PruneLayer,
    settings: EngineSettings = EngineSettings(),
) -> None:
    """Prune ``layers`` one after the other, each on the inputs the already-pruned layers before it give.

    For each decoder layer up to the last of ``layers``, in order: load it; if it is to be
    pruned, run every calibration micro-batch through it with hooks summing each projection's
    input ``statistic``, call ``prune_layer(index, {module path: (weight, statistic)})`` (weights
    in the engine's dtype; a fused Phi-3 projection once) and put the dense pruned weights it
    returns into the layer; then run the (pruned) layer over every micro-batch to produce the
    next layer's input, as SparseGPT's and Wanda's sequential references do. Layers left intact
    are just run through. Sums accumulate in float32 (float64 when the engine runs in float64).
    """
    if statistic not in STATISTICS:
        raise ValueError(statistic)
    check_offload_dir(settings.offload_dir)
    if not layers:
        return
    wanted = set(layers)
    acc_dtype = torch.float64 if settings.dtype == torch.float64 else torch.float32
    with _engine(base_dir, arch, calib, settings) as (skel, store):
        batches = _batches(calib.num_samples, settings.micro_batch)

        def statistics(i: int, module: nn.Module) -> dict[str, tuple[nn.Module, InputStatistic]]:
            """Each projection (module path -> module) with its input statistic from one pass over the calibration."""
            family, prefix = arch.family, f"{arch.family.layers_prefix}.{i}."
            sums: dict[str, torch.Tensor] = {}
            tokens: dict[str, int] = {}
            hooked: dict[str, str] = {}  # module path -> input it reads
            handles = []
            for role in family.modules:
                rel = family.modules[role]
                key = _INPUT_OF_ROLE[role]
                if prefix + rel in hooked:
                    continue  # a fused module (Phi-3 qkv_proj): one weight, its first role's input
                hooked[prefix + rel] = key
                if key in tokens:
                    continue  # another projection already sums this input
                tokens[key] = 0

                def add(_m: nn.Module, inp: tuple, key: str = key) -> None:
                    x = inp[0].reshape(-1, inp[0].shape[-1]).to(acc_dtype)  # (rows * T, in)
                    if key not in sums:
                        width = x.shape[1]
                        shape = (width,) if statistic == "squares" else (width, width)
                        sums[key] = torch.zeros(shape, dtype=acc_dtype, device=x.device)
                    if statistic == "squares":
                        sums[key].add_(x.square().sum(dim=0))
                    else:
                        sums[key].addmm_(x.T, x)  # (in, rows * T) @ (rows * T, in)
                    tokens[key] += x.shape[0]

                handles.append(module.get_submodule(rel).register_forward_pre_hook(add))
            try:
                with torch.no_grad():
                    for start, rows in batches:
                        skel.run_layer(module, i, store.get(i, start, rows).to(skel.device))
            finally:
                for h in handles:
                    h.remove()
            return {
                path: (module.get_submodule(path[len(prefix) :]), InputStatistic(sums[key], tokens[key]))
                for path, key in hooked.items()
            }

        @contextlib.contextmanager
        def prune_before_run(i: int, module: nn.Module) -> Iterator[None]:
            if i in wanted:
                stats = statistics(i, module)
                pruned = prune_layer(i, {path: (m.weight.detach(), s) for path, (m, s) in stats.items()})
                del stats
                with torch.no_grad():
                    for path, weight in pruned.items():
                        module.get_submodule(path[len(f"{arch.family.layers_prefix}.{i}.") :]).weight.copy_(weight)
            yield

        upto = max(layers) + 1
        _forward_sweep(
            skel, calib, settings, store, upto=upto, keep_from=upto, on_layer=prune_before_run, label="calibration: pruning"
        )


@contextlib.contextmanager
def _engine(
    base_dir: Path, arch: ArchSpec, calib: Calibration, settings: EngineSettings
) -> Iterator[tuple[_Skeleton, BoundaryStore]]:
    """The model skeleton over the checkpoint and an empty boundary store, both released on exit."""
    check_offload_dir(settings.offload_dir)
    ckpt = Checkpoint(base_dir)
    try:
        skel = _Skeleton(base_dir, ckpt, arch, settings.dtype, torch.device(settings.device))
        shape = (calib.num_samples, calib.seq_len, arch.hidden_size)  # (N, T, H) per boundary
        with BoundaryStore(shape, settings.dtype, settings.budget, settings.offload_dir) as store:
            yield skel, store
    finally:
        ckpt.close()


def calibrated_scores(
    base_dir: Path,
    arch: ArchSpec,
    layers: list[int],
    calib: Calibration,
    importance: str,
    settings: EngineSettings = EngineSettings(),
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of ``layers``: (kv_group_scores (H_kv,), channel_scores (I,)) float64, on CPU.

    ``importance``: ``taylor`` (forward + reverse sweep) or ``activation`` (forward sweep).
    """
    if importance not in CALIBRATED:
        raise ValueError(importance)
    check_offload_dir(settings.offload_dir)
    if not layers:
        return {}
    with _engine(base_dir, arch, calib, settings) as (skel, store):
        sweep = _activation if importance == "activation" else _taylor
        return sweep(skel, calib, settings, store, sorted(layers))


def final_hidden_states(
    base_dir: Path, arch: ArchSpec, calib: Calibration, settings: EngineSettings = EngineSettings()
) -> torch.Tensor:
    """The last decoder layer's output for every calibration block, (N, T, H), by the forward sweep alone."""
    with _engine(base_dir, arch, calib, settings) as (skel, store):
        L = len(skel.layers)
        _forward_sweep(skel, calib, settings, store, upto=L, keep_from=L)
        return store.get(L, 0, calib.num_samples)


def _activation(
    skel: _Skeleton, calib: Calibration, settings: EngineSettings, store: BoundaryStore, layers: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Minitron's activation importance: mean magnitude of each head's and channel's output."""
    arch = skel.arch
    wanted = set(layers)
    heads, channels = {}, {}

    @contextlib.contextmanager
    def hooks(i: int, module: nn.Module) -> Iterator[None]:
        if i not in wanted:
            yield
            return
        head = torch.zeros(arch.num_attention_heads, dtype=torch.float64, device=skel.device)
        chan = torch.zeros(max(arch.num_experts, 1), arch.intermediate_size, dtype=torch.float64, device=skel.device)

        def on_o(_m: nn.Module, inp: tuple) -> None:  # o_proj input: (rows, T, H * hd), heads concatenated
            x = inp[0].reshape(*inp[0].shape[:-1], arch.num_attention_heads, arch.head_dim)  # (rows, T, H, hd)
            head.add_(torch.linalg.vector_norm(x.double(), dim=-1).sum(dim=(0, 1)))

        def on_down(_m: nn.Module, inp: tuple) -> None:  # down_proj input: act(gate) * up, (rows, T, I)
            chan[0].add_(inp[0].double().abs().sum(dim=(0, 1)))

        def on_experts(m: nn.Module, inp: tuple) -> None:
            """Each expert's down input, act(gate) * up, over the tokens routed to it (a mixture has no down module)."""
            x, routed = inp[0], inp[1]  # (tokens, H), (tokens, top_k) expert indices
            for e in range(arch.num_experts):
                rows = (routed == e).any(dim=-1)
                if rows.any():
                    gate, up = nn.functional.linear(x[rows], m.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, I) each
                    chan[e].add_((m.act_fn(gate) * up).double().abs().sum(dim=0))

        down = (arch.family.experts, on_experts) if arch.num_experts else (arch.family.modules["down"], on_down)
        handles = [
            module.get_submodule(arch.family.modules["o"]).register_forward_pre_hook(on_o),
            module.get_submodule(down[0]).register_forward_pre_hook(down[1]),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        n = calib.ids.numel()
        # A KV group's score sums its G query heads' (rows of o_proj's input are grouped by kv head).
        heads[i] = (head / n).view(arch.num_key_value_heads, arch.group_size).sum(dim=1).cpu()
        channels[i] = (chan / n).cpu() if arch.num_experts else (chan[0] / n).cpu()  # a mixture: (E, I), over all n tokens

    _forward_sweep(skel, calib, settings, store, upto=max(layers) + 1, keep_from=max(layers) + 1, on_layer=hooks)
    return {i: (heads[i], channels[i]) for i in layers}


def _taylor(
    skel: _Skeleton, calib: Calibration, settings: EngineSettings, store: BoundaryStore, layers: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """First-order Taylor (LLM-Pruner param_first): sum over each unit's group of |w * dL/dw|.

    L is the mean next-token loss over every calibration token; each micro-batch contributes
    its summed token losses / the total count, so accumulated gradients are exactly dL/dw.
    """
    arch, device, L = skel.arch, skel.device, len(skel.layers)
    first = layers[0]
    wanted = set(layers)
    batches = _batches(calib.num_samples, settings.micro_batch)
    predicted = calib.num_samples * (calib.seq_len - 1)  # every token but each row's first is a target
    _forward_sweep(skel, calib, settings, store, upto=L, keep_from=first)

    # Loss from the final norm + lm_head: slot L turns from the last hidden state into dL/d(it).
    # Both act on each position alone, so the loss runs over spans of positions: a span's logits
    # are 1/8 of lm_head's size (the run's largest tensors otherwise), still a GEMM of H/8 rows.
    targets = next_token_targets(calib.ids)  # (N, T)
    span = max(16, arch.hidden_size // 8)
    with skel.head() as logits_of:
        for start, rows in batches:
            hidden = store.get(L, start, rows)  # (rows, T, H)
            grad = torch.empty_like(hidden)
            for r in range(rows):
                for p in range(0, calib.seq_len, span):
                    h = hidden[r : r + 1, p : p + span].to(device).requires_grad_(True)  # (1, span, H)
                    loss = token_loss_sum(logits_of(h), targets[start + r : start + r + 1, p : p + span].to(device))
                    (loss / predicted).backward()
                    grad[r, p : p + span] = h.grad[0]
                    del h, loss
            store.put(L, start, grad)
            del hidden, grad

    scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    acc_dtype = torch.float64 if settings.dtype == torch.float64 else torch.float32
    with progress.task("calibration: gradients", L - first, unit="layers", show=settings.show_progress) as advance:
        for i in range(L - 1, first - 1, -1):
            trainable = _scored_params(arch, skel.layers[i]) if i in wanted else []
            with skel.layer(i, set(trainable)) as module:
                acc: dict[str, torch.Tensor] = {}
                hooks = []
                for name in trainable:
                    p = module.get_parameter(name)
                    acc[name] = torch.zeros(p.shape, dtype=acc_dtype, device=device)

                    def add(param: torch.Tensor, into: torch.Tensor = acc[name]) -> None:
                        into.add_(param.grad)
                        param.grad = None  # one micro-batch's gradient alive at a time

                    hooks.append(p.register_post_accumulate_grad_hook(add))
                for start, rows in batches:
                    x = store.get(i, start, rows).to(device).requires_grad_(i > first)
                    out = skel.run_layer(module, i, x)
                    out.backward(store.get(i + 1, start, rows).to(device))
                    if i > first:
                        store.put(i, start, x.grad)  # the input is spent: its slot now holds dL/d(input)
                    del x, out
                for h in hooks:
                    h.remove()
                store.drop(i + 1)
                if i in wanted:
                    prefix = f"{arch.family.layers_prefix}.{i}."
                    scores[i] = taylor_group_scores(
                        arch, i, {prefix + n: (module.get_parameter(n).detach(), acc[n]) for n in trainable}
                    )
                del acc
            advance(1)
    return scores


__all__ = [
    "BoundaryStore",
    "CALIBRATED",
    "Calibration",
    "DEFAULT_BUDGET",
    "DEFAULT_MICRO_BATCH",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "DEFINITIONS",
    "EngineSettings",
    "InputStatistic",
    "STATISTICS",
    "calibrated_scores",
    "check_offload_dir",
    "final_hidden_states",
    "load_calibration",
    "read_calibration",
    "sequential_prune",
]
