"""loramkit.train.data: formats, masking token by token, packing, refusals, collate.

Expectations are built independently of the code under test: token streams from plain
``tokenizer(...)`` calls, trained tokens from tokenizing the response / assistant content on
its own plus eos, prompts from ``apply_chat_template`` or the documented Alpaca layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from loramkit.errors import LoramError
from loramkit.train.data import (
    FALLBACK_CHAT_TEMPLATE,
    FORMATS,
    Example,
    collate,
    data_digest,
    load_examples,
    load_examples_with_stats,
)
from tests.factory import BOS_ID, EOS_ID, PAD_ID, sample_texts, tiny_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """The same tokenizer without a chat template (exercises the fallbacks)."""
    t = tiny_tokenizer()
    t.chat_template = None
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_runs(ex: Example) -> list[list[int]]:
    """Maximal runs of trained positions, as token ids; also checks labels are ids or -100."""
    assert len(ex.labels) == len(ex.input_ids)
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        assert label in (token, IGNORE)
        if label == IGNORE:
            if current:
                runs.append(current)
                current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


# --------------------------------------------------------------------------- text formats

DOCS = [
    " ".join(sample_texts(6, seed=1)),
    sample_texts(3, seed=2)[0] + "\n" + sample_texts(3, seed=2)[1],  # one doc, two lines
    " ".join(sample_texts(9, seed=3)),
    sample_texts(1, seed=4)[0],
]


def doc_stream(tok, docs) -> list[int]:
    out = []
    for doc in docs:
        out += [BOS_ID] + encode(tok, doc) + [EOS_ID]
    return out


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_text_packs_stream_into_full_blocks(tmp_path, tok, seq_len):
    # Blank-line separators of several kinds, including whitespace-only lines.
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n" + DOCS[0] + "\n\n" + DOCS[1] + "\n\n\n  \n" + DOCS[2] + "\n \n" + DOCS[3] + "\n")
    examples, stats = load_examples_with_stats(path, tok, seq_len)
    stream = doc_stream(tok, DOCS)
    assert stats.fmt == "text" and stats.rows == len(DOCS)
    assert len(examples) == len(stream) // seq_len > 1
    assert all(len(ex.input_ids) == seq_len for ex in examples)
    assert sum((ex.input_ids for ex in examples), []) == stream[: len(examples) * seq_len]
    assert stats.dropped_tail_tokens == len(stream) % seq_len
    assert all(ex.labels == ex.input_ids for ex in examples)
    # eos ends every document and bos opens the next one.
    assert stream.count(EOS_ID) == len(DOCS) and stream.count(BOS_ID) == len(DOCS)


def test_text_shorter_than_one_block_is_kept_unpadded(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text(DOCS[3] + "\n\n" + DOCS[1])
    examples, fmt = load_examples(path, tok, 512)
    stream = doc_stream(tok, [DOCS[3], DOCS[1]])
    assert fmt == "text" and len(stream) < 512
    assert [ex.input_ids for ex in examples] == [stream]
    assert examples[0].labels == stream


def test_jsonl_text_packs_like_text_and_skips_rows_without_text(tmp_path, tok):
    rows = [
        {"text": DOCS[0]},
        {"text": DOCS[1], "meta": 1},
        {"title": "no text"},
        {"text": DOCS[2]},
        {"text": ""},
        {"text": DOCS[3]},
    ]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", rows)
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS))
    from_jsonl, stats = load_examples_with_stats(jsonl, tok, 16)
    from_txt, _ = load_examples(txt, tok, 16)
    assert stats.fmt == "jsonl-text"
    assert from_jsonl == from_txt
    assert stats.skipped_rows == 2 and stats.rows == 6


# --------------------------------------------------------------------------- instructions

INSTRUCTIONS = [
    {
        "instruction": "Who painted the red barn?",
        "input": "The old farmer painted the red barn.",
        "output": "The old farmer did.",
    },
    {"instruction": "Describe the quiet lake.", "output": "The water was calm and the sun was bright."},
    {"instruction": "Repeat the word.", "input": "", "output": "again"},  # empty input = no input
    {"instruction": "Count to three.", "input": None, "output": "1 2 3"},
]


def user_text(row) -> str:
    extra = row.get("input") or ""
    return row["instruction"] + ("\n\n" + extra if extra else "")


def test_instructions_with_chat_template_train_only_the_response(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTIONS)
    examples, fmt = load_examples(path, tok, 256)
    assert fmt == "instructions" and len(examples) == len(INSTRUCTIONS)
    for row, ex in zip(INSTRUCTIONS, examples):
        messages = [{"role": "user", "content": user_text(row)}, {"role": "assistant", "content": row["output"]}]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert ex.input_ids == encode(tok, rendered)
        # Every prompt token is masked; the response plus its eos is trained, nothing after.
        n_prompt = len(encode(tok, prompt))
        assert ex.input_ids[:n_prompt] == encode(tok, prompt)
        assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
        response = encode(tok, row["output"]) + [EOS_ID]
        assert ex.labels[n_prompt : n_prompt + len(response)] == response
        assert all(label == IGNORE for label in ex.labels[n_prompt + len(response) :])  # the template's "\n"
        assert trained_runs(ex) == [response]
        assert tok.decode(response) == row["output"] + "</s>"
    # With input: instruction, blank line, input in the user turn; without: no blank line.
    assert "Who painted the red barn?\n\nThe old farmer" in tok.decode(examples[0].input_ids)
    assert "Repeat the word.</s>" in tok.decode(examples[2].input_ids)


def test_instructions_without_chat_template_use_alpaca_layout(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTIONS)
    examples, fmt = load_examples(path, plain_tok, 256)
    assert fmt == "instructions" and len(examples) == len(INSTRUCTIONS)
    for row, ex in zip(INSTRUCTIONS, examples):
        prompt = "### Instruction:\n" + row["instruction"]
        if row.get("input"):
            prompt += "\n\n### Input:\n" + row["input"]
        prompt += "\n\n### Response:\n"
        assert plain_tok.decode(ex.input_ids) == "<s>" + prompt + row["output"] + "</s>"
        assert ex.input_ids[0] == BOS_ID and ex.input_ids[-1] == EOS_ID
        assert ex.labels[0] == IGNORE and ex.labels[-1] == EOS_ID
        response = encode(plain_tok, row["output"]) + [EOS_ID]
        assert ex.labels[-len(response) :] == response
        assert ex.labels[: -len(response)] == [IGNORE] * (len(ex.labels) - len(response))
        assert ex.input_ids.count(EOS_ID) == 1
    assert "### Input:" not in plain_tok.decode(examples[1].input_ids)
    assert "### Input:" not in plain_tok.decode(examples[2].input_ids)


def test_instruction_rows_missing_fields_are_skipped_and_counted(tmp_path, tok):
    rows = [
        INSTRUCTIONS[0],
        {"instruction": "no output"},
        {"output": "no instruction"},
        {"instruction": "x", "output": 5},
        {"instruction": "x", "input": ["list"], "output": "y"},
        INSTRUCTIONS[1],
    ]
    examples, stats = load_examples_with_stats(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 256)
    assert stats.fmt == "instructions"
    assert len(examples) == 2 and stats.skipped_rows == 4 and stats.rows == 6
    assert sum(stats.skip_reasons.values()) == 4


def test_prompt_longer_than_seq_len_is_dropped_and_counted(tmp_path, tok):
    long_row = {"instruction": " ".join(sample_texts(20, seed=5)), "output": "yes"}
    path = write_jsonl(tmp_path / "sft.jsonl", [long_row, INSTRUCTIONS[1]])
    examples, stats = load_examples_with_stats(path, tok, 48)
    assert stats.dropped_examples == 1 and len(examples) == 1
    assert trained_runs(examples[0]) == [encode(tok, INSTRUCTIONS[1]["output"]) + [EOS_ID]]
    # Every row too long: refused, and the message says to raise seq_len.
    with pytest.raises(LoramError, match=r"no usable rows in .*seq_len=48"):
        load_examples(write_jsonl(tmp_path / "long.jsonl", [long_row]), tok, 48)


def test_truncation_keeps_the_first_seq_len_tokens(tmp_path, tok):
    row = {"instruction": "Tell a story.", "output": " ".join(sample_texts(10, seed=6))}
    path = write_jsonl(tmp_path / "sft.jsonl", [row])
    full, _ = load_examples(path, tok, 4096)
    cut, stats = load_examples_with_stats(path, tok, 40)
    assert stats.truncated_examples == 1
    assert cut[0].input_ids == full[0].input_ids[:40] and cut[0].labels == full[0].labels[:40]
    assert EOS_ID not in cut[0].labels  # the response was cut before its end


# --------------------------------------------------------------------------- chat

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Where is the stone bridge?"},
    {"role": "assistant", "content": "The stone bridge is by the quiet lake."},
    {"role": "user", "content": "Who built it?"},
    {"role": "assistant", "content": "The tall engineer built it in 1950."},
]
ASSISTANT_CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
MASKED_CONTENTS = [m["content"] for m in CONVERSATION if m["role"] != "assistant"]


def check_conversation(tok, ex: Example, rendered: str) -> None:
    assert ex.input_ids == encode(tok, rendered)
    runs = trained_runs(ex)
    assert runs == [encode(tok, content) + [EOS_ID] for content in ASSISTANT_CONTENTS]
    assert [tok.decode(run) for run in runs] == [content + "</s>" for content in ASSISTANT_CONTENTS]
    labelled_text = "".join(tok.decode(run) for run in runs)
    for content in MASKED_CONTENTS:
        assert content not in labelled_text
    # Each trained run starts right after the assistant header.
    header = "<|assistant|>\n" if tok.chat_template else "### Assistant:\n"
    header_ids = encode(tok, header)
    starts = [k for k in range(1, len(ex.labels)) if ex.labels[k] != IGNORE and ex.labels[k - 1] == IGNORE]
    assert len(starts) == 2
    for k in starts:
        assert ex.input_ids[k - len(header_ids) : k] == header_ids


def test_chat_trains_every_assistant_turn_and_masks_the_rest(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    examples, fmt = load_examples(path, tok, 256)
    assert fmt == "chat" and len(examples) == 1
    check_conversation(tok, examples[0], tok.apply_chat_template(CONVERSATION, tokenize=False))


def test_chat_without_template_uses_documented_fallback(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    examples, fmt = load_examples(path, plain_tok, 256)
    assert fmt == "chat"
    rendered = plain_tok.apply_chat_template(CONVERSATION, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False)
    assert rendered.startswith("<s>### System:\nYou answer in one sentence.\n\n### User:\n")
    check_conversation(plain_tok, examples[0], rendered)


def test_chat_rows_without_a_trainable_assistant_turn_are_skipped(tmp_path, tok):
    rows = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "Hello?"}]},  # nothing to train
        {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}]},  # leading only
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
    ]
    examples, stats = load_examples_with_stats(write_jsonl(tmp_path / "chat.jsonl", rows), tok, 256)
    assert len(examples) == 1 and stats.skipped_rows == 5


def test_chat_leading_assistant_turn_is_context(tmp_path, tok):
    messages = [{"role": "assistant", "content": "Welcome back."}] + CONVERSATION[1:]
    examples, _ = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok, 256)
    assert trained_runs(examples[0]) == [encode(tok, c) + [EOS_ID] for c in ASSISTANT_CONTENTS]


def test_prefix_unstable_chat_template_is_refused(tmp_path):
    t = tiny_tokenizer()
    # Marks the last message: earlier renderings are not prefixes of the full one.
    t.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(LoramError, match="cannot be masked reliably") as info:
        load_examples(path, t, 256)
    assert "line 1" in str(info.value) and "\n" not in str(info.value)


def test_token_straddling_the_span_start_is_trained(tmp_path):
    # The generation prompt ends mid-word (" far"), the answer finishes it ("mer ...");
    # byte-level BPE makes " farmer" one token whose offsets cross the span start.
    t = tiny_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' far' + m['content'] + eos_token }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' far' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "The old"}, {"role": "assistant", "content": "mer walked."}]
    full = "The old farmer walked.</s>"
    enc = t(full, add_special_tokens=False, return_offsets_mapping=True)
    head = len("The old far")
    assert any(s < head < e for s, e in enc["offset_mapping"])  # the test really has a straddling token
    examples, _ = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), t, 64)
    assert examples[0].input_ids == enc["input_ids"]
    assert trained_runs(examples[0]) == [encode(t, " farmer walked.") + [EOS_ID]]
    assert examples[0].labels[:2] == [IGNORE, IGNORE]  # "The", " old"


# --------------------------------------------------------------------------- detection, refusals


def test_auto_detection_and_fmt_override(tmp_path, tok):
    txt = tmp_path / "a.txt"
    txt.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    sft = write_jsonl(tmp_path / "s.jsonl", INSTRUCTIONS)
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(INSTRUCTIONS, indent=2))
    sniffed = tmp_path / "data.records"
    sniffed.write_text(json.dumps({"messages": CONVERSATION}) + "\n")

    assert load_examples(txt, tok, 16)[1] == "text"  # .txt is text even if it looks like JSON
    assert load_examples(chat, tok, 256)[1] == "chat"
    assert load_examples(sft, tok, 256)[1] == "instructions"
    assert load_examples(docs, tok, 16)[1] == "jsonl-text"
    assert load_examples(alpaca, tok, 256) == load_examples(sft, tok, 256)
    assert load_examples(sniffed, tok, 256)[1] == "chat"

    # Forcing a format.
    forced, fmt = load_examples(txt, tok, 16, fmt="jsonl-text")
    assert fmt == "jsonl-text" and sum((e.input_ids for e in forced), []) == doc_stream(tok, [DOCS[0]])[: len(forced) * 16]
    raw, fmt = load_examples(docs, tok, 16, fmt="text")
    assert fmt == "text" and tok.decode(raw[0].input_ids).startswith('<s>{"text": ')
    with pytest.raises(LoramError, match="no usable rows"):
        load_examples(chat, tok, 256, fmt="instructions")
    with pytest.raises(LoramError, match="unknown data format"):
        load_examples(chat, tok, 256, fmt="sharegpt")
    assert set(FORMATS) == {"text", "jsonl-text", "instructions", "chat"}


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.txt", ""),
        ("blank.txt", "\n  \n\t\n\n"),
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n   \n"),
        ("nofields.jsonl", '{"a": 1}\n{"prompt": "x", "completion": "y"}\n[1, 2]\n'),
        ("nooutput.jsonl", '{"instruction": "x"}\n{"instruction": "y", "output": ""}\n'),
        ("noassistant.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
        ("blanktext.jsonl", '{"text": ""}\n{"text": "   "}\n'),
    ],
)
def test_file_without_usable_rows_is_refused(tmp_path, tok, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoramError, match=r"no usable rows in .*\(expected ") as info:
        load_examples(path, tok, 64)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_malformed_json_line_names_its_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(INSTRUCTIONS[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(LoramError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_examples(path, tok, 64)


def test_mixed_formats_are_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", [INSTRUCTIONS[0], {"messages": CONVERSATION}])
    with pytest.raises(LoramError, match="line 1 is instructions but line 2 is chat"):
        load_examples(path, tok, 256)


def test_other_user_errors(tmp_path, tok):
    with pytest.raises(LoramError, match="not found"):
        load_examples(tmp_path / "missing.jsonl", tok, 64)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LoramError, match="not UTF-8"):
        load_examples(bad, tok, 64)
    with pytest.raises(LoramError, match="seq_len"):
        load_examples(write_jsonl(tmp_path / "s.jsonl", INSTRUCTIONS), tok, 1)


def test_json_line_with_unicode_line_separator_is_one_row(tmp_path, tok):
    row = {"instruction": "Join\u2028these", "output": "done\u2029"}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    examples, stats = load_examples_with_stats(path, tok, 128)
    assert stats.rows == 1 and len(examples) == 1


# --------------------------------------------------------------------------- determinism, digest


def test_same_inputs_give_same_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    first = load_examples(path, tok, 64)
    assert load_examples(path, tiny_tokenizer(), 64) == first


def test_data_digest_is_sha256_of_bytes(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"hello\n\nworld\n")
    assert data_digest(path) == hashlib.sha256(b"hello\n\nworld\n").hexdigest()
    path.write_bytes(b"hello\n\nworld!\n")
    assert data_digest(path) == hashlib.sha256(b"hello\n\nworld!\n").hexdigest()


# --------------------------------------------------------------------------- collate


@pytest.mark.parametrize("pad_id", [0, PAD_ID, EOS_ID])
def test_collate_masks_padding_token_by_token(pad_id):
    examples = [
        Example([5, 6, 7], [IGNORE, 6, 7]),
        Example([8, 9, 10, 11, 12], [IGNORE, IGNORE, 10, 11, 12]),
        Example([13, 14], [IGNORE, 14]),
    ]
    batch = collate(examples, pad_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (3, 5) and batch[key].dtype == torch.long
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        for t in range(5):
            if t < n:
                assert batch["input_ids"][b, t] == ex.input_ids[t]
                assert batch["labels"][b, t] == ex.labels[t]
                assert batch["attention_mask"][b, t] == 1
            else:
                assert batch["input_ids"][b, t] == pad_id
                assert batch["labels"][b, t] == IGNORE
                assert batch["attention_mask"][b, t] == 0
    assert not (batch["labels"] == pad_id).any()


def test_collate_real_examples_never_label_the_pad_id(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTIONS)
    examples, _ = load_examples(path, tok, 256)
    batch = collate(examples, tok.pad_token_id)
    lengths = torch.tensor([len(ex.input_ids) for ex in examples])
    positions = torch.arange(batch["input_ids"].shape[1])
    padding = positions[None, :] >= lengths[:, None]  # (B, T)
    assert padding.any()
    assert torch.equal(batch["attention_mask"], (~padding).long())
    assert (batch["labels"][padding] == IGNORE).all()
    assert (batch["input_ids"][padding] == PAD_ID).all()
    assert not (batch["labels"] == PAD_ID).any()


def test_example_lengths_must_match():
    with pytest.raises(ValueError):
        Example([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------- bounded memory


def test_long_documents_are_encoded_in_pieces_with_the_ids_of_the_whole(tok, monkeypatch):
    """Pieces are cut before a newline or a space, where the pre-tokenizer splits anyway."""
    import random

    import loramkit.train.data as data

    rng = random.Random(0)
    words = " ".join(sample_texts(50, seed=4)).split()
    doc = "".join(rng.choice(words) + rng.choice([" ", " ", "  ", "\n", ", "]) for _ in range(3000))
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    for limit in (40, 97, 1000):
        pieces = list(data.text_pieces(doc, limit))
        assert "".join(pieces) == doc and all(len(p) <= limit for p in pieces) and len(pieces) > 1
        assert all(p[0] in " \n" for p in pieces[1:])
        monkeypatch.setattr(data, "_MAX_PIECE_CHARS", limit)
        stream = [t for piece in data.document_tokens(["short one", doc, "another"], tok) for t in piece]
        assert stream == list(data.document_tokens(["short one"], tok))[0].tolist() + [t for t in [BOS_ID, *whole, EOS_ID]] + [
            BOS_ID,
            *tok("another", add_special_tokens=False)["input_ids"],
            EOS_ID,
        ]
    assert list(data.text_pieces("x" * 10, 4)) == ["xxxx", "xxxx", "xx"]  # no whitespace: hard cuts


def test_packed_text_is_stored_as_int32_blocks(tmp_path, tok):
    from loramkit.train.data import PackedBlocks

    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(sample_texts(60, seed=2)))
    examples, stats = load_examples_with_stats(p, tok, 16)
    assert isinstance(examples, PackedBlocks) and examples.tokens.dtype == torch.int32
    assert examples.tokens.shape == (len(examples), 16) and stats.tokens == examples.tokens.numel()
    assert examples[0].input_ids == examples[0].labels == examples.tokens[0].tolist()


def test_an_instruction_row_far_longer_than_the_sequence_is_skipped(tmp_path, tok):
    rows = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "x " * 5000, "output": "too long"}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    examples, stats = load_examples_with_stats(path, tok, 64)
    assert len(examples) == 1 and stats.skipped_rows == 1
    assert any("characters (64 per token of --seq-len)" in r for r in stats.skip_reasons)
