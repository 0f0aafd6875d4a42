"""THE table of ggml tensor types and KV cache types, and numpy reference dequantizers.

Every fact about a type lives here once (``TYPES``): its block layout (elements and bytes per
block, by the standard ggml type id), whether it is quantized, whether the runtime computes with it
and whether ``edgellama-quantize`` writes it; ``KV_CACHE_TYPES`` likewise for the KV cache's element
types and their head-size rule.  Everything else (the kernels, the loader, ``info``, the quantizer)
reads these.  Block layouts of the types the runtime computes with (f16: IEEE half):

    Q8_0   34 bytes: f16 d, int8 qs[32]                 x = d * q
    Q4_0   18 bytes: f16 d, uint8 qs[16]                x = d * (nibble - 8); low nibbles are
                                                        elements 0..15, high nibbles 16..31
    Q4_1   20 bytes: f16 d, f16 m, uint8 qs[16]         x = d * nibble + m (same nibble order)
    Q5_0   22 bytes: f16 d, u32 qh, uint8 qs[16]        x = d * (nibble | bit << 4) - 16 d
    Q5_1   24 bytes: f16 d, f16 m, u32 qh, uint8 qs[16] x = d * (nibble | bit << 4) + m
    Q4_K  144 bytes per 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 nibble bytes
    Q5_K  176 bytes per 256: as Q4_K, plus 32 bytes of 5th bits
    Q6_K  210 bytes per 256: 128 bytes of low nibbles, 64 of high bit pairs, int8 scales[16], f16 d

The numpy functions here are slow, obviously-correct twins of the Numba kernels; tests check them
bit-exact against gguf-py's ``gguf.quants``.  Importing this module never compiles anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


@dataclass(frozen=True)
class TypeInfo:
    """What a ggml type is: its block layout and what edgellama does with it."""

    block_elems: int          # elements per block (1 for plain numbers)
    block_bytes: int          # bytes per block
    runtime: bool = False     # the kernels compute with it (weights of this type load)
    writable: bool = False    # edgellama-quantize writes it

    @property
    def quantized(self) -> bool:
        """Blocks of several elements sharing scales (every Q, K, IQ and TQ type)."""
        return self.block_elems > 1


_T = GGMLType
TYPES: dict[GGMLType, TypeInfo] = {
    _T.F32: TypeInfo(1, 4, runtime=True, writable=True),
    _T.F16: TypeInfo(1, 2, runtime=True, writable=True),
    _T.BF16: TypeInfo(1, 2, runtime=True, writable=True),
    _T.Q4_0: TypeInfo(32, 18, runtime=True, writable=True),
    _T.Q4_1: TypeInfo(32, 20, runtime=True, writable=True),
    _T.Q5_0: TypeInfo(32, 22, runtime=True, writable=True),
    _T.Q5_1: TypeInfo(32, 24, runtime=True, writable=True),
    _T.Q8_0: TypeInfo(32, 34, runtime=True, writable=True),
    _T.Q8_1: TypeInfo(32, 36),
    _T.Q2_K: TypeInfo(256, 84),
    _T.Q3_K: TypeInfo(256, 110),
    _T.Q4_K: TypeInfo(256, 144, runtime=True, writable=True),
    _T.Q5_K: TypeInfo(256, 176, runtime=True, writable=True),
    _T.Q6_K: TypeInfo(256, 210, runtime=True, writable=True),
    _T.Q8_K: TypeInfo(256, 292),
    _T.IQ2_XXS: TypeInfo(256, 66),
    _T.IQ2_XS: TypeInfo(256, 74),
    _T.IQ3_XXS: TypeInfo(256, 98),
    _T.IQ1_S: TypeInfo(256, 50),
    _T.IQ4_NL: TypeInfo(32, 18),
    _T.IQ3_S: TypeInfo(256, 110),
    _T.IQ2_S: TypeInfo(256, 82),
    _T.IQ4_XS: TypeInfo(256, 136),
    _T.I8: TypeInfo(1, 1),
    _T.I16: TypeInfo(1, 2),
    _T.I32: TypeInfo(1, 4),
    _T.I64: TypeInfo(1, 8),
    _T.F64: TypeInfo(1, 8),
    _T.IQ1_M: TypeInfo(256, 56),
    _T.TQ1_0: TypeInfo(256, 54),
    _T.TQ2_0: TypeInfo(256, 66),
}

# Views of the table, for the common questions.
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {t: (i.block_elems, i.block_bytes) for t, i in TYPES.items()}
RUNTIME_TYPES = frozenset(t for t, i in TYPES.items() if i.runtime)
QUANTIZED_TYPES = frozenset(t for t, i in TYPES.items() if i.quantized)
RUNTIME_QUANTIZED = RUNTIME_TYPES & QUANTIZED_TYPES            # read by the int8 kernels, packed
RUNTIME_FLOAT = RUNTIME_TYPES - QUANTIZED_TYPES                # read as file rows: F32, F16, BF16
WRITABLE_TYPES = frozenset(t for t, i in TYPES.items() if i.writable)
QK = TYPES[_T.Q8_0].block_elems        # 32: activations are quantized in blocks of this many
SUPER_BLOCK = TYPES[_T.Q4_K].block_elems // QK  # 32-element blocks per K-quant super-block (8)


def is_quantized(type_id: int) -> bool:
    """Whether a type id names a quantized type (unknown ids are not)."""
    info = TYPES.get(type_id)  # IntEnum members hash like their ints
    return info is not None and info.quantized


# ----- KV cache element types --------------------------------------------------------------------

@dataclass(frozen=True)
class KVCacheType:
    """One KV cache element type: how a cached row of head_dim values is stored."""

    name: str
    dtype: type               # numpy element type of the cache array
    head_multiple: int        # head sizes must be multiples of this
    rule: str                 # why, for the error message

    def row_length(self, head_dim: int) -> int:
        """Elements of ``dtype`` in one cached row of head_dim values."""
        if self.name == "q8_0":
            return head_dim // QK * TYPES[_T.Q8_0].block_bytes
        return head_dim

    def bytes_per_value(self) -> float:
        return self.row_length(QK) * np.dtype(self.dtype).itemsize / QK


F16_LOAD_WIDTH = 8  # halves widened per vector step of an f16 cache row
KV_CACHE_TYPES: dict[str, KVCacheType] = {
    # IEEE half stored as its bits (Numba has no float16): llama.cpp's default
    "f16": KVCacheType("f16", np.uint16, F16_LOAD_WIDTH, f"the f16 cache widens {F16_LOAD_WIDTH} values at a time"),
    "f32": KVCacheType("f32", np.float32, 1, ""),
    # blocks of 32 int8 values with an f16 scale, as llama.cpp's -ctk/-ctv q8_0
    "q8_0": KVCacheType("q8_0", np.uint8, QK, f"q8_0 blocks hold {QK} values"),
}


def type_name(type_id: int) -> str:
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"type#{type_id}"


def row_nbytes(qtype: GGMLType, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements; the caller has checked divisibility."""
    block_elems, block_bytes = BLOCK_LAYOUT[qtype]
    return n_cols // block_elems * block_bytes


def tensor_nbytes(qtype: GGMLType, shape: tuple[int, ...]) -> int:
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return n_rows * row_nbytes(qtype, shape[-1])


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Reference dequantizer: raw uint8 bytes of a tensor -> float32 array of ``shape``."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    n = int(np.prod(shape))
    if qtype == GGMLType.F32:
        out = raw.view(np.float32)
    elif qtype == GGMLType.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == GGMLType.BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype == GGMLType.Q8_0:
        blocks = raw.reshape(-1, 34)
        d = _f16(blocks[:, :2])
        out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif qtype in (GGMLType.Q4_0, GGMLType.Q4_1):
        head = 2 if qtype == GGMLType.Q4_0 else 4
        blocks = raw.reshape(-1, head + 16)
        d = _f16(blocks[:, :2])
        qs = blocks[:, head:]
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        if qtype == GGMLType.Q4_0:
            out = d * (nibbles - 8.0)
        else:
            out = d * nibbles + _f16(blocks[:, 2:4])
    else:
        raise NotImplementedError(f"no dequantizer for {type_name(qtype)}")
    out = np.asarray(out, dtype=np.float32).reshape(-1)
    if out.size != n:
        raise ValueError(f"{out.size} elements decoded for shape {shape}")
    return out.reshape(shape)
