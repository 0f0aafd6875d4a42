"""KV cache rows: the only code that knows a cached row's element format (float32, IEEE half bits,
or Q8_0 blocks), specialized per cache dtype when a kernel is compiled; storing rows, and moving
cached keys to new positions (context shift).

A cached key or value row of head_dim elements is float32, IEEE half bits (uint16), or Q8_0
blocks (uint8, KV_Q8_BLOCK bytes per 32 elements: the f16 scale d, then 32 int8 q; value d * q,
quantized as ggml's reference quantize_row_q8_0 does).  _kv_load and _kv_store (and, for float32
and f16 rows, the vector loops _kv_vscores and _kv_vsum) are the only code that knows the element
format; each is specialized per cache dtype when a kernel is compiled.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..quants import F16_LOAD_WIDTH, KV_CACHE_TYPES
from .common import EXACT, I32, QK
from .llvm import _F32, _I8, _I16, _I32, _as_f32, _const_vec, _f16_at, _half_to_f32, _put_half, _to_kv, _vec
from .ops import rope
from .products import _abs_max
from .parallel import parallel_rows
from .target import _native_half, _target_features


KV_Q8_BLOCK = KV_CACHE_TYPES["q8_0"].row_length(QK)  # bytes of one Q8_0 block: f16 d + 32 int8


def kv_row_length(head_dim: int, dtype) -> int:
    """Elements of the cache array per row of head_dim values (THE table: quants.KV_CACHE_TYPES)."""
    kind = next(t for t in KV_CACHE_TYPES.values() if np.dtype(t.dtype) == np.dtype(dtype))
    return kind.row_length(head_dim)


def _kv_load(row, out):
    """out (head_dim,) float32 = the cached row."""


def _kv_store(values, row):
    """The cached row = values (head_dim,) float32, in the cache's element type."""


def _block_vector(context, builder, arr_type, arr, at, elem, n=QK):
    """IR: pointer to the n elements of 1-D C-contiguous array arr from index at, as a vector."""
    data = builder.bitcast(context.make_array(arr_type)(context, builder, arr).data, elem.as_pointer())
    return builder.bitcast(builder.gep(data, [at]), _vec(elem, n).as_pointer())


def _c_array(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype


@intrinsic
def _q8_block_axpy(typingctx, p, row, row_at, out, out_at, accumulate):
    """out[out_at + i] += p * int8(row[row_at + i]) for i < 32, or = with accumulate False."""
    if not (p == types.float32 and _c_array(row, types.uint8) and _c_array(out, types.float32)
            and accumulate == types.boolean):
        return None

    def codegen(context, builder, sig, args):
        at = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        qv = builder.load(_block_vector(context, builder, sig.args[1], args[1], at(2), _I8), align=1)
        splat = builder.insert_element(ir.Constant(_vec(_F32, QK), ir.Undefined), args[0], ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, splat, _const_vec(_I32, [0] * QK))
        v = builder.fmul(splat, builder.sitofp(qv, _vec(_F32, QK)))
        ptr = _block_vector(context, builder, sig.args[3], args[3], at(4), _F32)
        old = builder.load(ptr, align=4)
        builder.store(builder.select(args[5], builder.fadd(old, v), v), ptr, align=4)
        return context.get_dummy_value()

    return types.void(p, row, row_at, out, out_at, accumulate), codegen




@intrinsic
def _f16_widen(typingctx, row, at, out):
    """out[at + i] = the half row[at + i] (uint16 bits) for i < F16_LOAD_WIDTH: one vector step."""
    if not (_c_array(row, types.uint16) and _c_array(out, types.float32)):
        return None

    def codegen(context, builder, sig, args):
        n, at = F16_LOAD_WIDTH, context.cast(builder, args[1], sig.args[1], types.intp)
        h = builder.load(_block_vector(context, builder, sig.args[0], args[0], at, _I16, n), align=2)
        out = _block_vector(context, builder, sig.args[2], args[2], at, _F32, n)
        builder.store(_half_to_f32(builder, h, _native_half(_target_features())), out, align=4)
        return context.get_dummy_value()

    return types.void(row, at, out), codegen


# ----- one-token attention's inner loops over f32 / f16 cache rows, as explicit vectors ------------------
#
# Written in numba, a span's dot products each ended in a horizontal reduction of its own, and the
# weighted sums of value rows kept their accumulators in the output array (loaded and stored at
# every position: LLVM cannot tell the arrays apart).  These keep the accumulators in registers,
# reduce four dots at once, read each value row once for a head size of 64 or 128, and fix the
# order of every float operation (products and sums, never fused).  One token's attention over
# 2048 cached positions, 2 threads, f16 cache, this Xeon: 1B shape (16 layers) 17.2-17.6 ->
# 13.7-15.5 ms (medians), SmolLM2 (30 layers) 10.2-13.7 -> 8.5-9.0 ms; one (span, KV head) job on
# warm caches 1.3-1.7x faster.

_W = 16  # float32 lanes of a vector step; a head size that is 8 more than a multiple of 16 ends with 8


def _attn_array(a, ndim, dtypes):
    return isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" and a.dtype in dtypes


def _elem_ptr(context, builder, arr_type, arr, flat):
    """IR: pointer to element ``flat`` (an intp) of C-contiguous array arr."""
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.gep(data, [flat])


def _shape(context, builder, arr_type, arr, axis):
    return cgutils.unpack_tuple(builder, context.make_array(arr_type)(context, builder, arr).shape)[axis]


def _load_f32(builder, ptr, n, native):
    """IR: n float32 lanes from a pointer to float32 or to half bits (i16)."""
    is_f32 = ptr.type.pointee == _F32
    v = builder.load(builder.bitcast(ptr, _vec(ptr.type.pointee, n).as_pointer()), align=4 if is_f32 else 2)
    return v if is_f32 else _half_to_f32(builder, v, native)


_SPECIAL_HEAD_DIMS = (64, 128)  # unrolled with the query in registers; other sizes loop over chunks


def _by_head_dim(builder, hd, intp, unrolled, looped, sizes=_SPECIAL_HEAD_DIMS) -> None:
    """IR: unrolled(size) where the head size hd is one of sizes, else looped()."""
    if not sizes:
        looped()
        return
    with builder.if_else(builder.icmp_signed("==", hd, intp(sizes[0]))) as (then, otherwise):
        with then:
            unrolled(sizes[0])
        with otherwise:
            _by_head_dim(builder, hd, intp, unrolled, looped, sizes[1:])


@intrinsic
def _kv_vscores(typingctx, q, qi, cache, kv, start, n, scale, out, o_at):
    """out[o_at + t] = (q[qi] . cache[kv, start + t]) * scale for t < n (n >= 1): float32 or f16
    rows of a (n_kv_heads, n_ctx, row) cache, head_dim = q.shape[1] a multiple of 8.

    Each dot's order: four accumulators of 16 lanes, starting at -0.0 (so that a first product
    is itself), take the 16-lane chunks in turn (chunk c goes to c % 4) and are added (0+1)+(2+3);
    lanes i and i+8 are added, then the last 8 lanes' products (a head size of 16k+8), then lanes
    i and i+4, i and i+2, i and i+1.  Positions go four at a time (past the end: the last one
    again, stored again), and the four dots' final sums are done side by side in shared vectors,
    lane for lane in that order: a few shuffles for four dots instead of a reduction each."""
    if not (_attn_array(q, 2, (types.float32,)) and _attn_array(cache, 3, (types.float32, types.uint16))
            and _attn_array(out, 1, (types.float32,)) and scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        native = _native_half(_target_features())
        intp = context.get_value_type(types.intp)
        idx = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        hd = _shape(context, builder, sig.args[0], args[0], 1)
        n_ctx = _shape(context, builder, sig.args[2], args[2], 1)
        row_len = _shape(context, builder, sig.args[2], args[2], 2)
        q0 = _elem_ptr(context, builder, sig.args[0], args[0], builder.mul(idx(1), hd))
        first_row = builder.add(builder.mul(idx(3), n_ctx), idx(4))
        n, scale = idx(5), args[6]
        out0 = _elem_ptr(context, builder, sig.args[7], args[7], idx(8))
        last = builder.sub(n, intp(1))
        minus_zero = ir.Constant(_vec(_F32, _W), [-0.0] * _W)
        lo, hi = list(range(8)), list(range(8, 16))

        def pair(a, b, ia, ib):
            return builder.fadd(builder.shuffle_vector(a, b, _const_vec(_I32, ia)),
                                builder.shuffle_vector(a, b, _const_vec(_I32, ib)))

        def finish(sums, rows, q_tail, tail):
            """The four dots' 16-lane sums -> their values, in the order above."""
            halves = [pair(sums[0], sums[1], lo + [16 + i for i in lo], hi + [16 + i for i in hi]),
                      pair(sums[2], sums[3], lo + [16 + i for i in lo], hi + [16 + i for i in hi])]
            if tail is not None:
                slots = [cgutils.alloca_once(builder, h.type) for h in halves]
                for slot, h in zip(slots, halves):
                    builder.store(h, slot)
                with builder.if_then(tail):
                    at = builder.sub(hd, intp(8))
                    qv = q_tail() if q_tail else _load_f32(builder, builder.gep(q0, [at]), 8, native)
                    prods = [builder.fmul(qv, _load_f32(builder, builder.gep(r, [at]), 8, native)) for r in rows]
                    for k in range(2):
                        both = builder.shuffle_vector(prods[2 * k], prods[2 * k + 1], _const_vec(_I32, range(16)))
                        builder.store(builder.fadd(halves[k], both), slots[k])
                halves = [builder.load(slot) for slot in slots]
            first = [b + i for b in (0, 8, 16, 24) for i in range(4)]
            z = pair(halves[0], halves[1], first, [i + 4 for i in first])
            w = pair(z, z, [b + i for b in (0, 4, 8, 12) for i in range(2)],
                     [b + i + 2 for b in (0, 4, 8, 12) for i in range(2)])
            r = pair(w, w, [0, 2, 4, 6], [1, 3, 5, 7])
            return [builder.extract_element(r, ir.Constant(_I32, j)) for j in range(4)]

        def positions(body):
            """body(t, rows, ts) for t = 0, 4, 8, ... < n: rows the four cache rows' pointers."""
            with cgutils.for_range_slice(builder, intp(0), n, intp(4), intp) as (t, _):
                ts = []
                for j in range(4):
                    p = builder.add(t, intp(j))
                    ts.append(builder.select(builder.icmp_signed("<", p, n), p, last))
                rows = [_elem_ptr(context, builder, sig.args[2], args[2],
                                  builder.mul(builder.add(first_row, p), row_len)) for p in ts]
                values = body(rows)
                for p, v in zip(ts, values):
                    builder.store(builder.fmul(v, scale), builder.gep(out0, [p]))

        def unrolled(size):
            """A head size known here: the query's chunks loaded once, in registers."""
            chunks = size // _W
            qs = [_load_f32(builder, builder.gep(q0, [intp(c * _W)]), _W, native) for c in range(chunks)]
            q_tail = _load_f32(builder, builder.gep(q0, [intp(size - 8)]), 8, native) if size % _W else None

            def body(rows):
                sums = []
                for r in rows:
                    accs = [minus_zero] * 4
                    for c in range(chunks):
                        k = _load_f32(builder, builder.gep(r, [intp(c * _W)]), _W, native)
                        accs[c % 4] = builder.fadd(accs[c % 4], builder.fmul(qs[c], k))
                    sums.append(builder.fadd(builder.fadd(accs[0], accs[1]), builder.fadd(accs[2], accs[3])))
                tail = ir.Constant(ir.IntType(1), 1) if size % _W else None
                return finish(sums, rows, (lambda: q_tail) if q_tail is not None else None, tail)
            positions(body)

        def looped():
            def body(rows):
                accs = [[cgutils.alloca_once(builder, minus_zero.type) for _ in range(4)] for _ in range(4)]
                for a in accs:
                    for slot in a:
                        builder.store(minus_zero, slot)

                def chunk(chain, at):
                    qv = _load_f32(builder, builder.gep(q0, [at]), _W, native)
                    for j in range(4):
                        k = _load_f32(builder, builder.gep(rows[j], [at]), _W, native)
                        acc = accs[j][chain]
                        builder.store(builder.fadd(builder.load(acc), builder.fmul(qv, k)), acc)

                four = builder.udiv(hd, intp(4 * _W))
                with cgutils.for_range(builder, four) as loop:
                    at = builder.mul(loop.index, intp(4 * _W))
                    for c in range(4):
                        chunk(c, builder.add(at, intp(c * _W)))
                done = builder.mul(four, intp(4 * _W))
                for c in range(3):  # the remaining whole chunks (at most 3)
                    at = builder.add(done, intp(c * _W))
                    with builder.if_then(builder.icmp_signed("<=", builder.add(at, intp(_W)), hd)):
                        chunk(c, at)
                sums = [builder.fadd(builder.fadd(builder.load(a[0]), builder.load(a[1])),
                                     builder.fadd(builder.load(a[2]), builder.load(a[3]))) for a in accs]
                tail = builder.icmp_signed("!=", builder.urem(hd, intp(_W)), intp(0))
                return finish(sums, rows, None, tail)
            positions(body)

        _by_head_dim(builder, hd, intp, unrolled, looped)
        return context.get_dummy_value()

    return types.void(q, qi, cache, kv, start, n, scale, out, o_at), codegen


@intrinsic
def _kv_vsum(typingctx, p, p_at, n, cache, kv, start, out, oi, head_dim):
    """out[oi, i] = sum over t < n, in order, of p[p_at + t] * cache[kv, start + t, i], for i <
    head_dim (a multiple of 8), and returns the sum of p[p_at + t] in order (in double precision,
    rounded to float32 at the end, as a numba loop summing from 0.0 does): a float32 or f16 cache
    of shape (n_kv_heads, n_ctx, row).  Each sum starts at 0 and adds one product per position (no
    fused multiply-add), as a scalar loop would.  The accumulators go down the positions together:
    all of a head size of 64 or 128 (each row read once), else 64 columns at a time."""
    if not (_attn_array(p, 1, (types.float32,)) and _attn_array(out, 2, (types.float32,))
            and _attn_array(cache, 3, (types.float32, types.uint16))):
        return None

    def codegen(context, builder, sig, args):
        native = _native_half(_target_features())
        intp = context.get_value_type(types.intp)
        idx = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        hd = idx(8)
        count = idx(2)
        row_len = _shape(context, builder, sig.args[3], args[3], 2)
        n_ctx = _shape(context, builder, sig.args[3], args[3], 1)
        p0 = _elem_ptr(context, builder, sig.args[0], args[0], idx(1))
        v0 = _elem_ptr(context, builder, sig.args[3], args[3],
                       builder.mul(builder.add(builder.mul(idx(4), n_ctx), idx(5)), row_len))
        o0 = _elem_ptr(context, builder, sig.args[6], args[6],
                       builder.mul(idx(7), _shape(context, builder, sig.args[6], args[6], 1)))
        f64 = ir.DoubleType()
        total = cgutils.alloca_once(builder, f64)  # in double precision, as a numba loop from 0.0 sums
        builder.store(ir.Constant(f64, 0.0), total)

        def columns(at, widths, with_total):
            """The sums of columns at .. at + sum(widths) - 1, one accumulator per width (and the
            weights' sum with_total)."""
            accs = [cgutils.alloca_once(builder, _vec(_F32, w)) for w in widths]
            offsets = [sum(widths[:j]) for j in range(len(widths))]
            for acc, w in zip(accs, widths):
                builder.store(ir.Constant(_vec(_F32, w), [0.0] * w), acc)
            with cgutils.for_range(builder, count) as loop:
                weight = builder.load(builder.gep(p0, [loop.index]))
                if with_total:
                    builder.store(builder.fadd(builder.load(total), builder.fpext(weight, f64)), total)
                row = builder.gep(v0, [builder.mul(loop.index, row_len)])
                for acc, w, o in zip(accs, widths, offsets):
                    splat = builder.insert_element(ir.Constant(_vec(_F32, w), ir.Undefined), weight,
                                                   ir.Constant(_I32, 0))
                    splat = builder.shuffle_vector(splat, splat, _const_vec(_I32, [0] * w))
                    values = _load_f32(builder, builder.gep(row, [builder.add(at, intp(o))]), w, native)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(splat, values)), acc)
            for acc, w, o in zip(accs, widths, offsets):
                ptr = builder.bitcast(builder.gep(o0, [builder.add(at, intp(o))]), _vec(_F32, w).as_pointer())
                builder.store(builder.load(acc), ptr, align=4)

        def looped():
            with cgutils.for_range(builder, count) as loop:
                weight = builder.fpext(builder.load(builder.gep(p0, [loop.index])), f64)
                builder.store(builder.fadd(builder.load(total), weight), total)
            four = builder.udiv(hd, intp(4 * _W))
            with cgutils.for_range(builder, four) as loop:
                columns(builder.mul(loop.index, intp(4 * _W)), [_W] * 4, False)
            done = builder.mul(four, intp(4 * _W))
            rest = builder.sub(hd, done)  # 0 .. 56, a multiple of 8
            for k in range(7, 0, -1):  # rest = 8k: whole chunks of 16, then 8
                with builder.if_then(builder.icmp_signed("==", rest, intp(8 * k))):
                    columns(done, [_W] * (k // 2) + [8] * (k % 2), False)

        _by_head_dim(builder, hd, intp,
                     lambda size: columns(intp(0), [_W] * (size // _W) + [8] * (size % _W // 8), True), looped)
        return builder.fptrunc(builder.load(total), _F32)

    return types.float32(p, p_at, n, cache, kv, start, out, oi, head_dim), codegen


@njit(**EXACT)
def _q8_scale(row, b):
    """The f16 scale of Q8_0 block b of a cached row, as float32."""
    return _f16_at(row, KV_Q8_BLOCK * b)


@njit(**EXACT)
def _roundf(v):
    """Round half away from zero (C's roundf), as ggml's reference quantizers and gguf-py do."""
    a = abs(v)
    r = np.floor(a)
    r += np.floor(np.float32(2.0) * (a - r))
    return r if v >= 0 else -r


@overload(_kv_load, jit_options={"error_model": "numpy"})
def _kv_load_impl(row, out):
    if row.dtype == types.uint8:
        def load_q8(row, out):
            for b in range(out.shape[0] // QK):
                _q8_block_axpy(_q8_scale(row, b), row, KV_Q8_BLOCK * b + 2, out, QK * b, False)
        return load_q8

    if row.dtype == types.uint16:
        def load_f16(row, out):  # head_dim % F16_LOAD_WIDTH == 0 (Model checks); no scalar tail:
            for i in range(0, out.shape[0], F16_LOAD_WIDTH):  # it would keep this from being inlined
                _f16_widen(row, i, out)
        return load_f16

    def load(row, out):
        for i in range(out.shape[0]):
            out[i] = _as_f32(row[i])
    return load


@overload(_kv_store, jit_options={"error_model": "numpy"})
def _kv_store_impl(values, row):
    if row.dtype == types.uint8:
        def store_q8(values, row):
            for b in range(values.shape[0] // QK):
                o = KV_Q8_BLOCK * b
                d = _abs_max(values, QK * b) / np.float32(127.0)
                inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
                _put_half(row, o, d)
                for i in range(QK):
                    row[o + 2 + i] = I32(_roundf(values[QK * b + i] * inv)) & 255
        return store_q8

    def store(values, row):
        for i in range(values.shape[0]):
            row[i] = _to_kv(values[i], row)
    return store


@njit(**EXACT)
def rerotate_keys(k_cache, start, end, cos, sin, head_dim):
    """Rotate cached keys at slots start..end-1 of every layer and head by the angles (cos, sin),
    in place: moving a key from position p to p - delta is a rotation by -delta's angles.
    k_cache: (n_layers, n_kv_heads, n_ctx, row length), any KV element type (see _kv_load)."""
    parallel_rows(_rerotate_keys_range, k_cache.shape[0] * k_cache.shape[1], (k_cache, start, end, cos, sin, head_dim))


@njit(**EXACT)
def _rerotate_keys_range(lo, hi, k_cache, start, end, cos, sin, head_dim):
    n_kv_heads = k_cache.shape[1]
    for job in range(lo, hi):
        layer, head = job // n_kv_heads, job % n_kv_heads
        key = np.empty(head_dim, np.float32)
        for p in range(start, end):
            row = k_cache[layer, head, p]
            _kv_load(row, key)
            rope(key, 1, head_dim, cos, sin)
            _kv_store(key, row)


@njit(**EXACT)
def store_kv(cache, start, values):
    """cache[h, start + t] = values[t, h * head_dim:(h + 1) * head_dim] for T new tokens, in the
    cache's element type.  cache: (n_kv_heads, n_ctx, row length) of one layer; values: (T, n_kv*hd)."""
    parallel_rows(_store_kv_range, cache.shape[0], (cache, start, values))


@njit(**EXACT)
def _store_kv_range(lo, hi, cache, start, values):
    n_kv_heads = cache.shape[0]
    head_dim = values.shape[1] // n_kv_heads
    for h in range(lo, hi):
        for t in range(values.shape[0]):
            _kv_store(values[t, h * head_dim:(h + 1) * head_dim], cache[h, start + t])
