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
from numba import njit, types
from numba.extending import intrinsic

from .threads import over_rows

QK_K = 256

# numpy's error model: a float division by zero gives inf / NaN as in C (the lanes of a fit that the
# reference skips compute such values and discard them) instead of raising
_kernel = {"cache": True, "nogil": True, "error_model": "numpy"}  # serial; threads.over_rows runs row ranges at once
_inline = {"cache": True, "inline": "always", "error_model": "numpy"}


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


# ----- the same fits, many sub-blocks at once ---------------------------------------------------
# Lane k of the arrays below is sub-block k of a run of super-blocks of one row (element i of lane k
# at [i * lanes + k]): each lane runs exactly the scalar fit's float32 operations in the same order,
# so the results are those of the scalar fits, but the independent sums of all lanes advance
# together in vectors (LLVM's loop vectorizer, which needs a runtime lane count and one array per
# quantity to see the lanes as independent) instead of one latency-bound chain per sub-block.
# Lanes whose scalar fit would have returned early compute values that are then discarded (no
# exceptions: numpy's error model, inf / NaN as in C).

RUN = 8  # super-blocks fitted together: 64 lanes of 32 (Q4_K / Q5_K) or 128 lanes of 16 (Q6_K)
# The lane count must be a compile-time constant for LLVM to vectorize the lane loops (measured: a
# runtime count leaves them scalar, 4x slower), so a row's last, shorter run is fitted from a
# zero-padded copy and the padding lanes are discarded.
ASYM_LANES = 8 * RUN
SYM_LANES = 16 * RUN


@njit(**_inline)
def fit_scale_min_lanes(row, base, nmax, rmin, rdelta, nstep, xs, ws, best, trial, st, levels, scales, mins):
    """``fit_scale_min`` with the reference weights of the L = ASYM_LANES 32-element sub-blocks of
    row[base:base + 32 * L], together.  Scratch: xs, ws (32 * L,) float32, best, trial (32 * L,)
    int32, st (15, L) float32.  Output: levels (32 * L,) in element order, scales and mins (L,)."""
    L = ASYM_LANES
    lo, hi, sum_w, sum_x, scale, best_err, iscale = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    sum_l, sum_l2, sum_xl, err, t_scale, t_min, det, flat = st[7], st[8], st[9], st[10], st[11], st[12], st[13], st[14]
    fnmax = np.float32(nmax)
    for k in range(L):
        for i in range(32):
            xs[i * L + k] = row[base + 32 * k + i]
    # the reference weights: sqrt(mean x^2) + |x| (the sum of squares in element order)
    for k in range(L):
        err[k] = np.float32(0.0)
    for i in range(32):
        for k in range(L):
            v = xs[i * L + k]
            err[k] += v * v
    for k in range(L):
        err[k] = np.sqrt(err[k] / np.float32(32.0))
    for i in range(32):
        for k in range(L):
            ws[i * L + k] = err[k] + abs(xs[i * L + k])
    # range, sum of weights and weighted sum
    for k in range(L):
        lo[k] = xs[k]
        hi[k] = xs[k]
        sum_w[k] = ws[k]
        sum_x[k] = ws[k] * xs[k]
    for i in range(1, 32):
        for k in range(L):
            v = xs[i * L + k]
            w = ws[i * L + k]
            lo[k] = v if v < lo[k] else lo[k]
            hi[k] = v if v > hi[k] else hi[k]
            sum_w[k] += w
            sum_x[k] += w * v
    for k in range(L):
        lo[k] = np.float32(0.0) if lo[k] > 0 else lo[k]
        flat[k] = np.float32(1.0) if hi[k] == lo[k] else np.float32(0.0)
        iscale[k] = fnmax / (hi[k] - lo[k])
        scale[k] = np.float32(1.0) / iscale[k]
        best_err[k] = np.float32(0.0)
    # levels of the plain range, and their error
    for i in range(32):
        for k in range(L):
            v = xs[i * L + k]
            level = max(0, min(nmax, nearest_int(iscale[k] * (v - lo[k]))))
            best[i * L + k] = level
            diff = scale[k] * np.float32(level) + lo[k] - v
            best_err[k] += ws[i * L + k] * (diff * diff)
    for step in range(nstep + 1):
        numerator = rmin + rdelta * np.float32(step) + fnmax
        for k in range(L):
            iscale[k] = numerator / (hi[k] - lo[k])
            sum_l[k] = np.float32(0.0)
            sum_l2[k] = np.float32(0.0)
            sum_xl[k] = np.float32(0.0)
            err[k] = np.float32(0.0)
        for i in range(32):
            for k in range(L):
                v = xs[i * L + k]
                level = max(0, min(nmax, nearest_int(iscale[k] * (v - lo[k]))))
                trial[i * L + k] = level
                fl = np.float32(level)
                wl = ws[i * L + k] * fl
                sum_l[k] += wl
                sum_l2[k] += wl * fl
                sum_xl[k] += wl * v
        for k in range(L):
            d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]
            this_scale = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d
            this_min = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d
            positive = this_min > 0
            t_scale[k] = sum_xl[k] / sum_l2[k] if positive else this_scale
            t_min[k] = np.float32(0.0) if positive else this_min
            det[k] = d
        for i in range(32):
            for k in range(L):
                diff = t_scale[k] * np.float32(trial[i * L + k]) + t_min[k] - xs[i * L + k]
                err[k] += ws[i * L + k] * (diff * diff)
        for k in range(L):
            take = det[k] > 0 and err[k] < best_err[k]
            best_err[k] = err[k] if take else best_err[k]
            scale[k] = t_scale[k] if take else scale[k]
            lo[k] = t_min[k] if take else lo[k]
            det[k] = np.float32(1.0) if take else np.float32(0.0)  # now: whether the trial won
        for i in range(32):
            for k in range(L):
                best[i * L + k] = trial[i * L + k] if det[k] != 0 else best[i * L + k]
    for k in range(L):
        is_flat = flat[k] != 0
        scales[k] = np.float32(0.0) if is_flat else scale[k]
        mins[k] = -lo[k]
        for i in range(32):
            levels[32 * k + i] = 0 if is_flat else best[i * L + k]


@njit(**_inline)
def fit_symmetric_lanes(row, base, nmax, xs, best, trial, st, levels, scales):
    """``fit_symmetric`` of the L = SYM_LANES 16-element sub-blocks of row[base:base + 16 * L],
    together.  Scratch: xs (16 * L,) float32, best, trial (16 * L,) int32, st (6, L) float32.
    Output: levels (16 * L,) in element order, scales (L,)."""
    L = SYM_LANES
    amax, vmax, sumlx, suml2, scale, best_fit = st[0], st[1], st[2], st[3], st[4], st[5]
    fnmax = np.float32(nmax)
    for k in range(L):
        for i in range(16):
            xs[i * L + k] = row[base + 16 * k + i]
    for k in range(L):
        amax[k] = np.float32(0.0)
        vmax[k] = np.float32(0.0)
    for i in range(16):
        for k in range(L):
            v = xs[i * L + k]
            a = abs(v)
            take = a > amax[k]
            vmax[k] = v if take else vmax[k]
            amax[k] = a if take else amax[k]
    for k in range(L):
        sumlx[k] = np.float32(0.0)
        suml2[k] = np.float32(0.0)
    for i in range(16):
        for k in range(L):
            v = xs[i * L + k]
            level = max(-nmax, min(nmax - 1, nearest_int((-fnmax / vmax[k]) * v)))
            best[i * L + k] = level + nmax
            w = v * v
            fl = np.float32(level)
            sumlx[k] += w * v * fl
            suml2[k] += w * fl * fl
    for k in range(L):
        scale[k] = sumlx[k] / suml2[k] if suml2[k] != 0 else np.float32(0.0)
        best_fit[k] = scale[k] * sumlx[k]
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -(fnmax + np.float32(0.1) * np.float32(step))
        for k in range(L):
            sumlx[k] = np.float32(0.0)
            suml2[k] = np.float32(0.0)
        for i in range(16):
            for k in range(L):
                v = xs[i * L + k]
                level = max(-nmax, min(nmax - 1, nearest_int((numerator / vmax[k]) * v)))
                trial[i * L + k] = level + nmax
                w = v * v
                fl = np.float32(level)
                sumlx[k] += w * v * fl
                suml2[k] += w * fl * fl
        for k in range(L):
            take = suml2[k] > 0 and sumlx[k] * sumlx[k] > best_fit[k] * suml2[k]
            new_scale = sumlx[k] / suml2[k]
            scale[k] = new_scale if take else scale[k]
            best_fit[k] = new_scale * sumlx[k] if take else best_fit[k]
            suml2[k] = np.float32(1.0) if take else np.float32(0.0)  # now: whether the trial won
        for i in range(16):
            for k in range(L):
                best[i * L + k] = trial[i * L + k] if suml2[k] != 0 else best[i * L + k]
    for k in range(L):
        zero = amax[k] < GROUP_MAX_EPS
        scales[k] = np.float32(0.0) if zero else scale[k]
        for i in range(16):
            levels[16 * k + i] = 0 if zero else best[i * L + k]


@njit(**_inline)
def _copy_padded(row, start, pad):
    """pad[:] = row[start:], then zeros."""
    n = row.shape[0] - start
    for i in range(n):
        pad[i] = row[start + i]
    for i in range(n, pad.shape[0]):
        pad[i] = np.float32(0.0)


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


@njit(**_inline)
def _finish_asymmetric(row, out, r, first, n_run, five_bits, levels, scales, mins, levels6):
    """Blocks first .. first + n_run - 1 of a row from their fitted levels, scales and minima (the
    run's arrays): 6-bit factors, re-rounded levels, packed bits."""
    nmax = 31 if five_bits else 15
    block_bytes = 176 if five_bits else 144
    qs = 48 if five_bits else 16  # offset of the nibbles in the block
    for b in range(first, first + n_run):
        base = b * QK_K
        o = b * block_bytes
        lb = (b - first) * QK_K  # this block's levels, scales and mins in the run's arrays
        d, dmin = _pack_scales_mins(out, r, o, scales[8 * (b - first):], mins[8 * (b - first):], levels6)
        _requantize_asymmetric(row, base, d, dmin, levels6, levels[lb:], nmax)
        if five_bits:
            for i in range(32):
                high = 0
                for half in range(4):
                    high |= (levels[lb + 64 * half + i] >> 4) << (2 * half)
                    high |= (levels[lb + 64 * half + 32 + i] >> 4) << (2 * half + 1)
                out[r, o + 16 + i] = np.uint8(high)
        for half in range(4):
            for i in range(32):
                out[r, o + qs + 32 * half + i] = np.uint8((levels[lb + 64 * half + i] & 0xF)
                                                          | ((levels[lb + 64 * half + 32 + i] & 0xF) << 4))


@njit(cache=True, error_model="numpy")
def _asymmetric_row(row, out, r, five_bits, levels, scales, mins, levels6, xs, ws, best, trial, st, pad):
    """One row of Q4_K (five_bits False) or Q5_K into out[r], the fits vectorized across sub-blocks.
    A function of its own, with its scratch as arguments (LLVM then vectorizes the lane loops)."""
    nmax = 31 if five_bits else 15
    rmin = np.float32(-0.5) if five_bits else np.float32(-1.0)
    nstep = 15 if five_bits else 20
    n_super = row.shape[0] // QK_K
    for first in range(0, n_super, RUN):
        n_run = min(RUN, n_super - first)
        if n_run == RUN:
            fit_scale_min_lanes(row, first * QK_K, nmax, rmin, np.float32(0.1), nstep, xs, ws, best, trial, st,
                                levels, scales, mins)
        else:
            _copy_padded(row, first * QK_K, pad)
            fit_scale_min_lanes(pad, 0, nmax, rmin, np.float32(0.1), nstep, xs, ws, best, trial, st, levels,
                                scales, mins)
        _finish_asymmetric(row, out, r, first, n_run, five_bits, levels, scales, mins, levels6)


@njit(**_kernel)
def _quantize_rows_asymmetric(x, out, five_bits):
    levels = np.empty(RUN * QK_K, dtype=np.int32)     # (run x 256,) 0..nmax, element order
    scales = np.empty(RUN * 8, dtype=np.float32)      # (run x 8,) fitted sub-block scales
    mins = np.empty(RUN * 8, dtype=np.float32)        # (run x 8,) fitted minima (subtracted)
    levels6 = np.empty(16, dtype=np.int32)            # (16,) 6-bit scales, minima of a block
    xs = np.empty(RUN * QK_K, dtype=np.float32)       # (32 x lanes,) lane-major copy of the run
    ws = np.empty(RUN * QK_K, dtype=np.float32)       # (32 x lanes,) its weights
    best = np.empty(RUN * QK_K, dtype=np.int32)       # (32 x lanes,) best levels so far
    trial = np.empty(RUN * QK_K, dtype=np.int32)      # (32 x lanes,) levels of the trial
    st = np.empty((15, RUN * 8), dtype=np.float32)    # per-lane state of the fits
    pad = np.empty(RUN * QK_K, dtype=np.float32)      # a row's last run, zero-padded
    for r in range(x.shape[0]):
        _asymmetric_row(x[r], out, r, five_bits, levels, scales, mins, levels6, xs, ws, best, trial, st, pad)


@njit(cache=True, error_model="numpy")
def _reference_rows_asymmetric(x, out, five_bits):
    """The same bytes with the scalar fits, one sub-block at a time (the twin of the lanes)."""
    nmax = 31 if five_bits else 15
    rmin = np.float32(-0.5) if five_bits else np.float32(-1.0)
    nstep = 15 if five_bits else 20
    levels = np.empty(RUN * QK_K, dtype=np.int32)
    scales = np.empty(RUN * 8, dtype=np.float32)
    mins = np.empty(RUN * 8, dtype=np.float32)
    levels6 = np.empty(16, dtype=np.int32)
    weights = np.empty(32, dtype=np.float32)
    trial = np.empty(32, dtype=np.int32)
    for r in range(x.shape[0]):
        row = x[r]
        n_super = row.shape[0] // QK_K
        for first in range(0, n_super, RUN):
            n_run = min(RUN, n_super - first)
            for j in range(8 * n_run):
                _reference_weights(row, first * QK_K + 32 * j, weights)
                scales[j], mins[j] = fit_scale_min(row, first * QK_K + 32 * j, 32, nmax, weights, levels, 32 * j,
                                                   trial, rmin, np.float32(0.1), nstep)
            _finish_asymmetric(row, out, r, first, n_run, five_bits, levels, scales, mins, levels6)


def quantize_rows_q4_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 144) uint8."""
    over_rows(x.shape[0], lambda lo, hi: _quantize_rows_asymmetric(x[lo:hi], out[lo:hi], False))


def quantize_rows_q5_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 176) uint8."""
    over_rows(x.shape[0], lambda lo, hi: _quantize_rows_asymmetric(x[lo:hi], out[lo:hi], True))


# ----- Q6_K --------------------------------------------------------------------------------------

@njit(**_inline)
def _finish_q6_k(row, out, r, b, levels, scales):
    """Block b of a row from its 16 fitted scales and levels (levels, scales: this block's)."""
    base = b * QK_K
    o = b * 210
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for j in range(16):
        if abs(scales[j]) > max_abs_scale:
            max_abs_scale = abs(scales[j])
            max_scale = scales[j]
    if max_abs_scale < GROUP_MAX_EPS:
        for i in range(210):
            out[r, o + i] = 0
        return
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


@njit(cache=True, error_model="numpy")
def _q6_k_row(row, out, r, levels, scales, xs, best, trial, st, pad):
    """One row of Q6_K into out[r], the fits vectorized across sub-blocks."""
    n_super = row.shape[0] // QK_K
    for first in range(0, n_super, RUN):
        n_run = min(RUN, n_super - first)
        if n_run == RUN:
            fit_symmetric_lanes(row, first * QK_K, 32, xs, best, trial, st, levels, scales)
        else:
            _copy_padded(row, first * QK_K, pad)
            fit_symmetric_lanes(pad, 0, 32, xs, best, trial, st, levels, scales)
        for b in range(first, first + n_run):
            _finish_q6_k(row, out, r, b, levels[(b - first) * QK_K:], scales[(b - first) * 16:])


@njit(**_kernel)
def _quantize_rows_q6_k(x, out):
    levels = np.empty(RUN * QK_K, dtype=np.int32)     # (run x 256,) 0..63 (q + 32), element order
    scales = np.empty(RUN * 16, dtype=np.float32)     # (run x 16,) fitted sub-block scales
    xs = np.empty(RUN * QK_K, dtype=np.float32)       # (16 x lanes,) lane-major copy of the run
    best = np.empty(RUN * QK_K, dtype=np.int32)       # (16 x lanes,)
    trial = np.empty(RUN * QK_K, dtype=np.int32)      # (16 x lanes,)
    st = np.empty((6, RUN * 16), dtype=np.float32)    # per-lane state of the fits
    pad = np.empty(RUN * QK_K, dtype=np.float32)      # a row's last run, zero-padded
    for r in range(x.shape[0]):
        _q6_k_row(x[r], out, r, levels, scales, xs, best, trial, st, pad)


@njit(cache=True, error_model="numpy")
def _reference_rows_q6_k(x, out):
    """The same bytes with the scalar fits (the twin of the lanes)."""
    levels = np.empty(QK_K, dtype=np.int32)
    scales = np.empty(16, dtype=np.float32)
    for r in range(x.shape[0]):
        row = x[r]
        for b in range(row.shape[0] // QK_K):
            for j in range(16):
                scales[j] = fit_symmetric(row, b * QK_K + 16 * j, 16, 32, levels, 16 * j)
            _finish_q6_k(row, out, r, b, levels, scales)


def quantize_rows_q6_k(x, out):
    """x (n_rows, n_cols) float32, n_cols % 256 == 0 -> out (n_rows, n_cols // 256 * 210) uint8."""
    over_rows(x.shape[0], lambda lo, hi: _quantize_rows_q6_k(x[lo:hi], out[lo:hi]))


def reference_rows(x, out, qtype_name: str):
    """The same bytes through the scalar (one sub-block at a time) fits: the vectorized kernels'
    twin, for tests."""
    if qtype_name == "Q6_K":
        _reference_rows_q6_k(x, out)
    else:
        _reference_rows_asymmetric(x, out, qtype_name == "Q5_K")


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
    for r in range(raw.shape[0]):
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
    for r in range(raw.shape[0]):
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
    for r in range(raw.shape[0]):
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
