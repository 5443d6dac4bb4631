"""Which float precision a run computes in, chosen from what the hardware does natively.

bf16 autocast halves activation memory and, where the hardware has bf16 arithmetic (CUDA
GPUs from Ampere on; x86 CPUs with AVX512-BF16 or AMX), is faster than fp32. Where it
does not, bf16 is emulated and 15-20x *slower* than fp32 on a CPU, so ``auto`` picks fp32
there (fp16 autocast on a CUDA GPU without bf16). Every command that runs a model
(train, align, eval, the demo) resolves ``--precision`` here, and reports the choice with
its reason.

``LORAMKIT_NATIVE_BF16=0`` declares the CPU to lack native bf16 (the test suite sets it,
so that results do not depend on the machine); ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``
set below AVX512-BF16 are honoured too, since torch's kernels then emulate bf16.

Torch is imported only when a choice is made, so importing this module is cheap.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LoramError

if TYPE_CHECKING:
    import torch

__all__ = ["Precision", "PrecisionChoice", "cpu_bf16_support", "resolve_precision"]


class PrecisionChoice(str, Enum):
    """``--precision`` values. Mixed: fp32 weights that train, 16-bit autocast around the forward."""

    auto = "auto"
    bf16_mixed = "bf16-mixed"
    fp16_mixed = "fp16-mixed"
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is never ``auto``."""

    name: str  # bf16-mixed | fp16-mixed | bf16 | fp32
    requested: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype around forward passes, or None for no autocast."""
        import torch

        return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.name)

    @property
    def compute_dtype(self) -> torch.dtype:
        """What matmuls run in: frozen weights and 4-bit layers compute in this dtype."""
        import torch

        return {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.name, torch.float32)

    def describe(self) -> str:
        """``bf16-mixed (auto: ...)`` for summaries."""
        return f"{self.name} ({self.reason})"

    def to_json(self) -> dict[str, str]:
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86: /proc/cpuinfo flags
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_support() -> tuple[bool, str]:
    """(does this CPU compute bf16 natively, for the kernels torch will use here; why)."""
    if os.environ.get("LORAMKIT_NATIVE_BF16", "").strip() == "0":
        return False, "LORAMKIT_NATIVE_BF16=0"
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64"):
        found = [f for f in _CPU_BF16_FLAGS if f in flags]
        if not found:
            return False, "this CPU has no AVX512-BF16 or AMX: bf16 would be emulated"
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if isa and not any(isa.startswith(x) for x in _ONEDNN_BF16_ISAS):
            return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN below bf16"
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in ("AVX512", "AMX"):
            return False, f"torch's CPU kernels run at {capability} here (ATEN_CPU_CAPABILITY): bf16 would be emulated"
        return True, f"the CPU has {' and '.join(f.upper().replace('_', '-') for f in found)}"
    if machine in ("aarch64", "arm64") and "bf16" in flags:
        return True, "the CPU has the Arm BF16 extension"
    return False, f"no native bf16 known for a {machine or 'unknown'} CPU"


def _device_bf16(device: torch.device) -> tuple[bool, str]:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16"
        return False, f"{name} has no bf16"
    if device.type == "cpu":
        return cpu_bf16_support()
    return False, f"no native bf16 known for {device.type}"


def resolve_precision(requested: str | PrecisionChoice, device: torch.device | str) -> Precision:
    """``auto`` -> bf16-mixed where ``device`` computes bf16 natively, else fp16-mixed (CUDA) or fp32.

    An explicit choice is kept (even if slow here: the user asked), except fp16-mixed on a
    CPU, which torch does not train well, which is refused.
    """
    import torch

    value = requested.value if isinstance(requested, PrecisionChoice) else str(requested)
    choices = [c.value for c in PrecisionChoice]
    if value not in choices:
        raise LoramError(f"--precision must be one of {', '.join(choices)}, got {value!r}")
    device = torch.device(device)
    if value != "auto":
        if value == "fp16-mixed" and device.type != "cuda":
            raise LoramError("--precision fp16-mixed needs a CUDA device; use auto, bf16-mixed or fp32")
        return Precision(value, value, "as requested")
    native, why = _device_bf16(device)
    if native:
        return Precision("bf16-mixed", "auto", f"auto: {why}")
    if device.type == "cuda":
        return Precision("fp16-mixed", "auto", f"auto: {why}")
    return Precision("fp32", "auto", f"auto: {why}")
