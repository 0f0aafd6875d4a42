"""Numba K-quant quantizers (Q4_K, Q5_K, Q6_K), byte-identical to ggml's reference quantizers
(``quantize_row_q{4,5,6}_K_ref``: what llama-quantize runs when no importance matrix is given).

Block layouts, 256 elements per super-block (ggml's ``block_q4_K`` etc., little-endian):
    Q4_K  144 bytes: f16 d, f16 dmin, scales[12], qs[128]
    Q5_K  176 bytes: f16 d, f16 dmin, scales[12], qh[32], qs[128]
    Q6_K  210 bytes: ql[128], qh[64], int8 scales[16], f16 d

Q4_K / Q5_K: eight sub-blocks of 32; sub-block j decodes as ``d * sc[j] * q - dmin * m[j]`` with
6-bit factors sc, m packed into ``scales``: for j < 4, scales[j] and scales[j + 4] hold sc[j] and
m[j] in their low 6 bits; for j >= 4, scales[j + 4] holds the low nibbles of sc[j] (low) and m[j]
(high) and the top two bits of sc[j] / m[j] sit in bits 6-7 of scales[j - 4] / scales[j].  The
4-bit levels of elements n+l and n+l+32 (n = 0, 64, 128, 192) share byte qs[n/2 + l] (low, high);
Q5_K's fifth bits: bit 2k of qh[l] for element 64k + l, bit 2k+1 for element 64k + 32 + l.
Q6_K: sixteen sub-blocks of 16, element x = d * scales[j] * (q - 32), q in 0..63; in each half
(128 elements, h = 0, 1) element 128h + 32k + l keeps its low nibble in ql[64h + l + 32(k % 2)]
(low nibble for k < 2, high for k >= 2) and its top two bits in qh[32h + l] at bits 2k.

How the reference chooses the numbers (the algorithm, restated):
  * ``nearest_int(v)``: round to nearest, ties to even, by adding 1.5 * 2^23 in float32 and reading
    the low mantissa bits (exact for |v| < 2^22; beyond that the reference's bits are kept too).
  * Q4_K / Q5_K sub-block fit (``fit_scale_min``): weights w = sqrt(mean x^2) + |x|; minimum
    clamped to <= 0; start from the levels of the range (max - min) / nmax; then try nstep + 1
    rescaled grids iscale = (rmin + rdelta * k + nmax) / (max - min), k = 0..nstep; for each, the
    weighted least-squares scale and minimum of those levels (min clamped to 0, then scale =
    sum wxl / sum wl^2) are kept if their weighted squared error is strictly smaller, and a kept
    minimum becomes the ``min`` of the following trials (levels and grid both shift with it).  Q4_K: nmax 15, rmin -1, rdelta
    0.1, 20 steps; Q5_K: nmax 31, rmin -0.5, rdelta 0.1, 15 steps.  The eight scales and minima are
    then quantized to 6 bits against their maxima (d = max / 63 in f16) and every element re-rounded
    against the stored (f16 * 6-bit) scale and minimum.
  * Q6_K sub-block fit (``fit_symmetric``, ggml's make_qx_quants with rmse_type 1): levels in
    -32..31 from iscale = -32 / (the value of largest magnitude), weights w = x^2, least-squares
    scale; then 18 rescaled grids -(32 + 0.1 k) / max, k = -9..9 except 0, each kept when it
    explains more (sumlx^2 / suml2 larger).  The 16 scales become int8 against the one of largest
    magnitude (d = max / -128 in f16) and elements are re-rounded against d * scale.
Every operation is float32 in the reference's order (no fastmath, no fused multiply-add: ggml's
reference is compiled for baseline x86-64 / without contraction); sums run in element order.

Importance weights (imatrix) are not used yet: llama.cpp then runs different searches
(``quantize_row_q4_K_impl`` with make_qkx3_quants).  The sub-block fits already take their weights
as an argument, so a weighted variant needs only another weight rule and search, not new kernels.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

QK_K = 256

_kernel = {"cache": True, "parallel": True}
_inline = {"cache": True, "inline": "always"}


@intrinsic
def _f32_bits(typingctx, value):
    """The IEEE bits of a float32 as an int32 (a register move, no memory)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, value):
    """The float32 with these IEEE bits (an int32 / uint32)."""
    if not isinstance(value, types.Integer) or value.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(value), codegen


_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23


@njit(**_inline)
def nearest_int(v):
    """ggml's nearest_int of a float32: (bits(v + 1.5 * 2^23) & 0x7FFFFF) - 0x400000."""
    return np.int32((_f32_bits(v + _MAGIC) & np.int32(0x7FFFFF)) - np.int32(0x400000))


@njit(**_inline)
def f32_to_f16_bits(v):
    """IEEE half bits of a float32: nearest, ties to even (ggml's GGML_FP32_TO_FP16)."""
    b = np.int64(_f32_bits(v)) & 0xFFFFFFFF
    sign = (b >> 16) & 0x8000
    mag = b & 0x7FFFFFFF
    if mag >= 0x7F800000:  # inf or NaN
        if mag == 0x7F800000:
            return sign | 0x7C00
        payload = (mag >> 13) & 0x3FF
        return sign | 0x7C00 | max(payload, 1)
    if mag >= 0x47800000:  # >= 2^16
        return sign | 0x7C00
    if mag < 0x38800000:  # below 2^-14: a half subnormal or zero
        exponent = mag >> 23
        if exponent < 102:
            return sign
        mantissa = (mag & 0x7FFFFF) | 0x800000
        shift = 126 - exponent
        q = mantissa >> shift
        rest = mantissa & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and (q & 1) == 1):
            q += 1
        return sign | q
    rebased = mag - 0x38000000
    rounded = rebased + 0xFFF + ((rebased >> 13) & 1)
    return sign | (rounded >> 13)


@njit(**_inline)
def f16_bits_to_f32(h):
    """The float32 value of IEEE half bits (exact)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        # subnormal or zero: mantissa * 2^-24, exact in float32
        value = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return -value if sign else value
    if exponent == 31:
        return _bits_f32(np.uint32(sign | 0x7F800000 | (mantissa << 13)))
    return _bits_f32(np.uint32(sign | ((exponent + 112) << 23) | (mantissa << 13)))


@njit(**_inline)
def _put_f16(out, r, o, v):
    """Store float32 v as IEEE half at out[r, o:o+2] (little-endian); returns the stored value."""
    h = f32_to_f16_bits(v)
    out[r, o] = np.uint8(h & 0xFF)
    out[r, o + 1] = np.uint8((h >> 8) & 0xFF)
    return f16_bits_to_f32(h)


# ----- sub-block fits ----------------------------------------------------------------------------

@njit(**_inline)
def fit_scale_min(x, base, n, nmax, weights, levels, lbase, trial, rmin, rdelta, nstep):
    """Asymmetric fit of x[base:base+n] to ``scale * level - minimum``, levels 0..nmax, minimizing
    the ``weights``-weighted squared error over a grid of nstep + 1 trial scales (ggml's
    make_qkx2_quants).  Writes levels[lbase:lbase+n]; ``trial``: (n,) uint8 scratch.
    Returns (scale, minimum) with minimum >= 0 (the value subtracted)."""
    lo = x[base]
    hi = x[base]
    sum_w = weights[0]
    sum_x = sum_w * x[base]
    for i in range(1, n):
        v = x[base + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if lo > 0:
        lo = np.float32(0.0)
    if hi == lo:
        for i in range(n):
            levels[lbase + i] = 0
        return np.float32(0.0), -lo
    fnmax = np.float32(nmax)
    iscale = fnmax / (hi - lo)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        level = max(0, min(nmax, nearest_int(iscale * (x[base + i] - lo))))
        levels[lbase + i] = level
        diff = scale * np.float32(level) + lo - x[base + i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        # the minimum in use moves when a trial wins: later trials start from it
        iscale = (rmin + rdelta * np.float32(step) + fnmax) / (hi - lo)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            level = max(0, min(nmax, nearest_int(iscale * (x[base + i] - lo))))
            trial[i] = level
            fl = np.float32(level)
            wl = weights[i] * fl
            sum_l += wl
            sum_l2 += wl * fl
            sum_xl += wl * x[base + i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(trial[i]) + this_min - x[base + i]
                error += weights[i] * (diff * diff)
            if error < best_error:
                for i in range(n):
                    levels[lbase + i] = trial[i]
                best_error = error
                scale = this_scale
                lo = this_min
    return scale, -lo


GROUP_MAX_EPS = np.float32(1e-15)


@njit(**_inline)
def fit_symmetric(x, base, n, nmax, levels, lbase):
    """Symmetric fit of x[base:base+n] to ``scale * (level - nmax)``, levels 0..2*nmax-1, weights
    x^2, over 19 trial scales (ggml's make_qx_quants with rmse_type 1).  Writes
    levels[lbase:lbase+n]; returns the scale (0 for an all-zero group)."""
    vmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        a = abs(x[base + i])
        if a > amax:
            amax = a
            vmax = x[base + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            levels[lbase + i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = -fnmax / vmax
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        v = x[base + i]
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        levels[lbase + i] = level + nmax
        w = v * v
        fl = np.float32(level)
        sumlx += w * v * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(k)) / vmax
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            v = x[base + i]
            fl = np.float32(max(-nmax, min(nmax - 1, nearest_int(iscale * v))))
            w = v * v
            sumlx += w * v * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                levels[lbase + i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[base + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_inline)
def _reference_weights(x, base, weights):
    """The reference's sub-block weights without an importance matrix: sqrt(mean x^2) + |x|."""
    sum_x2 = np.float32(0.0)
    for i in range(32):
        sum_x2 += x[base + i] * x[base + i]
    av_x = np.sqrt(sum_x2 / np.float32(32.0))
    for i in range(32):
        weights[i] = av_x + abs(x[base + i])


# ----- Q4_K / Q5_K -------------------------------------------------------------------------------

@njit(**_inline)
def _pack_scales_mins(out, r, o, scales, mins, levels6):
    """Quantize the eight sub-block scales and minima to 6 bits against their maxima; write d, dmin
    (f16) at out[r, o:o+4] and the packed factors at out[r, o+4:o+16].  levels6: (16,) int32 output,
    sc[0..7] then m[0..7].  Returns (d, dmin) as stored."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # the reference stores into uint8
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        levels6[j] = ls
        levels6[8 + j] = lm
    for j in range(4):
        out[r, o + 4 + j] = np.uint8(levels6[j] | ((levels6[j + 4] >> 4) << 6))
        out[r, o + 8 + j] = np.uint8(levels6[8 + j] | ((levels6[8 + j + 4] >> 4) << 6))
        out[r, o + 12 + j] = np.uint8((levels6[j + 4] & 0xF) | ((levels6[8 + j + 4] & 0xF) << 4))
    d = _put_f16(out, r, o, max_scale / np.float32(63.0))
    dmin = _put_f16(out, r, o + 2, max_min / np.float32(63.0))
    return d, dmin


@njit(**_inline)
def _requantize_asymmetric(x, base, d, dmin, levels6, levels, nmax):
    """Re-round every element against the stored scale and minimum of its sub-block (sub-blocks
    whose stored scale is 0 keep the levels of their fit)."""
    for j in range(8):
        dj = d * np.float32(levels6[j])
        if dj == 0:
            continue
        mj = dmin * np.float32(levels6[8 + j])
        for i in range(32):
            levels[32 * j + i] = max(0, min(nmax, nearest_int((x[base + 32 * j + i] + mj) / dj)))


@njit(**_kernel)
def quantize_rows_q4_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 144) uint8."""
    n_super = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        row = x[r]
        levels = np.empty(QK_K, dtype=np.int32)   # (256,) levels 0..15 of the super-block
        trial = np.empty(32, dtype=np.int32)      # (32,) levels of a trial scale
        weights = np.empty(32, dtype=np.float32)  # (32,) sub-block weights
        scales = np.empty(8, dtype=np.float32)    # (8,) fitted sub-block scales
        mins = np.empty(8, dtype=np.float32)      # (8,) fitted sub-block minima (subtracted)
        levels6 = np.empty(16, dtype=np.int32)    # (16,) 6-bit scales then minima
        for b in range(n_super):
            base = b * QK_K
            o = b * 144
            for j in range(8):
                _reference_weights(row, base + 32 * j, weights)
                scales[j], mins[j] = fit_scale_min(row, base + 32 * j, 32, 15, weights, levels, 32 * j, trial,
                                                   np.float32(-1.0), np.float32(0.1), 20)
            d, dmin = _pack_scales_mins(out, r, o, scales, mins, levels6)
            _requantize_asymmetric(row, base, d, dmin, levels6, levels, 15)
            for half in range(4):
                for i in range(32):
                    out[r, o + 16 + 32 * half + i] = np.uint8(levels[64 * half + i] | (levels[64 * half + 32 + i] << 4))


@njit(**_kernel)
def quantize_rows_q5_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 176) uint8."""
    n_super = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        row = x[r]
        levels = np.empty(QK_K, dtype=np.int32)   # (256,) levels 0..31
        trial = np.empty(32, dtype=np.int32)      # (32,)
        weights = np.empty(32, dtype=np.float32)  # (32,)
        scales = np.empty(8, dtype=np.float32)    # (8,)
        mins = np.empty(8, dtype=np.float32)      # (8,)
        levels6 = np.empty(16, dtype=np.int32)    # (16,)
        for b in range(n_super):
            base = b * QK_K
            o = b * 176
            for j in range(8):
                _reference_weights(row, base + 32 * j, weights)
                scales[j], mins[j] = fit_scale_min(row, base + 32 * j, 32, 31, weights, levels, 32 * j, trial,
                                                   np.float32(-0.5), np.float32(0.1), 15)
            d, dmin = _pack_scales_mins(out, r, o, scales, mins, levels6)
            _requantize_asymmetric(row, base, d, dmin, levels6, levels, 31)
            for i in range(32):
                high = 0
                for half in range(4):
                    high |= (levels[64 * half + i] >> 4) << (2 * half)
                    high |= (levels[64 * half + 32 + i] >> 4) << (2 * half + 1)
                out[r, o + 16 + i] = np.uint8(high)
            for half in range(4):
                for i in range(32):
                    out[r, o + 48 + 32 * half + i] = np.uint8((levels[64 * half + i] & 0xF)
                                                              | ((levels[64 * half + 32 + i] & 0xF) << 4))


# ----- Q6_K --------------------------------------------------------------------------------------

@njit(**_kernel)
def quantize_rows_q6_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 210) uint8."""
    n_super = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        row = x[r]
        levels = np.empty(QK_K, dtype=np.int32)   # (256,) levels 0..63 (q + 32)
        scales = np.empty(16, dtype=np.float32)   # (16,) fitted sub-block scales
        for b in range(n_super):
            base = b * QK_K
            o = b * 210
            max_scale = np.float32(0.0)
            max_abs_scale = np.float32(0.0)
            for j in range(16):
                s = fit_symmetric(row, base + 16 * j, 16, 32, levels, 16 * j)
                scales[j] = s
                if abs(s) > max_abs_scale:
                    max_abs_scale = abs(s)
                    max_scale = s
            if max_abs_scale < GROUP_MAX_EPS:
                for i in range(210):
                    out[r, o + i] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            d = _put_f16(out, r, o + 208, np.float32(1.0) / iscale)
            for j in range(16):
                sc = min(127, nearest_int(iscale * scales[j]))
                out[r, o + 192 + j] = np.uint8(sc & 0xFF)
                sc8 = np.int32(sc & 0xFF)
                if sc8 > 127:
                    sc8 -= 256
                dj = d * np.float32(sc8)
                if dj == 0:
                    continue
                for i in range(16):
                    levels[16 * j + i] = max(-32, min(31, nearest_int(row[base + 16 * j + i] / dj))) + 32
            for half in range(2):
                lb = 128 * half
                for i in range(32):
                    q1 = levels[lb + i]
                    q2 = levels[lb + 32 + i]
                    q3 = levels[lb + 64 + i]
                    q4 = levels[lb + 96 + i]
                    out[r, o + 64 * half + i] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                    out[r, o + 64 * half + 32 + i] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                    out[r, o + 128 + 32 * half + i] = np.uint8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4)
                                                               | ((q4 >> 4) << 6))


# ----- dequantizers: raw (n_rows, row_bytes) uint8 -> out (n_rows, n_cols) float32 --------------
# As ggml's dequantize_row_q{4,5,6}_K: every product and difference rounded to float32 in its order.

@njit(**_inline)
def _get_f16(raw, r, o):
    return f16_bits_to_f32(np.int64(raw[r, o]) | (np.int64(raw[r, o + 1]) << 8))


@njit(**_inline)
def _scale_min(raw, r, o, j):
    """The 6-bit scale and minimum of sub-block j from the 12 packed bytes at raw[r, o:o+12]."""
    if j < 4:
        return np.int32(raw[r, o + j] & 63), np.int32(raw[r, o + j + 4] & 63)
    sc = (raw[r, o + j + 4] & 0xF) | ((raw[r, o + j - 4] >> 6) << 4)
    m = (raw[r, o + j + 4] >> 4) | ((raw[r, o + j] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@njit(**_kernel)
def dequantize_rows_q4_k(raw, out):
    for r in prange(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            o = b * 144
            d = _get_f16(raw, r, o)
            dmin = _get_f16(raw, r, o + 2)
            for j in range(8):
                sc, m = _scale_min(raw, r, o + 4, j)
                dj = d * np.float32(sc)
                mj = dmin * np.float32(m)
                shift = 4 * (j & 1)
                for i in range(32):
                    q = (np.int32(raw[r, o + 16 + 32 * (j >> 1) + i]) >> shift) & 0xF
                    out[r, b * QK_K + 32 * j + i] = dj * np.float32(q) - mj


@njit(**_kernel)
def dequantize_rows_q5_k(raw, out):
    for r in prange(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            o = b * 176
            d = _get_f16(raw, r, o)
            dmin = _get_f16(raw, r, o + 2)
            for j in range(8):
                sc, m = _scale_min(raw, r, o + 4, j)
                dj = d * np.float32(sc)
                mj = dmin * np.float32(m)
                shift = 4 * (j & 1)
                for i in range(32):
                    q = (np.int32(raw[r, o + 48 + 32 * (j >> 1) + i]) >> shift) & 0xF
                    q += ((np.int32(raw[r, o + 16 + i]) >> j) & 1) << 4
                    out[r, b * QK_K + 32 * j + i] = dj * np.float32(q) - mj


@njit(**_kernel)
def dequantize_rows_q6_k(raw, out):
    for r in prange(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            o = b * 210
            d = _get_f16(raw, r, o + 208)
            for half in range(2):
                for k in range(4):
                    for i in range(32):
                        low = (np.int32(raw[r, o + 64 * half + 32 * (k & 1) + i]) >> (4 * (k >> 1))) & 0xF
                        high = (np.int32(raw[r, o + 128 + 32 * half + i]) >> (2 * k)) & 3
                        sc = np.int32(raw[r, o + 192 + 8 * half + 2 * k + i // 16])
                        if sc > 127:
                            sc -= 256
                        out[r, b * QK_K + 128 * half + 32 * k + i] = (d * np.float32(sc)) * np.float32((low | (high << 4)) - 32)
