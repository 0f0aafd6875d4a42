"""Hostile GGUF files: every row of the GGUF section of /work/shared/BAD-INPUTS.md.

Each bad file must raise exactly ``ModelFormatError`` (nothing else escapes) with a message that
names the file and the offending field/value; nothing may hang or allocate by a declared size.
The bytes are assembled by hand with the small ``struct.pack`` builder below, which a test first
proves byte-identical to ``write_gguf``'s output, so every case is "a valid file, one thing changed".
Metadata semantics (head counts, vocab sizes, ...) belong to the model loader and are tested there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import (HEADER_MEMORY_FACTOR, HEADER_MEMORY_SLACK, MAX_ARRAY_ITEMS,
                            MAX_METADATA_KEYS, MAX_TENSORS, GGUFFile, ModelFileNotFoundError,
                            ModelFormatError, StringArray, TensorSpec, ValueType, write_gguf)
from edgellama.quants import GGMLType

REPO_ROOT = Path(__file__).resolve().parents[1]
U64_MAX = (1 << 64) - 1
HANG_GUARD_SECONDS = 20  # generous: a correct parser answers in milliseconds


# ----- byte-level builder -------------------------------------------------------------------------

def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: u64 length + bytes (``length`` overrides the declared length)."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str | bytes, value: str | bytes) -> bytes:
    return kv(key, ValueType.STRING, gstr(value))


def kv_u32(key: str | bytes, value: int) -> bytes:
    return kv(key, ValueType.UINT32, struct.pack("<I", value))


def arr(item_type: int, count: int, items: bytes = b"") -> bytes:
    """An ARRAY value payload: u32 item type, u64 count, items."""
    return struct.pack("<IQ", item_type, count) + items


def tinfo(name: str | bytes, ne: list[int], ttype: int = GGMLType.F32, offset: int = 0,
          n_dims: int | None = None) -> bytes:
    """A tensor info record; ``ne`` in GGUF order (row length first), dims packed as int64."""
    return (gstr(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims)
            + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", ttype, offset))


W_DATA = np.arange(4, dtype=np.float32)
KV_ARCH = kv_str("general.architecture", "llama")
TI_W = tinfo("w", [4])
DATA_W = W_DATA.tobytes() + b"\0" * 16  # one F32 tensor of 4 elements, padded to 32


def gguf(kvs=(KV_ARCH,), tensors=(TI_W,), data=DATA_W, *, magic=b"GGUF", version=3,
         n_tensors=None, n_kv=None, pad_to=32, tail=b"") -> bytes:
    """Header (counts default to the real ones), padding to ``pad_to``, data section, ``tail``."""
    head = (magic + struct.pack("<I", version)
            + struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors))
    head += b"\0" * (-len(head) % pad_to)
    return head + data + tail


def pad_to_size(blob: bytes, size: int) -> bytes:
    return blob + b"\xab" * max(0, size - len(blob))


# ----- guards -------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm; a BaseException so no ``except Exception`` in the parser can hide it."""


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_GUARD_SECONDS):
    if not hasattr(signal, "setitimer"):  # Windows: the subprocess test still guards the worst case
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"GGUFFile did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_gguf(path) -> GGUFFile:
    with hang_guard():
        return GGUFFile(path)


def expect_error(path, *fragments: str) -> str:
    """GGUFFile(path) raises exactly ModelFormatError naming the file and every fragment."""
    with pytest.raises(Exception) as excinfo:
        open_gguf(path)
    # exactly ModelFormatError, or the one subclass for a missing file
    assert excinfo.type in (ModelFormatError, ModelFileNotFoundError), \
        f"{excinfo.type.__name__} escaped: {excinfo.value!r}"
    message = str(excinfo.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write_bytes(tmp_path: Path, blob: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


# ----- the builder is the writer -----------------------------------------------------------------

def test_builder_matches_write_gguf(tmp_path):
    path = tmp_path / "ok.gguf"
    write_gguf(path, {"general.architecture": "llama"}, [TensorSpec("w", GGMLType.F32, (4,))],
               [W_DATA])
    assert path.read_bytes() == gguf()
    g = open_gguf(write_bytes(tmp_path, gguf()))
    assert g.metadata == {"general.architecture": "llama"}
    assert np.array_equal(g.raw("w").view(np.float32), W_DATA)


# ----- the table ----------------------------------------------------------------------------------

def _truncated(cut: int) -> bytes:
    return gguf()[:cut]


def _nested(depth: int) -> bytes:
    """``depth`` levels of arrays, the innermost an empty u8 array."""
    payload = arr(ValueType.UINT8, 0)
    for _ in range(depth - 1):
        payload = arr(ValueType.ARRAY, 1, payload)
    return gguf(kvs=(kv("deep", ValueType.ARRAY, payload),))


def _two_tensors(off_a: int, off_b: int, ne_a=(16,), ne_b=(16,), data_len=128, pad_to=32,
                 extra_kvs=()) -> bytes:
    return gguf(kvs=(KV_ARCH, *extra_kvs),
                tensors=(tinfo("a", list(ne_a), offset=off_a), tinfo("b", list(ne_b), offset=off_b)),
                data=b"\0" * data_len, pad_to=pad_to)


def _alignment_kv(vtype: int, payload: bytes) -> bytes:
    return gguf(kvs=(KV_ARCH, kv("general.alignment", vtype, payload)))


BAD = [
    # --- too short, magic, version ---
    ("empty-file", b"", ["truncated or incomplete", "0 bytes"]),
    ("too-short-6-bytes", b"GGUF\x03\x00", ["truncated or incomplete", "6 bytes"]),
    ("too-short-23-bytes", gguf()[:23], ["truncated or incomplete", "23 bytes"]),
    ("wrong-magic-ggml", gguf(magic=b"GGML"), ["not a GGUF file", "b'GGML'"]),
    ("wrong-magic-lowercase", gguf(magic=b"gguf"), ["not a GGUF file", "b'gguf'"]),
    ("wrong-magic-zip", pad_to_size(b"PK\x03\x04", 64), ["not a GGUF file", "PK"]),
    ("version-0", gguf(version=0), ["unsupported GGUF version 0"]),
    ("version-1", gguf(version=1), ["unsupported GGUF version 1"]),
    ("version-4", gguf(version=4), ["unsupported GGUF version 4"]),
    ("version-u32-max", gguf(version=0xFFFFFFFF), ["unsupported GGUF version 4294967295"]),
    ("version-3-byte-swapped", gguf(version=0x03000000), ["byte-swapped", "version 3"]),
    ("version-2-byte-swapped", gguf(version=0x02000000), ["byte-swapped", "version 2"]),
    ("whole-header-big-endian",
     b"GGUF" + struct.pack(">IQQ", 3, 1, 1) + gguf()[24:], ["byte-swapped", "version 3"]),
    # --- counts ---
    ("tensor-count-u64-max", gguf(n_tensors=U64_MAX), [f"tensor count {U64_MAX}"]),
    ("tensor-count-2^31", gguf(n_tensors=1 << 31), [f"tensor count {1 << 31}"]),
    ("tensor-count-1000-in-small-file", gguf(n_tensors=1000), ["tensor count 1000"]),
    ("kv-count-u64-max", gguf(n_kv=U64_MAX), [f"metadata count {U64_MAX}"]),
    ("kv-count-2^31", gguf(n_kv=1 << 31), [f"metadata count {1 << 31}"]),
    ("kv-count-one-too-many", gguf(n_kv=2, tensors=(), data=b"", pad_to=1),
     ["truncated or incomplete", "metadata key #1"]),
    ("tensor-count-one-too-many", gguf(n_tensors=2, data=b"", pad_to=1), ["truncated or incomplete", "tensor #1"]),
    # --- string lengths ---
    ("key-length-u64-max", gguf(kvs=(gstr("k", U64_MAX) + struct.pack("<I", 4) + b"\0" * 4,)),
     ["truncated or incomplete", f"metadata key #0 needs {U64_MAX} bytes"]),
    ("key-length-2^40", gguf(kvs=(gstr("k", 1 << 40) + b"\0" * 8,)),
     ["truncated or incomplete", f"metadata key #0 needs {1 << 40} bytes"]),
    ("string-value-length-u64-max",
     gguf(kvs=(kv("general.name", ValueType.STRING, gstr("x", U64_MAX)),)),
     ["truncated or incomplete", "value of 'general.name'", str(U64_MAX)]),
    ("string-value-length-past-eof",
     gguf(kvs=(kv("general.name", ValueType.STRING, gstr("x", 10_000)),)),
     ["truncated or incomplete", "value of 'general.name'", "10000"]),
    ("tensor-name-length-u64-max", gguf(tensors=(gstr("w", U64_MAX) + b"\0" * 28,)),
     ["truncated or incomplete", "name of tensor #0", str(U64_MAX)]),
    ("string-in-array-length-u64-max",
     gguf(kvs=(kv("tokenizer.ggml.tokens", ValueType.ARRAY,
                  arr(ValueType.STRING, 2, gstr("a") + gstr("b", U64_MAX))),)),
     ["truncated or incomplete", "'tokenizer.ggml.tokens'", str(U64_MAX)]),
    # --- array counts: a ~500-byte file declaring 2^30 items (more in test_huge_array_counts_*) ---
    ("u8-array-2^30-items", pad_to_size(gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.UINT8, 1 << 30)),)), 500),
     ["'a'", f"array of {1 << 30} items", "truncated or incomplete"]),
    ("u64-array-u64-max-items", pad_to_size(gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.UINT64, U64_MAX)),)), 500),
     ["'a'", f"array of {U64_MAX} items"]),
    ("string-array-2^30-items",
     pad_to_size(gguf(kvs=(kv("tokenizer.ggml.tokens", ValueType.ARRAY, arr(ValueType.STRING, 1 << 30)),)), 500),
     ["'tokenizer.ggml.tokens'", f"array of {1 << 30} items", "truncated or incomplete"]),
    ("array-of-arrays-2^30-items",
     pad_to_size(gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.ARRAY, 1 << 30)),)), 500),
     ["'a'", "arrays of arrays are not supported"]),
    ("string-array-count-one-too-many",
     gguf(kvs=(kv("t", ValueType.ARRAY, arr(ValueType.STRING, 3, gstr("a") + gstr("b"))),), tensors=(),
          data=b"", pad_to=1),
     ["truncated or incomplete", "key 't'", "array of 3 items"]),
    # --- value / tensor types ---
    ("unknown-value-type-13", gguf(kvs=(kv("k", 13, b"\0" * 8),)), ["'k'", "unknown value type 13"]),
    ("unknown-value-type-u32-max", gguf(kvs=(kv("k", 0xFFFFFFFF, b"\0" * 8),)),
     ["'k'", "unknown value type 4294967295"]),
    ("unknown-array-item-type", gguf(kvs=(kv("k", ValueType.ARRAY, arr(13, 1, b"\0" * 8)),)),
     ["'k'", "unknown array item type 13"]),
    ("unknown-tensor-type-4-removed-q4_2", gguf(tensors=(tinfo("w", [32], ttype=4),)),
     ["'w'", "unknown tensor type 4"]),
    ("unknown-tensor-type-31", gguf(tensors=(tinfo("w", [4], ttype=31),)), ["'w'", "unknown tensor type 31"]),
    ("unknown-tensor-type-u32-max", gguf(tensors=(tinfo("w", [4], ttype=0xFFFFFFFF),)),
     ["'w'", "unknown tensor type 4294967295"]),
    # --- keys and names ---
    ("empty-key", gguf(kvs=(KV_ARCH, kv_u32("", 1))), ["metadata key #1 is empty"]),
    ("duplicate-key", gguf(kvs=(KV_ARCH, kv_u32("general.architecture", 1))),
     ["duplicate metadata key 'general.architecture'"]),
    ("duplicate-tensor-name", gguf(tensors=(tinfo("w", [4]), tinfo("w", [4], offset=32)), data=b"\0" * 64),
     ["duplicate tensor name 'w'"]),
    ("tensor-name-64-bytes", gguf(tensors=(tinfo("t" * 64, [4]),)), ["tensor #0 name", "longer than 63 bytes"]),
    ("tensor-name-300-bytes", gguf(tensors=(tinfo("t" * 300, [4]),)), ["tensor #0 name", "longer than 63 bytes"]),
    ("tensor-name-empty", gguf(tensors=(tinfo("", [4]),)), ["tensor #0 name ''", "empty"]),
    ("key-invalid-utf8", gguf(kvs=(KV_ARCH, kv_u32(b"general.\xff\xfe", 1))),
     ["metadata key #1", "not valid UTF-8"]),
    ("key-utf8-surrogate", gguf(kvs=(kv_u32(b"k\xed\xa0\x80", 1),)), ["metadata key #0", "not valid UTF-8"]),
    ("key-utf8-cut-multibyte", gguf(kvs=(kv_u32(b"k\xe2\x82", 1),)), ["metadata key #0", "not valid UTF-8"]),
    ("string-value-invalid-utf8", gguf(kvs=(kv_str("general.name", b"\xc0\xaf"),)),
     ["value of 'general.name'", "not valid UTF-8"]),
    ("tensor-name-invalid-utf8", gguf(tensors=(tinfo(b"w\xff", [4]),)), ["name of tensor #0", "not valid UTF-8"]),
    # --- bools and nesting ---
    ("bool-value-2", gguf(kvs=(kv("flag", ValueType.BOOL, b"\x02"),)), ["'flag'", "bool value 2"]),
    ("bool-value-255", gguf(kvs=(kv("flag", ValueType.BOOL, b"\xff"),)), ["'flag'", "bool value 255"]),
    ("bool-array-value-2", gguf(kvs=(kv("flags", ValueType.ARRAY, arr(ValueType.BOOL, 3, b"\x00\x01\x02")),)),
     ["'flags'", "bool value 2"]),
    # arrays of arrays: llama.cpp's reader refuses them, and each item would be a Python object
    ("arrays-nested-2-deep", _nested(2), ["'deep'", "arrays of arrays are not supported"]),
    ("arrays-nested-64-deep", _nested(64), ["'deep'", "arrays of arrays are not supported"]),
    ("array-of-5M-empty-arrays-declared",
     pad_to_size(gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.ARRAY, 5_000_000)),)), 500),
     ["'a'", "arrays of arrays are not supported"]),
    # --- dims ---
    ("n_dims-0", gguf(tensors=(tinfo("w", [], n_dims=0),)), ["'w'", "n_dims 0"]),
    ("n_dims-5", gguf(tensors=(tinfo("w", [4, 1, 1, 1, 1]),)), ["'w'", "n_dims 5"]),
    ("n_dims-u32-max", gguf(tensors=(tinfo("w", [4], n_dims=0xFFFFFFFF),)), ["'w'", "n_dims 4294967295"]),
    ("dim-negative", gguf(tensors=(tinfo("w", [4, -1]),)), ["'w'", "[4, -1]", "positive"]),
    ("dim-int64-min", gguf(tensors=(tinfo("w", [-(1 << 63)]),)), ["'w'", str(-(1 << 63)), "positive"]),
    ("dim-zero", gguf(tensors=(tinfo("w", [4, 0]),)), ["'w'", "[4, 0]", "positive"]),
    ("dims-product-overflows", gguf(tensors=(tinfo("w", [1 << 32, 1 << 32]),)),
     ["'w'", f"[{1 << 32}, {1 << 32}]", "overflow"]),
    ("dims-product-overflows-4d", gguf(tensors=(tinfo("w", [1 << 16] * 4),)), ["'w'", "overflow"]),
    ("dim-int64-max", gguf(tensors=(tinfo("w", [(1 << 63) - 1]),)), ["'w'", "overflow"]),
    ("row-length-not-multiple-of-q8_0-block", gguf(tensors=(tinfo("w", [33], ttype=GGMLType.Q8_0),)),
     ["'w'", "row length 33", "Q8_0 block size 32"]),
    ("row-length-not-multiple-of-q4_k-block", gguf(tensors=(tinfo("w", [32, 2], ttype=GGMLType.Q4_K),)),
     ["'w'", "row length 32", "Q4_K block size 256"]),
    # --- general.alignment ---
    ("alignment-string", _alignment_kv(ValueType.STRING, gstr("32")),
     ["general.alignment", "unsigned integer", "'32'"]),
    ("alignment-float32", _alignment_kv(ValueType.FLOAT32, struct.pack("<f", 32.0)),
     ["general.alignment", "unsigned integer", "32.0"]),
    ("alignment-float64", _alignment_kv(ValueType.FLOAT64, struct.pack("<d", 32.0)),
     ["general.alignment", "unsigned integer", "32.0"]),
    ("alignment-bool", _alignment_kv(ValueType.BOOL, b"\x01"), ["general.alignment", "unsigned integer", "True"]),
    ("alignment-array", _alignment_kv(ValueType.ARRAY, arr(ValueType.UINT32, 1, struct.pack("<I", 32))),
     ["general.alignment", "unsigned integer"]),
    ("alignment-zero", _alignment_kv(ValueType.UINT32, struct.pack("<I", 0)), ["general.alignment 0", "power of two"]),
    ("alignment-negative", _alignment_kv(ValueType.INT32, struct.pack("<i", -32)),
     ["general.alignment -32", "power of two"]),
    ("alignment-48-not-power-of-two", _alignment_kv(ValueType.UINT32, struct.pack("<I", 48)),
     ["general.alignment 48", "power of two"]),
    ("alignment-2^40", _alignment_kv(ValueType.UINT64, struct.pack("<Q", 1 << 40)),
     [f"general.alignment {1 << 40}"]),
    ("alignment-2^31", _alignment_kv(ValueType.UINT32, struct.pack("<I", 1 << 31)),
     [f"general.alignment {1 << 31}"]),
    # --- offsets ---
    ("offset-misaligned", gguf(tensors=(tinfo("w", [4], offset=4),)),
     ["'w'", "offset 4 is not a multiple of the alignment 32"]),
    ("offset-misaligned-custom-alignment",
     _two_tensors(0, 64, pad_to=128, data_len=256,
                  extra_kvs=(kv_u32("general.alignment", 128),)),
     ["'b'", "offset 64 is not a multiple of the alignment 128"]),
    ("offsets-identical", _two_tensors(0, 0), ["'a'", "'b'", "overlap"]),
    ("offsets-overlap-partially", _two_tensors(0, 32, ne_a=(16,), ne_b=(8,)), ["'a'", "'b'", "overlap"]),
    ("offsets-overlap-listed-in-reverse", _two_tensors(64, 32, ne_a=(8,), ne_b=(16,)),
     ["'a'", "'b'", "overlap"]),
    ("offset-out-of-data-section", gguf(tensors=(tinfo("w", [4], offset=1 << 40),)),
     ["'w'", str(1 << 40), "past the end", "truncated or incomplete"]),
    ("offset-near-u64-max", gguf(tensors=(tinfo("w", [4], offset=U64_MAX - 31),)),
     ["'w'", str(U64_MAX - 31), "past the end"]),
    ("tensor-extends-past-data-section", gguf(tensors=(tinfo("w", [16]),)),
     ["'w'", "[0, 64)", "32-byte data section", "truncated or incomplete"]),
    ("truncated-download-in-data", _truncated(len(gguf()) - 20),
     ["'w'", "file is truncated or incomplete"]),
    ("truncated-download-before-data-section",
     gguf(kvs=(kv_str("general.architecture", "llamas"),), data=b"")[:-1],
     ["file is truncated or incomplete", "before its tensor data section"]),
    ("truncated-download-in-header", _truncated(40), ["file is truncated or incomplete"]),
]


@pytest.mark.parametrize("blob, fragments", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_gguf(tmp_path, blob, fragments):
    expect_error(write_bytes(tmp_path, blob), *fragments)


def test_file_is_a_directory(tmp_path):
    d = tmp_path / "model.gguf"
    d.mkdir()
    expect_error(d, "is a directory")


def test_file_is_a_device_or_a_fifo(tmp_path):
    """They were "truncated or incomplete (0 bytes...)"."""
    expect_error(Path("/dev/zero"), "not a regular file")
    os.mkfifo(tmp_path / "fifo.gguf")
    expect_error(tmp_path / "fifo.gguf", "not a regular file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")
    with pytest.raises(FileNotFoundError) as e:  # also a ModelFormatError: either except catches it
        GGUFFile(tmp_path / "nope.gguf")
    assert isinstance(e.value, ModelFileNotFoundError) and isinstance(e.value, ModelFormatError)


def test_views_outlive_a_closed_file(tmp_path):
    """close() cannot unmap the file under a view that is still in use (np.memmap did: reading
    the view then crashed the process); run in a child so that a crash fails only this test."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        from edgellama.gguf import GGUFFile
        from edgellama.quants import GGMLType
        from tiny_model import write_tiny_model
        path = write_tiny_model({str(tmp_path / "m.gguf")!r}, GGMLType.Q8_0)
        f = GGUFFile(path)
        view = f.raw("token_embd.weight")
        want = int(view.sum())
        f.close()
        assert int(view.sum()) == want
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-500:])


def test_dangling_symlink(tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    expect_error(link, "no such file")


# ----- the edges just inside the limits load -----------------------------------------------------

GOOD = [
    ("tensor-name-63-bytes", gguf(tensors=(tinfo("t" * 63, [4]),))),
    ("n_dims-4", gguf(tensors=(tinfo("w", [4, 1, 1, 1]),))),
    ("arrays-not-nested", _nested(1)),
    ("no-tensors-no-metadata", gguf(kvs=(), tensors=(), data=b"")),
    ("alignment-1", gguf(kvs=(KV_ARCH, kv_u32("general.alignment", 1)), pad_to=1)),
    ("alignment-64", _two_tensors(0, 64, pad_to=64, extra_kvs=(kv_u32("general.alignment", 64),))),
    ("bool-0-and-1", gguf(kvs=(kv("t", ValueType.BOOL, b"\x01"), kv("f", ValueType.BOOL, b"\x00")))),
    ("tensors-adjacent-unordered", _two_tensors(64, 0)),
    ("trailing-bytes-after-data", gguf(tail=b"\0" * 100)),
]


@pytest.mark.parametrize("blob", [c[1] for c in GOOD], ids=[c[0] for c in GOOD])
def test_edge_cases_that_are_valid(tmp_path, blob):
    open_gguf(write_bytes(tmp_path, blob))


# ----- huge declared counts: fail at once, allocate nothing ---------------------------------------

HUGE_COUNT_CASES = [c for c in BAD if "2^30" in c[0] or "u64-max" in c[0] or "2^31" in c[0]]


@pytest.mark.parametrize("blob, fragments", [c[1:] for c in HUGE_COUNT_CASES],
                         ids=[c[0] for c in HUGE_COUNT_CASES])
def test_huge_counts_allocate_nothing(tmp_path, blob, fragments):
    path = write_bytes(tmp_path, blob)
    tracemalloc.start()
    try:
        expect_error(path, *fragments)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"parsing a {len(blob)}-byte file peaked at {peak} bytes"


def test_huge_array_counts_fail_at_once_in_a_subprocess(tmp_path):
    """The ~500-byte files declaring 2^30 items, each in a fresh interpreter under a hang guard."""
    paths = [write_bytes(tmp_path, blob, f"{i}.gguf")
             for i, (name, blob, _) in enumerate(BAD) if "array" in name and "2^30" in name]
    assert len(paths) == 3 and all(400 <= p.stat().st_size <= 600 for p in paths)
    script = textwrap.dedent("""
        import sys
        from edgellama.gguf import GGUFFile, ModelFormatError
        for path in sys.argv[1:]:
            try:
                GGUFFile(path)
            except ModelFormatError as e:
                print("rejected", e)
            else:
                print("accepted", path)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("rejected") for line in lines), lines
    assert all(str(1 << 30) in line or "arrays of arrays" in line for line in lines), lines


# ----- amplification: many tiny items cost memory and time in proportion to the file -------------
# The audit (issue 11, item 7): 60 MB of 5M empty sub-arrays took 25 s and 734 MB to parse.  Every
# shape that makes a Python object out of a few bytes is tried here on tens of MB, each parsed in a
# fresh interpreter that reports its peak RSS growth.

MIB = 1 << 20
RSS_NOISE = 16 * MIB  # what a parse that allocates nothing may still move the peak by

AMPLIFICATION_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from edgellama.gguf import GGUFFile, ModelFormatError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    try:
        GGUFFile(sys.argv[1])
        outcome, message = "accepted", ""
    except ModelFormatError as e:
        outcome, message = "rejected", str(e)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"outcome": outcome, "message": message, "growth": growth,
                      "seconds": time.perf_counter() - start}))
""")


def _strings(count: int, text: str) -> bytes:
    return arr(ValueType.STRING, count, gstr(text) * count)


def _keys(count: int, vtype: int = ValueType.UINT8, payload: bytes = b"\x01") -> tuple[bytes, ...]:
    return tuple(kv(f"k{i:08d}", vtype, payload) for i in range(count))


def _tensors(count: int) -> bytes:
    return gguf(kvs=(KV_ARCH,), tensors=tuple(tinfo(f"t{i:08d}", [8], offset=32 * i) for i in range(count)),
                data=b"\0" * (32 * count))


# (id, builder, how the file must be refused: "cap" = at once, before allocating; "account" = by the
# memory account, part-way; None = accepted), message fragments
AMPLIFICATION = [
    ("audit-5M-empty-sub-arrays-60MB",
     lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, arr(ValueType.ARRAY, 5_000_000,
                                                               arr(ValueType.UINT8, 0) * 5_000_000)))),
     "cap", ["'a'", "arrays of arrays are not supported"]),
    ("4M-one-item-sub-arrays-52MB",
     lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, arr(ValueType.ARRAY, 4_000_000,
                                                               arr(ValueType.UINT8, 1, b"\x07") * 4_000_000)))),
     "cap", ["'a'", "arrays of arrays are not supported"]),
    ("7.5M-empty-strings-60MB", lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, _strings(7_500_000, "")))),
     "cap", ["'a'", "array of 7500000 items", f"{MAX_ARRAY_ITEMS} items"]),
    ("4M-two-byte-strings-40MB", lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, _strings(4_000_000, "ab")))),
     "account", ["'a'", "of its 4000000 strings would take", "MiB of memory"]),
    ("3M-twelve-byte-strings-60MB",
     lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, _strings(3_000_000, "abcdefghijkl")))),
     None, []),
    ("20000-arrays-of-200-two-byte-strings-40MB",
     lambda: gguf(kvs=(KV_ARCH,) + tuple(kv(f"k{i:06d}", ValueType.ARRAY, _strings(200, "ab"))
                                         for i in range(20_000))),
     "account", ["strings would take", "MiB of memory"]),
    ("2M-keys-44MB", lambda: gguf(kvs=_keys(2_000_000)), "cap",
     ["metadata count 2000000", f"{MAX_METADATA_KEYS} keys"]),
    ("1M-tensors-73MB", lambda: _tensors(1_000_000), "cap", ["tensor count 1000000", f"{MAX_TENSORS} tensors"]),
    # inside the limits: accepted, at a cost in proportion to the bytes
    ("4M-empty-strings-32MB", lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, _strings(4_000_000, "")))),
     None, []),
    ("1M-forty-byte-strings-48MB", lambda: gguf(kvs=(KV_ARCH, kv("a", ValueType.ARRAY, _strings(1_000_000, "x" * 40)))),
     None, []),
    (f"{MAX_METADATA_KEYS}-keys", lambda: gguf(kvs=_keys(MAX_METADATA_KEYS)), None, []),
    (f"{MAX_TENSORS}-tensors", lambda: _tensors(MAX_TENSORS), None, []),
]


@pytest.mark.parametrize("build, refusal, fragments", [c[1:] for c in AMPLIFICATION],
                         ids=[c[0] for c in AMPLIFICATION])
def test_many_tiny_items_cost_memory_in_proportion_to_the_file(tmp_path, build, refusal, fragments):
    path = write_bytes(tmp_path, build())
    size = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", AMPLIFICATION_CHILD, str(path)], capture_output=True,
                              text=True, timeout=60, env=env)  # the audit's case took 25 s: "hangs" if > 60
    except subprocess.TimeoutExpired:
        pytest.fail(f"parsing the {size}-byte file did not end within 60 s")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # RSS counts the mapped file pages the parser read (at most the file) besides its objects
    limit = (HEADER_MEMORY_FACTOR + 1) * size + HEADER_MEMORY_SLACK + RSS_NOISE
    if refusal is None:
        assert result["outcome"] == "accepted", result["message"]
    else:
        assert result["outcome"] == "rejected", f"a {size}-byte file of tiny items was accepted"
        assert str(path) in result["message"]
        for fragment in fragments:
            assert fragment in result["message"], (fragment, result["message"])
        if refusal == "cap":  # refused from the declared count, before anything was allocated
            limit = RSS_NOISE
    assert result["growth"] <= limit, (f"parsing a {size / MIB:.0f} MiB file grew the peak RSS by "
                                       f"{result['growth'] / MIB:.0f} MiB (limit {limit / MIB:.0f} MiB)")


def _kept_bytes(path: Path) -> tuple[int, GGUFFile]:
    """What a parsed header keeps in Python objects (tracemalloc), and the parsed file."""
    tracemalloc.start()
    try:
        g = GGUFFile(path)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return kept, g


ACCOUNT_SHAPES = [
    ("u8-keys", lambda: gguf(kvs=_keys(5_000))),
    ("u64-keys", lambda: gguf(kvs=_keys(5_000, ValueType.UINT64, b"\xff" * 8))),
    ("f64-keys", lambda: gguf(kvs=_keys(5_000, ValueType.FLOAT64, struct.pack("<d", 0.1)))),
    ("string-keys", lambda: gguf(kvs=tuple(kv_str(f"k{i:08d}", f"value {i}") for i in range(5_000)))),
    ("u8-array-keys", lambda: gguf(kvs=_keys(5_000, ValueType.ARRAY, arr(ValueType.UINT8, 1, b"\x01")))),
    ("bool-array-keys", lambda: gguf(kvs=_keys(5_000, ValueType.ARRAY, arr(ValueType.BOOL, 1, b"\x01")))),
    ("empty-string-array-keys", lambda: gguf(kvs=_keys(5_000, ValueType.ARRAY, arr(ValueType.STRING, 0)))),
    ("tensors", lambda: _tensors(5_000)),
    ("strings-of-0-and-1-bytes", lambda: gguf(kvs=(kv("a", ValueType.ARRAY, _strings(20_000, "")),
                                                    kv("b", ValueType.ARRAY, _strings(20_000, "x"))))),
    ("strings-ascii", lambda: gguf(kvs=tuple(kv(f"s{n}", ValueType.ARRAY, _strings(5_000, "a" * n))
                                              for n in (2, 7, 8, 15, 16, 31, 100)))),
    ("strings-non-ascii", lambda: gguf(kvs=tuple(kv(f"s{i}", ValueType.ARRAY, _strings(5_000, t))
                                                  for i, t in enumerate(["é", "éa", "€", "€€x", "😀", "😀a", "ab€"])))),
]


@pytest.mark.parametrize("build", [c[1] for c in ACCOUNT_SHAPES], ids=[c[0] for c in ACCOUNT_SHAPES])
def test_the_memory_account_bounds_what_the_header_keeps(tmp_path, build):
    """The per-item costs the parser charges are upper bounds of what CPython really keeps."""
    kept, g = _kept_bytes(write_bytes(tmp_path, build()))
    assert kept <= g.header_memory, f"the header keeps {kept} bytes, the account says {g.header_memory}"


def test_an_array_of_strings_is_read_in_place(tmp_path):
    """A vocabulary's strings are not kept as Python objects: the header keeps 8 bytes per string
    (where each one starts) and decodes an item when asked; it still reads as the list it is."""
    texts = [f"Ġtok{i}" + "é" * (i % 3) for i in range(50_000)] + ["", "x", "日本語", "😀"]
    blob = b"".join(gstr(t) for t in texts)
    path = write_bytes(tmp_path, gguf(kvs=(KV_ARCH, kv("v", ValueType.ARRAY, arr(ValueType.STRING, len(texts), blob)))))
    kept, g = _kept_bytes(path)
    strings_alone = sum(sys.getsizeof(t) for t in texts)  # what a list of them would hold, and more
    assert kept < 8 * len(texts) + (64 << 10) < strings_alone / 5, (kept, strings_alone)
    v = g.metadata["v"]
    assert isinstance(v, StringArray) and len(v) == len(texts)
    assert list(v) == texts and v == texts and v == tuple(texts) and texts == v and v != texts[:-1]
    assert v != texts[:-1] + ["😁"] and v != "x" and (v == 3) is False
    assert v[0] == texts[0] and v[-1] == "😀" and v[-4] == "" and v[len(texts) - 2] == "日本語"
    assert v[np.int64(7)] == texts[7]
    assert v[10:20] == texts[10:20] and v[::9973] == texts[::9973] and v[-3:] == texts[-3:] and v[5:2] == []
    assert v[::-1][:3] == texts[::-1][:3] and v[-2:-60_000:-17] == texts[-2:-60_000:-17]
    assert list(v.lengths()) == [len(t.encode()) for t in texts]
    for bad in (len(texts), -len(texts) - 1):
        with pytest.raises(IndexError):
            v[bad]
    with pytest.raises(TypeError):
        v[1.5]
    with pytest.raises(TypeError):
        hash(v)
    assert "50004 strings" in repr(v) and len(repr(v)) < 120
    for i, metadata in enumerate((g.typed_metadata(), dict(g.metadata))):  # the writer copies it as the list
        written = tmp_path / f"copy{i}.gguf"                                  # it stands for, typed or not
        write_gguf(written, metadata, [TensorSpec("w", GGMLType.F32, (4,))], [W_DATA])
        assert open_gguf(written).metadata["v"] == texts


def test_real_sized_vocabularies_are_far_inside_the_account(tmp_path):
    """262,144 tokens and 524,288 merges (more than any real model: ~260k tokens, ~500k merges),
    with realistic lengths, use under two thirds of what the account allows."""
    tokens = [("Ġ" if i & 1 else "") + "etaoinshrdlu"[i % 5:][:1 + i % 7] + f"{i:x}" for i in range(262_144)]
    merges = [f"{tokens[i % 262_144]} {tokens[i * 7919 % 262_144]}"[:4 + i % 11] for i in range(524_288)]
    path = tmp_path / "vocab.gguf"
    write_gguf(path, {"general.architecture": "llama", "tokenizer.ggml.tokens": tokens,
                      "tokenizer.ggml.merges": merges,
                      "tokenizer.ggml.token_type": np.ones(len(tokens), np.int32)},
               [TensorSpec("w", GGMLType.F32, (4,))], [W_DATA])
    g = open_gguf(path)
    assert g.metadata["tokenizer.ggml.tokens"] == tokens and g.metadata["tokenizer.ggml.merges"] == merges
    assert g.header_memory <= (HEADER_MEMORY_FACTOR * g.data_offset + HEADER_MEMORY_SLACK) * 2 / 3


def test_edge_of_the_caps(tmp_path):
    """One item over each cap is refused, at once; exactly the cap loads (MAX_METADATA_KEYS and
    MAX_TENSORS are covered above)."""
    over = pad_to_size(gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.UINT8, MAX_ARRAY_ITEMS + 1)),)),
                       MAX_ARRAY_ITEMS + 200)
    expect_error(write_bytes(tmp_path, over, "over.gguf"), "'a'", f"array of {MAX_ARRAY_ITEMS + 1} items",
                 f"longer than the {MAX_ARRAY_ITEMS} items")
    at = gguf(kvs=(kv("a", ValueType.ARRAY, arr(ValueType.UINT8, MAX_ARRAY_ITEMS, b"\x01" * MAX_ARRAY_ITEMS)),),
              tensors=(), data=b"")
    assert len(open_gguf(write_bytes(tmp_path, at, "at.gguf")).metadata["a"]) == MAX_ARRAY_ITEMS
    keys = pad_to_size(gguf(kvs=(), tensors=(), data=b"", n_kv=MAX_METADATA_KEYS + 1), 14 * MAX_METADATA_KEYS + 100)
    expect_error(write_bytes(tmp_path, keys, "keys.gguf"), f"metadata count {MAX_METADATA_KEYS + 1}",
                 f"more than the {MAX_METADATA_KEYS} keys")
    tensors = pad_to_size(gguf(kvs=(), tensors=(), data=b"", n_tensors=MAX_TENSORS + 1), 33 * MAX_TENSORS + 100)
    expect_error(write_bytes(tmp_path, tensors, "tensors.gguf"), f"tensor count {MAX_TENSORS + 1}",
                 f"more than the {MAX_TENSORS} tensors")


# ----- valid round trip ---------------------------------------------------------------------------

def _sample_model(tmp_path: Path, alignment: int = 32):
    rng = np.random.default_rng(0)
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny ünïcode ✓",
        "llama.block_count": 2,
        "llama.rope.freq_base": 10000.0,
        "general.file_type": (ValueType.UINT32, 7),
        "a.u8": (ValueType.UINT8, 255), "a.i8": (ValueType.INT8, -128),
        "a.u16": (ValueType.UINT16, 65535), "a.i16": (ValueType.INT16, -32768),
        "a.i32": (ValueType.INT32, -(1 << 31)), "a.u64": (ValueType.UINT64, U64_MAX),
        "a.i64": (ValueType.INT64, -(1 << 63)), "a.f64": (ValueType.FLOAT64, 0.1),
        "a.bool": True, "a.false": False,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "", "▁hello", "\n"],
        "tokenizer.ggml.scores": np.array([0.0, -1.5, -2.25, 0.0, -3.0, -4.0], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 1, 1, 6], dtype=np.int32),
        "a.u64s": (ValueType.ARRAY, (ValueType.UINT64, np.array([0, U64_MAX], dtype=np.uint64))),
        "a.bools": (ValueType.ARRAY, (ValueType.BOOL, np.array([True, False, True]))),
        "a.empty": (ValueType.ARRAY, (ValueType.STRING, [])),
    }
    q8 = np.zeros((3, 34), dtype=np.uint8)
    q8[:, 2:] = rng.integers(0, 256, (3, 32))
    q8[:, :2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    tensors = [
        (TensorSpec("token_embd.weight", GGMLType.F16, (6, 8)), rng.standard_normal((6, 8)).astype(np.float16)),
        (TensorSpec("blk.0.attn_q.weight", GGMLType.Q8_0, (3, 32)), q8),
        (TensorSpec("blk.0.attn_norm.weight", GGMLType.F32, (8,)), rng.standard_normal(8).astype(np.float32)),
        (TensorSpec("output_norm.weight", GGMLType.F32, (2, 1, 1, 8)), rng.standard_normal((2, 1, 1, 8)).astype(np.float32)),
    ]
    path = tmp_path / "model.gguf"
    write_gguf(path, metadata, [s for s, _ in tensors], [d for _, d in tensors], alignment=alignment)
    return path, metadata, tensors


def _same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
    if isinstance(a, StringArray):  # how the reader gives an array of strings (read in place)
        return type(b) is list and list(a) == b and a[:] == b and [a[i] for i in range(-len(b), 0)] == b
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("alignment", [32, 64])
def test_round_trip(tmp_path, alignment):
    path, metadata, tensors = _sample_model(tmp_path, alignment)
    g = open_gguf(path)
    assert g.version == 3 and g.alignment == alignment
    expected = {
        "general.architecture": "llama", "general.name": "tiny ünïcode ✓", "llama.block_count": 2,
        "llama.rope.freq_base": 10000.0, "general.file_type": 7,
        "a.u8": 255, "a.i8": -128, "a.u16": 65535, "a.i16": -32768, "a.i32": -(1 << 31),
        "a.u64": U64_MAX, "a.i64": -(1 << 63), "a.f64": 0.1, "a.bool": True, "a.false": False,
        "tokenizer.ggml.tokens": metadata["tokenizer.ggml.tokens"],
        "tokenizer.ggml.scores": metadata["tokenizer.ggml.scores"],
        "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"],
        "a.u64s": np.array([0, U64_MAX], dtype=np.uint64),
        "a.bools": np.array([True, False, True]), "a.empty": [],
    }
    if alignment != 32:
        expected["general.alignment"] = alignment
    assert set(g.metadata) == set(expected)
    for key, value in expected.items():
        assert _same_value(g.metadata[key], value), (key, g.metadata[key], value)

    typed = g.typed_metadata()
    assert typed["a.i8"] == (ValueType.INT8, -128)
    assert typed["a.f64"] == (ValueType.FLOAT64, 0.1)
    assert typed["llama.rope.freq_base"] == (ValueType.FLOAT32, 10000.0)
    assert typed["llama.block_count"] == (ValueType.UINT32, 2)
    assert typed["a.bool"] == (ValueType.BOOL, True)
    assert typed["general.name"] == (ValueType.STRING, "tiny ünïcode ✓")
    assert typed["tokenizer.ggml.tokens"][1][0] == ValueType.STRING
    assert typed["tokenizer.ggml.scores"][1][0] == ValueType.FLOAT32
    assert typed["tokenizer.ggml.token_type"][1][0] == ValueType.INT32
    assert typed["a.u64s"][1][0] == ValueType.UINT64
    assert typed["a.bools"][1][0] == ValueType.BOOL
    assert typed["a.empty"][1] == (ValueType.STRING, [])

    assert list(g.tensors) == [s.name for s, _ in tensors]
    for spec, data in tensors:
        info = g.tensor(spec.name)
        assert (info.qtype, info.shape, info.nbytes) == (spec.qtype, spec.shape, spec.nbytes)
        assert info.offset % alignment == 0 and info.offset >= g.data_offset
        assert g.raw(spec.name).tobytes() == np.ascontiguousarray(data).tobytes()
    assert g.rows("blk.0.attn_q.weight").shape == (3, 34)
    assert g.rows("output_norm.weight").shape == (2, 32)

    # typed_metadata + the tensors rewrite the very same bytes
    copy = tmp_path / "copy.gguf"
    write_gguf(copy, typed, [s for s, _ in tensors], [g.raw(s.name) for s, _ in tensors], alignment=alignment)
    assert copy.read_bytes() == path.read_bytes()


def test_round_trip_agrees_with_gguf_py(tmp_path):
    gguf_py = pytest.importorskip("gguf")
    path, metadata, tensors = _sample_model(tmp_path)
    reader = gguf_py.GGUFReader(str(path))
    assert reader.fields["general.name"].contents() == "tiny ünïcode ✓"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == metadata["tokenizer.ggml.tokens"]
    ours = open_gguf(path)
    for t in reader.tensors:
        info = ours.tensor(t.name)
        assert int(t.tensor_type) == info.qtype and int(t.data_offset) == info.offset
        assert tuple(int(d) for d in reversed(t.shape)) == info.shape


def test_tensors_and_arrays_are_read_only_views(tmp_path):
    path, _, tensors = _sample_model(tmp_path)
    g = open_gguf(path)
    for spec, _ in tensors:
        for view in (g.raw(spec.name), g.rows(spec.name)):
            assert not view.flags.writeable
            with pytest.raises((ValueError, TypeError)):
                view[0] = 1
            with pytest.raises((ValueError, TypeError)):
                view.setflags(write=True)
            assert not view.flags.owndata  # a view into the map, not a copy
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type", "a.u64s", "a.bools"):
        with pytest.raises(ValueError):
            g.metadata[key][0] = 0


# ----- fuzz: random corruptions and truncations ---------------------------------------------------

def _fuzz_base(tmp_path: Path) -> tuple[bytes, int]:
    base = tmp_path / "base"
    base.mkdir()
    path, _, _ = _sample_model(base)
    blob = path.read_bytes()
    return blob, open_gguf(path).data_offset


def _check_loads_or_rejects(path: Path, blob: bytes, what: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)  # a fresh inode: earlier maps stay valid
    try:
        with hang_guard():
            g = GGUFFile(path)
    except ModelFormatError as e:
        assert str(path) in str(e), (what, str(e))
        return
    except Exception as e:  # anything else is a parser bug
        pytest.fail(f"{what}: {type(e).__name__} escaped: {e!r}")
    # It loaded: everything it claims must lie inside the file.
    for name, info in g.tensors.items():
        assert g.data_offset <= info.offset and info.offset + info.nbytes <= len(blob), (what, name)
        assert g.raw(name).nbytes == info.nbytes
        g.rows(name)
    g.typed_metadata()


def test_fuzz_truncations(tmp_path):
    blob, data_offset = _fuzz_base(tmp_path)
    path = tmp_path / "fuzz.gguf"
    for cut in range(len(blob)):
        _check_loads_or_rejects(path, blob[:cut], f"truncated to {cut} bytes")
        if cut < data_offset:  # anything cut in the header must be rejected
            with pytest.raises(ModelFormatError):
                open_gguf(path)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_single_byte_corruptions(tmp_path, seed):
    blob, data_offset = _fuzz_base(tmp_path)
    path = tmp_path / "fuzz.gguf"
    rng = random.Random(seed)
    interesting = [0x00, 0x01, 0x02, 0x07, 0x08, 0x09, 0x0D, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF]
    # every header offset once, with a seeded value from the interesting set or random
    for pos in range(data_offset):
        value = rng.choice(interesting) if rng.random() < 0.5 else rng.randrange(256)
        if value == blob[pos]:
            value ^= 0xFF
        bad = blob[:pos] + bytes([value]) + blob[pos + 1:]
        _check_loads_or_rejects(path, bad, f"seed {seed}: byte {pos} {blob[pos]:#04x} -> {value:#04x}")
    # a few hundred random corruptions, some also truncated
    for i in range(300):
        bad = bytearray(blob)
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            bad[rng.randrange(data_offset)] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[:rng.randrange(len(bad))]
        _check_loads_or_rejects(path, bytes(bad), f"seed {seed}: random corruption #{i}")


def test_fuzz_counts_and_lengths_set_to_extremes(tmp_path):
    """Every u64 window of the header (at any byte offset) set to a huge count/length/offset."""
    blob, data_offset = _fuzz_base(tmp_path)
    path = tmp_path / "fuzz.gguf"
    for pos in range(4, data_offset - 8):
        for value in (U64_MAX, 1 << 63, 1 << 30, (1 << 32) - 1):
            bad = blob[:pos] + struct.pack("<Q", value) + blob[pos + 8:]
            _check_loads_or_rejects(path, bad, f"u64 at {pos} -> {value}")
