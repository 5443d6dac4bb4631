"""The layer-streamed calibration engine (loramkit.prune.calibration) against whole-model autograd.

References are plain transformers models in float64: one forward over every calibration
block, the mean next-token loss computed here, one backward. The engine runs in float64 too,
in uneven micro-batches, so the two differ only by summation order: agreement is asserted to
1e-12 relative to the largest score (float64 eps is 2.2e-16; a score sums about 10^4 products
through 8 layers, so accumulated rounding stays far below 1e-12). Gradients are reduced to
unit scores with the package's group reduction, whose geometry test_prune checks against its
own oracles; what is under test here is the engine's gradients and activations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import loramkit.prune.calibration as cal_mod
from loramkit.cli import run
from loramkit.errors import LoramError
from loramkit.families import ArchSpec
from loramkit.prune.calibration import (
    EngineSettings,
    calibrated_scores,
    final_hidden_states,
    load_calibration,
)
from loramkit.prune.pruner import prune
from loramkit.prune.taylor import taylor_group_scores, whole_model_taylor_scores
from tests.factory import sample_texts

SAMPLES, SEQ_LEN = 5, 24  # micro-batches of 2: 2 + 2 + 1 rows
F64 = EngineSettings(micro_batch=2, dtype=torch.float64, show_progress=False)
RTOL = 1e-12


def _arch(base: Path) -> ArchSpec:
    return ArchSpec.from_config(json.loads((base / "config.json").read_text()))


def _calib_file(tmp_path: Path, n: int = 40) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(sample_texts(n, seed=5)) + "\n", encoding="utf-8")
    return p


def _calib(base: Path, tmp_path: Path):
    return load_calibration(_calib_file(tmp_path), base, 256, SAMPLES, SEQ_LEN)


def _pruned(arch: ArchSpec) -> list[int]:
    return list(range(2, arch.num_hidden_layers - 1))  # prune's default for 8 layers


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max())
    assert scale > 0, what
    err = float((got - want).abs().max())
    assert err <= RTOL * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _scored(arch: ArchSpec, params: dict[str, torch.nn.Parameter], layer: int) -> list[str]:
    names = []
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        module = arch.family.module(layer, role)
        names += [f"{module}.weight"] + ([f"{module}.bias"] if role in ("q", "k", "v", "gate", "up") else [])
    return [n for n in dict.fromkeys(names) if n in params]


def _tap(acc: torch.Tensor, per_token):
    """A forward pre-hook adding ``per_token(input)`` summed over (N, T) to ``acc``; the input is left alone."""

    def hook(_module, args):
        acc.add_(per_token(args[0]).sum((0, 1)))

    return hook


def reference(base: Path, arch: ArchSpec, layers: list[int], ids: torch.Tensor):
    """The whole model in float64, one forward over every block and one backward of the mean token loss.

    Returns the last decoder layer's output (N, T, H), Taylor scores per layer, and activation
    sums per layer: per-head L2 norms of o_proj's input (H,), |down_proj input| per channel (I,).
    """
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    model.eval()
    seen, heads, chans = {}, {}, {}
    last = model.get_submodule(f"{arch.family.layers_prefix}.{arch.num_hidden_layers - 1}")
    last.register_forward_hook(
        lambda _m, _i, out: seen.update(h=(out[0] if isinstance(out, tuple) else out).detach())
    )  # -> None: output kept
    for i in layers:
        heads[i] = torch.zeros(arch.num_attention_heads, dtype=torch.float64)
        chans[i] = torch.zeros(arch.intermediate_size, dtype=torch.float64)
        # o_proj input (N, T, H * hd) -> per-head L2 norms (N, T, H); down_proj input (N, T, I)
        o = model.get_submodule(arch.family.module(i, "o"))
        o.register_forward_pre_hook(_tap(heads[i], lambda x: x.detach().unflatten(-1, (-1, arch.head_dim)).norm(dim=-1)))
        model.get_submodule(arch.family.module(i, "down")).register_forward_pre_hook(_tap(chans[i], lambda x: x.detach().abs()))
    logits = model(input_ids=ids, use_cache=False).logits  # (N, T, V) float64
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    params = dict(model.named_parameters())
    taylor = {
        i: taylor_group_scores(arch, i, {n: (params[n].detach(), params[n].grad) for n in _scored(arch, params, i)})
        for i in layers
    }
    return seen["h"], taylor, heads, chans


# ---------------------------------------------------------------------------- exactness


def test_engine_equals_whole_model_autograd(make_base_dir, tmp_path, family_case):
    """Forward sweep, Taylor (reverse sweep) and activation scores against one float64 whole-model pass."""
    base = make_base_dir(family_case)
    arch, calib = _arch(base), _calib(base, tmp_path)
    assert calib.ids.shape == (SAMPLES, SEQ_LEN)
    layers = _pruned(arch)
    hidden, taylor, heads, chans = reference(base, arch, layers, calib.ids)

    got = final_hidden_states(base, arch, calib, F64)
    assert got.shape == (SAMPLES, SEQ_LEN, arch.hidden_size)
    _close(got, hidden, "last decoder layer output")

    got = calibrated_scores(base, arch, layers, calib, "taylor", F64)
    for i in layers:
        _close(got[i][0], taylor[i][0], f"taylor layer {i} kv groups")
        _close(got[i][1], taylor[i][1], f"taylor layer {i} channels")
        assert (got[i][0] > 0).all() and (got[i][1] > 0).all()

    got = calibrated_scores(base, arch, layers, calib, "activation", F64)
    n = calib.ids.numel()
    for i in layers:  # a KV group sums its G query heads' mean norms
        _close(got[i][0], (heads[i] / n).view(arch.num_key_value_heads, -1).sum(1), f"activation layer {i} kv groups")
        _close(got[i][1], chans[i] / n, f"activation layer {i} channels")


def test_whole_model_reference_path_agrees(make_base_dir, tmp_path):
    """taylor.whole_model_taylor_scores (what the benchmark compares with) computes the same scores."""
    base = make_base_dir("qwen2")
    arch, calib = _arch(base), _calib(base, tmp_path)
    got = whole_model_taylor_scores(base, arch, [2, 5], calib, micro_batch=3, dtype=torch.float64)
    _, want, _, _ = reference(base, arch, [2, 5], calib.ids)
    for i in (2, 5):
        _close(got[i][0], want[i][0], f"layer {i} kv groups")
        _close(got[i][1], want[i][1], f"layer {i} channels")


# ---------------------------------------------------------------------------- cut units


def _cut_base(base: Path, tmp_path: Path, arch: ArchSpec, layer: int, group: int, channel: int, what: str) -> Path:
    """A copy of ``base`` where one KV group and one MLP channel of ``layer`` are cut off.

    ``what="outputs"``: their o_proj columns and down_proj column are zero (nothing they
    compute reaches the residual stream). ``what="values"``: the group's v rows (and bias)
    and the channel's up row (and bias) are zero (their outputs are zero).
    """
    out = tmp_path / "cut"
    shutil.copytree(base, out)
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)
        tensors, changed = load_file(str(f)), False
        hd, G = arch.head_dim, arch.group_size
        cuts = {
            "outputs": [("o", 1, slice(group * G * hd, (group + 1) * G * hd)), ("down", 1, slice(channel, channel + 1))],
            "values": [("v", 0, slice(group * hd, (group + 1) * hd)), ("up", 0, slice(channel, channel + 1))],
        }[what]
        for role, dim, idx in cuts:
            for suffix in ("weight", "bias"):
                name = f"{arch.family.module(layer, role)}.{suffix}"
                if name in tensors and (suffix == "weight" or dim == 0):
                    t = tensors[name].clone()
                    t[(slice(None), idx) if dim == 1 else idx] = 0
                    tensors[name], changed = t, True
        if changed:
            save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def test_cut_units_score_exactly_zero(make_base_dir, tmp_path, family_case):
    base = make_base_dir(family_case)
    arch = _arch(base)
    layer, group, channel = 3, arch.num_key_value_heads - 1, 7
    cut = _cut_base(base, tmp_path, arch, layer, group, channel, "outputs")
    calib = _calib(cut, tmp_path)
    kv, ch = calibrated_scores(cut, arch, [layer], calib, "taylor", EngineSettings(show_progress=False))[layer]
    assert kv[group] == 0 and ch[channel] == 0  # exactly: every gradient behind a zero column is 0
    assert (kv[:group] > 0).all() and (ch[:channel] > 0).all() and (ch[channel + 1 :] > 0).all()


def test_silent_units_have_zero_activation(make_base_dir, tmp_path, family_case):
    base = make_base_dir(family_case)
    arch = _arch(base)
    if arch.family.modules["v"] == arch.family.modules["q"] or arch.family.modules["up"] == arch.family.modules["gate"]:
        pytest.skip("fused projections: v and up rows are segments of another tensor")
    layer, group, channel = 4, 0, 11
    cut = _cut_base(base, tmp_path, arch, layer, group, channel, "values")
    calib = _calib(cut, tmp_path)
    kv, ch = calibrated_scores(cut, arch, [layer], calib, "activation", EngineSettings(show_progress=False))[layer]
    assert kv[group] == 0 and ch[channel] == 0
    assert (kv[1:] > 0).all() and (ch[:channel] > 0).all()


# ---------------------------------------------------------------------------- boundary store


def test_disk_store_gives_the_same_scores(make_base_dir, tmp_path, monkeypatch):
    base = make_base_dir("llama_gqa")
    arch, calib = _arch(base), _calib(base, tmp_path)
    offload = tmp_path / "offload"
    offload.mkdir()
    seen = []
    close = cal_mod.BoundaryStore.close

    def spy(self):  # what the store held on disk, before it cleans up
        seen.append((self.disk_slots, self.peak_memory, sorted(p.name for p in offload.rglob("*"))))
        close(self)

    monkeypatch.setattr(cal_mod.BoundaryStore, "close", spy)
    for importance in ("taylor", "activation"):
        seen.clear()
        memory = calibrated_scores(base, arch, [2, 3, 6], calib, importance, EngineSettings(show_progress=False))
        assert seen[0][0] == 0
        disk = EngineSettings(budget=0, offload_dir=offload, show_progress=False)
        spilled = calibrated_scores(base, arch, [2, 3, 6], calib, importance, disk)
        disk_slots, peak_memory, files = seen[-1]
        assert disk_slots >= 2 and peak_memory == 0 and files  # everything went to files
        for i in (2, 3, 6):
            assert torch.equal(memory[i][0], spilled[i][0]) and torch.equal(memory[i][1], spilled[i][1])
        assert list(offload.iterdir()) == []  # the temporary folder is gone


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_offload_dir_removed_on_interrupt(make_base_dir, tmp_path, monkeypatch, interrupt):
    base = make_base_dir("llama_gqa")
    arch, calib = _arch(base), _calib(base, tmp_path)
    offload = tmp_path / "offload"
    offload.mkdir()
    calls = []
    run_layer = cal_mod._Skeleton.run_layer

    def flaky(self, module, index, hidden):
        calls.append(index)
        if len(calls) == 9:  # mid-way through the reverse sweep, with files on disk
            assert any(offload.rglob("*.bin"))
            raise interrupt()
        return run_layer(self, module, index, hidden)

    monkeypatch.setattr(cal_mod._Skeleton, "run_layer", flaky)
    with pytest.raises(interrupt):
        calibrated_scores(
            base,
            arch,
            [3],
            calib,
            "taylor",
            EngineSettings(micro_batch=SAMPLES, budget=0, offload_dir=offload, show_progress=False),
        )
    assert list(offload.iterdir()) == []


# ---------------------------------------------------------------------------- calibration text


def test_calibration_is_packed_and_capped(make_base_dir, tmp_path):
    base = make_base_dir("llama_gqa")
    path = _calib_file(tmp_path, 6)
    few = load_calibration(path, base, 256, 1000, 16)  # asks for more than the file holds
    stream = few.ids.reshape(-1)
    assert few.num_samples == few.record()["num_samples"] and few.record()["num_tokens"] == few.ids.numel()
    one = load_calibration(path, base, 256, 1000, 4096 // 16)  # shorter than one block: one block of all tokens
    assert one.num_samples == 1 and one.seq_len < 256
    assert torch.equal(stream, one.ids[0, : stream.numel()])  # the same packed stream, cut differently
    assert (one.ids[0] == 1).sum() == 6  # a BOS starts each passage


def test_long_passage_tokenized_only_as_far_as_needed(make_base_dir, tmp_path, monkeypatch):
    """A one-passage file far longer than the calibration needs: the same ids as encoding it whole."""
    base = make_base_dir("llama_gqa")
    text = " ".join(sample_texts(4000, seed=9))  # ~250k characters, one passage
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    from transformers import AutoTokenizer

    whole = AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    encoded = []
    real = AutoTokenizer.from_pretrained

    def spy(*a, **kw):  # record how many characters each tokenizer call sees
        tok = real(*a, **kw)
        call = tok.__class__.__call__
        monkeypatch.setattr(tok.__class__, "__call__", lambda self, t, **k: encoded.append(len(t)) or call(self, t, **k))
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    got = load_calibration(path, base, 256, 4, 16)
    assert torch.equal(got.ids.reshape(-1), torch.tensor(whole[:64]))
    assert max(encoded) < len(text) // 10


# ---------------------------------------------------------------------------- determinism and CLI


def test_same_inputs_same_bundle_id(make_base_dir, tmp_path):
    """Same base, calibration and settings: the same bundle, whether boundaries sat in memory or on disk."""
    base = make_base_dir("qwen3")
    calib = _calib_file(tmp_path)
    offload = tmp_path / "offload"
    offload.mkdir()
    ids = {}
    for name, importance, extra in [
        ("taylor", "taylor", {}), ("taylor-again", "taylor", {}), ("taylor-disk", "taylor", {"activation_budget": 0, "offload_dir": offload}),
        ("activation", "activation", {}), ("activation-again", "activation", {}),
    ]:  # fmt: skip
        m = prune(base, tmp_path / name, 0.5, importance=importance, calibration=calib, calibration_samples=3,
                  calibration_seq_len=32, show_progress=False, **extra)  # fmt: skip
        ids[name] = m["bundle_id"]
    assert ids["taylor"] == ids["taylor-again"] == ids["taylor-disk"]
    assert ids["activation"] == ids["activation-again"] != ids["taylor"]
    assert m["pruning"]["importance"] == "activation" and "Minitron" in m["pruning"]["importance_definition"]


def _one_line_error(capsys, *argv: object) -> str:
    rc = run([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _refused(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_refusals(make_base_dir, tmp_path, capsys, importance):
    base = make_base_dir("llama_gqa")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n", encoding="utf-8")
    rowless = tmp_path / "rowless.jsonl"
    rowless.write_text('{"prompt": "no text field"}\n{"text": "   "}\n', encoding="utf-8")
    good = _calib_file(tmp_path)
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    before = _refused(tmp_path)
    common = ["prune", base, "--out", tmp_path / "out", "--ratio", "0.5", "--importance", importance]
    assert "no calibration text" in _one_line_error(capsys, *common, "--calibration", blank)
    assert "no calibration text" in _one_line_error(capsys, *common, "--calibration", rowless)
    line = _one_line_error(capsys, *common, "--calibration", good, "--seq-len", 1024)
    assert "1024" in line and "max_position_embeddings" in line and "256" in line
    line = _one_line_error(capsys, *common, "--calibration", good, "--offload-dir", a_file)
    assert "--offload-dir" in line and str(a_file) in line
    line = _one_line_error(capsys, *common, "--calibration", good, "--offload-dir", tmp_path / "missing")
    assert "--offload-dir" in line
    assert _refused(tmp_path) == before  # nothing written, no temporary folder left


def test_full_disk_is_one_line_and_cleaned_up(make_base_dir, tmp_path, monkeypatch):
    import errno
    import os

    base = make_base_dir("llama_gqa")
    arch, calib = _arch(base), _calib(base, tmp_path)
    offload = tmp_path / "offload"
    offload.mkdir()

    def full(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cal_mod.os, "pwrite", full)
    with pytest.raises(LoramError, match="No space left on device.*--offload-dir") as exc:
        calibrated_scores(base, arch, [3], calib, "taylor", EngineSettings(budget=0, offload_dir=offload, show_progress=False))
    assert "\n" not in str(exc.value)
    assert list(offload.iterdir()) == []
