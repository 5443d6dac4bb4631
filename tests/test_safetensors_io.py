"""loramkit.bundle.safetensors_io: the streaming writer and the bounded reader.

The safetensors library is the oracle: files the writer makes must load with it, and
the reader must return what it returns. Malformed files must be refused with a
one-line BundleError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramkit.bundle.safetensors_io import SafetensorsReader, StreamingWriter, nbytes_of, tensor_sha256
from loramkit.errors import BundleError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.f32": torch.randn(5, 7, generator=g),
        "b.bf16": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
        "c.i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "d.scalar": torch.tensor(3.25),
        "e.empty": torch.empty(0, 3),
        "f.f16": torch.randn(6, generator=g).to(torch.float16),
        "g.i64_empty": torch.empty(0, dtype=torch.int64),
    }


_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}


def _entries(ts: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(n, _CODE[t.dtype], tuple(t.shape)) for n, t in ts.items()]


def _write(path: Path, ts: dict[str, torch.Tensor], metadata=None) -> str:
    w = StreamingWriter(path, _entries(ts), metadata)
    for n, t in ts.items():
        w.write(n, t)
    return w.close()


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and _bits(a) == _bits(b)


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


# ----------------------------------------------------------------------------- writer


def test_writer_output_loads_with_safetensors(tmp_path):
    ts = _tensors()
    p = tmp_path / "x.safetensors"
    digest = _write(p, ts, {"format": "pt"})
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest()
    back = load_file(str(p))
    assert set(back) == set(ts)
    for n, t in ts.items():
        assert _same(back[n], t), n
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    n, header = _header(p)
    assert (8 + n) % 8 == 0  # data starts aligned, as the library writes it
    assert p.stat().st_size == 8 + n + sum(t.numel() * t.element_size() for t in ts.values())


def test_writer_size_and_entries(tmp_path):
    ts = _tensors()
    w = StreamingWriter(tmp_path / "y.safetensors", _entries(ts))
    for n, t in ts.items():
        w.write(n, t)
    w.close()
    assert w.size == (tmp_path / "y.safetensors").stat().st_size


def test_writer_accepts_non_contiguous_input(tmp_path):
    t = torch.randn(4, 6)
    tt = t.t()  # (6, 4), non-contiguous
    p = tmp_path / "t.safetensors"
    w = StreamingWriter(p, [("t", "F32", (6, 4))])
    w.write("t", tt)
    w.close()
    assert torch.equal(load_file(str(p))["t"], tt.contiguous())


@pytest.mark.parametrize(
    "name,tensor,msg",
    [
        ("second", torch.zeros(5, 7), "expected first"),  # wrong order
        ("first", torch.zeros(7, 5), "expected first"),  # wrong shape
        ("first", torch.zeros(5, 7, dtype=torch.float64), "expected first"),  # wrong dtype
        ("first", torch.zeros(5, 7, dtype=torch.bfloat16), "expected first"),
    ],
)
def test_writer_refuses_wrong_tensor(tmp_path, name, tensor, msg):
    w = StreamingWriter(tmp_path / "z.safetensors", [("first", "F32", (5, 7)), ("second", "F32", (2,))])
    with pytest.raises(RuntimeError, match=msg):
        w.write(name, tensor)
    w.abort()


def test_writer_close_before_all_tensors_raises(tmp_path):
    w = StreamingWriter(tmp_path / "z.safetensors", [("first", "F32", (5, 7)), ("second", "F32", (2,))])
    w.write("first", torch.zeros(5, 7))
    with pytest.raises(RuntimeError, match="1 of 2"):
        w.close()
    w.abort()


def test_writer_refuses_extra_tensor(tmp_path):
    w = StreamingWriter(tmp_path / "z.safetensors", [("first", "F32", (2,))])
    w.write("first", torch.zeros(2))
    with pytest.raises((RuntimeError, IndexError)):
        w.write("second", torch.zeros(2))
    w.abort()


# ----------------------------------------------------------------------------- reader


def test_reader_matches_safetensors(tmp_path):
    ts = _tensors()
    p = tmp_path / "lib.safetensors"
    save_file(ts, str(p), metadata={"format": "pt", "k": "v"})  # written by the library itself
    ref = load_file(str(p))
    with SafetensorsReader(p) as r:
        assert set(r.keys()) == set(ts)
        assert r.metadata == {"format": "pt", "k": "v"}
        for n in ts:
            got = r.get(n)
            assert _same(got, ref[n]), n
            info = r.tensors[n]
            assert info.shape == tuple(ts[n].shape) and info.dtype == _CODE[ts[n].dtype]
            assert info.nbytes == nbytes_of(info.dtype, info.shape) == ts[n].numel() * ts[n].element_size()
            assert info.numel == ts[n].numel()
        # the returned tensor owns its memory: changing it does not change a second read
        a = r.get("a.f32")
        a.zero_()
        assert _same(r.get("a.f32"), ref["a.f32"])


def test_reader_reads_streaming_writer_output(tmp_path):
    ts = _tensors()
    p = tmp_path / "w.safetensors"
    _write(p, ts)
    with SafetensorsReader(p) as r:
        for n, t in ts.items():
            assert _same(r.get(n), t)


def _valid_file(tmp_path: Path) -> Path:
    p = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}, str(p))
    return p


def _assert_refused(p: Path):
    with pytest.raises(BundleError) as ei:
        SafetensorsReader(p)
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg
    return msg


def test_reader_refuses_truncated_data(tmp_path):
    p = _valid_file(tmp_path)
    raw = p.read_bytes()
    for cut in (1, 4, 20):
        bad = tmp_path / f"trunc{cut}.safetensors"
        bad.write_bytes(raw[:-cut])
        _assert_refused(bad)


def test_reader_refuses_file_shorter_than_length_prefix(tmp_path):
    for n in (0, 3, 7):
        bad = tmp_path / f"short{n}.safetensors"
        bad.write_bytes(b"\x10" * n)
        _assert_refused(bad)


def test_reader_refuses_padded_file(tmp_path):
    p = _valid_file(tmp_path)
    bad = tmp_path / "padded.safetensors"
    bad.write_bytes(p.read_bytes() + b"\0" * 8)
    _assert_refused(bad)


def test_reader_refuses_garbage_header_length(tmp_path):
    p = _valid_file(tmp_path)
    raw = p.read_bytes()
    for n in (2**63 + 5, 2**40, 2**27):
        bad = tmp_path / f"len{n}.safetensors"
        bad.write_bytes(struct.pack("<Q", n) + raw[8:])
        _assert_refused(bad)


def test_reader_refuses_header_past_eof(tmp_path):
    p = _valid_file(tmp_path)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    bad = tmp_path / "past.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw) - 8 + 1) + raw[8:])
    _assert_refused(bad)
    # the header alone, cut short
    bad2 = tmp_path / "cut.safetensors"
    bad2.write_bytes(raw[: 8 + n // 2])
    _assert_refused(bad2)


def _with_header(tmp_path: Path, name: str, header, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return p


def test_reader_refuses_garbage_header_json(tmp_path):
    _assert_refused(_with_header(tmp_path, "json.safetensors", b"{not json", b""))
    _assert_refused(_with_header(tmp_path, "utf8.safetensors", b"\xff\xfe\xfd", b""))


@pytest.mark.parametrize(
    "header",
    [
        [],  # a JSON array, not an object
        "text",
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},  # offsets not integers
        {"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},  # negative dims
        {"w": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}},  # unknown dtype
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},  # size does not match shape
        {"w": {"dtype": "F32", "shape": [2]}},  # no offsets
        {"w": 5},
    ],
    ids=["array", "string", "str-offsets", "neg-dims", "dtype", "size", "no-offsets", "not-dict"],
)
def test_reader_refuses_malformed_header_entries(tmp_path, header):
    _assert_refused(_with_header(tmp_path, "bad.safetensors", header, b"\0" * 8))


def test_reader_refuses_missing_file(tmp_path):
    _assert_refused(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- tensor_sha256


def test_tensor_sha256_is_the_hash_of_the_stored_bytes(tmp_path):
    ts = _tensors()
    p = tmp_path / "h.safetensors"
    save_file(ts, str(p))
    raw = p.read_bytes()
    n, header = _header(p)
    for name, t in ts.items():
        begin, end = header[name]["data_offsets"]
        assert tensor_sha256(t) == hashlib.sha256(raw[8 + n + begin : 8 + n + end]).hexdigest(), name


def test_tensor_sha256_independent_of_name_and_layout(tmp_path):
    t = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    other = torch.randn(17)
    p1, p2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file({"x": t, "zzz": other}, str(p1))
    _write(p2, {"aaa": other, "renamed.weight": t, "pad": torch.zeros(3)})
    digests = set()
    for p, name in ((p1, "x"), (p2, "renamed.weight")):
        with SafetensorsReader(p) as r:
            digests.add(tensor_sha256(r.get(name)))
    digests.add(tensor_sha256(t))
    digests.add(tensor_sha256(t.t().contiguous().t()))  # same values, non-contiguous view
    assert digests == {hashlib.sha256(_bits(t)).hexdigest()}


def test_tensor_sha256_sees_every_bit():
    t = torch.randn(64)
    u = t.clone()
    u.view(torch.int32)[17] ^= 1  # one mantissa bit
    assert tensor_sha256(t) != tensor_sha256(u)
    assert tensor_sha256(torch.tensor([0.0])) != tensor_sha256(torch.tensor([-0.0]))  # bits, not values
    assert tensor_sha256(torch.empty(0)) == hashlib.sha256(b"").hexdigest()


def test_reader_refuses_overlapping_offsets(tmp_path):
    # sizes add up to the data length, but both tensors point at the first 8 bytes
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    p = _with_header(tmp_path, "overlap.safetensors", header, b"\0" * 16)
    with pytest.raises(Exception):
        load_file(str(p))  # the library refuses it too
    _assert_refused(p)


def test_reader_accepts_out_of_order_offsets(tmp_path):
    header = {
        "late": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        "early": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "none": {"dtype": "F32", "shape": [0], "data_offsets": [12, 12]},
    }
    data = struct.pack("<q", -5) + struct.pack("<f", 1.5)
    p = _with_header(tmp_path, "order.safetensors", header, data)
    ref = load_file(str(p))
    with SafetensorsReader(p) as r:
        for n in header:
            assert _same(r.get(n), ref[n])


def test_failed_reader_leaves_no_unraisable_errors(tmp_path, monkeypatch):
    import gc
    import sys

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    for i in range(3):
        with pytest.raises(BundleError):
            SafetensorsReader(tmp_path / f"missing{i}.safetensors")
    gc.collect()
    assert seen == []  # __del__ of a half-built reader must not raise


# ----------------------------------------------------------------------------- chunked copy


@pytest.mark.parametrize("chunk", [1, 7, 8, 64, 1 << 20])
def test_reader_chunks_reassemble_the_tensor(tmp_path, chunk):
    ts = _tensors()
    p = tmp_path / "c.safetensors"
    save_file(ts, str(p))
    with SafetensorsReader(p) as r:
        for n, t in ts.items():
            data = b"".join(bytes(piece) for piece in r.chunks(n, chunk))
            assert data == _bits(t), n


def test_writer_copy_from_reader(tmp_path):
    ts = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(ts, str(src))
    dst = tmp_path / "dst.safetensors"
    order = ["e.empty", "c.i64", "a.f32", "d.scalar", "b.bf16", "f.f16", "g.i64_empty"]
    w = StreamingWriter(dst, [(n, _CODE[ts[n].dtype], tuple(ts[n].shape)) for n in order], {"format": "pt"})
    with SafetensorsReader(src) as r:
        for n in order:
            h = hashlib.sha256()
            w.copy_from(r, n, h.update)
            assert h.hexdigest() == tensor_sha256(ts[n]), n
    digest = w.close()
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    back = load_file(str(dst))
    for n, t in ts.items():
        assert _same(back[n], t), n


def test_reads_into_a_scratch_buffer_and_hashes_beside_the_writes(tmp_path, monkeypatch):
    """Scratch reads (get/chunks into a reused buffer) and threaded hashing (every piece, here)
    give the same tensors, tensor digests and file digest as plain reads and writes."""
    import loramkit.bundle.safetensors_io as sio

    monkeypatch.setattr(sio, "_PARALLEL_FROM", 1)  # every piece through the worker threads
    ts = _tensors() | {"h.big": torch.randn(1024, 640, generator=torch.Generator().manual_seed(1))}  # 2.5 MiB
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(ts, str(src))
    order = sorted(ts)
    scratch = bytearray(max(t.numel() * t.element_size() for t in ts.values()))
    w = StreamingWriter(dst, [(n, _CODE[ts[n].dtype], tuple(ts[n].shape)) for n in order], {"format": "pt"})
    with SafetensorsReader(src) as r:
        for i, n in enumerate(order):
            got = r.get(n, scratch)
            assert _same(got, ts[n]) and sio.tensor_sha256_beside(got).result() == tensor_sha256(ts[n]), n
            if i % 2:
                w.write(n, got)
            else:
                h = hashlib.sha256()
                w.copy_from(r, n, h.update, buffer=scratch)
                assert h.hexdigest() == tensor_sha256(ts[n]), n
    assert w.close() == hashlib.sha256(dst.read_bytes()).hexdigest()
    back = load_file(str(dst))
    assert all(_same(back[n], t) for n, t in ts.items())


def test_writer_copy_from_refuses_wrong_tensor(tmp_path):
    ts = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(ts, str(src))
    w = StreamingWriter(tmp_path / "dst.safetensors", [("a.f32", "F32", (7, 5))])  # transposed shape
    with SafetensorsReader(src) as r, pytest.raises(RuntimeError, match="expected a.f32"):
        w.copy_from(r, "a.f32")
    w.abort()
