"""A prompt's attention with its queries in vector lanes: up to LANES query rows (the heads of one
KV head's group, for one or more tokens) go down a span of cached positions together.  Every
score and every output element of a lane is a plain sequential sum (no reductions across lanes),
so a key or value element is read once and multiplies all LANES queries at once: the cache is read
once per LANES queries instead of once per query, and no dot product needs a horizontal sum.

Layouts (float32, flat C arrays): rows (n, hd) of a span's keys or values widened to float32;
qt (hd, LANES) the queries transposed; st (ATTN_SPAN, LANES) a span's scores then weights;
acct (hd, LANES) the outputs transposed.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kv import _attn_array, _elem_ptr
from .llvm import _F32, _I64, _exp_ir, _splat, _vec
from .target import _target_features

LANES = 16  # query rows that go down the cached positions together


def _together() -> int:
    """Positions (scores) or output columns (values) computed together: 8 sums of LANES in flight
    hide the additions' latency with AVX-512's 32 registers; 4 elsewhere (a sum of LANES is 2
    AVX2 or 4 NEON registers).  The numbers do not depend on it: each lane's sum is sequential."""
    return 8 if "avx512f" in _target_features() else 4


def _clamped(builder, intp, start, end):
    """IR: the _together() indices start, start + 1, ... with those >= end replaced by end - 1."""
    last = builder.sub(end, intp(1))
    out = []
    for j in range(_together()):
        i = builder.add(start, intp(j))
        out.append(builder.select(builder.icmp_signed("<", i, end), i, last))
    return out


def _flat_f32(a):
    return _attn_array(a, 1, (types.float32,))


@intrinsic
def _lane_scores(typingctx, rows, qt, n, hd, st):
    """st[t, j] = sum over i < hd, in order from 0, of rows[t, i] * qt[i, j], for t < n and every
    lane j (products and sums rounded separately, never fused).  Positions go a few at a time
    (_together); the last group repeats position n - 1 (the same value, stored again)."""
    if not (_flat_f32(rows) and _flat_f32(qt) and _flat_f32(st)):
        return None

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        idx = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        count, size = idx(2), idx(3)
        r0 = _elem_ptr(context, builder, sig.args[0], args[0], intp(0))
        q0 = builder.bitcast(_elem_ptr(context, builder, sig.args[1], args[1], intp(0)),
                             _vec(_F32, LANES).as_pointer())
        s0 = builder.bitcast(_elem_ptr(context, builder, sig.args[4], args[4], intp(0)),
                             _vec(_F32, LANES).as_pointer())
        zero = ir.Constant(_vec(_F32, LANES), [0.0] * LANES)
        together = _together()
        accs = [cgutils.alloca_once(builder, zero.type) for _ in range(together)]
        with cgutils.for_range_slice(builder, intp(0), count, intp(together), intp) as (t, _):
            ps = _clamped(builder, intp, t, count)
            starts = [builder.gep(r0, [builder.mul(p, size)]) for p in ps]
            for acc in accs:
                builder.store(zero, acc)
            with cgutils.for_range(builder, size) as loop:
                qv = builder.load(builder.gep(q0, [loop.index]), align=4)
                for acc, start in zip(accs, starts):
                    k = _splat(builder, builder.load(builder.gep(start, [loop.index])), LANES)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(k, qv)), acc)
            for acc, p in zip(accs, ps):
                builder.store(builder.load(acc), builder.gep(s0, [p]), align=4)
        return context.get_dummy_value()

    return types.void(rows, qt, n, hd, st), codegen


@intrinsic
def _lane_values(typingctx, rows, pt, n, hd, acct, alpha):
    """acct[i, j] = acct[i, j] * alpha[j] + sum over t < n, in order, of pt[t, j] * rows[t, i], for
    i < hd and every lane j (the sum continues from the scaled value; products and sums rounded
    separately).  Columns go a few at a time (_together); the last group repeats column hd - 1
    (the same value, stored again)."""
    if not (_flat_f32(rows) and _flat_f32(pt) and _flat_f32(acct) and _flat_f32(alpha)):
        return None

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        idx = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        count, size = idx(2), idx(3)
        r0 = _elem_ptr(context, builder, sig.args[0], args[0], intp(0))
        vec_ptr = lambda a: builder.bitcast(_elem_ptr(context, builder, sig.args[a], args[a], intp(0)),
                                            _vec(_F32, LANES).as_pointer())
        p0, a0 = vec_ptr(1), vec_ptr(4)
        scale = builder.load(vec_ptr(5), align=4)
        together = _together()
        accs = [cgutils.alloca_once(builder, _vec(_F32, LANES)) for _ in range(together)]
        with cgutils.for_range_slice(builder, intp(0), size, intp(together), intp) as (i, _):
            cols = _clamped(builder, intp, i, size)
            for acc, c in zip(accs, cols):
                builder.store(builder.fmul(builder.load(builder.gep(a0, [c]), align=4), scale), acc)
            with cgutils.for_range(builder, count) as loop:
                pv = builder.load(builder.gep(p0, [loop.index]), align=4)
                row = builder.gep(r0, [builder.mul(loop.index, size)])
                for acc, c in zip(accs, cols):
                    v = _splat(builder, builder.load(builder.gep(row, [c])), LANES)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(pv, v)), acc)
            for acc, c in zip(accs, cols):
                builder.store(builder.load(acc), builder.gep(a0, [c]), align=4)
        return context.get_dummy_value()

    return types.void(rows, pt, n, hd, acct, alpha), codegen


def _weights_ir(builder, d, floor):
    """IR: attention._weight of a vector: exp(d), 0 below the floor (a NaN stays NaN)."""
    low = builder.fcmp_ordered("<", d, floor)
    e = _exp_ir(builder, builder.select(low, floor, d))
    return builder.select(low, ir.Constant(d.type, [0.0] * LANES), e)


@intrinsic
def _lane_softmax(typingctx, st, n, first, limit, m, scale, alpha, total):
    """One span of scores st (n, LANES) at positions first.. to weights, per lane j: the score
    times scale, -inf at positions >= limit[j] (the causal mask); the running maximum m[j] raised
    to the span's; alpha[j] = weight(m_old - m_new); st[t, j] = weight(score - m_new); and
    total[j] = total[j] * alpha[j] + (the span's weights summed in order from 0, in double
    precision).  weight(d) = exp(d), 0 below attention.SOFTMAX_FLOOR (attention._weight)."""
    if not (_flat_f32(st) and _flat_f32(m) and _flat_f32(alpha) and _attn_array(limit, 1, (types.int64,))
            and _attn_array(total, 1, (types.float64,)) and scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        from .attention import SOFTMAX_FLOOR  # (attention imports this module)
        intp = context.get_value_type(types.intp)
        f32s, f64s, i64s = _vec(_F32, LANES), _vec(ir.DoubleType(), LANES), _vec(_I64, LANES)
        ptr = lambda a, ty: builder.bitcast(_elem_ptr(context, builder, sig.args[a], args[a], intp(0)),
                                            ty.as_pointer())
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        first = context.cast(builder, args[2], sig.args[2], types.int64)
        s0, m_ptr, a_ptr = ptr(0, f32s), ptr(4, f32s), ptr(6, f32s)
        lim = builder.load(ptr(3, i64s), align=8)
        t_ptr = ptr(7, f64s)
        scales = _splat(builder, args[5], LANES)
        floor = ir.Constant(f32s, [float(SOFTMAX_FLOOR)] * LANES)
        minus_inf = ir.Constant(f32s, [float("-inf")] * LANES)
        m_old = builder.load(m_ptr, align=4)
        best = cgutils.alloca_once(builder, f32s)
        builder.store(m_old, best)
        with cgutils.for_range(builder, count) as loop:
            at = builder.gep(s0, [loop.index])
            s = builder.fmul(builder.load(at, align=4), scales)
            at_pos = builder.add(first, context.cast(builder, loop.index, types.intp, types.int64))
            pos = _splat(builder, at_pos, LANES)
            s = builder.select(builder.icmp_signed(">=", pos, lim), minus_inf, s)
            builder.store(s, at, align=4)
            b = builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", s, b), s, b), best)
        m_new = builder.load(best)
        a = _weights_ir(builder, builder.fsub(m_old, m_new), floor)
        builder.store(m_new, m_ptr, align=4)
        builder.store(a, a_ptr, align=4)
        acc = cgutils.alloca_once(builder, f64s)
        builder.store(ir.Constant(f64s, [0.0] * LANES), acc)
        with cgutils.for_range(builder, count) as loop:
            at = builder.gep(s0, [loop.index])
            w = _weights_ir(builder, builder.fsub(builder.load(at, align=4), m_new), floor)
            builder.store(w, at, align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fpext(w, f64s)), acc)
        old = builder.load(t_ptr, align=8)
        builder.store(builder.fadd(builder.fmul(old, builder.fpext(a, f64s)), builder.load(acc)), t_ptr, align=8)
        return context.get_dummy_value()

    return types.void(st, n, first, limit, m, scale, alpha, total), codegen
