"""Every Numba kernel of the runtime.  Each has a numpy twin in the tests.

Weights arrive as read-only ``(n_out, row_bytes)`` uint8 views of the memory-mapped GGUF file plus
their ggml type id; they are dequantized inside the kernels, never copied out as floats.  Decoding
one token quantizes each activation vector once to int8 blocks of 32 (ggml's Q8_0 / Q8_1 activation
format) and reuses it for every matrix that reads it; a block's int32 dot product is scaled once.

Type ids (ggml): F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30.
``half_table`` arguments are 65536-entry float32 tables mapping a 16-bit pattern to its value
(``F16_TABLE`` for IEEE half, ``BF16_TABLE`` for bfloat16).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 8, 30
QK = 32  # elements per quantized block
I32 = np.int32

F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

# error_model="numpy": a division is a plain instruction (no ZeroDivisionError check), so loops with
# divisions vectorize; fastmath only for kernels whose floating work is dot products
_fast = {"cache": True, "fastmath": True, "error_model": "numpy"}
_exact = {"cache": True, "error_model": "numpy"}


# ----- activation quantization ------------------------------------------------------------------

@njit(**_exact)
def round_to_f16(v):
    """The float32 value nearest to v that IEEE half can hold (ties to even), as ggml's FP32_TO_FP16."""
    return _round_half(np.float32(v))


@njit(**_fast)
def _abs_max(x, o):
    """max |x[o:o+32]| (a max is exact in any order, so fastmath may vectorize it)."""
    amax = np.float32(0.0)
    for i in range(QK):
        amax = max(amax, abs(x[o + i]))
    return amax


@njit(**_exact)
def quantize_q8(x, xq, xd, xs):
    """x: (n,) f32 -> xq: (n,) int8, xd: (n/32,) block scales, xs: (n/32,) scale * block sum of xq.

    Per 32-block, as ggml's x86 quantize_row_q8_1: d = max|x| / 127 (stored as half),
    q = round-to-nearest-even(x * 127 / max|x|), s = half(d * sum(q)).
    """
    for b in range(x.shape[0] // QK):
        o = b * QK
        amax = _abs_max(x, o)
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
        total = I32(0)
        for i in range(QK):
            q = I32(np.rint(x[o + i] * inv))
            xq[o + i] = q
            total += q
        xd[b] = round_to_f16(d)
        xs[b] = round_to_f16(d * np.float32(total))


@njit(parallel=True, **_exact)
def quantize_q8_rows(x, xq, xd, xs):
    """quantize_q8 of every row: x (T, n) -> xq (T, n), xd and xs (T, n/32)."""
    for t in prange(x.shape[0]):
        quantize_q8(x[t], xq[t], xd[t], xs[t])


# ----- quantized products: tiles of block dot products, written in LLVM vector IR ---------------

# Numba has no vector types, and LLVM does not find the int8 dot-product instructions in scalar
# loops over 32-element blocks.  So the inner work of every quantized product is one intrinsic,
# generated below as LLVM IR: a *tile* of up to TILE_ROWS weight rows times up to n_tok activation
# rows, looping over the 32-element blocks with one float vector accumulator per (row, token),
# exactly like ggml's AVX2 vec_dot kernels:
#
#   per block:  p = 8 lanes of 4-byte int8 dot products      (vpdpbusd with AVX-VNNI / AVX-512 VNNI;
#                                                              portable IR elsewhere: sdot on arm64)
#               acc += float(p) * (d_w * d_x)                 (one fused multiply-add)
#   per tile:   out = hsum(acc)  [+ sum_b m_w * s_x for Q4_1]  (ggml's hsum_float_8 order)
#
# vpdpbusd multiplies unsigned by signed bytes.  Q4 nibbles are unsigned already; the Q4_0 offset of
# 8 is subtracted in integers through the accumulator's start value, -8 * (per-lane sums of x), as
# ggml keeps it in its integer sum.  Q8_0 weights are signed: they are flipped to w + 128 (w xor
# 0x80) and 128 * (lane sums of x) is subtracted the same way.  With AVX-512 VNNI two blocks go
# through one 16-lane instruction.  Rows and tokens past the ends of the arrays are clamped (computed
# again, never stored), so any n_out and any token count need no separate tail code.

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()
_BLOCK_BYTES = {T_Q8_0: 34, T_Q4_0: 18, T_Q4_1: 20}
_NIBBLES_AT = {T_Q4_0: 2, T_Q4_1: 4}      # byte offset of a Q4 block's 16 nibble bytes
TILE_ROWS = 4                             # weight rows per tile
TILE_TOKENS = 4                           # activation rows per tile in prompt products


def _target_features() -> set[str]:
    """The CPU features Numba compiles for (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES, else the host's)."""
    from numba.core import config

    if config.CPU_NAME:
        flat = config.CPU_FEATURES or ""
    else:
        import llvmlite.binding as llvm

        flat = llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


def _x86() -> bool:
    import llvmlite.binding as llvm

    return llvm.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686")


def _native_half(feats) -> bool:
    """Whether LLVM converts half <-> float inline (x86 without F16C makes it a libcall that
    Numba's JIT cannot link)."""
    return "f16c" in feats or not _x86()


def _half_to_f32(b, h, native):
    """IR: the i16 half-precision bit pattern h -> float32 (exact)."""
    if native:
        return b.fpext(b.bitcast(h, _F16), _F32)
    # exponent and mantissa shifted into float32 position, rescaled by 2^112 (exact, subnormals
    # included); infinities and NaNs get the all-ones exponent; then the sign
    h32 = b.zext(h, _I32)
    c = lambda v: ir.Constant(_I32, v)
    magnitude = b.fmul(b.bitcast(b.shl(b.and_(h32, c(0x7FFF)), c(13)), _F32), ir.Constant(_F32, 2.0 ** 112))
    bits = b.bitcast(magnitude, _I32)
    special = b.icmp_unsigned("==", b.and_(h32, c(0x7C00)), c(0x7C00))
    bits = b.select(special, b.or_(bits, c(0x7F800000)), bits)
    return b.bitcast(b.or_(bits, b.shl(b.and_(h32, c(0x8000)), c(16))), _F32)


def _f32_to_half(b, f, native):
    """IR: float32 f -> its nearest half (ties to even) as an i16 bit pattern, as F16C's vcvtps2ph."""
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


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _const_vec(ty, values):
    return ir.Constant(_vec(ty, len(values)), list(values))


class _TileIR:
    """Emits one tile (see above) into a Numba intrinsic's builder.  Compile-time code only."""

    def __init__(self, context, builder, sig, args, qtype, n_rows, n_tok):
        feats = _target_features()
        self.b = builder
        self.qtype, self.n_rows, self.n_tok = qtype, n_rows, n_tok
        self.vnni = "avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats
        self.native_half = _native_half(feats)
        self.blocks_per_step = 2 if self.vnni and {"avx512vnni", "avx512bw", "avx512f"} <= feats else 1
        w, xq, xd, xs, out = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4, 6))
        self.w, self.xq, self.xd, self.xs, self.out = w, xq, xd, xs, out
        self.r0 = context.cast(builder, args[1], sig.args[1], types.intp)
        self.t0 = context.cast(builder, args[5], sig.args[5], types.intp)
        self.n_out = cgutils.unpack_tuple(builder, w.shape)[0]
        self.n_total, n_in = cgutils.unpack_tuple(builder, xq.shape)
        self.nb = builder.ashr(n_in, self.i64(5))
        stride = lambda a: cgutils.unpack_tuple(builder, a.strides)[0]
        # byte offsets of the (clamped) rows and tokens this tile reads
        self.w_rows = [builder.mul(self.clamp(builder.add(self.r0, self.i64(k)), self.n_out), stride(w))
                       for k in range(n_rows)]
        toks = [self.clamp(builder.add(self.t0, self.i64(j)), self.n_total) for j in range(n_tok)]
        self.xq_rows = [builder.mul(t, stride(xq)) for t in toks]
        self.xd_rows = [builder.mul(t, stride(xd)) for t in toks]
        self.xs_rows = [builder.mul(t, stride(xs)) for t in toks]
        self.out_stride = stride(out)

    # small helpers
    def i64(self, v):
        return ir.Constant(_I64, v)

    def clamp(self, v, n):
        last = self.b.sub(n, self.i64(1))
        return self.b.select(self.b.icmp_signed("<", v, last), v, last)

    def load(self, arr, byte_offset, ty, align=1):
        ptr = self.b.gep(self.b.bitcast(arr.data, _I8.as_pointer()), [byte_offset])
        return self.b.load(self.b.bitcast(ptr, ty.as_pointer()), align=align)

    def load_half(self, arr, byte_offset):
        """The IEEE half at byte_offset of arr, as float32."""
        return _half_to_f32(self.b, self.load(arr, byte_offset, _I16), self.native_half)

    def intrinsic(self, name, ret, arg_types):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, arg_types), name)

    def spread(self, scalars):
        """S scalars -> 8*S lanes, scalar i in lanes 8i..8i+7."""
        v = ir.Constant(_vec(scalars[0].type, len(scalars)), ir.Undefined)
        for i, s in enumerate(scalars):
            v = self.b.insert_element(v, s, ir.Constant(_I32, i))
        return self.b.shuffle_vector(v, v, _const_vec(_I32, [i // 8 for i in range(8 * len(scalars))]))

    def concat(self, a, b):
        n = a.type.count
        return self.b.shuffle_vector(a, b, _const_vec(_I32, range(2 * n)))

    def dot(self, acc, u, s):
        """acc + lane-wise sums of 4 adjacent products u*s (u unsigned bytes, s signed bytes)."""
        lanes = acc.type.count
        if self.vnni:
            fn = self.intrinsic(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", _vec(_I32, lanes), [_vec(_I32, lanes)] * 3)
            return self.b.call(fn, [acc, self.b.bitcast(u, _vec(_I32, lanes)), self.b.bitcast(s, _vec(_I32, lanes))])
        wide = _vec(_I32, 4 * lanes)
        extend = self.b.sext if self.qtype == T_Q8_0 else self.b.zext  # no flip without VNNI
        prod = self.b.mul(extend(u, wide), self.b.sext(s, wide))
        for g in range(4):
            acc = self.b.add(acc, self.b.shuffle_vector(prod, prod, _const_vec(_I32, [4 * i + g for i in range(lanes)])))
        return acc

    # the tile
    def emit(self):
        b = self.b
        acc_types = {8 * s for s in (1, self.blocks_per_step)}
        self.acc = {n: [[cgutils.alloca_once_value(b, ir.Constant(_vec(_F32, n), [0.0] * n))
                         for _ in range(self.n_tok)] for _ in range(self.n_rows)] for n in acc_types}
        self.acc_m = [[cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in range(self.n_tok)]
                      for _ in range(self.n_rows)]
        step = self.blocks_per_step
        n_steps = b.udiv(self.nb, self.i64(step))
        with cgutils.for_range(b, n_steps) as loop:
            self.step(b.mul(loop.index, self.i64(step)), step)
        if step > 1:  # an odd block count: the last block alone
            with b.if_then(b.icmp_signed("!=", b.mul(n_steps, self.i64(step)), self.nb)):
                self.step(b.sub(self.nb, self.i64(1)), 1)
        self.store()

    def step(self, blk, n_blocks):
        """Blocks blk .. blk + n_blocks - 1 of every (row, token) pair of the tile."""
        b, qt, lanes = self.b, self.qtype, 8 * n_blocks
        blocks = [b.add(blk, self.i64(i)) for i in range(n_blocks)]
        fma = self.intrinsic(f"llvm.fmuladd.v{lanes}f32", _vec(_F32, lanes), [_vec(_F32, lanes)] * 3)
        # activations: int8 values, block scales, and the integer offset term as the start value
        x, dx, start, sx = [], [], [], []
        offset = {T_Q4_0: 8, T_Q8_0: 128 if self.vnni else 0}.get(qt, 0)
        zero = ir.Constant(_vec(_I32, lanes), [0] * lanes)
        for j in range(self.n_tok):
            x.append(self.load(self.xq, b.add(self.xq_rows[j], b.shl(blk, self.i64(5))), _vec(_I8, 32 * n_blocks)))
            dx.append(self.spread([self.load(self.xd, b.add(self.xd_rows[j], b.shl(i, self.i64(2))), _F32, 4)
                                   for i in blocks]))
            if qt == T_Q4_1:
                sx.append([self.load(self.xs, b.add(self.xs_rows[j], b.shl(i, self.i64(2))), _F32, 4) for i in blocks])
            if offset:
                lane_sums = self.dot(zero, _const_vec(_I8, [offset if offset < 128 else offset - 256] * (4 * lanes)), x[j])
                start.append(b.sub(zero, lane_sums))
            else:
                start.append(zero)
        for k in range(self.n_rows):
            # one weight row's blocks: int8 values (nibbles unpacked), scales (and Q4_1 minimums)
            qs, dw, mw = [], [], []
            for i in blocks:
                at = b.add(self.w_rows[k], b.mul(i, self.i64(_BLOCK_BYTES[qt])))
                dw.append(self.load_half(self.w, at))
                if qt == T_Q8_0:
                    q = self.load(self.w, b.add(at, self.i64(2)), _vec(_I8, 32))
                    qs.append(b.xor(q, _const_vec(_I8, [-128] * 32)) if self.vnni else q)
                else:
                    raw = self.load(self.w, b.add(at, self.i64(_NIBBLES_AT[qt])), _vec(_I8, 16))
                    qs.append(self.concat(b.and_(raw, _const_vec(_I8, [15] * 16)), b.lshr(raw, _const_vec(_I8, [4] * 16))))
                if qt == T_Q4_1:
                    mw.append(self.load_half(self.w, b.add(at, self.i64(2))))
            q = qs[0] if n_blocks == 1 else self.concat(qs[0], qs[1])
            scale_w = self.spread(dw)
            for j in range(self.n_tok):
                acc = self.acc[lanes][k][j]
                p = b.sitofp(self.dot(start[j], q, x[j]), _vec(_F32, lanes))
                b.store(b.call(fma, [p, b.fmul(scale_w, dx[j]), b.load(acc)]), acc)
                if qt == T_Q4_1:
                    m = b.load(self.acc_m[k][j])
                    for i in range(n_blocks):
                        m = b.fadd(m, b.fmul(mw[i], sx[j][i]))
                    b.store(m, self.acc_m[k][j])

    def hsum8(self, v):
        """ggml's hsum_float_8: (lanes 0-3 + lanes 4-7), then pairs, then the last two."""
        b = self.b
        half = lambda v, lo: b.shuffle_vector(v, v, _const_vec(_I32, range(lo, lo + v.type.count // 2)))
        v = b.fadd(half(v, 0), half(v, 4))
        v = b.fadd(half(v, 0), half(v, 2))
        return b.fadd(b.extract_element(v, ir.Constant(_I32, 0)), b.extract_element(v, ir.Constant(_I32, 1)))

    def store(self):
        b = self.b
        for k in range(self.n_rows):
            row = b.add(self.r0, self.i64(k))
            for j in range(self.n_tok):
                tok = b.add(self.t0, self.i64(j))
                inside = b.and_(b.icmp_signed("<", row, self.n_out), b.icmp_signed("<", tok, self.n_total))
                with b.if_then(inside):
                    v = b.load(self.acc[8][k][j])
                    if 16 in self.acc:  # two-block lanes fold onto the one-block ones first
                        v16 = b.load(self.acc[16][k][j])
                        lo = b.shuffle_vector(v16, v16, _const_vec(_I32, range(8)))
                        hi = b.shuffle_vector(v16, v16, _const_vec(_I32, range(8, 16)))
                        v = b.fadd(b.fadd(lo, hi), v)
                    total = self.hsum8(v)
                    if self.qtype == T_Q4_1:
                        total = b.fadd(total, b.load(self.acc_m[k][j]))
                    at = b.add(b.mul(tok, self.out_stride), b.shl(row, self.i64(2)))
                    b.store(total, b.bitcast(b.gep(b.bitcast(self.out.data, _I8.as_pointer()), [at]),
                                             _F32.as_pointer()))


def _tile(qtype: int, n_rows: int, n_tok: int):
    """tile(w, r0, xq, xd, xs, t0, out): out[t0 + j, r0 + k] = row r0 + k of w . activation t0 + j.

    w: (n_out, row_bytes) uint8 rows of type qtype; xq: (T, n_in) int8 and xd, xs: (T, n_in/32)
    float32, as quantize_q8 writes them; out: (T, n_out) float32.  Every array C-contiguous.
    """

    @intrinsic
    def tile(typingctx, w, r0, xq, xd, xs, t0, out):
        want = ((w, types.uint8, 2), (xq, types.int8, 2), (xd, types.float32, 2), (xs, types.float32, 2),
                (out, types.float32, 2))
        for arr, dtype, ndim in want:
            if not (isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == ndim and arr.layout == "C"):
                return None
        return types.void(w, r0, xq, xd, xs, t0, out), (
            lambda context, builder, sig, args: _TileIR(context, builder, sig, args, qtype, n_rows, n_tok).emit()
            or context.get_dummy_value())

    return tile


_q8_0_row_tile, _q8_0_tile = _tile(T_Q8_0, TILE_ROWS, 1), _tile(T_Q8_0, TILE_ROWS, TILE_TOKENS)
_q4_0_row_tile, _q4_0_tile = _tile(T_Q4_0, TILE_ROWS, 1), _tile(T_Q4_0, TILE_ROWS, TILE_TOKENS)
_q4_1_row_tile, _q4_1_tile = _tile(T_Q4_1, TILE_ROWS, 1), _tile(T_Q4_1, TILE_ROWS, TILE_TOKENS)


@njit(parallel=True, **_fast)
def matmul_quantized(w, wtype, xq, xd, xs, out):
    """out (T, n_out) = x @ W.T for Q8_0, Q4_0 or Q4_1 rows w, x given as its Q8 blocks (xq, xd, xs).

    One token: tiles of TILE_ROWS rows x 1 token.  More: TILE_ROWS x TILE_TOKENS tiles, each tile's
    weight rows staying in L1 while the tokens stream past.
    """
    n_groups = (w.shape[0] + TILE_ROWS - 1) // TILE_ROWS
    n_tok = xq.shape[0]
    if n_tok == 1:
        for g in prange(n_groups):
            r = g * TILE_ROWS
            if wtype == T_Q8_0:
                _q8_0_row_tile(w, r, xq, xd, xs, 0, out)
            elif wtype == T_Q4_0:
                _q4_0_row_tile(w, r, xq, xd, xs, 0, out)
            else:
                _q4_1_row_tile(w, r, xq, xd, xs, 0, out)
    else:
        for g in prange(n_groups):
            r = g * TILE_ROWS
            for t in range(0, n_tok, TILE_TOKENS):
                if wtype == T_Q8_0:
                    _q8_0_tile(w, r, xq, xd, xs, t, out)
                elif wtype == T_Q4_0:
                    _q4_0_tile(w, r, xq, xd, xs, t, out)
                else:
                    _q4_1_tile(w, r, xq, xd, xs, t, out)



# ----- scalar helpers in LLVM IR: exp, and the KV cache's storage type --------------------------

@intrinsic
def _expf(typingctx, x):
    """exp(x) for float32 x, within about 2 ulp, in plain arithmetic so that loops over it vectorize
    (a libm call does not).  x = n ln2 + r with |r| <= ln2/2 (n rounded to nearest by adding
    1.5 * 2^23; ln2 split in two for exactness); e^r by its Taylor series to r^7; 2^n applied as two
    factors so that n = 128 (results near FLT_MAX) and gradual underflow come out right."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        b, (v,) = builder, args
        f = lambda c: ir.Constant(_F32, c)
        i = lambda c: ir.Constant(_I32, c)
        is_nan = b.fcmp_unordered("uno", v, v)
        clamped = b.select(b.fcmp_ordered("<", v, f(-104.0)), f(-104.0), v)
        clamped = b.select(b.fcmp_ordered(">", clamped, f(89.0)), f(89.0), clamped)
        clamped = b.select(is_nan, f(0.0), clamped)
        shifter = f(1.5 * 2.0 ** 23)
        z = b.fadd(b.fmul(clamped, f(1.4426950408889634)), shifter)
        n_float = b.fsub(z, shifter)
        n = b.sub(b.bitcast(z, _I32), b.bitcast(shifter, _I32))
        r = b.fsub(b.fsub(clamped, b.fmul(n_float, f(0.693359375))), b.fmul(n_float, f(-2.12194440e-4)))
        p = f(1.0 / 5040.0)
        for k in (720, 120, 24, 6, 2, 1, 1):
            p = b.fadd(b.fmul(p, r), f(1.0 / k))
        half_n = b.ashr(n, i(1))
        scale_a = b.bitcast(b.shl(b.add(half_n, i(127)), i(23)), _F32)
        scale_b = b.bitcast(b.shl(b.add(b.sub(n, half_n), i(127)), i(23)), _F32)
        y = b.fmul(b.fmul(p, scale_a), scale_b)
        y = b.select(b.fcmp_ordered("<", v, f(-104.0)), f(0.0), y)
        return b.select(is_nan, v, y)

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
def _kv_f32(typingctx, v):
    """A KV cache element as float32: float32 passes through, uint16 holds an IEEE half."""
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


# ----- float weights and the per-type dispatch ---------------------------------------------------

@njit(parallel=True, **_fast)
def matvec_f32(w, x, out):
    """w: (n_out, 4 * n_in) bytes of float32 rows."""
    wf = w.view(np.float32)
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += wf[r, i] * x[i]
        out[r] = acc


@njit(parallel=True, **_fast)
def matvec_half(w, x, out, half_table):
    """w: (n_out, 2 * n_in) bytes of 16-bit floats (F16 or BF16, chosen by ``half_table``)."""
    wh = w.view(np.uint16)
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += half_table[wh[r, i]] * x[i]
        out[r] = acc


@njit(**_exact)
def matvec(w, wtype, x, xq, xd, xs, out, f16_table, bf16_table):
    """out = W @ x for a weight of any runtime type; xq/xd/xs must hold quantize_q8(x)."""
    if wtype == T_Q8_0 or wtype == T_Q4_0 or wtype == T_Q4_1:
        nb = xd.shape[0]
        matmul_quantized(w, wtype, xq.reshape(1, xq.shape[0]), xd.reshape(1, nb), xs.reshape(1, nb),
                         out.reshape(1, out.shape[0]))
    elif wtype == T_F32:
        matvec_f32(w, x, out)
    elif wtype == T_F16:
        matvec_half(w, x, out, f16_table)
    else:
        matvec_half(w, x, out, bf16_table)


# ----- dequantization (embedding rows, prefill tiles) -------------------------------------------

@njit(**_exact)
def dequantize_row(row, wtype, out, f16_table, bf16_table):
    """One weight row (bytes) -> out (n,) float32."""
    n = out.shape[0]
    if wtype == T_F32:
        out[:] = row.view(np.float32)[:n]
    elif wtype == T_F16 or wtype == T_BF16:
        table = f16_table if wtype == T_F16 else bf16_table
        rh = row.view(np.uint16)
        for i in range(n):
            out[i] = table[rh[i]]
    elif wtype == T_Q8_0:
        rq = row.view(np.int8)
        for b in range(n // QK):
            d = f16_table[I32(row[b * 34]) | (I32(row[b * 34 + 1]) << 8)]
            for i in range(QK):
                out[b * QK + i] = d * np.float32(rq[b * 34 + 2 + i])
    else:
        bs = 18 if wtype == T_Q4_0 else 20
        for b in range(n // QK):
            o = b * bs
            d = f16_table[I32(row[o]) | (I32(row[o + 1]) << 8)]
            if wtype == T_Q4_0:
                m = np.float32(-8.0) * d
                qo = o + 2
            else:
                m = f16_table[I32(row[o + 2]) | (I32(row[o + 3]) << 8)]
                qo = o + 4
            for j in range(16):
                byte = I32(row[qo + j])
                out[b * QK + j] = d * np.float32(I32(byte & 15)) + m
                out[b * QK + 16 + j] = d * np.float32(I32(byte >> 4)) + m


@njit(parallel=True, **_exact)
def dequantize_rows(w, wtype, out, f16_table, bf16_table):
    """w: (n_rows, row_bytes) -> out: (n_rows, n) float32."""
    for r in prange(w.shape[0]):
        dequantize_row(w[r], wtype, out[r], f16_table, bf16_table)


@njit(**_exact)
def embed_rows(tokens, w, wtype, out, f16_table, bf16_table):
    """out[t] = dequantized row ``tokens[t]`` of the embedding table."""
    for t in range(tokens.shape[0]):
        dequantize_row(w[tokens[t]], wtype, out[t], f16_table, bf16_table)


# ----- normalization, rotary embedding, attention, feed-forward ---------------------------------

@njit(**_exact)
def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight;  x, out: (n,)."""
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i]) * x[i]
    scale = np.float32(1.0 / math.sqrt(ss / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * weight[i]


@njit(parallel=True, **_exact)
def rmsnorm_rows(x, weight, eps, out):
    for t in prange(x.shape[0]):
        rmsnorm(x[t], weight, eps, out[t])


@njit(**_exact)
def rope(v, n_heads, head_dim, cos, sin):
    """Rotate adjacent pairs (2i, 2i+1) of the first 2*len(cos) dims of each head, in place.

    v: (n_heads * head_dim,); cos, sin: (n_rot / 2,) for this position.  This is the layout of
    GGUF llama Q/K rows (llama.cpp's converter permutes Hugging Face's half-split rows into it).
    """
    for h in range(n_heads):
        base = h * head_dim
        for i in range(cos.shape[0]):
            a = v[base + 2 * i]
            b = v[base + 2 * i + 1]
            v[base + 2 * i] = a * cos[i] - b * sin[i]
            v[base + 2 * i + 1] = a * sin[i] + b * cos[i]


@njit(parallel=True, **_exact)
def rope_rows(x, positions, n_heads, head_dim, cos_table, sin_table):
    """x: (T, n_heads * head_dim); row t is at position positions[t]."""
    for t in prange(x.shape[0]):
        p = positions[t]
        rope(x[t], n_heads, head_dim, cos_table[p], sin_table[p])


@njit(parallel=True, **_exact)
def rerotate_keys(k_cache, start, end, cos, sin):
    """Rotate cached keys at slots start..end-1 of every layer and head by the angles (cos, sin),
    in place: moving a key from position p to p - delta is a rotation by -delta's angles."""
    n_layers, n_kv_heads = k_cache.shape[0], k_cache.shape[1]
    for job in prange(n_layers * n_kv_heads):
        layer, head = job // n_kv_heads, job % n_kv_heads
        for p in range(start, end):
            rope(k_cache[layer, head, p], 1, k_cache.shape[3], cos, sin)


@njit(**_fast)
def _dot_kv(q, k_row):
    """q . k_row for a cached key row of float32 or of half bit patterns (uint16)."""
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += q[i] * _kv_f32(k_row[i])
    return s


@njit(**_exact)
def _attend(q, k_cache, v_cache, n_pos, scale, scores, out):
    """One head: softmax(q . K[:n_pos] * scale) @ V[:n_pos].  k/v_cache: (n_ctx, head_dim)."""
    best = np.float32(-np.inf)
    for t in range(n_pos):
        s = _dot_kv(q, k_cache[t]) * scale
        scores[t] = s
        best = max(best, s)
    # exponentials in their own loop so that it vectorizes; the sum in plain order
    for t in range(n_pos):
        scores[t] = _expf(scores[t] - best)
    total = 0.0
    for t in range(n_pos):
        total += scores[t]
    inv = np.float32(1.0 / total)
    out[:] = 0.0
    for t in range(n_pos):
        p = scores[t] * inv
        for i in range(out.shape[0]):
            out[i] += p * _kv_f32(v_cache[t, i])


@njit(parallel=True, **_exact)
def attention(q, k_cache, v_cache, first_pos, scores, out):
    """Causal grouped-query attention of T new tokens over the cache.

    q: (T, n_heads, head_dim) for positions first_pos .. first_pos + T - 1;
    k_cache, v_cache: (n_kv_heads, n_ctx, head_dim) already holding those positions;
    scores: (n_threads_or_more, n_ctx) scratch; out: (T, n_heads, head_dim).
    Token t sees positions 0 .. first_pos + t (the causal mask); query head h reads KV head
    h // (n_heads / n_kv_heads).
    """
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    n_work = n_tokens * n_heads
    n_chunks = min(scores.shape[0], n_work)
    for c in prange(n_chunks):
        for job in range(c, n_work, n_chunks):
            t = job // n_heads
            h = job % n_heads
            kv = h // group
            _attend(q[t, h], k_cache[kv], v_cache[kv], first_pos + t + 1, scale, scores[c], out[t, h])


@njit(**_exact)
def _swiglu_inplace(g, u):
    # g in place and a loop from 0: with a third output array, or start/end bounds, LLVM cannot
    # prove the store never meets a later load and does not vectorize the loop
    for i in range(g.shape[0]):
        g[i] = g[i] / (np.float32(1.0) + _expf(-g[i])) * u[i]


@njit(parallel=True, **_exact)
def swiglu(gate, up):
    """gate = silu(gate) * up, in place, elementwise over any matching C-contiguous shapes."""
    g = gate.reshape(-1)
    u = up.reshape(-1)
    n_spans = (g.shape[0] + 4095) // 4096
    for span in prange(n_spans):
        start, end = span * 4096, min(g.shape[0], (span + 1) * 4096)
        _swiglu_inplace(g[start:end], u[start:end])


# ----- one token through the whole decoder (decode step) ----------------------------------------

@njit(**_exact)
def _layer_matvec(blob, mat_table, i, x, xq, xd, xs, out, f16_table, bf16_table):
    """matvec with matrix i of mat_table, viewed in place inside blob."""
    offset, n_rows, row_bytes, wtype = mat_table[i, 0], mat_table[i, 1], mat_table[i, 2], mat_table[i, 3]
    w = blob[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    matvec(w, wtype, x, xq, xd, xs, out, f16_table, bf16_table)


@njit(**_exact)
def decode_token(token, pos, embd, embd_type, blob, mat_table, norms, output_norm, output, output_type,
                 eps, n_heads, n_kv_heads, head_dim, cos_table, sin_table, k_cache, v_cache,
                 x, xb, xq, xd, xs, q, k, v, att, hb, hb2, hq, hd, hs, scores, logits,
                 f16_table, bf16_table):
    """Run one token at position ``pos`` through every layer; write its logits.

    blob: the bytes holding every layer matrix (the mapped file); mat_table[7*l + j] = (offset,
    n_rows, row_bytes, type id) of layer l's j-th matrix of (attn_q, attn_k, attn_v, attn_output,
    ffn_gate, ffn_up, ffn_down); norms: (n_layers, 2, dim) =
    (attn_norm, ffn_norm); k_cache, v_cache: (n_layers, n_kv_heads, n_ctx, head_dim).
    Buffers: x, xb, att: (dim,); xq (dim,) int8, xd, xs (dim/32,); q (n_heads*head_dim,);
    k, v (n_kv_heads*head_dim,); hb, hb2: (ffn,); hq (ffn,) int8, hd, hs (ffn/32,);
    scores: (n_threads, n_ctx); logits: (n_vocab,).
    """
    n_layers = norms.shape[0]
    dequantize_row(embd[token], embd_type, x, f16_table, bf16_table)
    cos = cos_table[pos]
    sin = sin_table[pos]
    for l in range(n_layers):
        m = 7 * l
        # attention block: pre-norm, one quantized activation shared by q, k and v
        rmsnorm(x, norms[l, 0], eps, xb)
        quantize_q8(xb, xq, xd, xs)
        _layer_matvec(blob, mat_table, m, xb, xq, xd, xs, q, f16_table, bf16_table)
        _layer_matvec(blob, mat_table, m + 1, xb, xq, xd, xs, k, f16_table, bf16_table)
        _layer_matvec(blob, mat_table, m + 2, xb, xq, xd, xs, v, f16_table, bf16_table)
        rope(q, n_heads, head_dim, cos, sin)
        rope(k, n_kv_heads, head_dim, cos, sin)
        # the new key/value enter the cache at slot pos, then the query attends over 0..pos
        for h in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[l, h, pos, i] = k[h * head_dim + i]
                v_cache[l, h, pos, i] = v[h * head_dim + i]
        attention(q.reshape(1, n_heads, head_dim), k_cache[l], v_cache[l], pos, scores,
                  att.reshape(1, n_heads, head_dim))
        # output projection and residual
        quantize_q8(att, xq, xd, xs)
        _layer_matvec(blob, mat_table, m + 3, att, xq, xd, xs, xb, f16_table, bf16_table)
        for i in range(x.shape[0]):
            x[i] += xb[i]
        # feed-forward block: pre-norm, SwiGLU, down projection, residual
        rmsnorm(x, norms[l, 1], eps, xb)
        quantize_q8(xb, xq, xd, xs)
        _layer_matvec(blob, mat_table, m + 4, xb, xq, xd, xs, hb, f16_table, bf16_table)
        _layer_matvec(blob, mat_table, m + 5, xb, xq, xd, xs, hb2, f16_table, bf16_table)
        _swiglu_inplace(hb, hb2)
        quantize_q8(hb, hq, hd, hs)
        _layer_matvec(blob, mat_table, m + 6, hb, hq, hd, hs, xb, f16_table, bf16_table)
        for i in range(x.shape[0]):
            x[i] += xb[i]
    # final norm and the vocabulary projection
    rmsnorm(x, output_norm, eps, xb)
    quantize_q8(xb, xq, xd, xs)
    matvec(output, output_type, xb, xq, xd, xs, logits, f16_table, bf16_table)
