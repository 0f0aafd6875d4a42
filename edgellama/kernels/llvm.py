"""LLVM IR helpers and the scalar intrinsics built from them: half <-> float conversion (inline
where the CPU has it, exact integer code elsewhere), ``_expf``, and the KV cache's element types.
Compile-time code: these emit IR into the kernels that use them."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .common import EXACT, I32
from .target import _native_half, _target_features

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _const_vec(ty, values):
    return ir.Constant(_vec(ty, len(values)), list(values))


def _splat(builder, x, count):
    """IR: the scalar x in each of ``count`` lanes of a vector."""
    v = builder.insert_element(ir.Constant(_vec(x.type, count), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _const_vec(_I32, [0] * count))


def _like(value, ty, c):
    """The constant c of scalar type ty, splatted if value is a vector."""
    if isinstance(value.type, ir.VectorType):
        return ir.Constant(_vec(ty, value.type.count), [c] * value.type.count)
    return ir.Constant(ty, c)


def _with_elem(value, ty):
    """The type ty, or a vector of ty as wide as value."""
    return _vec(ty, value.type.count) if isinstance(value.type, ir.VectorType) else ty


def _half_to_f32(b, h, native):
    """IR: i16 half-precision bit patterns (scalar or vector) -> float32, exactly."""
    if native:
        return b.fpext(b.bitcast(h, _with_elem(h, _F16)), _with_elem(h, _F32))
    # exponent and mantissa shifted into float32 position, rescaled by 2^112 (exact, subnormals
    # included); infinities and NaNs get the all-ones exponent; then the sign
    h32 = b.zext(h, _with_elem(h, _I32))
    c = lambda v: _like(h, _I32, v)
    f32 = _with_elem(h, _F32)
    magnitude = b.fmul(b.bitcast(b.shl(b.and_(h32, c(0x7FFF)), c(13)), f32), _like(h, _F32, 2.0 ** 112))
    bits = b.bitcast(magnitude, _with_elem(h, _I32))
    special = b.icmp_unsigned("==", b.and_(h32, c(0x7C00)), c(0x7C00))
    bits = b.select(special, b.or_(bits, c(0x7F800000)), bits)
    return b.bitcast(b.or_(bits, b.shl(b.and_(h32, c(0x8000)), c(16))), f32)


def _f32_to_half(b, f, native):
    """IR: float32 f -> its nearest half (ties to even) as an i16 bit pattern, as F16C's vcvtps2ph.
    Without F16C the subnormal rounding is a float addition: exact-only code, like _expf."""
    if native:
        return b.bitcast(b.fptrunc(f, _F16), _I16)
    c = lambda v: ir.Constant(_I32, v)
    bits = b.bitcast(f, _I32)
    sign = b.and_(bits, c(0x80000000))
    mag = b.xor(bits, sign)
    # overflow: infinity, or a quiet NaN
    big = b.select(b.icmp_unsigned(">", mag, c(0x7F800000)), c(0x7E00), c(0x7C00))
    # subnormal halves: one float addition lines the mantissa up and rounds it (ties to even)
    magic = (127 - 15 + 23 - 10 + 1) << 23
    sub = b.sub(b.bitcast(b.fadd(b.bitcast(mag, _F32), b.bitcast(c(magic), _F32)), _I32), c(magic))
    # normal halves: rebias the exponent, round the 13 dropped bits to nearest even
    odd = b.and_(b.lshr(mag, c(13)), c(1))
    normal = b.lshr(b.add(b.add(mag, c(((15 - 127) << 23) + 0xFFF)), odd), c(13))
    out = b.select(b.icmp_unsigned(">=", mag, c(0x47800000)), big,
                   b.select(b.icmp_unsigned("<", mag, c(0x38800000)), sub, normal))
    return b.trunc(b.or_(out, b.lshr(sign, c(16))), _I16)


def _exp_ir(b, v):
    """IR: exp(v) for float32 v (scalar or vector), within about 2 ulp, in plain arithmetic (see
    _expf)."""
    f = lambda c: _like(v, _F32, c)
    i = lambda c: _like(v, _I32, c)
    i32 = _with_elem(v, _I32)
    is_nan = b.fcmp_unordered("uno", v, v)
    clamped = b.select(b.fcmp_ordered("<", v, f(-104.0)), f(-104.0), v)
    clamped = b.select(b.fcmp_ordered(">", clamped, f(89.0)), f(89.0), clamped)
    clamped = b.select(is_nan, f(0.0), clamped)
    shifter = f(1.5 * 2.0 ** 23)
    z = b.fadd(b.fmul(clamped, f(1.4426950408889634)), shifter)
    n_float = b.fsub(z, shifter)
    n = b.sub(b.bitcast(z, i32), b.bitcast(shifter, i32))
    r = b.fsub(b.fsub(clamped, b.fmul(n_float, f(0.693359375))), b.fmul(n_float, f(-2.12194440e-4)))
    p = f(1.0 / 5040.0)
    for k in (720, 120, 24, 6, 2, 1, 1):
        p = b.fadd(b.fmul(p, r), f(1.0 / k))
    half_n = b.ashr(n, i(1))
    scale_a = b.bitcast(b.shl(b.add(half_n, i(127)), i(23)), v.type)
    scale_b = b.bitcast(b.shl(b.add(b.sub(n, half_n), i(127)), i(23)), v.type)
    y = b.fmul(b.fmul(p, scale_a), scale_b)
    y = b.select(b.fcmp_ordered("<", v, f(-104.0)), f(0.0), y)
    return b.select(is_nan, v, y)


@intrinsic
def _expf(typingctx, x):
    """exp(x) for float32 x, within about 2 ulp, in plain arithmetic so that loops over it vectorize
    (a libm call does not).  Never in functions compiled with fastmath (nor in anything they call):
    Numba's fastmath pass would let LLVM reassociate its rounding step 1.5 * 2^23 away.  x = n ln2 + r with |r| <= ln2/2 (n rounded to nearest by adding
    1.5 * 2^23; ln2 split in two for exactness); e^r by its Taylor series to r^7; 2^n applied as two
    factors so that n = 128 (results near FLT_MAX) and gradual underflow come out right."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _exp_ir(builder, args[0])

    return types.float32(x), codegen


@intrinsic
def _round_half(typingctx, v):
    """float32 -> the nearest value an IEEE half holds (ties to even; overflow to infinity)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        native = _native_half(_target_features())
        return _half_to_f32(builder, _f32_to_half(builder, args[0], native), native)

    return types.float32(v), codegen


@intrinsic
def _half_bits(typingctx, value):
    """float32 -> the bits (uint16) of its nearest half (ties to even)."""
    if value != types.float32:
        return None
    return types.uint16(value), (lambda context, builder, sig, args:
                                 _f32_to_half(builder, args[0], _native_half(_target_features())))


@intrinsic
def _as_f32(typingctx, v):
    """float32 passes through; uint16 holds IEEE half bits (an f16 KV cache, a block scale): their
    value, exactly."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v == types.uint16:
        return types.float32(v), (lambda context, builder, sig, args:
                                  _half_to_f32(builder, args[0], _native_half(_target_features())))
    return None


@intrinsic
def _to_kv(typingctx, value, cache):
    """float32 value -> the element type of the KV cache array: itself, or its half as uint16."""
    if not (isinstance(cache, types.Array) and value == types.float32):
        return None
    if cache.dtype == types.float32:
        return types.float32(value, cache), lambda context, builder, sig, args: args[0]
    if cache.dtype == types.uint16:
        return types.uint16(value, cache), (lambda context, builder, sig, args:
                                            _f32_to_half(builder, args[0], _native_half(_target_features())))
    return None



@njit(**EXACT)
def _f16_at(row, o):
    """The IEEE half stored at bytes o, o+1 of a byte row, as float32."""
    return _as_f32(np.uint16(I32(row[o]) | (I32(row[o + 1]) << 8)))


@njit(**EXACT)
def _put_half(group, at, value):
    """A scale or minimum into a packed record as IEEE half bits."""
    bits = I32(_half_bits(value))
    group[at] = bits & 255
    group[at + 1] = bits >> 8


def _byte_pointer(context, builder, arr_type, arr, at, ty):
    """IR: pointer to a ty at byte offset ``at`` of 1-D C-contiguous uint8 array arr (any alignment)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.bitcast(builder.gep(builder.bitcast(data, _I8.as_pointer()), [at]), ty.as_pointer())


def _u8_array(a):
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == types.uint8


@intrinsic
def _load_u32(typingctx, arr, at):
    """The 4 bytes of a uint8 array at byte offset at, as a little-endian uint32 (unaligned)."""
    if not (_u8_array(arr) and isinstance(at, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        offset = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_byte_pointer(context, builder, sig.args[0], args[0], offset, _I32), align=1)

    return types.uint32(arr, at), codegen


@intrinsic
def _store_u32(typingctx, arr, at, value):
    """Store a uint32 as 4 little-endian bytes of a uint8 array at byte offset at (unaligned)."""
    if not (_u8_array(arr) and isinstance(at, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        offset = context.cast(builder, args[1], sig.args[1], types.intp)
        v = context.cast(builder, args[2], sig.args[2], types.uint32)
        builder.store(v, _byte_pointer(context, builder, sig.args[0], args[0], offset, _I32), align=1)
        return context.get_dummy_value()

    return types.void(arr, at, value), codegen
