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
