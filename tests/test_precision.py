"""--precision auto: bf16 where the hardware computes it natively, fp32 (fp16 on old CUDA) elsewhere.

The suite runs with bf16 off (``LORAMKIT_NATIVE_BF16=0``, tests/conftest.py); the detection
itself is tested here by presenting it other CPUs. The 4-bit layers compute in the run's
dtype, not in the bundle's recorded ``compute_dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramkit import precision as P
from loramkit.errors import LoramError
from loramkit.prune.pruner import prune
from loramkit.train.config import TrainConfig
from loramkit.train.trainer import train
from tests.factory import sample_texts


@pytest.fixture
def cpu(monkeypatch):
    """Present a CPU: ``cpu(flags, capability)``; the suite's bf16-off switch is lifted."""

    def present(flags: set[str], capability: str = "AVX512", machine: str = "x86_64") -> None:
        monkeypatch.delenv("LORAMKIT_NATIVE_BF16", raising=False)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.setattr(P, "_cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(P.platform, "machine", lambda: machine)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return present


def test_auto_is_bf16_mixed_on_cpus_with_native_bf16(cpu):
    for flags in ({"avx512f", "avx512_bf16"}, {"avx512f", "amx_bf16", "amx_tile"}):
        cpu(flags)
        p = P.resolve_precision("auto", "cpu")
        assert (p.name, p.autocast_dtype, p.compute_dtype) == ("bf16-mixed", torch.bfloat16, torch.bfloat16)
        assert p.reason.startswith("auto: the CPU has") and p.requested == "auto"


@pytest.mark.parametrize(
    "flags, capability, machine",
    [
        ({"avx2", "fma"}, "AVX2", "x86_64"),  # an AMD EPYC / older Xeon: bf16 emulated
        ({"avx512f", "avx512bw"}, "AVX512", "x86_64"),  # AVX512 without its BF16 extension
        ({"avx512f", "avx512_bf16"}, "AVX2", "x86_64"),  # ATEN_CPU_CAPABILITY=avx2 lowers torch's kernels
        ({"asimd"}, "DEFAULT", "aarch64"),  # Arm without FEAT_BF16
    ],
)
def test_auto_is_fp32_where_bf16_would_be_emulated(cpu, flags, capability, machine):
    cpu(flags, capability, machine)
    p = P.resolve_precision("auto", "cpu")
    assert (p.name, p.autocast_dtype, p.compute_dtype) == ("fp32", None, torch.float32)
    assert p.reason.startswith("auto: ")


def test_the_switches_that_turn_bf16_off(cpu, monkeypatch):
    cpu({"avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert P.resolve_precision("auto", "cpu").name == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert P.resolve_precision("auto", "cpu").name == "bf16-mixed"
    monkeypatch.setenv("LORAMKIT_NATIVE_BF16", "0")
    assert P.resolve_precision("auto", "cpu").reason == "auto: LORAMKIT_NATIVE_BF16=0"


def test_explicit_choices_are_kept_and_bad_ones_refused(cpu):
    cpu({"avx2"}, "AVX2")
    for name in ("bf16-mixed", "bf16", "fp32"):
        assert P.resolve_precision(name, "cpu").name == name
    assert P.resolve_precision(P.PrecisionChoice.bf16, "cpu").compute_dtype == torch.bfloat16
    with pytest.raises(LoramError, match="needs a CUDA device"):
        P.resolve_precision("fp16-mixed", "cpu")
    with pytest.raises(LoramError, match="must be one of auto, bf16-mixed"):
        P.resolve_precision("fp8", "cpu")


@pytest.fixture(scope="module")
def nf4_bundle(make_base_dir, tmp_path_factory) -> Path:
    from loramkit.quant import quantize_bundle

    root = tmp_path_factory.mktemp("precision")
    prune(make_base_dir("llama_gqa"), root / "b", 0.5, show_progress=False)
    quantize_bundle(root / "b", root / "nf4", quant_type="nf4")  # records compute_dtype bfloat16
    return root / "nf4"


def _compute_dtypes(model) -> set[torch.dtype]:
    import bitsandbytes as bnb

    dtypes = {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert dtypes, "no 4-bit layer: vacuous"
    return dtypes


def test_4bit_layers_compute_in_the_runs_dtype_not_the_recorded_one(nf4_bundle, cpu):
    from loramkit.model.loader import load_pruned_model

    assert json.loads((nf4_bundle / "loram.json").read_text())["quantization"]["compute_dtype"] == "bfloat16"
    assert _compute_dtypes(load_pruned_model(nf4_bundle, compute_dtype=torch.float32)) == {torch.float32}
    assert _compute_dtypes(load_pruned_model(nf4_bundle, compute_dtype="bfloat16")) == {torch.bfloat16}
    cpu({"avx2"}, "AVX2")  # auto: the recorded bf16 only where it is native
    assert _compute_dtypes(load_pruned_model(nf4_bundle)) == {torch.float32}
    cpu({"avx512_bf16"})
    assert _compute_dtypes(load_pruned_model(nf4_bundle)) == {torch.bfloat16}


def test_train_reports_the_chosen_precision_and_why(nf4_bundle, tmp_path, monkeypatch):
    import loramkit.model.loader as loader

    seen = []
    real = loader.load_pruned_model
    monkeypatch.setattr(loader, "load_pruned_model", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    data = tmp_path / "t.txt"
    data.write_text("\n\n".join(sample_texts(40, seed=1)))
    cfg = TrainConfig(rank=2, max_steps=1, micro_batch=2, seq_len=32)  # precision auto, bf16 off in the suite
    s = train(nf4_bundle, data, tmp_path / "a", cfg, show_progress=False, log=lambda _: None)
    assert (s["precision"], s["precision_reason"]) == ("fp32", "auto: LORAMKIT_NATIVE_BF16=0")
    assert seen[0]["compute_dtype"] == torch.float32 and seen[0]["dtype"] == torch.float32
    record = json.loads((tmp_path / "a" / "loram_adapter.json").read_text())
    assert record["training"]["summary"]["precision"] == "fp32"
