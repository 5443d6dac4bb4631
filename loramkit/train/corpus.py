"""A pre-training corpus (text files, or a directory of them) -> packed token blocks.

``loramkit align`` trains on plain text, not on instructions: a corpus is a ``.txt`` file
(documents separated by blank lines), a ``.jsonl`` file (rows ``{"text": ...}``; other rows
are skipped and counted), or a directory: every ``*.txt`` and ``*.jsonl`` file below it
(dot-files and dot-directories excluded), in ascending order of their relative paths, read
as one sequence of documents. Documents are tokenized as :func:`~loramkit.train.data.document_tokens`
says (``[bos] ids [eos]``), concatenated into one stream across files, and cut into blocks of
exactly ``seq_len`` tokens; the last partial block is dropped.

Blocks are kept in one int32 tensor ``(N, seq_len)`` (4 bytes a token, not the ~60 of Python
lists: 105M tokens take 420 MB), and read as :class:`~loramkit.train.data.Example` one by one.

The corpus digest identifies the files, not how they were read: ``sha256`` of the UTF-8 text
``"<file sha256>  <relative path>\\n"`` for every file, in ascending path order, i.e. what
``sha256sum`` prints (``cd CORPUS && find . -type f \\( -name '*.txt' -o -name '*.jsonl' \\) |
sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum``). A single file is a corpus
of one, named by its base name.

Example::

    corpus = load_corpus("fineweb-sample/", tokenizer, seq_len=512)
    corpus.sha256, corpus.num_tokens, len(corpus.blocks)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundle.hashing import sha256_file
from ..errors import LoramError
from .data import PackedBlocks, _json_rows, _read_text, _SkipRow, _text_documents, _text_of, document_tokens

__all__ = ["CORPUS_SUFFIXES", "Corpus", "PackedBlocks", "corpus_files", "corpus_digest", "load_corpus"]

CORPUS_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Corpus:
    """What :func:`load_corpus` read: the blocks, and what the manifest records about them."""

    path: Path
    blocks: PackedBlocks
    sha256: str
    files: list[str]  # relative paths, in reading order
    documents: int
    num_tokens: int  # the whole token stream, separators included (the dropped tail too)
    skipped_rows: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


def corpus_files(path: str | Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the corpus's files, in ascending relative-path order.

    Raises:
        LoramError: no such file or directory, or a directory without ``.txt`` / ``.jsonl`` files.
    """
    path = Path(path)
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise LoramError(f"corpus not found: {path}; pass a .txt or .jsonl file or a directory of them")
    found = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.suffix in CORPUS_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), p))
    if not found:
        raise LoramError(f"{path}: no .txt or .jsonl files in this directory; a corpus needs text")
    return sorted(found, key=lambda e: e[0])


def corpus_digest(files: Sequence[tuple[str, Path]]) -> str:
    """sha256 of the ``sha256sum`` listing of ``files`` (see the module docstring)."""
    listing = "".join(f"{sha256_file(p)}  {rel}\n" for rel, p in sorted(files, key=lambda e: e[0]))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _documents(files: Sequence[tuple[str, Path]], skips: Counter, counts: list[int]) -> Iterator[str]:
    """Every document of every file, in order; counts rows without text in ``skips``."""
    for _, p in files:
        text = _read_text(p)
        if p.suffix == ".jsonl" or (p.suffix != ".txt" and text.lstrip()[:1] in ("{", "[")):
            for _, row in _json_rows(p, text):
                try:
                    doc = _text_of(row)
                except _SkipRow as skip:
                    skips[str(skip)] += 1
                    continue
                counts[0] += 1
                yield doc
        else:
            for doc in _text_documents(text):
                counts[0] += 1
                yield doc


def load_corpus(path: str | Path, tokenizer: Any, seq_len: int) -> Corpus:
    """Read, tokenize and pack a corpus (see the module docstring).

    Args:
        path: a ``.txt`` / ``.jsonl`` file or a directory of them.
        tokenizer: the bundle's tokenizer.
        seq_len: tokens per block.

    Raises:
        LoramError: missing path, unreadable or non-UTF-8 file, malformed JSON line, no text
            at all, or fewer tokens than one block.
    """
    path = Path(path)
    files = corpus_files(path)
    skips: Counter = Counter()
    counts = [0]
    stream = array("i")
    for piece in document_tokens(_documents(files, skips, counts), tokenizer):
        stream.extend(piece)
    if counts[0] == 0 or not stream:
        detail = "; skipped: " + ", ".join(f"{r} ({n})" for r, n in skips.most_common(3)) if skips else ""
        raise LoramError(f'no usable text in {path} (expected .txt documents or .jsonl rows with a non-empty "text"){detail}')
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise LoramError(
            f"{path}: {len(stream):,} tokens, fewer than one block of --seq-len {seq_len}; add text or lower --seq-len"
        )
    tokens = torch.frombuffer(stream, dtype=torch.int32)[: n_blocks * seq_len].clone().view(n_blocks, seq_len)
    return Corpus(
        path=path,
        blocks=PackedBlocks(tokens),
        sha256=corpus_digest(files),
        files=[rel for rel, _ in files],
        documents=counts[0],
        num_tokens=len(stream),
        skipped_rows=sum(skips.values()),
        skip_reasons=dict(skips.most_common()),
    )
