"""Shared pytest fixtures: tiny base models on disk, seeding, warning policy.

Fixtures
--------
``family_case``      parametrized over every case in ``tests.factory.FAMILY_CASES``.
``make_base_dir``    session-scoped factory ``make_base_dir(case, **kw) -> Path``
                     (``kw`` as for ``tests.factory.make_base``); also available
                     as ``base_dir``.
``family_base_dir``  ``make_base_dir(family_case)`` (default kwargs).
``tiny_tok``         a fresh ``tests.factory.tiny_tokenizer()``.

Test policy set here: no network (HF_HUB_OFFLINE), bf16 off (``LORAMKIT_NATIVE_BF16=0``:
precision ``auto`` is fp32), ``torch.set_num_threads(2)`` once (``LORAMKIT_TEST_THREADS``), ``torch.manual_seed(0)`` before every test, warnings raised from
transformers / peft / torch / safetensors / tokenizers / huggingface_hub are
shown, not turned into errors, even if the project config says
``filterwarnings = error`` (a test that wants them as errors opts in with
``@pytest.mark.filterwarnings("error")``, marks take precedence).
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# bf16 off: precision "auto" resolves to fp32 on every machine, so results do not depend on
# whether this CPU has AVX512-BF16 (tests that need bf16 ask for it explicitly).
os.environ.setdefault("LORAMKIT_NATIVE_BF16", "0")

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.factory import CASE_NAMES, make_base, tiny_tokenizer
from tests.hub_server import hub  # noqa: E402,F401  (fixture: loopback Hugging Face Hub, see tests/hub_server.py)

_QUIET_MODULES = ("transformers", "peft", "torch", "safetensors", "tokenizers", "huggingface_hub", "accelerate")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("LORAMKIT_TEST_THREADS", "2")))  # the suite passes with 1 and 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    # Appended ini lines win over earlier ones (e.g. a project-wide "error").
    for mod in _QUIET_MODULES:
        config.addinivalue_line("filterwarnings", f"default::Warning:{mod}")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=CASE_NAMES, ids=list(CASE_NAMES))
def family_case(request: pytest.FixtureRequest) -> str:
    return request.param


# ----------------------------------------------------------------- base model dirs

# key -> (path, manifest).  Module level so the tamper check below can see it.
_BASE_CACHE: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}


def _manifest(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


def _make_read_only(root: Path) -> None:
    # Only effective when not running as root, but cheap; the manifest check
    # below catches modifications either way.
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _cache_key(case: str, kw: dict[str, Any]) -> str:
    return repr((case, sorted((k, repr(v)) for k, v in kw.items())))


@pytest.fixture(scope="session")
def make_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``make_base_dir(case, **kw) -> Path`` of saved tiny base models.

    Each distinct ``(case, kw)`` is built once per session (in its own tmp dir)
    and then shared by every test that asks for it.  The directories are
    READ-ONLY BY CONTRACT: tests (and the code under test) must not write,
    delete or add anything in them; copy the directory first
    (``shutil.copytree``) if a test needs to change it.  Files are chmod'ed
    read-only, and after every test the shared directories are checked; a
    test that changed one errors in teardown and the directory is rebuilt for
    later tests.
    """

    def _make(case: str, **kw: Any) -> Path:
        key = _cache_key(case, kw)
        hit = _BASE_CACHE.get(key)
        if hit is not None:
            return hit[0]
        safe = "".join(ch if ch.isalnum() else "_" for ch in case)
        path = tmp_path_factory.mktemp(f"base_{safe}", numbered=True)
        make_base(path, case, **kw)
        _make_read_only(path)
        _BASE_CACHE[key] = (path, _manifest(path))
        return path

    return _make


@pytest.fixture(scope="session")
def base_dir(make_base_dir: Callable[..., Path]) -> Callable[..., Path]:
    """Alias of :func:`make_base_dir` (same cache, same read-only contract)."""
    return make_base_dir


@pytest.fixture
def family_base_dir(make_base_dir: Callable[..., Path], family_case: str) -> Path:
    """Default-built base model directory for ``family_case`` (read-only)."""
    return make_base_dir(family_case)


@pytest.fixture
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _shared_base_dirs_untouched():
    yield
    changed = []
    for key, (path, manifest) in list(_BASE_CACHE.items()):
        if not path.exists() or _manifest(path) != manifest:
            changed.append(path)
            del _BASE_CACHE[key]  # later tests get a freshly built copy
    if changed:
        pytest.fail(
            "test modified shared base model dir(s) (read-only by contract; copy first): " + ", ".join(map(str, changed)),
            pytrace=False,
        )
