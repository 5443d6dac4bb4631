"""Import bitsandbytes without its one harmless start-up warning (see FIELD-NOTES: "kernels")."""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from ..errors import LoramError

# On CPUs with AVX512_BF16 bitsandbytes tries an optional Hub-fetched kernel at import and logs
# a warning when the `kernels` package is absent. Its own CPU kernels are used instead.
_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"


@functools.cache
def bnb() -> ModuleType:
    """The ``bitsandbytes`` module (imported once).

    Raises:
        LoramError: bitsandbytes is not installed.
    """
    log = logging.getLogger(_NOISY_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except ImportError as exc:
        raise LoramError(f"4-bit bundles need bitsandbytes ({exc}); pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
    return bitsandbytes
