"""KV cache rows: the only code that knows a cached row's element format (float32, IEEE half bits,
or Q8_0 blocks), specialized per cache dtype when a kernel is compiled; storing rows, and moving
cached keys to new positions (context shift).

A cached key or value row of head_dim elements is float32, IEEE half bits (uint16), or Q8_0
blocks (uint8, KV_Q8_BLOCK bytes per 32 elements: the f16 scale d, then 32 int8 q; value d * q,
quantized as ggml's reference quantize_row_q8_0 does).  These four helpers are the only code that
knows the element format; each is specialized per cache dtype when a kernel is compiled.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
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


def _kv_dot(q, row):
    """q . the cached row."""


def _kv_axpy(p, row, out):
    """out += p * the cached row."""


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
def _q8_block_dot(typingctx, x, x_at, row, row_at):
    """sum over i < 32 of x[x_at + i] * int8(row[row_at + i]): float32 x, uint8 row holding int8s;
    one vector product summed in a fixed tree order.  (Numba's loops over a 32-element block get
    unrolled before LLVM can vectorize them, and run scalar.)"""
    if not (_c_array(x, types.float32) and _c_array(row, types.uint8)):
        return None

    def codegen(context, builder, sig, args):
        at = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        xv = builder.load(_block_vector(context, builder, sig.args[0], args[0], at(1), _F32), align=4)
        qv = builder.load(_block_vector(context, builder, sig.args[2], args[2], at(3), _I8), align=1)
        v = builder.fmul(xv, builder.sitofp(qv, _vec(_F32, QK)))
        n = QK
        while n > 1:
            n //= 2
            v = builder.fadd(builder.shuffle_vector(v, v, _const_vec(_I32, range(n))),
                             builder.shuffle_vector(v, v, _const_vec(_I32, range(n, 2 * n))))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(x, x_at, row, row_at), codegen


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


@overload(_kv_dot, jit_options={"fastmath": True, "error_model": "numpy"})
def _kv_dot_impl(q, row):
    if row.dtype == types.uint8:
        def dot_q8(q, row):
            s = np.float32(0.0)
            for b in range(q.shape[0] // QK):
                s += _q8_scale(row, b) * _q8_block_dot(q, QK * b, row, KV_Q8_BLOCK * b + 2)
            return s
        return dot_q8

    def dot(q, row):
        s = np.float32(0.0)
        for i in range(q.shape[0]):
            s += q[i] * _as_f32(row[i])
        return s
    return dot


@overload(_kv_axpy, jit_options={"error_model": "numpy"})
def _kv_axpy_impl(p, row, out):
    if row.dtype == types.uint8:
        def axpy_q8(p, row, out):
            for b in range(out.shape[0] // QK):
                _q8_block_axpy(p * _q8_scale(row, b), row, KV_Q8_BLOCK * b + 2, out, QK * b, True)
        return axpy_q8

    def axpy(p, row, out):
        for i in range(out.shape[0]):
            out[i] += p * _as_f32(row[i])
    return axpy


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
    n_layers, n_kv_heads = k_cache.shape[0], k_cache.shape[1]
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
