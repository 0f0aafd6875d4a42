"""ggml tensor types: block layouts and numpy reference dequantizers.

Every quantized type stores a row as consecutive blocks.  The table below gives, per standard ggml
type id, (elements per block, bytes per block).  Block layouts of the types the runtime computes with:

    Q8_0  34 bytes: f16 d, int8 qs[32]                x = d * q
    Q4_0  18 bytes: f16 d, uint8 qs[16]               x = d * (nibble - 8); low nibbles are
                                                      elements 0..15, high nibbles 16..31
    Q4_1  20 bytes: f16 d, f16 m, uint8 qs[16]        x = d * nibble + m (same nibble order)

The numpy functions here are slow, obviously-correct twins of the Numba kernels; tests check them
bit-exact against gguf-py's ``gguf.quants``.  Importing this module never compiles anything.
"""

from __future__ import annotations

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


# type -> (elements per block, bytes per block)
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
}

# Types the runtime's kernels compute with.
RUNTIME_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                           GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K,
                           GGMLType.Q6_K})


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
