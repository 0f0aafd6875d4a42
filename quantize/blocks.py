"""Numba row quantizers and dequantizers, byte-identical to ggml's reference C code.

Quantizers take float32 rows ``x: (n_rows, n_cols)`` and fill ``out: (n_rows, row_bytes)`` uint8;
dequantizers do the reverse.  Every kernel is serial over the rows it is given (``threads.over_rows``
runs disjoint row ranges at once, with the GIL released) and exact: no
fastmath, float32 arithmetic exactly where ggml's ``quantize_row_*_ref`` uses float, so the
bytes equal ggml's and gguf-py's (``gguf.quants.quantize``; the tests compare them).

Block layouts (32 elements per block; the K-quants, 256 per block, are in ``kquants``):
    Q8_0  34 bytes: f16 d, int8 q[32]          d = max|x| / 127,       q = roundf(x / d)
    Q4_0  18 bytes: f16 d, uint8 qs[16]        d = x[argmax|x|] / -8,  q = min(15, trunc(x / d + 8.5))
    Q4_1  20 bytes: f16 d, f16 m, uint8 qs[16] d = (max - min) / 15,   q = min(15, trunc((x - min) / d + 0.5))
    Q5_0  22 bytes: f16 d, u32 qh, qs[16]      d = x[argmax|x|] / -16, q = min(31, trunc(x / d + 16.5))
    Q5_1  24 bytes: f16 d, f16 m, u32 qh, qs[16]  d = (max - min) / 31, q = trunc((x - min) / d + 0.5)
For Q4_x / Q5_x, qs[j] holds element j in its low nibble and element j + 16 in its high nibble;
Q5_x keep the fifth bit of element j in bit j of qh.

Rounding rules that matter for bit-exactness:
  * ``roundf`` rounds half away from zero (not numpy's half-to-even ``np.round``);
  * ``1 / d`` is computed once per block in float32 and multiplied, as in C (not ``x / d``);
  * float32 -> float16 rounds to nearest, ties to even (numpy's ``astype(np.float16)``);
  * float32 -> bfloat16 rounds to nearest even and turns NaN into a quiet NaN (ggml, gguf-py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgellama import quants
from edgellama.quants import BLOCK_LAYOUT, GGMLType

from . import kquants
from . import threads
from .threads import over_rows

QK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1

_kernel = {"cache": True, "nogil": True}  # serial over the rows given; threads.over_rows runs ranges at once


# ----- scalar conversions -----------------------------------------------------------------------

@njit(cache=True)
def _f32_bits_to_f16_bits(bits):
    """IEEE half bits of the float32 with these bits: nearest, ties to even; NaN stays NaN."""
    b = np.int64(bits)  # int64 arithmetic: Numba turns mixed uint32/int64 into float64
    sign = (b >> 16) & 0x8000
    mag = b & 0x7FFFFFFF
    if mag >= 0x7F800000:  # inf or NaN
        if mag == 0x7F800000:
            return np.uint16(sign | 0x7C00)
        payload = (mag >> 13) & 0x3FF
        return np.uint16(sign | 0x7C00 | max(payload, 1))
    if mag >= 0x47800000:  # >= 2^16: past the largest half
        return np.uint16(sign | 0x7C00)
    if mag < 0x38800000:  # below 2^-14: a half subnormal (a multiple of 2^-24) or zero
        exponent = mag >> 23
        if exponent < 102:  # below 2^-25: rounds to zero
            return np.uint16(sign)
        mantissa = (mag & 0x7FFFFF) | 0x800000
        shift = 126 - exponent  # value / 2^-24 == mantissa / 2^shift
        q = mantissa >> shift
        rest = mantissa & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and (q & 1) == 1):
            q += 1
        return np.uint16(sign | q)
    # Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even;
    # a carry out of the mantissa correctly bumps the exponent (up to inf).
    rebased = mag - 0x38000000
    rounded = rebased + 0xFFF + ((rebased >> 13) & 1)
    return np.uint16(sign | (rounded >> 13))


@njit(cache=True)
def _f32_bits_to_bf16_bits(bits):
    """bfloat16 bits: nearest, ties to even; NaN becomes a quiet NaN (ggml_compute_fp32_to_bf16)."""
    b = np.int64(bits)
    if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep it NaN, make it quiet
        return np.uint16(((b >> 16) & 0xFFFF) | 64)
    return np.uint16(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)


@njit(cache=True, inline="always")
def _store_f16(out, r, o, v, scratch):
    """The float32 v as IEEE half at out[r, o:o+2]; scratch: (1,) float32 to reinterpret v's bits."""
    scratch[0] = v
    _store_u16(out, r, o, _f32_bits_to_f16_bits(scratch.view(np.uint32)[0]))


@njit(cache=True, inline="always")
def _store_u16(out, r, o, value):
    """Little-endian uint16 at out[r, o:o+2]."""
    out[r, o] = np.uint8(value & 0xFF)
    out[r, o + 1] = np.uint8((value >> 8) & 0xFF)


@njit(cache=True, inline="always")
def _round_away(v):
    """C's roundf: nearest integer, halves away from zero (v is a float32)."""
    a = abs(v)
    n = np.floor(a)
    if a - n >= np.float32(0.5):
        n += np.float32(1.0)
    return -n if v < 0 else n


# ----- quantizers: x (n_rows, n_cols) float32 -> out (n_rows, n_cols // 32 * bytes) uint8 --------

@njit(**_kernel)
def quantize_rows_q8_0(x, out):
    n_blocks = x.shape[1] // QK
    for r in range(x.shape[0]):
        scratch = np.empty(1, dtype=np.float32)  # (1,) bit reinterpretation of the scale
        for b in range(n_blocks):
            src = b * QK
            dst = b * 34
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[r, src + j]))
            d = amax / np.float32(127.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _store_f16(out, r, dst, d, scratch)
            for j in range(QK):
                q = int(_round_away(x[r, src + j] * inv_d))
                out[r, dst + 2 + j] = np.uint8(q & 0xFF)


@njit(**_kernel)
def quantize_rows_q4_0(x, out):
    n_blocks = x.shape[1] // QK
    for r in range(x.shape[0]):
        scratch = np.empty(1, dtype=np.float32)  # (1,) bit reinterpretation of the scale
        for b in range(n_blocks):
            src = b * QK
            dst = b * 18
            # the value of largest magnitude, first one on ties (ggml: `if (amax < fabsf(v))`)
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(QK):
                v = x[r, src + j]
                if amax < abs(v):
                    amax = abs(v)
                    vmax = v
            d = vmax / np.float32(-8.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _store_f16(out, r, dst, d, scratch)
            for j in range(QK // 2):
                lo = _q4_0_level(x[r, src + j] * inv_d)
                hi = _q4_0_level(x[r, src + j + QK // 2] * inv_d)
                out[r, dst + 2 + j] = np.uint8(lo | (hi << 4))


@njit(**_kernel)
def quantize_rows_q4_1(x, out):
    n_blocks = x.shape[1] // QK
    for r in range(x.shape[0]):
        scratch = np.empty(1, dtype=np.float32)  # (1,) bit reinterpretation of the scales
        for b in range(n_blocks):
            src = b * QK
            dst = b * 20
            vmin = np.float32(np.finfo(np.float32).max)
            vmax = -vmin
            for j in range(QK):
                v = x[r, src + j]
                if v < vmin:
                    vmin = v
                if v > vmax:
                    vmax = v
            d = (vmax - vmin) / np.float32(15.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _store_f16(out, r, dst, d, scratch)
            _store_f16(out, r, dst + 2, vmin, scratch)
            for j in range(QK // 2):
                lo = _q4_1_level((x[r, src + j] - vmin) * inv_d)
                hi = _q4_1_level((x[r, src + j + QK // 2] - vmin) * inv_d)
                out[r, dst + 4 + j] = np.uint8(lo | (hi << 4))


@njit(**_kernel)
def quantize_rows_q5_0(x, out):
    """Q5_0 (22 bytes: f16 d, u32 qh, uint8 qs[16]): d = x[argmax|x|] / -16,
    q = min(31, trunc(x / d + 16.5)); low nibbles as Q4_0, fifth bits of element j in bit j of qh."""
    n_blocks = x.shape[1] // QK
    for r in range(x.shape[0]):
        scratch = np.empty(1, dtype=np.float32)  # (1,) bit reinterpretation of the scale
        for b in range(n_blocks):
            src = b * QK
            dst = b * 22
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(QK):
                v = x[r, src + j]
                if amax < abs(v):
                    amax = abs(v)
                    vmax = v
            d = vmax / np.float32(-16.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _store_f16(out, r, dst, d, scratch)
            high = 0
            for j in range(QK // 2):
                lo = _q5_0_level(x[r, src + j] * inv_d)
                hi = _q5_0_level(x[r, src + j + QK // 2] * inv_d)
                out[r, dst + 6 + j] = np.uint8((lo & 0xF) | ((hi & 0xF) << 4))
                high |= ((lo >> 4) & 1) << j
                high |= ((hi >> 4) & 1) << (j + QK // 2)
            for k in range(4):
                out[r, dst + 2 + k] = np.uint8((high >> (8 * k)) & 0xFF)


@njit(**_kernel)
def quantize_rows_q5_1(x, out):
    """Q5_1 (24 bytes: f16 d, f16 m, u32 qh, uint8 qs[16]): d = (max - min) / 31,
    q = trunc((x - min) / d + 0.5) (as a byte: no clamp, as in ggml)."""
    n_blocks = x.shape[1] // QK
    for r in range(x.shape[0]):
        scratch = np.empty(1, dtype=np.float32)  # (1,) bit reinterpretation of the scales
        for b in range(n_blocks):
            src = b * QK
            dst = b * 24
            vmin = np.float32(np.finfo(np.float32).max)
            vmax = -vmin
            for j in range(QK):
                v = x[r, src + j]
                if v < vmin:
                    vmin = v
                if v > vmax:
                    vmax = v
            d = (vmax - vmin) / np.float32(31.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _store_f16(out, r, dst, d, scratch)
            _store_f16(out, r, dst + 2, vmin, scratch)
            high = 0
            for j in range(QK // 2):
                lo = _byte_level((x[r, src + j] - vmin) * inv_d)
                hi = _byte_level((x[r, src + j + QK // 2] - vmin) * inv_d)
                out[r, dst + 8 + j] = np.uint8((lo & 0xF) | ((hi & 0xF) << 4))
                high |= ((lo >> 4) & 1) << j
                high |= ((hi >> 4) & 1) << (j + QK // 2)
            for k in range(4):
                out[r, dst + 4 + k] = np.uint8((high >> (8 * k)) & 0xFF)


@njit(cache=True, inline="always")
def _q5_0_level(scaled):
    """ggml: MIN(31, (int8_t)(x * id + 16.5f)); the sum is in [0, 33) for finite input."""
    t = scaled + np.float32(16.5)
    q = int(t) if t == t else 0
    return min(31, max(0, q))


@njit(cache=True, inline="always")
def _byte_level(scaled):
    """ggml: (uint8_t)((x - min) * id + 0.5f), in [0, 32) for finite input."""
    t = scaled + np.float32(0.5)
    q = int(t) if t == t else 0
    return max(0, q) & 0xFF


@njit(cache=True, inline="always")
def _q4_0_level(scaled):
    """ggml: MIN(15, (int8_t)(x * id + 8.5f)); the sum is in [0, 17) for finite input."""
    t = scaled + np.float32(8.5)
    q = int(t) if t == t else 0
    return min(15, max(0, q))


@njit(cache=True, inline="always")
def _q4_1_level(scaled):
    """ggml: MIN(15, (int8_t)((x - min) * id + 0.5f))."""
    t = scaled + np.float32(0.5)
    q = int(t) if t == t else 0
    return min(15, max(0, q))


@njit(**_kernel)
def convert_rows_f16(x, out):
    """x (n_rows, n) float32 -> out (n_rows, n) uint16 IEEE half bits."""
    for r in range(x.shape[0]):
        bits = x[r].view(np.uint32)
        for j in range(x.shape[1]):
            out[r, j] = _f32_bits_to_f16_bits(bits[j])


@njit(**_kernel)
def convert_rows_bf16(x, out):
    """x (n_rows, n) float32 -> out (n_rows, n) uint16 bfloat16 bits."""
    for r in range(x.shape[0]):
        bits = x[r].view(np.uint32)
        for j in range(x.shape[1]):
            out[r, j] = _f32_bits_to_bf16_bits(bits[j])


# ----- dequantizers: raw (n_rows, row_bytes) uint8 -> out (n_rows, n_cols) float32 --------------

@njit(cache=True, inline="always")
def _load_f16(raw, r, o, half_table):
    return half_table[np.int64(raw[r, o]) | (np.int64(raw[r, o + 1]) << 8)]


@njit(**_kernel)
def dequantize_rows_q8_0(raw, out, half_table):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK):
            d = _load_f16(raw, r, b * 34, half_table)
            for j in range(QK):
                q = np.int32(raw[r, b * 34 + 2 + j])
                q = q - 256 if q > 127 else q
                out[r, b * QK + j] = d * np.float32(q)


@njit(**_kernel)
def dequantize_rows_q4_0(raw, out, half_table):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK):
            d = _load_f16(raw, r, b * 18, half_table)
            for j in range(QK // 2):
                byte = np.int32(raw[r, b * 18 + 2 + j])
                out[r, b * QK + j] = d * np.float32((byte & 0xF) - 8)
                out[r, b * QK + j + QK // 2] = d * np.float32((byte >> 4) - 8)


@njit(**_kernel)
def dequantize_rows_q4_1(raw, out, half_table):
    """x = d * q + m, each product and sum rounded to float32 (ggml's dequantize_row_q4_1)."""
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK):
            d = _load_f16(raw, r, b * 20, half_table)
            m = _load_f16(raw, r, b * 20 + 2, half_table)
            for j in range(QK // 2):
                byte = np.int32(raw[r, b * 20 + 4 + j])
                out[r, b * QK + j] = d * np.float32(byte & 0xF) + m
                out[r, b * QK + j + QK // 2] = d * np.float32(byte >> 4) + m


@njit(**_kernel)
def dequantize_rows_q5_0(raw, out, half_table):
    """x = d * (q - 16), q = nibble | fifth bit << 4 (ggml's dequantize_row_q5_0)."""
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK):
            o = b * 22
            d = _load_f16(raw, r, o, half_table)
            high = (np.int64(raw[r, o + 2]) | (np.int64(raw[r, o + 3]) << 8) | (np.int64(raw[r, o + 4]) << 16)
                    | (np.int64(raw[r, o + 5]) << 24))
            for j in range(QK // 2):
                byte = np.int32(raw[r, o + 6 + j])
                lo = (byte & 0xF) | (((high >> j) & 1) << 4)
                hi = (byte >> 4) | (((high >> (j + QK // 2)) & 1) << 4)
                out[r, b * QK + j] = np.float32(lo - 16) * d
                out[r, b * QK + j + QK // 2] = np.float32(hi - 16) * d


@njit(**_kernel)
def dequantize_rows_q5_1(raw, out, half_table):
    """x = d * q + m (ggml's dequantize_row_q5_1)."""
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK):
            o = b * 24
            d = _load_f16(raw, r, o, half_table)
            m = _load_f16(raw, r, o + 2, half_table)
            high = (np.int64(raw[r, o + 4]) | (np.int64(raw[r, o + 5]) << 8) | (np.int64(raw[r, o + 6]) << 16)
                    | (np.int64(raw[r, o + 7]) << 24))
            for j in range(QK // 2):
                byte = np.int32(raw[r, o + 8 + j])
                lo = (byte & 0xF) | (((high >> j) & 1) << 4)
                hi = (byte >> 4) | (((high >> (j + QK // 2)) & 1) << 4)
                out[r, b * QK + j] = np.float32(lo) * d + m
                out[r, b * QK + j + QK // 2] = np.float32(hi) * d + m


@njit(**_kernel)
def dequantize_rows_half(raw, out, half_table):
    """F16 or BF16 (by the table given): raw (n_rows, 2 * n) -> out (n_rows, n)."""
    for r in range(raw.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = _load_f16(raw, r, 2 * j, half_table)


@njit(cache=True, nogil=True)
def count_nonfinite_rows(values, counts):
    """counts[r] = number of NaN / Inf in values[r] (exponent bits all ones); no fastmath here."""
    for r in range(values.shape[0]):
        bits = values[r].view(np.uint32)
        n = 0
        for j in range(bits.shape[0]):
            n += (bits[j] & 0x7F800000) == 0x7F800000
        counts[r] = n


@njit(cache=True, nogil=True)
def count_nonfinite_halves(raw, block_bytes, offsets, counts):
    """counts[r] = number of inf / NaN half-precision scales in row r of raw (n_rows, row_bytes):
    the halves at ``offsets`` within each block of ``block_bytes``."""
    for r in range(raw.shape[0]):
        n = 0
        for o in range(0, raw.shape[1], block_bytes):
            for k in range(offsets.shape[0]):
                n += (raw[r, o + offsets[k] + 1] & 0x7C) == 0x7C
        counts[r] = n


# the byte offsets of every f16 scale in a block, as ggml_validate_row_data checks them
SCALE_OFFSETS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


# the exponent bits of the 16-bit float types: all ones is an inf or a NaN
_HALF_EXPONENT = {GGMLType.F16: 0x7C00, GGMLType.BF16: 0x7F80}


def count_exponent_all_ones(words: np.ndarray, mask: int) -> int:
    """How many of ``words`` (the bits of floats: uint16 or uint32) have every bit of ``mask`` (the
    exponent's) set: the infs and NaNs.  In pieces of 4M (a bounded temporary whatever the size)."""
    step = 1 << 22
    return sum(int(np.count_nonzero((words[i:i + step] & mask) == mask)) for i in range(0, len(words), step))


def count_bad_scales(raw: np.ndarray, qtype: GGMLType) -> int:
    """How many block scales of ``raw`` (n_rows, row_bytes) are inf or NaN (values too large for
    the type's half-precision scales; llama-quantize refuses such data); for F16 and BF16 rows, how
    many values are (a finite float32 beyond 65504 becomes an F16 inf)."""
    if qtype in _HALF_EXPONENT:
        return count_exponent_all_ones(np.ascontiguousarray(raw).reshape(-1).view("<u2"), _HALF_EXPONENT[qtype])
    if qtype not in SCALE_OFFSETS:
        return 0
    counts = np.empty(raw.shape[0], dtype=np.int64)  # (n_rows,)
    raw, block_bytes, offsets = _readonly(raw), BLOCK_LAYOUT[qtype][1], np.array(SCALE_OFFSETS[qtype], np.int64)
    over_rows(raw.shape[0], lambda lo, hi: count_nonfinite_halves(raw[lo:hi], block_bytes, offsets, counts[lo:hi]))
    return int(counts.sum())


@njit(cache=True, nogil=True, fastmath=True)  # reductions only: statistics, not output bytes
def error_stats_rows(values, approx, row_stats):
    """Per row r: row_stats[r] = (sum (approx - values)^2, sum values^2, max |approx - values|,
    max |values|), in float64.  values, approx: (n_rows, n_cols) float32; row_stats: (n_rows, 4)."""
    for r in range(values.shape[0]):
        sq_err = 0.0
        sq_src = 0.0
        max_err = 0.0
        max_src = 0.0
        for j in range(values.shape[1]):
            v = np.float64(values[r, j])
            e = np.float64(approx[r, j]) - v
            sq_err += e * e
            sq_src += v * v
            max_err = max(max_err, abs(e))
            max_src = max(max_src, abs(v))
        row_stats[r, 0] = sq_err
        row_stats[r, 1] = sq_src
        row_stats[r, 2] = max_err
        row_stats[r, 3] = max_src


# ----- Python entry points ---------------------------------------------------------------------

F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
F16_TABLE.flags.writeable = False
BF16_TABLE.flags.writeable = False

# type -> (row quantizer, row dequantizer, whether the dequantizer takes the half table)
QUANTIZERS = {
    GGMLType.Q8_0: (quantize_rows_q8_0, dequantize_rows_q8_0, True),
    GGMLType.Q4_0: (quantize_rows_q4_0, dequantize_rows_q4_0, True),
    GGMLType.Q4_1: (quantize_rows_q4_1, dequantize_rows_q4_1, True),
    GGMLType.Q5_0: (quantize_rows_q5_0, dequantize_rows_q5_0, True),
    GGMLType.Q5_1: (quantize_rows_q5_1, dequantize_rows_q5_1, True),
    GGMLType.Q4_K: (kquants.quantize_rows_q4_k, kquants.dequantize_rows_q4_k, False),
    GGMLType.Q5_K: (kquants.quantize_rows_q5_k, kquants.dequantize_rows_q5_k, False),
    GGMLType.Q6_K: (kquants.quantize_rows_q6_k, kquants.dequantize_rows_q6_k, False),
}
# Types ``quantize_rows`` can produce and ``dequantize_rows`` can read (the other types llama.cpp
# writes are read through gguf-py's reference dequantizers, which ggml's formats are defined by).
WRITABLE_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, *QUANTIZERS})
# the one table of types says the same (quants.TYPES' writable column)
assert WRITABLE_TYPES == quants.WRITABLE_TYPES, sorted(t.name for t in WRITABLE_TYPES ^ quants.WRITABLE_TYPES)
GGUF_PY_READABLE: frozenset[GGMLType] = frozenset()  # every type llama-quantize writes from our inputs is native now
READABLE_TYPES = WRITABLE_TYPES | GGUF_PY_READABLE


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only C-contiguous view, so every kernel sees one array type (one compilation)."""
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


def set_threads(n: int | None) -> None:
    """The quantizer's threads (threads.over_rows; its kernels are serial, none of Numba's own)."""
    if n:
        threads.set_threads(n)


def row_bytes(qtype: GGMLType, n_cols: int) -> int:
    block_elems, block_bytes = BLOCK_LAYOUT[qtype]
    return n_cols // block_elems * block_bytes


def block_elems(qtype: GGMLType) -> int:
    return BLOCK_LAYOUT[qtype][0]


def quantize_rows(x: np.ndarray, qtype: GGMLType, out: np.ndarray | None = None,
                  importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows (n_rows, n_cols) -> the ``qtype`` bytes of those rows, (n_rows, row_bytes) uint8.

    ``out``, if given, is a C-contiguous (n_rows, row_bytes) uint8 array to fill (no extra copy).
    ``importance`` (n_cols,) is reserved for imatrix weights (llama-quantize --imatrix); the block
    fits in ``kquants`` take their weights as arguments so that it can be passed down later."""
    x = _readonly(np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
    n_rows, n_cols = x.shape
    qtype = GGMLType(qtype)
    if qtype not in WRITABLE_TYPES:
        raise NotImplementedError(f"no quantizer for {qtype.name}")
    if importance is not None:
        raise NotImplementedError("importance-weighted (imatrix) quantization is not implemented")
    if n_cols % block_elems(qtype):
        raise ValueError(f"row length {n_cols} is not a multiple of {qtype.name}'s block size {block_elems(qtype)}")
    if out is None:
        out = np.empty((n_rows, row_bytes(qtype, n_cols)), dtype=np.uint8)  # (n_rows, row_bytes)
    if qtype == GGMLType.F32:
        out.view(np.float32)[...] = x
    elif qtype in (GGMLType.F16, GGMLType.BF16):
        convert = convert_rows_f16 if qtype == GGMLType.F16 else convert_rows_bf16
        halves = out.view(np.uint16)  # (n_rows, n_cols) half bits
        over_rows(n_rows, lambda lo, hi: convert(x[lo:hi], halves[lo:hi]))
    elif qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        QUANTIZERS[qtype][0](x, out)  # kquants' entry points run over the threads themselves
    else:
        quantizer = QUANTIZERS[qtype][0]
        over_rows(n_rows, lambda lo, hi: quantizer(x[lo:hi], out[lo:hi]))
    return out


def count_nonfinite(values: np.ndarray) -> np.ndarray:
    """Per-row NaN/Inf counts of float32 rows (n_rows, n_cols)."""
    counts = np.empty(values.shape[0], dtype=np.int64)  # (n_rows,)
    values = _readonly(values)
    over_rows(values.shape[0], lambda lo, hi: count_nonfinite_rows(values[lo:hi], counts[lo:hi]))
    return counts


def error_stats(values: np.ndarray, raw: np.ndarray, qtype: GGMLType) -> tuple[float, float, float, float]:
    """(sum of squared errors, sum of squared values, max |error|, max |value|) of ``raw`` (the
    ``qtype`` bytes of ``values``) against ``values`` (n_rows, n_cols) float32."""
    approx = dequantize_rows(raw, qtype, values.shape[1])  # (n_rows, n_cols)
    row_stats = np.empty((values.shape[0], 4), dtype=np.float64)  # (n_rows, 4)
    values, approx = _readonly(values), _readonly(approx)
    over_rows(values.shape[0], lambda lo, hi: error_stats_rows(values[lo:hi], approx[lo:hi], row_stats[lo:hi]))
    return (float(row_stats[:, 0].sum()), float(row_stats[:, 1].sum()), float(row_stats[:, 2].max(initial=0.0)),
            float(row_stats[:, 3].max(initial=0.0)))


def dequantize_rows(raw: np.ndarray, qtype: GGMLType, n_cols: int) -> np.ndarray:
    """(n_rows, row_bytes) uint8 of ``qtype`` -> float32 (n_rows, n_cols)."""
    qtype = GGMLType(qtype)
    raw = _readonly(np.asarray(raw, dtype=np.uint8).reshape(-1, np.asarray(raw).shape[-1]))
    n_rows = raw.shape[0]
    if qtype == GGMLType.F32:
        return raw.view(np.float32).reshape(n_rows, n_cols)  # a read-only view, no copy
    out = np.empty((n_rows, n_cols), dtype=np.float32)  # (n_rows, n_cols)
    if qtype in (GGMLType.F16, GGMLType.BF16):
        table = F16_TABLE if qtype == GGMLType.F16 else BF16_TABLE
        over_rows(n_rows, lambda lo, hi: dequantize_rows_half(raw[lo:hi], out[lo:hi], table))
    elif qtype in QUANTIZERS:
        _, dequantizer, takes_table = QUANTIZERS[qtype]
        if takes_table:
            over_rows(n_rows, lambda lo, hi: dequantizer(raw[lo:hi], out[lo:hi], F16_TABLE))
        else:
            over_rows(n_rows, lambda lo, hi: dequantizer(raw[lo:hi], out[lo:hi]))
    elif qtype in GGUF_PY_READABLE:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        out[:] = gguf_dequantize(np.array(raw), GGMLQuantizationType(int(qtype))).reshape(n_rows, n_cols)
    else:
        raise NotImplementedError(f"no dequantizer for {qtype.name}")
    return out


# Numba caches these (and kquants') compiled functions like the runtime's kernels (see
# edgellama/kernels/cache.py): in ``<cache>/quantizer/<stamp>-numba<version>``, stamped with a hash of
# the files they are made of, so that every clone or install of the same sources finds them, and
# locked while saving, so that two processes compiling at once cannot mix their entries.
def _install_cache() -> None:
    import sys
    from pathlib import Path

    from edgellama.kernels.cache import install

    sources = tuple(Path(m.__file__).resolve() for m in (sys.modules[__name__], kquants, quants))
    install([sys.modules[__name__], kquants], sources, kind="quantizer")


_install_cache()
