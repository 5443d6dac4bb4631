"""Outputs appear whole or not at all: everything is written under a temporary name, then renamed (:func:`staged`).

The output contract (specs/guarantees.md), in one place for every command that writes:
an output never overlaps an input; one writer per output at a time (an exclusive lock on a
sibling file); leftovers of a killed run (hidden staging folders, an old output renamed aside)
are cleaned up or put back by the next run; a full disk is one line and leaves nothing partial.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ..errors import DiskFullError, LoramError, OutputBusyError, OutputExistsError

# Locks this process holds, by resolved output path: (fd, depth). A nested writer of the same
# output (prune --quantize holds OUT while quantize writes it) re-enters instead of deadlocking.
_HELD: dict[Path, list[int]] = {}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """An existing output is replaced only when asked: checked before long work, and again when staging."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another output or pass --overwrite")


def check_out_clear(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (replacing it would destroy an input).

    Raises:
        LoramError: naming the output and the input it overlaps.
    """
    o = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).resolve()
        if o == i or o in i.parents or i in o.parents:
            rel = "is" if o == i else ("contains" if o in i.parents else "lies inside")
            raise LoramError(f"{out}: the output {rel} the input {inp}; choose an output outside every input")


@contextmanager
def output_lock(out: str | Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``out`` (``fcntl.flock`` on the sibling ``.OUT.lock``) or refuse at once.

    Yields whether the lock is fresh (false when this process already held it: a nested
    writer, whose leftovers are its outer writer's own). The lock file is removed on release;
    a waiter that locked a file already removed notices (inode check) and refuses too, so two
    writers can never both hold one output.

    Raises:
        OutputBusyError: another process holds the lock.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = out.parent.resolve() / out.name
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield False
        finally:
            _HELD[key][1] -= 1
        return
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:
            raise BlockingIOError
    except BlockingIOError:
        os.close(fd)
        raise OutputBusyError(
            f"{out}: another loramkit process is writing it right now; wait for it or choose another output"
        ) from None
    _HELD[key] = [fd, 1]
    try:
        yield True
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def recover_leftovers(out: Path) -> None:
    """Undo what a killed run left (call with a fresh lock held): put back an old output renamed
    aside when ``out`` is gone (a kill between the two renames), remove stale staging folders
    (``.OUT.tmp-*``, which is also what multi-step writers name their scratch)."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not (out.exists() or out.is_symlink()):
        os.replace(olds.pop(), out)
    for stale in [*olds, *out.parent.glob(f".{out.name}.tmp-*")]:
        _remove(stale)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or a library error wrapping one (safetensors' Rust message)."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_full_error(out: Path, need: int | None, written: int = 0) -> DiskFullError:
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    needs = f"needs {need:,} bytes" if need else f"needs more than the {written:,} bytes written before the disk filled"
    return DiskFullError(f"{out}: not enough disk space ({needs}, {free:,} free); nothing was written; free space and re-run")


@contextmanager
def staged(
    out: str | Path,
    overwrite: bool = False,
    *,
    directory: bool = True,
    inputs: Iterable[str | Path | None] = (),
    need_bytes: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """The one way loramkit writes an output: yield a fresh temporary sibling of ``out`` (a
    directory, or a file path to write); on success it takes ``out``'s place by rename, on
    error it is removed. Readers see the old output or the whole new one, never a partial one.

    A file replaces an existing one in a single atomic rename. A directory cannot be renamed
    over a non-empty one, so the old directory is first renamed aside, then removed; a kill
    between the two renames is undone by the next run (the old output is put back).

    A directory output also gets the rest of the output contract: ``inputs`` it must not
    overlap, an exclusive lock, cleanup of a killed run's leftovers, ``need_bytes`` checked
    against the free space up front, and ``check(tmp)`` (a writer validating what it wrote)
    before the rename.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        OutputBusyError: another process is writing ``out``.
        DiskFullError: the disk filled up (or has less than ``need_bytes`` free).
    """
    out = Path(out)
    check_out_clear(out, inputs)
    if not directory:
        with _staged(out, overwrite, directory, need_bytes, check) as tmp:
            yield tmp
        return
    with output_lock(out) as fresh:
        if fresh:
            recover_leftovers(out)
        with _staged(out, overwrite, directory, need_bytes, check) as tmp:
            yield tmp


@contextmanager
def _staged(
    out: Path, overwrite: bool, directory: bool, need: int | None, check: Callable[[Path], None] | None
) -> Iterator[Path]:
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if need is not None and shutil.disk_usage(out.parent).free < need:
        raise disk_full_error(out, need)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if check is not None:
            check(tmp)
        if directory and (out.exists() or out.is_symlink()):
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, LoramError):
            written = _tree_bytes(tmp)
            _remove(tmp)
            raise disk_full_error(out, need, written) from None
        raise
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staged_dir(out: str | Path, overwrite: bool = False, **contract: Any) -> AbstractContextManager[Path]:
    """:func:`staged` for a directory output (a bundle, an adapter, a checkpoint); ``contract``:
    its ``inputs``, ``need_bytes`` and ``check``."""
    return staged(out, overwrite, directory=True, **contract)


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
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise error(
            f"{path}: {what} is not valid JSON ({type(exc).__name__ if isinstance(exc, RecursionError) else exc})"
        ) from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data
