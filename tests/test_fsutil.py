"""The one atomic-write helper (loramkit.bundle.fsutil.staged): an output is the old one or the
whole new one, never partial, and nothing temporary is left behind whatever happens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramkit.bundle.fsutil import staged, staged_dir, write_json, write_text
from loramkit.errors import OutputExistsError


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class Boom(Exception):
    pass


def test_a_file_is_replaced_in_one_rename(tmp_path):
    out = tmp_path / "card.md"
    out.write_text("old")
    with staged(out, overwrite=True, directory=False) as tmp:
        tmp.write_text("new")
        assert out.read_text() == "old" and tmp.parent == out.parent  # a sibling: the rename stays on one filesystem
    assert out.read_text() == "new" and listing(tmp_path) == ["card.md"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "loram.json"
    write_json(out, {"v": 1})

    def half_then_fail(self: Path, text: str, encoding: str | None = None) -> int:
        with open(self, "w", encoding=encoding) as f:
            f.write(text[: len(text) // 2])
        raise Boom

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(Boom):
        write_json(out, {"v": 2, "padding": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"v": 1} and listing(tmp_path) == ["loram.json"]


def test_write_text_creates_parents_and_is_utf8(tmp_path):
    write_text(tmp_path / "a" / "b.md", "ünïcode ✓")
    assert (tmp_path / "a" / "b.md").read_bytes() == "ünïcode ✓".encode()


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(Boom), staged_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        raise Boom
    assert listing(tmp_path) == []
    with staged_dir(out) as tmp:
        (tmp / "loram.json").write_text("{}")
        assert not out.exists()
    assert listing(out) == ["loram.json"] and listing(tmp_path) == ["bundle"]


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"), staged_dir(out):
        pass
    assert listing(out) == ["mine.txt"] and listing(tmp_path) == ["bundle"]
    with pytest.raises(Boom), staged_dir(out, overwrite=True) as tmp:  # a failed overwrite keeps the old output
        (tmp / "new.txt").write_text("new")
        raise Boom
    assert listing(out) == ["mine.txt"] and listing(tmp_path) == ["bundle"]
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["bundle"]


@pytest.mark.parametrize("existing", ["file", "symlink"])
def test_a_directory_replaces_a_file_or_a_link(tmp_path, existing):
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours to delete")
    if existing == "file":
        out.write_text("a file")
    else:
        out.symlink_to(target)
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert out.is_dir() and not out.is_symlink() and listing(out) == ["x"]
    assert listing(target) == ["keep.txt"]  # the link went, not what it pointed at


# ---------------------------------------------------------------------------- the output contract (issue 13)

import errno  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from loramkit.bundle.fsutil import check_out_clear, output_lock  # noqa: E402
from loramkit.errors import DiskFullError, LoramError, OutputBusyError  # noqa: E402


@pytest.mark.parametrize("where", ["is", "contains", "inside"])
def test_an_output_overlapping_an_input_is_refused_and_the_input_kept(tmp_path, where):
    base = tmp_path / "parent" / "base"
    base.mkdir(parents=True)
    (base / "w").write_text("weights")
    out = {"is": base, "contains": base.parent, "inside": base / "sub"}[where]
    with pytest.raises(LoramError, match="input"), staged_dir(out, overwrite=True, inputs=[base]):
        pass
    assert (base / "w").read_text() == "weights" and listing(tmp_path) == ["parent"]


def test_a_second_writer_of_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(  # another process holds OUT's lock until we close its stdin
        [
            sys.executable,
            "-c",
            "import sys; from loramkit.bundle.fsutil import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match="another loramkit process"), staged_dir(out):
            pass
        assert not out.exists()
    finally:
        holder.communicate("")
    with staged_dir(out) as tmp:  # released: the next writer proceeds
        (tmp / "x").write_text("x")
    assert listing(out) == ["x"] and listing(tmp_path) == ["out"]  # no lock file left


def test_the_same_process_may_nest_writers_of_one_output(tmp_path):
    with output_lock(tmp_path / "out"), staged_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert listing(tmp_path / "out") == ["x"]


def test_a_killed_runs_leftovers_are_cleaned_and_an_old_output_put_back(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-deadbeef").mkdir()  # a killed run's full-size staging folder
    (tmp_path / ".out.tmp-deadbeef" / "big").write_bytes(b"x" * 1000)
    old = tmp_path / ".out.old-cafecafe"  # killed between the two renames: OUT is absent
    old.mkdir()
    (old / "v1").write_text("previous")
    with pytest.raises(OutputExistsError):  # the previous output is back, so no --overwrite: refused
        with staged_dir(out):
            pass
    assert listing(tmp_path) == ["out"] and listing(out) == ["v1"]
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "v2").write_text("new")
    assert listing(tmp_path) == ["out"] and listing(out) == ["v2"]


def test_a_full_disk_is_one_error_naming_the_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"out: not enough disk space \(needs more than the 100 bytes"):
        with staged_dir(out) as tmp:
            (tmp / "part").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert listing(tmp_path) == []
    with pytest.raises(DiskFullError, match=r"needs 1,000,000,000,000,000,000 bytes"):
        with staged_dir(out, need_bytes=10**18):
            pytest.fail("nothing may be written when the disk cannot hold the output")
    assert listing(tmp_path) == []


def test_a_writer_check_runs_before_the_rename(tmp_path):
    def refuse(tmp: Path) -> None:
        raise LoramError(f"{tmp.name} is unsound")

    with pytest.raises(LoramError, match="unsound"), staged_dir(tmp_path / "out", check=refuse) as tmp:
        (tmp / "x").write_text("x")
    assert listing(tmp_path) == []


def test_overlap_check_resolves_links(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(LoramError, match="is the input"):
        check_out_clear(tmp_path / "link", [tmp_path / "real"])
