"""A validating safetensors reader: numpy memmap views, no ``safetensors`` package needed.

Format: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data section.  The JSON
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` dict of strings.

Everything is checked before a byte of tensor data is touched (the rules of the safetensors
format and ../shared/BAD-INPUTS.md): header length at most 100 MB (and 2^20 JSON values) and inside
the file, valid
UTF-8 JSON object without duplicate keys, known dtypes, non-negative integer shapes, byte sizes
equal to shape x dtype size, and offsets that tile the data section exactly (no gaps, overlaps or
bytes left over).  Errors are ``ModelFormatError`` naming the file, the tensor and the value.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellama.gguf import ModelFormatError

from .files import regular_file
from .source import map_file, unmap

MAX_HEADER_BYTES = 100 * 1024 * 1024
# JSON values a header may hold (bounded by counting commas and brackets before parsing, so that a
# header of tiny values cannot grow into gigabytes of Python objects): a tensor entry is about 8
MAX_HEADER_ITEMS = 1 << 20

# safetensors dtype -> numpy dtype of the stored items (BF16 as raw uint16)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class SafeTensor:
    name: str
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                 # absolute byte offset in the file
    nbytes: int


def json_items_bound(raw: bytes) -> int:
    """An upper bound on the values a JSON text holds (every value but the first follows a comma or
    opens a container), counted in C before parsing: parsing allocates tens of bytes per value."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook that refuses a key given twice."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class SafetensorsFile:
    """One validated .safetensors file; ``array(name)`` is a read-only view of the file's map."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = regular_file(Path(path))
        self.size = p.stat().st_size
        self.tensors, self.metadata = self._read_header()
        self._mmap, self._buf = map_file(self.path)

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what}")

    def _read_header(self) -> tuple[dict[str, SafeTensor], dict[str, str]]:
        if self.size < 8:
            raise self.fail(f"file is truncated or incomplete ({self.size} bytes, the header length alone is 8)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise self.fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > self.size:
                raise self.fail(f"header length {n} runs past the end of the {self.size}-byte file "
                                "(file is truncated or incomplete)")
            raw = f.read(n)
        items = json_items_bound(raw)
        if items > MAX_HEADER_ITEMS:
            raise self.fail(f"header holds up to {items} JSON values, more than the {MAX_HEADER_ITEMS} accepted "
                            "(MAX_HEADER_ITEMS)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.startswith("{"):
            raise self.fail("header is not a JSON object")
        try:
            header = json.loads(text, object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and duplicate keys are ValueErrors
            raise self.fail(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self.fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise self.fail("__metadata__ must map strings to strings")
        data_start = 8 + n
        tensors = {name: self._tensor(name, entry, data_start) for name, entry in header.items()}
        self._check_tiling(tensors, data_start)
        return tensors, metadata

    def _tensor(self, name: str, entry: object, data_start: int) -> SafeTensor:
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise self.fail(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets, "
                            f"got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self.fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise self.fail(f"tensor {name!r}: shape {shape!r:.200} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise self.fail(f"tensor {name!r}: data_offsets {offsets!r:.200} are not two non-negative integers")
        begin, end = offsets
        if begin > end:
            raise self.fail(f"tensor {name!r}: data_offsets begin {begin} > end {end}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self.fail(f"tensor {name!r}: {end - begin} bytes in data_offsets, but {dtype} {shape} "
                            f"needs {expected}")
        if data_start + end > self.size:
            raise self.fail(f"tensor {name!r}: data [{begin}, {end}) lies past the end of the file "
                            "(file is truncated or incomplete)")
        return SafeTensor(name, dtype, tuple(shape), data_start + begin, end - begin)

    def _check_tiling(self, tensors: dict[str, SafeTensor], data_start: int) -> None:
        position = data_start
        for t in sorted(tensors.values(), key=lambda t: (t.begin, t.nbytes)):
            if t.begin < position:
                raise self.fail(f"tensor {t.name!r}: data at offset {t.begin - data_start} overlaps the "
                                "previous tensor")
            if t.begin > position:
                raise self.fail(f"tensor {t.name!r}: gap of {t.begin - position} bytes before its data")
            position = t.begin + t.nbytes
        if position != self.size:
            raise self.fail(f"{self.size - position} bytes after the last tensor are not covered by "
                            "the header")

    def array(self, name: str) -> np.ndarray:
        """The stored items of a tensor (BF16 as uint16), read-only, in the tensor's shape."""
        t = self.tensors[name]
        dtype = DTYPES[t.dtype]
        return self._buf[t.begin:t.begin + t.nbytes].view(dtype).reshape(t.shape)

    def close(self) -> None:
        self._buf = None
        unmap(self._mmap)


def to_float32(items: np.ndarray, dtype: str) -> np.ndarray:
    """Stored items (as ``SafetensorsFile.array`` gives them) -> float32, exactly for F16/BF16."""
    if dtype == "BF16":
        return (items.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return narrow_float64(items)
    if dtype in ("F32", "F16"):
        return np.asarray(items).astype(np.float32, copy=False)
    raise ModelFormatError(f"dtype {dtype} is not a floating-point type")


def narrow_float64(items: np.ndarray) -> np.ndarray:
    """float64 -> float32, refusing finite values beyond float32's range (the cast would make them
    Inf: reported as what they are, not as Inf in the file)."""
    items = np.asarray(items)
    with np.errstate(over="ignore"):
        out = items.astype(np.float32)
    big = np.isinf(out) & np.isfinite(items)
    if big.any():
        raise ModelFormatError(f"{int(big.sum())} float64 value(s) beyond float32's range (the first "
                               f"{float(items.reshape(-1)[np.argmax(big.reshape(-1))])!r}); refusing to quantize them")
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None, dtypes: dict[str, str] | None = None) -> None:
    """Write a .safetensors file (used by tools/ and tests; arrays must be F32/F16 or uint16 BF16
    with ``dtypes[name] = "BF16"``)."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64"}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = (dtypes or {}).get(name) or names[a.dtype.newbyteorder("<")]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in arrays:
            f.write(memoryview(a).cast("B"))
    os.replace(tmp, path)
