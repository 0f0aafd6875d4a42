"""GGUF read (memory-mapped, validated) and write (atomic).

Reading never trusts a declared size: every count, length and offset is checked against the bytes
that remain in the file before anything is looped over or allocated, so a hostile 500-byte file
fails at once with a ``ModelFormatError`` that names the file, the field and the value.  Tensors are
zero-copy, read-only views into one memory map, and so are numeric metadata arrays; arrays of
strings (a vocabulary's tokens and merges) are read in place too (``StringArray``: each string is
checked as the header is parsed, and decoded again when asked for).

What the header costs in Python objects is bounded by its size: counts are capped (keys, tensors,
array items), arrays of arrays are refused (llama.cpp's reader refuses them too), and the parser
keeps an account of the memory its objects take (strings, keys, tensor records): a header whose
objects would outgrow ``HEADER_MEMORY_FACTOR`` times its bytes plus ``HEADER_MEMORY_SLACK`` (many
tiny items: millions of short strings, ...) is refused as soon as it gets there, so parsing takes
time and memory in proportion to the file.

File layout (little-endian, version 2 and 3):
    magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
    n_kv x (string key, u32 value_type, value),
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset),
    padding to general.alignment (default 32), then the tensor data section.
``ne[0]`` is the row length (fastest varying); our shapes are numpy order, i.e. ``ne`` reversed.
"""

from __future__ import annotations

import errno
import hashlib
import marshal
import mmap
import operator
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np

from ._validate import is_int
from .quants import BLOCK_LAYOUT, GGMLType, tensor_nbytes, type_name

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
# Caps no real model comes near: ~50 keys, at most a few thousand tensors, vocabularies of up to
# ~260k tokens and ~500k merges.
MAX_METADATA_KEYS = 1 << 16   # 65,536
MAX_TENSORS = 1 << 16         # 65,536
MAX_ARRAY_ITEMS = 1 << 22     # 4,194,304 items in one array (16x the largest vocabulary)
# The header's Python objects may take HEADER_MEMORY_FACTOR bytes per header byte read so far, plus
# HEADER_MEMORY_SLACK: SmolLM2's 49k tokens and 49k merges take 9.8 MiB of the 71 MiB its 1.7 MiB
# header allows; 262k tokens and 524k merges (more than any real model) take 74 of 117 MiB.
HEADER_MEMORY_FACTOR = 4
HEADER_MEMORY_SLACK = 64 << 20
# What CPython keeps per item, rounded up (tests/test_gguf_bad_inputs.py checks these are upper
# bounds): a key is its str, its entries in ``metadata`` and ``value_types`` and its value (an
# array view is 112 bytes); a tensor is its TensorInfo, name, shape and the parser's bookkeeping.
# Strings are charged what ``sys.getsizeof`` says, plus a list slot (9 bytes: lists grow by 1/8)
# and the allocator's rounding (15).
KEY_BYTES = 512
TENSOR_BYTES = 768
_SLOT = 9
_ROUNDING = 15
_SHARED_STR_BYTES = sys.getsizeof("")  # what getsizeof says of a shared one ('x' says one more: ignored)
_STRING_CHUNK = 1 << 16  # strings decoded between two checks of the memory account
_STRING_ARRAY_BYTES = 320  # a StringArray and its bounds array, but for their 8 bytes per string


# A parsed header at least this long is kept (GGUFFile(keep_header=True)): SmolLM2's 1.7 MB parse in
# 0.14 s on a slow core, Llama 3's 7.8 MB in 0.55 s; read back, 0.02 and 0.1 s.
KEEP_HEADER_MIN_BYTES = 256 << 10
_KEPT_KIND = "gguf-headers"
_KEPT_FORMAT = 2  # 2: string arrays kept as their bounds (StringArray)
_STAMP: list[bytes] = []


def _source_stamp() -> bytes:
    """A hash of the sources that decide what a header parses to."""
    if not _STAMP:
        from . import _validate, quants

        h = hashlib.sha256()
        for module_file in (__file__, quants.__file__, _validate.__file__):
            with open(module_file, "rb") as fh:
                h.update(fh.read())
        _STAMP.append(h.digest())
    return _STAMP[0]


class ModelFormatError(ValueError):
    """A model file is malformed, truncated or uses something we do not support."""


class ModelFileNotFoundError(FileNotFoundError, ModelFormatError):
    """The model file does not exist: a ``FileNotFoundError`` (``errno``, ``filename``) that is also a
    ``ModelFormatError``, so that either ``except`` catches it."""

    def __init__(self, path):
        super().__init__(errno.ENOENT, "no such file", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: no such file"


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"), ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"), ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"), ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # numpy order: (..., rows, row_length)
    offset: int             # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reader over the mapped bytes."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0
        self.path = path
        self.used = 0  # bytes of Python objects built from the header so far (an upper bound)

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what}")

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise self.fail(f"file is truncated or incomplete: {what} needs {n} bytes at offset "
                            f"{self.pos}, only {self.remaining()} remain")

    def charge(self, nbytes: int, what: str) -> None:
        """Account for ``nbytes`` of Python objects built from the header; refuse the file once they
        outgrow HEADER_MEMORY_FACTOR x the header bytes read so far + HEADER_MEMORY_SLACK."""
        self.used += nbytes
        if self.used > HEADER_MEMORY_FACTOR * self.pos + HEADER_MEMORY_SLACK:
            raise self.fail(f"{what} would take {self.used >> 20} MiB of memory after {self.pos} bytes of header, "
                            f"more than the {HEADER_MEMORY_FACTOR} bytes per header byte + "
                            f"{HEADER_MEMORY_SLACK >> 20} MiB edgellama allows (too many tiny items)")

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.view, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        try:
            text = str(self.view[self.pos:self.pos + n], "utf-8")  # no intermediate bytes copy
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        self.pos += n
        return text

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return out


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALAR_DTYPES:
        dtype = _SCALAR_DTYPES[ValueType(vtype)]
        value = cur.array(dtype, 1, f"value of {key!r}")[0]
        if vtype == ValueType.BOOL:
            if value > 1:
                raise cur.fail(f"key {key!r}: bool value {value} is neither 0 nor 1")
            return bool(value)
        return value.item()
    if vtype == ValueType.STRING:
        text = cur.string(f"value of {key!r}")
        cur.charge(sys.getsizeof(text), f"key {key!r}: a string of {len(text)} characters")
        return text
    if vtype == ValueType.ARRAY:
        item_type = cur.u32(f"array type of {key!r}")
        count = cur.u64(f"array length of {key!r}")
        if item_type == ValueType.ARRAY:
            raise cur.fail(f"key {key!r}: arrays of arrays are not supported (nor by llama.cpp)")
        if item_type not in _SCALAR_DTYPES and item_type != ValueType.STRING:
            raise cur.fail(f"key {key!r}: unknown array item type {item_type}")
        min_bytes = _SCALAR_DTYPES[ValueType(item_type)].itemsize if item_type in _SCALAR_DTYPES else 8
        if count * min_bytes > cur.remaining():
            raise cur.fail(f"key {key!r}: array of {count} items needs at least {count * min_bytes} bytes, "
                           f"only {cur.remaining()} remain (file is truncated or incomplete)")
        if count > MAX_ARRAY_ITEMS:
            raise cur.fail(f"key {key!r}: array of {count} items is longer than the {MAX_ARRAY_ITEMS} items "
                           "edgellama accepts in one array")
        if item_type == ValueType.STRING:
            return _read_string_array(cur, count, key)
        values = cur.array(_SCALAR_DTYPES[ValueType(item_type)], count, f"array {key!r}")
        if item_type != ValueType.BOOL:
            return values
        if count and values.max() > 1:
            raise cur.fail(f"key {key!r}: bool value {values.max()} at index "
                           f"{int(np.argmax(values > 1))} is neither 0 nor 1")
        return values.view(np.bool_)
    raise cur.fail(f"key {key!r}: unknown value type {vtype}")


_U64 = struct.Struct("<Q")


def _read_string_array(cur: _Cursor, count: int, key: str) -> "StringArray":
    """count length-prefixed UTF-8 strings, each checked, read in place (a ``StringArray``); one
    tight loop (vocabularies hold ~100k of them), in chunks between which the memory account is
    checked.  The account charges what the strings would take as Python objects: the tokenizer
    builds them from the first load's vocabulary (later loads read its tables back)."""
    view, pos, end = cur.view, cur.pos, len(cur.buf)
    unpack = _U64.unpack_from
    cur.charge(_STRING_ARRAY_BYTES + 8 * (count + 1), f"key {key!r}: an array of {count} strings")
    bounds = np.empty(count + 1, np.int64)  # bounds[i]: where string i's length prefix is
    bounds[0] = pos
    try:
        for done in range(0, count, _STRING_CHUNK):
            n_chunk = min(_STRING_CHUNK, count - done)
            n_shared = 0  # empty and one-byte strings: CPython's singletons, a list slot each
            objects = 0
            at = array("q")
            for i in range(done, done + n_chunk):
                (n,) = unpack(view, pos)
                pos += 8
                if n > end - pos:
                    raise cur.fail(f"file is truncated or incomplete: string #{i} of {key!r} needs {n} "
                                   f"bytes at offset {pos}, only {end - pos} remain")
                if n < 2:
                    n_shared += 1
                objects += str(view[pos:pos + n], "utf-8").__sizeof__()  # (= getsizeof, faster)
                pos += n
                at.append(pos)
            bounds[done + 1:done + 1 + n_chunk] = at
            cur.pos = pos
            objects -= _SHARED_STR_BYTES * n_shared
            cur.charge(_SLOT * n_chunk + _ROUNDING * (n_chunk - n_shared) + objects,
                       f"key {key!r}: {done + n_chunk} of its {count} strings")
    except struct.error:
        raise cur.fail(f"file is truncated or incomplete: string #{i} of {key!r} at offset {pos}") from None
    except UnicodeDecodeError as e:
        raise cur.fail(f"string #{i} of {key!r} is not valid UTF-8 ({e.reason})") from None
    return StringArray(cur.buf, view, bounds)


class StringArray(Sequence):
    """A GGUF array of strings, read in place: item i is decoded from the mapped file when asked
    for (the parser checked every one).  A vocabulary's 128k tokens and 280k merges as Python
    strings took ~37 MiB of every process; this keeps 8 bytes per string, beside pages of the
    file.  A sequence of ``str`` (a slice is a list); equal to a list or tuple of the same strings."""

    __slots__ = ("_buf", "_view", "_bounds")

    def __init__(self, buf: np.ndarray, view: memoryview, bounds: np.ndarray):
        self._buf = buf          # the file's bytes (keeps the map alive)
        self._view = view        # a memoryview of them (one per file, shared)
        self._bounds = bounds    # (n + 1,) int64: string i is buf[bounds[i] + 8 : bounds[i + 1]]

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self._decode(range(len(self))[i]))
        n = len(self._bounds) - 1
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("string array index out of range")
        start, stop = self._bounds[i:i + 2].tolist()
        return str(self._view[start + 8:stop], "utf-8")

    def _decode(self, indices: range):
        view, bounds = self._view, self._bounds
        for c in range(0, len(indices), _STRING_CHUNK):
            part = indices[c:c + _STRING_CHUNK]
            if part.step == 1:
                edges = bounds[part.start:part.stop + 1].tolist()
                starts, stops = edges[:-1], edges[1:]
            else:
                idx = np.arange(part.start, part.stop, part.step)
                starts, stops = bounds[idx].tolist(), bounds[idx + 1].tolist()
            for a, b in zip(starts, stops):
                yield str(view[a + 8:b], "utf-8")

    def __iter__(self):
        return self._decode(range(len(self)))

    def lengths(self) -> np.ndarray:
        """Each string's length in bytes (UTF-8)."""
        return np.diff(self._bounds) - 8

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, StringArray)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], {len(self)} strings)"


def _data_problem(infos, data_size: int) -> str | None:
    """What is wrong with where tensors (name, type, shape, offset in the data section, bytes) lie
    in a data section of ``data_size`` bytes (past its end, before its start, overlapping), or None."""
    spans = []
    for name, _, _, offset, nbytes in infos:
        if offset < 0 or offset + nbytes > data_size:
            return (f"tensor {name!r}: data [{offset}, {offset + nbytes}) lies past the end of the "
                    f"{data_size}-byte data section: file is truncated or incomplete")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            return f"tensors {a!r} and {b!r} overlap in the data section"
    return None


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    ``metadata`` maps keys to Python values (strings, ints, floats, bools; arrays of strings as
    ``StringArray`` sequences read in place, numeric arrays as read-only numpy arrays).
    ``tensors`` maps names to ``TensorInfo``; ``raw(name)`` and ``rows(name)`` are zero-copy uint8
    views into the map.
    """

    def __init__(self, path: str | os.PathLike, keep_header: bool = False):
        """``keep_header``: read the parsed header back from edgellama's cache folder when this
        file's header bytes are the ones it was parsed from, and keep it there after parsing
        (``header_source`` says which: "kept" or "parsed"); see ``KEEP_HEADER_MIN_BYTES``."""
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise ModelFileNotFoundError(self.path)
        if p.is_dir():
            raise ModelFormatError(f"{self.path}: is a directory, expected a .gguf file")
        if not p.is_file():
            raise ModelFormatError(f"{self.path}: not a regular file (a device, FIFO or socket), expected a .gguf file")
        size = p.stat().st_size
        if size < 24:
            raise ModelFormatError(f"{self.path}: file is truncated or incomplete ({size} bytes, a "
                                   "GGUF header alone is 24)")
        # a read-only map whose numpy views hold a buffer export: close() cannot unmap it while a
        # view is alive (np.memmap would, and reading the view afterwards would crash)
        # kept open for pread: what is at the path may be another file by the time a cache is keyed
        # (a download or a quantizer renamed over it), so its identity and bytes come from here
        self._file: BinaryIO | None = open(self.path, "rb", buffering=0)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.stat = os.fstat(self._file.fileno())  # size, times and inode of the file mapped
        self.buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self._view: memoryview | None = None  # of buf, for the string arrays read back from a kept header
        self.header_source = "parsed"
        self.header_digest: bytes | None = None  # SHA-256 of the header bytes, where it was computed
        if not (keep_header and size >= KEEP_HEADER_MIN_BYTES and self._read_kept()):
            self._parse()
            if keep_header and self._header_end >= KEEP_HEADER_MIN_BYTES:
                self._keep()

    def _parse(self) -> None:
        cur = _Cursor(self.buf, self.path)
        magic = bytes(cur.view[0:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            if swapped in (2, 3):
                raise cur.fail(f"big-endian (byte-swapped) GGUF version {swapped} is not supported")
            raise cur.fail(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Smallest possible entries: kv = 8 (key len) + 1 + 4 (type) + 1; tensor = 8 + 1 + 4 + 8 + 4 + 8.
        if n_kv * 14 > cur.remaining():
            raise cur.fail(f"metadata count {n_kv} cannot fit in the {cur.remaining()} bytes of the file "
                           "(file is truncated or incomplete)")
        if n_tensors * 33 > cur.remaining():
            raise cur.fail(f"tensor count {n_tensors} cannot fit in the {cur.remaining()} bytes of the file "
                           "(file is truncated or incomplete)")
        if n_kv > MAX_METADATA_KEYS:
            raise cur.fail(f"metadata count {n_kv} is more than the {MAX_METADATA_KEYS} keys edgellama accepts")
        if n_tensors > MAX_TENSORS:
            raise cur.fail(f"tensor count {n_tensors} is more than the {MAX_TENSORS} tensors edgellama accepts")

        metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}
        type_pairs: dict[tuple[int, int | None], tuple[int, int | None]] = {}  # one tuple per distinct pair
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if not key:
                raise cur.fail(f"metadata key #{i} is empty")
            if key in metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            cur.charge(KEY_BYTES + len(key), f"metadata key #{i} {key[:80]!r}")
            vtype = cur.u32(f"value type of {key!r}")
            if vtype == ValueType.ARRAY and cur.remaining() >= 4:
                pair = (ValueType.ARRAY, struct.unpack_from("<I", cur.view, cur.pos)[0])
            else:
                pair = (vtype, None)
            self.value_types[key] = type_pairs.setdefault(pair, pair)
            metadata[key] = _read_value(cur, vtype, key)
        self.metadata = metadata

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not is_int(alignment):
            raise cur.fail(f"general.alignment must be an unsigned integer, got {alignment!r}")
        if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise cur.fail(f"general.alignment {alignment} is not a power of two in [1, {MAX_ALIGNMENT}]")
        self.alignment = alignment

        infos = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            if not name or len(name.encode()) > MAX_NAME_BYTES:
                raise cur.fail(f"tensor #{i} name {name[:80]!r} is empty or longer than {MAX_NAME_BYTES} bytes")
            if name in seen:
                raise cur.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            cur.charge(TENSOR_BYTES + len(name), f"tensor #{i} {name!r}")
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r}: n_dims {n_dims} not in [1, {MAX_DIMS}]")
            ne = [cur.scalar("q", 8, f"dims of tensor {name!r}") for _ in range(n_dims)]
            if any(d <= 0 for d in ne):
                raise cur.fail(f"tensor {name!r}: dimensions {ne} must all be positive")
            if int(np.prod([float(d) for d in ne])) >= 1 << 60:
                raise cur.fail(f"tensor {name!r}: dimensions {ne} overflow")
            type_id = cur.u32(f"type of tensor {name!r}")
            if type_id not in BLOCK_LAYOUT.keys():
                raise cur.fail(f"tensor {name!r}: unknown tensor type {type_id}")
            qtype = GGMLType(type_id)
            block_elems = BLOCK_LAYOUT[qtype][0]
            if ne[0] % block_elems:
                raise cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                               f"{type_name(qtype)} block size {block_elems}")
            offset = cur.u64(f"offset of tensor {name!r}")
            if offset % alignment:
                raise cur.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
            shape = tuple(reversed(ne))
            infos.append((name, qtype, shape, offset, tensor_nbytes(qtype, shape)))

        self.header_memory = cur.used  # the account: an upper bound of what the header's objects take
        self._header_end = cur.pos
        self.data_offset = (cur.pos + alignment - 1) // alignment * alignment
        data_size = len(self.buf) - self.data_offset
        if data_size < 0:
            raise cur.fail("file is truncated or incomplete: it ends before its tensor data section")
        problem = _data_problem(infos, data_size)
        if problem:
            raise cur.fail(problem)
        self.tensors = {name: TensorInfo(name, qtype, shape, self.data_offset + offset, nbytes)
                        for name, qtype, shape, offset, nbytes in infos}

    # ----- the parsed header, kept ---------------------------------------------------------------

    def _kept_name(self) -> str:
        real = os.fsencode(os.path.realpath(self.path))
        return hashlib.sha256(real + b"\0" + _source_stamp()).hexdigest()

    def _keep(self) -> None:
        """Keep what parsing found, with the length and SHA-256 of the header bytes it came from."""
        base = self.buf.__array_interface__["data"][0]
        meta = {k: (v.dtype.str, v.__array_interface__["data"][0] - base, len(v)) if isinstance(v, np.ndarray)
                else (v._bounds.tobytes(),) if isinstance(v, StringArray) else v
                for k, v in self.metadata.items()}
        types = [(k, int(a), None if b is None else int(b)) for k, (a, b) in self.value_types.items()]
        tensors = [(t.name, int(t.qtype), t.shape, t.offset, t.nbytes) for t in self.tensors.values()]
        state = (self.version, meta, types, self.alignment, self.header_memory, self.data_offset, tensors)
        digest = hashlib.sha256(self.buf[:self._header_end]).digest()
        self.header_digest = digest
        try:
            data = marshal.dumps((_KEPT_FORMAT, len(self.buf), self._header_end, digest, state))
        except ValueError:  # (not expected: the parser makes only marshal's types)
            return
        from .packed_cache import keep_blob

        keep_blob(_KEPT_KIND, self._kept_name(), data)

    def _read_kept(self) -> bool:
        """Take the parsed header kept for this path if the file's first bytes are the very ones it
        was parsed from (their length and SHA-256; and the file's size, which the tensors' bounds
        were checked against): parsing them again would give the same result."""
        from .packed_cache import load_blob

        data = load_blob(_KEPT_KIND, self._kept_name())
        if data is None:
            return False
        try:
            fmt, size, end, digest, state = marshal.loads(data)
            if fmt != _KEPT_FORMAT or size != len(self.buf) or not 0 < end <= size \
                    or hashlib.sha256(self.buf[:end]).digest() != digest:
                return False
            version, meta, types, alignment, header_memory, data_offset, tensors = state
            metadata = {k: self._kept_value(v, end) for k, v in meta.items()}
            pairs: dict = {}
            value_types = {k: pairs.setdefault((a, b), (a, b)) for k, a, b in types}
            infos = {name: TensorInfo(name, GGMLType(q), tuple(shape), offset, nbytes)
                     for name, q, shape, offset, nbytes in tensors}
            # the record is checked as parsing checks the header (it comes from a cache folder,
            # not from the header whose digest it carries): a layout parsing would refuse, or
            # that reaches beyond the file, is parsed again instead
            if not (is_int(alignment) and 0 < alignment <= MAX_ALIGNMENT and not alignment & (alignment - 1)
                    and data_offset == (end + alignment - 1) // alignment * alignment and data_offset <= size
                    and len(infos) == len(tensors)):
                return False
            for t in infos.values():
                if not (1 <= len(t.shape) <= MAX_DIMS and all(is_int(d) and d > 0 for d in t.shape)
                        and t.shape[-1] % BLOCK_LAYOUT[t.qtype][0] == 0 and t.nbytes == tensor_nbytes(t.qtype, t.shape)
                        and is_int(t.offset) and (t.offset - data_offset) % alignment == 0):
                    return False
            if _data_problem([(t.name, t.qtype, t.shape, t.offset - data_offset, t.nbytes) for t in infos.values()],
                             size - data_offset):
                return False
        except Exception:  # a file of another format: parse
            return False
        self.version, self.metadata, self.value_types, self.tensors = version, metadata, value_types, infos
        self.alignment, self.header_memory, self.data_offset = alignment, header_memory, data_offset
        self._header_end = end
        self.header_digest = digest
        self.header_source = "kept"
        return True

    def _kept_value(self, v, end: int):
        if type(v) is not tuple:
            return v
        if len(v) == 3:  # a numeric array: (dtype, offset, count)
            return np.frombuffer(self.buf, dtype=np.dtype(v[0]), count=v[2], offset=v[1])
        bounds = np.frombuffer(v[0], np.int64)  # a string array: where each string's length prefix is
        if not (len(bounds) >= 1 and 0 < bounds[0] and bounds[-1] <= end and (np.diff(bounds) >= 8).all()):
            raise ValueError("not the bounds of a string array of this header")
        if self._view is None:
            self._view = memoryview(self.buf)
        return StringArray(self.buf, self._view, bounds)

    # ----- access -------------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: missing tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """All bytes of a tensor as a flat read-only uint8 view."""
        info = self.tensor(name)
        return self.buf[info.offset:info.offset + info.nbytes]

    def rows(self, name: str) -> np.ndarray:
        """A tensor as a (n_rows, row_bytes) read-only uint8 view (one row = one output unit)."""
        info = self.tensor(name)
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return np.asarray(self.raw(name)).reshape(n_rows, info.nbytes // n_rows)

    def release(self, name: str, start_row: int = 0, stop_row: int | None = None) -> None:
        """Drop a tensor's pages (or those of its rows start_row..stop_row-1) of the map from this
        process's memory (they were copied elsewhere); reading them again brings them back from
        the page cache.  A no-op where madvise is missing."""
        mapping = self._mmap
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensor(name)
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // n_rows
        stop_row = n_rows if stop_row is None else min(stop_row, n_rows)
        if not 0 <= start_row < stop_row:
            return
        begin = info.offset + start_row * row_bytes
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, info.offset + stop_row * row_bytes - start)

    def release_header(self) -> None:
        """Drop the header's pages of the map from this process's memory (the metadata was parsed, or
        its kept copy checked against them; the vocabulary's strings, read where they lie, come back
        from the page cache if read again).  A no-op where madvise is missing."""
        mapping = self._mmap
        end = getattr(self, "data_offset", 0) // mmap.PAGESIZE * mmap.PAGESIZE  # (not the first tensor's page)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED") and end > 0:
            mapping.madvise(mmap.MADV_DONTNEED, 0, end)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def typed_metadata(self) -> dict[str, tuple[ValueType, Any]]:
        """Metadata with the file's own value types, ready for ``write_gguf`` to copy exactly."""
        out = {}
        for key, value in self.metadata.items():
            vtype, item_type = self.value_types[key]
            if vtype == ValueType.ARRAY:
                out[key] = (ValueType.ARRAY, (ValueType(item_type), value))
            else:
                out[key] = (ValueType(vtype), value)
        return out

    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the file mapped from ``offset``, read without mapping them into
        this process (no resident pages, as reading the map would bring in)."""
        if self._file is None:
            raise ValueError(f"{self.path}: closed")
        return os.pread(self._file.fileno(), size, offset)

    def __del__(self) -> None:  # (a file never closed: its descriptor goes with it, without a warning)
        fh = getattr(self, "_file", None)
        if fh is not None:
            fh.close()

    def close(self) -> None:
        fh, self._file = self._file, None
        if fh is not None:
            fh.close()
        mm, self._mmap = self._mmap, None
        self.buf = self._view = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are still alive; the map is freed with the last of them


# ----- writing ----------------------------------------------------------------------------------

def _infer_value(key: str, value: Any) -> tuple[ValueType, Any]:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ValueType):
        return value
    if isinstance(value, bool):
        return ValueType.BOOL, value
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return (ValueType.UINT32, v) if 0 <= v < 1 << 32 else (ValueType.INT64, v)
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32, float(value)
    if isinstance(value, str):
        return ValueType.STRING, value
    if isinstance(value, np.ndarray):
        for vt, dt in _SCALAR_DTYPES.items():
            if vt != ValueType.BOOL and value.dtype == dt.newbyteorder("="):
                return ValueType.ARRAY, (vt, value)
        if value.dtype == np.bool_:
            return ValueType.ARRAY, (ValueType.BOOL, value.astype(np.uint8))
        raise TypeError(f"metadata {key!r}: unsupported array dtype {value.dtype}")
    if isinstance(value, StringArray):  # a GGUF file's, copied
        return ValueType.ARRAY, (ValueType.STRING, value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return ValueType.ARRAY, (ValueType.STRING, list(value))
        if all(is_int(v) for v in value):
            return ValueType.ARRAY, (ValueType.INT32, np.asarray(value, dtype=np.int32))
        if all(isinstance(v, (float, int)) for v in value):
            return ValueType.ARRAY, (ValueType.FLOAT32, np.asarray(value, dtype=np.float32))
    raise TypeError(f"metadata {key!r}: cannot store {type(value).__name__} in GGUF")


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: ValueType, value: Any) -> bytes:
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype == ValueType.ARRAY:
        item_type, items = value
        head = struct.pack("<IQ", item_type, len(items))
        if item_type == ValueType.STRING:
            return head + b"".join(_pack_string(s) for s in items)
        return head + np.ascontiguousarray(items, dtype=_SCALAR_DTYPES[item_type]).tobytes()
    return np.array([value], dtype=_SCALAR_DTYPES[vtype]).tobytes()


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its data exists."""
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # numpy order

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qtype, self.shape)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True) -> None:
    """Give a finished temporary file (in ``path``'s folder) the usual permissions and the name
    ``path``.  Over an existing file only with ``replace``; without, a file of that name is never
    replaced, even one made after any earlier check (a hard link fails where the name exists; on
    file systems without hard links, after a last check): FileExistsError, ``tmp`` left for the
    caller to remove."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists (not replaced)", str(path)) from None
    except OSError:  # no hard links on this file system (FAT, exFAT, some network ones)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists (not replaced)", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any], specs: list[TensorSpec],
               data: Iterable[np.ndarray], alignment: int = DEFAULT_ALIGNMENT, replace: bool = True) -> None:
    """Write a GGUF v3 file atomically: a temp file in the same folder, renamed at the end (over an
    existing file only with ``replace``: see ``publish``).

    ``metadata`` values are plain Python values (types inferred: int -> u32, float -> f32, ...)
    or ``(ValueType, value)`` pairs; for arrays ``(ValueType.ARRAY, (item_type, items))``.
    ``data`` yields each tensor's bytes (any dtype, C order) in the order of ``specs``; it is
    consumed one tensor at a time, so a converter never holds the whole model in memory.
    If anything fails, nothing is left under ``path``.
    """
    path = Path(path)
    metadata = dict(metadata)
    declared = metadata.get("general.alignment")
    if alignment == DEFAULT_ALIGNMENT and declared is not None:
        # a key copied from an input file: lay the data out as it says (llama-quantize copies the
        # key but aligns to 32, a file that neither runtime loads where the key says otherwise)
        declared = _infer_value("general.alignment", declared)[1]
        if not is_int(declared) or not 0 < declared <= MAX_ALIGNMENT or declared & (declared - 1):
            raise ValueError(f"general.alignment {declared!r} is not a power of two in [1, {MAX_ALIGNMENT}]")
        alignment = int(declared)
    if alignment != DEFAULT_ALIGNMENT or declared is not None:
        metadata["general.alignment"] = (ValueType.UINT32, alignment)
    header = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(specs), len(metadata))]
    for key, value in metadata.items():
        vtype, v = _infer_value(key, value)
        header += [_pack_string(key), struct.pack("<I", vtype), _pack_value(vtype, v)]
    offset = 0
    offsets = []
    for spec in specs:
        block_elems = BLOCK_LAYOUT[spec.qtype][0]
        if spec.shape[-1] % block_elems:
            raise ValueError(f"{spec.name}: row length {spec.shape[-1]} is not a multiple of "
                             f"{type_name(spec.qtype)}'s block size {block_elems}")
        header += [_pack_string(spec.name), struct.pack("<I", len(spec.shape)),
                   struct.pack(f"<{len(spec.shape)}Q", *reversed(spec.shape)),
                   struct.pack("<IQ", spec.qtype, offset)]
        offsets.append(offset)
        offset += (spec.nbytes + alignment - 1) // alignment * alignment
    head = b"".join(header)
    head += b"\0" * (-len(head) % alignment)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            written = 0
            chunks = iter(data)
            for spec in specs:
                chunk = next(chunks, None)
                if chunk is None:
                    raise ValueError(f"no data given for tensor {spec.name!r}")
                raw = memoryview(np.ascontiguousarray(chunk)).cast("B")
                if raw.nbytes != spec.nbytes:
                    raise ValueError(f"tensor {spec.name!r}: {raw.nbytes} bytes given, "
                                     f"{type_name(spec.qtype)} {spec.shape} needs {spec.nbytes}")
                f.write(raw)
                written += raw.nbytes
                pad = -written % alignment
                f.write(b"\0" * pad)
                written += pad
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, replace)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
