"""A user's data file -> token examples for causal-LM LoRA training and evaluation.

Four formats, detected from the file (``fmt="auto"``) or forced with ``fmt``:

=================  ==========================================  ===============================
format             file                                        loss on
=================  ==========================================  ===============================
``text``           ``.txt``: documents separated by blank      every token (packed blocks)
                   lines
``jsonl-text``     ``.jsonl`` rows ``{"text": ...}``           every token (packed blocks)
``instructions``   ``.jsonl`` rows ``{"instruction", "input"   the response and the token(s)
                   (optional), "output"}``                     that end it
``chat``           ``.jsonl`` rows ``{"messages": [{"role",    assistant turns and the
                   "content"}, ...]}``                         end-of-turn token(s) after them
=================  ==========================================  ===============================

A ``.json`` file holding one JSON array of row objects (like ``alpaca_data.json``) is read
like JSON lines; other suffixes are sniffed (first character ``{`` or ``[``: JSON, else text).

Text formats: each document is ``[bos] tokens [eos]`` (each only when the tokenizer has it;
bos is not repeated after an eos with the same id, as in GPT-2), so an eos separates every
two documents and ends the last one.  The documents are concatenated into one stream and
cut into consecutive blocks of exactly ``seq_len`` tokens.  The last partial block
is dropped, unless it is the only one: then it is kept, unpadded.  ``labels == input_ids``
(the model shifts internally).

Instructions and chat: one example per row, truncated to ``seq_len`` tokens.  Prompts come
from the tokenizer's chat template when it has one.  Without one, instructions use an
Alpaca-style prompt (``"### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n"``,
then the output and eos) and chat uses :data:`FALLBACK_CHAT_TEMPLATE` (``### User:`` /
``### Assistant:`` headers, eos after each assistant turn).  The trained character spans
are found by rendering prefixes of the conversation (see :func:`_assistant_spans`), the full
string is tokenized once with offsets, and a token is trained iff its characters overlap a
trained span, so masking is exact token by token.

Everything that does not carry a loss is ``-100`` in ``labels``; padding (added only by
:func:`collate`) is never a real token id in ``labels``.  Output is deterministic: the same
file, tokenizer and ``seq_len`` give the same examples in file order (shuffling is the
trainer's job).

Memory: the file is read whole and every example is kept as Python lists of ints, roughly
50-70 bytes per token (input ids + labels), i.e. several GB for 100M tokens.  Fine for LoRA
fine-tuning sets.

Example::

    examples, fmt = load_examples("train.jsonl", tokenizer, seq_len=512)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(examples[:8], pad_id)  # input_ids, attention_mask, labels: (B, T)
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import torch

from ..bundle.hashing import sha256_file
from ..errors import LoramError

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "FALLBACK_CHAT_TEMPLATE",
    "Example",
    "DataStats",
    "load_examples",
    "load_examples_with_stats",
    "collate",
    "data_digest",
    "document_tokens",
]

log = logging.getLogger(__name__)

FORMATS = ("text", "jsonl-text", "instructions", "chat")
IGNORE_INDEX = -100  # label value that takes no loss (PyTorch / transformers convention)

# Used for chat rows when the tokenizer has no chat template.  Prefix-stable by construction:
# a conversation renders as the concatenation of its messages.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

_EXPECTED = {
    "text": "plain text, documents separated by blank lines",
    "jsonl-text": 'one JSON object per line with a non-empty string "text"',
    "instructions": 'one JSON object per line with string "instruction" and "output" (optional "input")',
    "chat": 'one JSON object per line with "messages": a list of {"role", "content"} that has an assistant turn',
    "auto": 'one JSON object per line with "text", "instruction" + "output", or "messages"',
}

_TOKENIZE_BATCH = 256  # documents per tokenizer call when packing
# A fast tokenizer keeps offsets and token strings for everything it encodes in one call
# (~450 bytes a token): a 50 MB one-line document would take 7 GiB. Longer documents are
# encoded in pieces of at most this many characters, cut before a newline or a space, where
# pre-tokenizers split anyway (so the ids are those of the whole; tested).
_MAX_PIECE_CHARS = 1 << 16
# A row of the instruction or chat formats longer than this many characters per token of
# --seq-len is skipped (only its first --seq-len tokens could train) instead of encoded whole.
_MAX_ROW_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class Example:
    """One training/evaluation sequence.

    Args:
        input_ids: token ids, at most ``seq_len`` long.
        labels: same length; the token id where loss is taken, ``-100`` elsewhere.
    """

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")


class PackedBlocks(Sequence[Example]):
    """Token blocks of one length, stored as an int32 tensor ``(N, T)``; item ``i`` is an Example."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"blocks must be (N, T), got {tuple(tokens.shape)}")
        self.tokens = tokens  # (N, T) int32

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> PackedBlocks: ...
    def __getitem__(self, i: int | slice) -> Example | PackedBlocks:
        if isinstance(i, slice):
            return PackedBlocks(self.tokens[i])
        ids = self.tokens[i].tolist()
        return Example(ids, list(ids))  # every token is trained (the model shifts labels)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedBlocks):
            return torch.equal(self.tokens, other.tokens)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # mutable-like, as a list

    def select(self, indices: Sequence[int]) -> PackedBlocks:
        return PackedBlocks(self.tokens[torch.as_tensor(list(indices), dtype=torch.long)])

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


@dataclass(frozen=True)
class DataStats:
    """What :func:`load_examples_with_stats` read, kept and left out (for logs and run records)."""

    fmt: str
    rows: int  # non-blank JSON rows, or documents of a text file
    examples: int
    tokens: int  # sum of example lengths
    trained_tokens: int  # labels != -100
    skipped_rows: int = 0  # rows without the fields their format needs
    skip_reasons: dict[str, int] = field(default_factory=dict)
    truncated_examples: int = 0  # instructions / chat rows longer than seq_len, cut
    dropped_examples: int = 0  # no trained token left within seq_len (prompt too long)
    dropped_tail_tokens: int = 0  # text formats: the final partial block


class _SkipRow(Exception):
    """A row that lacks what its format needs; counted, not fatal."""


# --------------------------------------------------------------------------- public API


def load_examples(path: str | Path, tokenizer: Any, seq_len: int, *, fmt: str = "auto") -> tuple[list[Example], str]:
    """Read and tokenize a data file; returns (examples, detected format name).

    Skipped rows and dropped examples are logged (``logging``, warning level); use
    :func:`load_examples_with_stats` to get the counts.

    Args:
        path: a ``.txt``, ``.jsonl`` (or ``.json`` array) file; see the module docstring.
        tokenizer: a transformers fast tokenizer (offsets are needed for masking).
        seq_len: block length for text formats, truncation length for the others.
        fmt: ``"auto"`` or one of :data:`FORMATS`.

    Returns:
        ``(examples, fmt)``, examples in file order.

    Raises:
        LoramError: unknown ``fmt``, unreadable file, malformed JSON line (with its line
            number), formats mixed in one file, a chat template that cannot be masked
            reliably, or no usable rows at all.
    """
    examples, stats = load_examples_with_stats(path, tokenizer, seq_len, fmt=fmt)
    if stats.skipped_rows or stats.dropped_examples:
        reasons = ", ".join(f"{r} ({n})" for r, n in stats.skip_reasons.items())
        log.warning(
            "%s: skipped %d of %d rows%s; dropped %d examples with no trained token within seq_len=%d",
            path,
            stats.skipped_rows,
            stats.rows,
            f": {reasons}" if reasons else "",
            stats.dropped_examples,
            seq_len,
        )
    return examples, stats.fmt


def load_examples_with_stats(
    path: str | Path, tokenizer: Any, seq_len: int, *, fmt: str = "auto"
) -> tuple[list[Example], DataStats]:
    """Like :func:`load_examples`, but returns :class:`DataStats` instead of the format name."""
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise LoramError(f"unknown data format {fmt!r}; use auto, {', '.join(FORMATS)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise LoramError(f"seq_len must be an integer of at least 2 tokens, got {seq_len!r}")
    text = _read_text(path)

    if fmt == "text" or (fmt == "auto" and _looks_like_plain_text(path, text)):
        docs = _text_documents(text)
        if not docs:
            raise _no_usable_rows(path, "text")
        return _packed(path, docs, tokenizer, seq_len, "text", rows=len(docs), skips=Counter())

    rows = _json_rows(path, text)
    if fmt == "auto":
        fmt = _detect_family(path, rows)
    if fmt == "jsonl-text":
        docs, skips = [], Counter()
        for _, row in rows:
            try:
                docs.append(_text_of(row))
            except _SkipRow as skip:
                skips[str(skip)] += 1
        if not docs:
            raise _no_usable_rows(path, fmt, skips)
        return _packed(path, docs, tokenizer, seq_len, fmt, rows=len(rows), skips=skips)
    return _per_row(path, rows, tokenizer, seq_len, fmt)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.

    Args:
        examples: at least one example.
        pad_id: id written into ``input_ids`` on padding (the tokenizer's pad id, or eos / 0
            when it has none; it is never attended to and never in ``labels``).

    Returns:
        ``input_ids`` (pad_id on padding), ``attention_mask`` (1 on tokens, 0 on padding),
        ``labels`` (-100 on padding), all int64 of shape (B, T).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    batch, longest = len(examples), max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def data_digest(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (recorded with a run, so a resume can check its data)."""
    path = Path(path)
    if not path.is_file():
        raise LoramError(f"data file not found: {path}")
    return sha256_file(path)


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise LoramError(f"data file not found: {path}; pass an existing .txt or .jsonl file")
    try:
        # utf-8-sig drops a BOM (it would break JSON on line 1); universal newlines.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoramError(f"{path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None


def _looks_like_plain_text(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return True
    if suffix in _JSON_SUFFIXES:
        return False
    return text.lstrip()[:1] not in ("{", "[")


def _text_documents(text: str) -> list[str]:
    """Maximal runs of non-blank lines, joined with newlines."""
    docs, lines = [], []
    # split("\n"), not splitlines(): the latter also splits on \x0c, \u2028, ... inside text.
    for line in text.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            docs.append("\n".join(lines))
            lines = []
    if lines:
        docs.append("\n".join(lines))
    return docs


def _json_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """``(location, parsed row)`` for every non-blank line (or every item of a JSON array)."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoramError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        if isinstance(items, list):
            return [(f"item {i}", row) for i, row in enumerate(items, start=1)]
    rows = []
    # split("\n"): a JSON string may legally hold a raw U+2028, which splitlines() would cut.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise LoramError(
                f"{path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}); fix or remove that line"
            ) from None
    return rows


def _row_family(row: Any) -> str | None:
    """The format a row's keys point to (most specific first), or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "instructions"
    if "text" in row:
        return "jsonl-text"
    return None


def _detect_family(path: Path, rows: list[tuple[str, Any]]) -> str:
    first: dict[str, str] = {}  # family -> location of its first row
    for loc, row in rows:
        family = _row_family(row)
        if family is None or family in first:
            continue
        if first:
            other, other_loc = next(iter(first.items()))
            raise LoramError(
                f"{path} mixes data formats: {other_loc} is {other} but {loc} is {family}; "
                "use one format per file (or pass the format to keep and fix the other rows)"
            )
        first[family] = loc
    if not first:
        skips = Counter({"no text, instruction/output or messages field": len(rows)}) if rows else Counter()
        raise _no_usable_rows(path, "auto", skips)
    return next(iter(first))


def _no_usable_rows(path: Path, fmt: str, skips: Counter | None = None, dropped: int = 0, seq_len: int = 0) -> LoramError:
    detail = ""
    if skips:
        detail += "; skipped: " + ", ".join(f"{reason} ({n})" for reason, n in skips.most_common(3))
    if dropped:
        detail += f"; {dropped} rows have no response/assistant token within seq_len={seq_len} (raise seq_len)"
    return LoramError(f"no usable rows in {path} (expected {_EXPECTED[fmt]}){detail}")


# --------------------------------------------------------------------------- text formats


def _text_of(row: Any) -> str:
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise _SkipRow('"text" missing or not a non-empty string')
    return text


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def document_tokens(docs: Iterable[str], tokenizer: Any) -> Iterator[array]:
    """Each document's token ids with its separators: ``[bos] ids [eos]``.

    bos and eos are added when the tokenizer has them; bos is not repeated right after an
    eos with the same id (GPT-2), so consecutive documents are separated by one token.
    Concatenated, the pieces are the token stream the text formats are packed from.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    last: int | None = None  # last token of the stream so far
    for ids in _encoded_documents(docs, tokenizer):
        piece = array("i", [bos] if bos is not None and last != bos else [])  # bos == eos (GPT-2): one separator
        piece.extend(ids)
        if eos is not None:
            piece.append(eos)
        last = piece[-1] if piece else last
        yield piece


def _encoded_documents(docs: Iterable[str], tokenizer: Any) -> Iterator[Sequence[int]]:
    """Each document's ids: short ones ``_TOKENIZE_BATCH`` to a call, a long one piece by piece
    (memory near one piece's encoding plus 4 bytes a token, however long the document)."""
    for batch in _batched(docs, _TOKENIZE_BATCH):
        short = [len(doc) <= _MAX_PIECE_CHARS for doc in batch]
        encoded = iter(encode_ids(tokenizer, [doc for doc, ok in zip(batch, short) if ok]))
        for doc, ok in zip(batch, short):
            if ok:
                yield next(encoded)
                continue
            ids = array("i")
            for pieces in _batched(text_pieces(doc), 4):
                for piece_ids in encode_ids(tokenizer, pieces):
                    ids.extend(piece_ids)
            yield ids


def encode_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens, nothing else kept (no masks or type ids)."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]  # fmt: skip
    return list(out)


def text_pieces(text: str, limit: int = _MAX_PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, each (but the first)
    starting at a newline or a space when there is one in the window, so that encoding the
    pieces gives the ids of encoding the whole (pre-tokenizers split before whitespace)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(text.rfind("\n", start + 1, end), text.rfind(" ", start + 1, end))
        cut = cut if cut > start else end  # no whitespace in the window: a hard cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def _packed(
    path: Path, docs: Sequence[str], tokenizer: Any, seq_len: int, fmt: str, *, rows: int, skips: Counter
) -> tuple[list[Example], DataStats]:
    # 4 bytes a token (int32), as align's corpus: a Python list would take ~50.
    stream = array("i")
    for piece in document_tokens(docs, tokenizer):
        stream.extend(piece)
    n_blocks = len(stream) // seq_len
    examples: Sequence[Example]
    if n_blocks:
        tail = len(stream) - n_blocks * seq_len
        tokens_t = torch.frombuffer(stream, dtype=torch.int32)[: n_blocks * seq_len].clone()
        examples = PackedBlocks(tokens_t.view(n_blocks, seq_len))  # (N, T)
    else:  # shorter than one block: keep it whole, unpadded; a single token would carry no loss
        tail = 0
        examples = [Example(stream.tolist(), stream.tolist())] if len(stream) >= 2 else []
    if not examples:
        raise _no_usable_rows(path, fmt, skips)
    tokens = n_blocks * seq_len if n_blocks else len(examples[0].input_ids)
    stats = DataStats(
        fmt=fmt,
        rows=rows,
        examples=len(examples),
        tokens=tokens,
        trained_tokens=tokens,
        skipped_rows=sum(skips.values()),
        skip_reasons=dict(skips.most_common()),
        dropped_tail_tokens=tail,
    )
    return examples, stats


# --------------------------------------------------------------------------- instructions and chat


def _per_row(path: Path, rows: list[tuple[str, Any]], tokenizer: Any, seq_len: int, fmt: str) -> tuple[list[Example], DataStats]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    examples: list[Example] = []
    skips: Counter = Counter()
    truncated = dropped = 0
    max_chars = _MAX_ROW_CHARS_PER_TOKEN * seq_len
    for loc, row in rows:
        try:
            if _chars(row) > max_chars:
                raise _SkipRow(f"longer than {max_chars:,} characters ({_MAX_ROW_CHARS_PER_TOKEN} per token of --seq-len)")
            if fmt == "instructions":
                ids, labels = _encode_instruction(path, loc, row, tokenizer, has_template)
            else:
                ids, labels = _encode_chat(path, loc, row, tokenizer, has_template)
        except _SkipRow as skip:
            skips[str(skip)] += 1
            continue
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        # Position 0 is never predicted (the model shifts labels left by one).
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    if not examples:
        raise _no_usable_rows(path, fmt, skips, dropped, seq_len)
    stats = DataStats(
        fmt=fmt,
        rows=len(rows),
        examples=len(examples),
        tokens=sum(len(ex.input_ids) for ex in examples),
        trained_tokens=sum(label != IGNORE_INDEX for ex in examples for label in ex.labels),
        skipped_rows=sum(skips.values()),
        skip_reasons=dict(skips.most_common()),
        truncated_examples=truncated,
        dropped_examples=dropped,
    )
    return examples, stats


def _chars(row: Any) -> int:
    """Characters in every string of a parsed JSON row (bounded work: the row is in memory)."""
    if isinstance(row, str):
        return len(row)
    if isinstance(row, dict):
        return sum(_chars(v) for v in row.values())
    if isinstance(row, list):
        return sum(_chars(v) for v in row)
    return 0


def _encode_instruction(path: Path, loc: str, row: Any, tokenizer: Any, has_template: bool) -> tuple[list[int], list[int]]:
    if not isinstance(row, dict):
        raise _SkipRow("not a JSON object")
    instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _SkipRow('"instruction" missing or not a non-empty string')
    if not isinstance(output, str) or not output.strip():
        raise _SkipRow('"output" missing or not a non-empty string')
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise _SkipRow('"input" is not a string')
    has_input = bool(extra.strip())

    if has_template:
        user = instruction + ("\n\n" + extra if has_input else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _encode_conversation(path, loc, messages, tokenizer, None)

    prompt = "### Instruction:\n" + instruction
    if has_input:
        prompt += "\n\n### Input:\n" + extra
    prompt += "\n\n### Response:\n"
    text = prompt + output
    ids, labels = _encode_spans(tokenizer, text, [(len(prompt), len(text))])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    if eos is not None:  # the response ends with eos, and the model learns to emit it
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _encode_chat(path: Path, loc: str, row: Any, tokenizer: Any, has_template: bool) -> tuple[list[int], list[int]]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    ):
        raise _SkipRow('"messages" is not a non-empty list of {"role", "content"} with string values')
    # A leading assistant turn has no prompt before it (templates refuse an empty
    # conversation), so it is context, not trained.
    if not any(m["role"] == "assistant" for m in messages[1:]):
        raise _SkipRow("no assistant turn after the first message")
    template = None if has_template else FALLBACK_CHAT_TEMPLATE
    return _encode_conversation(path, loc, messages, tokenizer, template)


def _encode_conversation(
    path: Path, loc: str, messages: list[dict], tokenizer: Any, template: str | None
) -> tuple[list[int], list[int]]:
    full, spans = _assistant_spans(path, loc, messages, tokenizer, template)
    # The template writes bos/eos itself, as apply_chat_template(tokenize=True) assumes.
    return _encode_spans(tokenizer, full, spans)


def _render(tokenizer: Any, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raise_exception(), role checks, bad content: the row's fault
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _SkipRow(f"rejected by the chat template: {message}") from None


def _assistant_spans(
    path: Path, loc: str, messages: list[dict], tokenizer: Any, template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns.

    Turn ``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)``
    (the header that opens the assistant turn stays masked) to the end of
    ``render(messages[:i + 1])`` with trailing whitespace removed: content plus the
    end-of-turn token(s), but not the newline some templates write after them.  Both
    renderings must be string prefixes of the full one; a template that renders earlier
    turns differently once later turns exist (e.g. one that strips reasoning from history)
    cannot be masked this way and is refused.
    """
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i in range(1, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], template, True)
        upto = _render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(head) and full.startswith(upto) and len(upto) >= len(head)):
            raise LoramError(
                f"{path}, {loc}: the chat template cannot be masked reliably: rendering the first {i} "
                f"messages is not a prefix of rendering the whole conversation; use a tokenizer whose "
                f"template renders earlier turns unchanged, or convert the data to the instructions format"
            )
        start, end = len(head), len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def _encode_spans(tokenizer: Any, text: str, spans: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` once; a token is labelled iff its characters overlap a span.

    A BPE token that merges characters across a span edge (e.g. sentencepiece's "▁" that
    belongs to the prompt glued to the first response word) is trained: it is the token the
    model has to produce.  Same rule as transformers' ``return_assistant_tokens_mask``.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise LoramError(
            "this tokenizer cannot return character offsets, which masking needs; use its fast (tokenizers-backed) version"
        ) from None
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = sorted(spans)
    ends = [end for _, end in spans]
    labels = []
    for token, (start, end) in zip(ids, offsets):
        # The first span that ends after this token starts; it overlaps iff it starts before
        # the token ends.  Empty offsets (e.g. trimmed whitespace) count as the point `start`.
        k = bisect.bisect_right(ends, start)
        hit = k < len(spans) and spans[k][0] < max(end, start + 1)
        labels.append(token if hit else IGNORE_INDEX)
    return ids, labels
