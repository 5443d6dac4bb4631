"""Outputs appear whole or not at all: everything is written under a temporary name, then renamed (:func:`staged`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError


@contextmanager
def staged(out: str | Path, overwrite: bool = False, *, directory: bool = True) -> Iterator[Path]:
    """The one way loramkit writes an output: yield a fresh temporary sibling of ``out`` (a
    directory, or a file path to write); on success it takes ``out``'s place by rename, on
    error it is removed. Readers see the old output or the whole new one, never a partial one.

    A file replaces an existing one in a single atomic rename. A directory cannot be renamed
    over a non-empty one, so the old directory is first renamed aside, then removed.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and (out.exists() or out.is_symlink()):
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staged_dir(out: str | Path, overwrite: bool = False) -> AbstractContextManager[Path]:
    """:func:`staged` for a directory output (a bundle, an adapter, a checkpoint)."""
    return staged(out, overwrite, directory=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace the file at ``path`` with ``text`` (UTF-8) atomically, through :func:`staged`."""
    with staged(path, overwrite=True, directory=False) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Replace the file at ``path`` with ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """Read a JSON object, turning every way it can be broken into one clear error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data
