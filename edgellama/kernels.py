"""Every Numba kernel of the runtime.  Each has a numpy twin in the tests.

Quantized weights (Q8_0, Q4_0, Q4_1) arrive as the row-interleaved copy ``pack_rows`` makes once at
load (the file's bytes, reordered: still quantized, never expanded to floats); float weights as
read-only ``(n_out, row_bytes)`` uint8 views of the memory-mapped GGUF file; both with their ggml
type id.  Each activation row is quantized once to int8 blocks of 32 (ggml's Q8_0 / Q8_1 activation
format) and reused by every matrix that reads it; a block's exact integer dot product is scaled once.
One token and a whole prompt go through the same product kernels.

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

with np.errstate(invalid="ignore"):  # arm64 numpy flags the signalling-NaN patterns while widening
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
def quantize_q8(x, xq, xd, xs, xsum):
    """x: (n,) f32 -> xq: (n,) int8, xd: (n/32,) block scales, xs: (n/32,) scale * block sum of xq,
    xsum: (n/32,) int32 block sums of xq.

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
        xsum[b] = total


@njit(parallel=True, **_exact)
def quantize_q8_rows(x, xq, xd, xs, xsum):
    """quantize_q8 of every row: x (T, n) -> xq (T, n), xd, xs and xsum (T, n/32)."""
    for t in prange(x.shape[0]):
        quantize_q8(x[t], xq[t], xd[t], xs[t], xsum[t])


# ----- quantized products over row-interleaved ("packed") weights --------------------------------

# The file stores a quantized matrix row after row, block after block.  At load every quantized
# matrix is repacked once into groups of LANES rows (LANES = the int32 lanes of one vector: 16 with
# AVX-512, 8 with AVX2, 4 elsewhere), so that one vector load brings 4 consecutive bytes of each of
# LANES rows.  Per group, per 32-element block b (the same bytes as the file, reordered):
#
#   Q4_0  LANES x f16 d          | 4 steps s x LANES rows x 4 bytes: nibble bytes 4s..4s+3 of the row
#   Q4_1  LANES x f16 d, LANES x f16 m | the same nibble steps
#   Q8_0  LANES x f16 d          | 8 steps s x LANES rows x 4 bytes: quants 4s..4s+3 of the row
#                                  (stored as q + 128, unsigned, on CPUs with VNNI: see below)
#
# A product then needs no horizontal sums: lane l accumulates row l.  For each block and token, one
# 4-byte group of the activation is broadcast to all lanes and one int8 dot-product instruction
# (vpdpbusd on AVX-VNNI / AVX-512 VNNI: unsigned x signed bytes, 4 products per int32 lane; portable
# IR elsewhere) adds 4 products to every row's integer sum; a nibble byte holds elements 4s+i (low
# half) and 16+4s+i (high half), so Q4 takes two such steps per byte vector.  The exact block sum is
# then scaled once: acc += float(isum) * d_w * d_x (one fused multiply-add per block, lanes = rows),
# plus m_w * s_x for Q4_1.  Offsets stay in integers as in ggml: Q4_0's nibble - 8 and the q + 128 of
# unsigned Q8_0 enter as the integer sum's start value -8 * sum(x) (-128 * sum(x)).
#
# The inner work is LLVM IR emitted by the intrinsics below (Numba has no vector types, and LLVM
# finds neither the dot-product instructions nor this data layout in scalar loops).  One call
# computes a tile: one row group x n_tok tokens, the group's weights staying in L1 while tokens
# stream past.

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()
_BLOCK_BYTES = {T_Q8_0: 34, T_Q4_0: 18, T_Q4_1: 20}


def packing() -> tuple[int, bool]:
    """(LANES, whether Q8_0 quants are stored unsigned): the packed layout the compiled kernels of
    this CPU target expect.  Plain Python: choosing it compiles nothing."""
    feats = _target_features()
    if {"avx512f", "avx512bw"} <= feats:
        lanes = 16
    elif "avx2" in feats:
        lanes = 8
    else:
        lanes = 4
    return lanes, _has_vnni(feats) and lanes in (8, 16)


def target_summary() -> str:
    """What the quantized kernels compile to here, e.g. 'x86_64, 16 lanes, vpdpbusd (VNNI)'."""
    feats = _target_features()
    lanes, _ = packing()
    if _has_vnni(feats):
        dot = "vpdpbusd (VNNI)"
    elif _arch() == "aarch64" and "dotprod" in feats:
        dot = "sdot (dotprod)"
    else:
        dot = "portable int8 IR"
    return f"{_arch()}, {lanes} lanes, {dot}"


def tile_tokens() -> int:
    """Tokens per prompt tile: 8 where 32 vector registers hold the accumulators, else 4."""
    return 8 if packing()[0] == 16 else 4


@njit(parallel=True, **_exact)
def pack_rows(w, wtype, lanes, unsigned_q8, out):
    """w: (n_out, row_bytes) file rows of type Q8_0 / Q4_0 / Q4_1 -> out: (n_groups, lanes * row_bytes),
    the layout above.  out must arrive zeroed: the last group's padding rows are left as they are."""
    bb = 34 if wtype == T_Q8_0 else (18 if wtype == T_Q4_0 else 20)
    head = 4 if wtype == T_Q4_1 else 2             # scale (and minimum) bytes per row and block
    n_steps = (bb - head) // 4
    flip = np.uint8(0x80 if unsigned_q8 and wtype == T_Q8_0 else 0)
    n_blocks = w.shape[1] // bb
    for g in prange(out.shape[0]):
        group = out[g]
        for lane in range(min(lanes, w.shape[0] - g * lanes)):
            row = w[g * lanes + lane]
            for b in range(n_blocks):
                src, rec = b * bb, b * lanes * bb    # the block in the row, its record in the group
                group[rec + 2 * lane] = row[src]     # d: lanes consecutive halves (then m for Q4_1)
                group[rec + 2 * lane + 1] = row[src + 1]
                if head == 4:
                    group[rec + 2 * lanes + 2 * lane] = row[src + 2]
                    group[rec + 2 * lanes + 2 * lane + 1] = row[src + 3]
                for s in range(n_steps):             # 4-byte slices, one per lane per step
                    at, q = rec + (head + 4 * s) * lanes + 4 * lane, src + head + 4 * s
                    group[at] = row[q] ^ flip
                    group[at + 1] = row[q + 1] ^ flip
                    group[at + 2] = row[q + 2] ^ flip
                    group[at + 3] = row[q + 3] ^ flip


def _target_features() -> set[str]:
    """The CPU features Numba compiles for, by Numba's own rule: NUMBA_CPU_FEATURES when set
    (NUMBA_CPU_NAME=generic sets it empty), else the host's."""
    from numba.core import config

    if config.CPU_FEATURES is not None:
        flat = config.CPU_FEATURES
    else:
        import llvmlite.binding as llvm

        flat = llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


def _has_vnni(feats) -> bool:
    """x86 vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX-512 VNNI with VL."""
    return "avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats


def _arch() -> str:
    import llvmlite.binding as llvm

    return llvm.get_process_triple().split("-")[0]


def _x86() -> bool:
    return _arch() in ("x86_64", "i386", "i686")


def _native_half(feats) -> bool:
    """Whether LLVM converts half <-> float inline (x86 without F16C makes it a libcall that
    Numba's JIT cannot link)."""
    return "f16c" in feats or not _x86()


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _const_vec(ty, values):
    return ir.Constant(_vec(ty, len(values)), list(values))


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


class _TileIR:
    """Emits one packed tile into a Numba intrinsic's builder.  Compile-time code only.

    Arguments (as the intrinsic receives them): wp (n_groups, group_bytes) uint8 packed weights,
    g the row group, n_out, xq (T, n_in) int8, xd / xs (T, n_in/32) float32, xsum (T, n_in/32)
    int32, t0 the first token, out (T, n_out) float32.  Tokens past T are clamped (computed again,
    never stored); rows past n_out are never stored.
    """

    def __init__(self, context, builder, sig, args, qtype, n_tok):
        feats = _target_features()
        self.b, self.qtype, self.n_tok = builder, qtype, n_tok
        self.lanes, self.unsigned_q8 = packing()
        self.vnni = _has_vnni(feats)
        self.arm_dot = _arch() == "aarch64" and "dotprod" in feats   # sdot: signed x signed bytes
        self.native_half = _native_half(feats)
        arrays = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 4, 5, 6, 8))
        self.wp, self.xq, self.xd, self.xs, self.xsum, self.out = arrays
        index = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        self.g, self.n_out, self.t0 = index(1), index(2), index(7)
        self.n_total, n_in = cgutils.unpack_tuple(builder, self.xq.shape)
        self.nb = builder.ashr(n_in, self.i64(5))
        stride = lambda a: cgutils.unpack_tuple(builder, a.strides)[0]
        self.group_at = builder.mul(self.g, stride(self.wp))
        toks = [self.clamp(builder.add(self.t0, self.i64(j)), self.n_total) for j in range(n_tok)]
        self.rows_of = {name: [builder.mul(t, stride(getattr(self, name))) for t in toks]
                        for name in ("xq", "xd", "xs", "xsum")}
        self.out_stride = stride(self.out)

    # ----- small helpers
    def i64(self, v):
        return ir.Constant(_I64, v)

    def clamp(self, v, n):
        last = self.b.sub(n, self.i64(1))
        return self.b.select(self.b.icmp_signed("<", v, last), v, last)

    def ptr(self, arr, byte_offset, ty):
        return self.b.bitcast(self.b.gep(self.b.bitcast(arr.data, _I8.as_pointer()), [byte_offset]), ty.as_pointer())

    def load(self, arr, byte_offset, ty, align=1):
        return self.b.load(self.ptr(arr, byte_offset, ty), align=align)

    def token_value(self, name, j, blk, ty):
        """Block blk's entry of per-block activation array `name` for token j (4-byte elements)."""
        return self.load(getattr(self, name), self.b.add(self.rows_of[name][j], self.b.shl(blk, self.i64(2))), ty, 4)

    def splat(self, s):
        n = self.lanes
        v = self.b.insert_element(ir.Constant(_vec(s.type, n), ir.Undefined), s, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(v, v, _const_vec(_I32, [0] * n))

    def dot(self, acc, u, s):
        """acc + per-lane sums of 4 adjacent byte products u * s (s signed; u unsigned with VNNI)."""
        n, b = self.lanes, self.b
        if self.vnni and n in (8, 16):
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(_vec(_I32, n), [_vec(_I32, n)] * 3),
                                                f"llvm.x86.avx512.vpdpbusd.{32 * n}")
            return b.call(fn, [acc, b.bitcast(u, _vec(_I32, n)), b.bitcast(s, _vec(_I32, n))])
        if self.arm_dot and n == 4:
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(_vec(_I32, 4), [_vec(_I32, 4)] + [_vec(_I8, 16)] * 2),
                                                "llvm.aarch64.neon.sdot.v4i32.v16i8")
            return b.call(fn, [acc, u, s])
        # without VNNI the weights are signed bytes too (nibbles 0..15, Q8_0 kept signed), so the
        # products are signed x signed: the pattern of arm64's sdot
        wide = _vec(_I32, 4 * n)
        prod = b.mul(b.sext(u, wide), b.sext(s, wide))
        for k in range(4):
            acc = b.add(acc, b.shuffle_vector(prod, prod, _const_vec(_I32, [4 * i + k for i in range(n)])))
        return acc

    # ----- the tile
    def emit(self):
        b, n, qt = self.b, self.lanes, self.qtype
        vf, vi, vb = _vec(_F32, n), _vec(_I32, n), _vec(_I8, 4 * n)
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vf, [vf] * 3), f"llvm.fmuladd.v{n}f32")
        acc = [cgutils.alloca_once_value(b, ir.Constant(vf, [0.0] * n)) for _ in range(self.n_tok)]
        offset = {T_Q4_0: 8, T_Q8_0: 128 if self.unsigned_q8 else 0}.get(qt, 0)
        with cgutils.for_range(b, self.nb) as loop:
            blk = loop.index
            rec = b.add(self.group_at, b.mul(blk, self.i64(n * _BLOCK_BYTES[qt])))
            d_w = _half_to_f32(b, self.load(self.wp, rec, _vec(_I16, n)), self.native_half)
            if qt == T_Q4_1:
                m_w = _half_to_f32(b, self.load(self.wp, b.add(rec, self.i64(2 * n)), _vec(_I16, n)), self.native_half)
            quants = b.add(rec, self.i64((4 if qt == T_Q4_1 else 2) * n))
            # integer block sums, starting from the offset term
            isum = []
            for j in range(self.n_tok):
                start = ir.Constant(vi, [0] * n)
                if offset:
                    start = self.splat(b.mul(self.token_value("xsum", j, blk, _I32), ir.Constant(_I32, -offset)))
                isum.append(start)
            x_at = [b.add(self.rows_of["xq"][j], b.shl(blk, self.i64(5))) for j in range(self.n_tok)]
            for s in range(8 if qt == T_Q8_0 else 4):
                v = self.load(self.wp, b.add(quants, self.i64(4 * n * s)), vb)
                if qt == T_Q8_0:
                    steps = [(v, 4 * s)]
                else:  # low nibbles: elements 4s.., high nibbles: elements 16+4s..
                    steps = [(b.and_(v, _const_vec(_I8, [15] * (4 * n))), 4 * s),
                             (b.lshr(v, _const_vec(_I8, [4] * (4 * n))), 16 + 4 * s)]
                for weights, element in steps:
                    for j in range(self.n_tok):
                        x4 = self.load(self.xq, b.add(x_at[j], self.i64(element)), _I32)
                        isum[j] = self.dot(isum[j], weights, b.bitcast(self.splat(x4), vb))
            # one scaling per block: acc += isum * d_w * d_x (+ m_w * s_x)
            for j in range(self.n_tok):
                scale = b.fmul(d_w, self.splat(self.token_value("xd", j, blk, _F32)))
                total = b.call(fma, [b.sitofp(isum[j], vf), scale, b.load(acc[j])])
                if qt == T_Q4_1:
                    total = b.call(fma, [m_w, self.splat(self.token_value("xs", j, blk, _F32)), total])
                b.store(total, acc[j])
        self.store(acc, vf)

    def store(self, acc, vf):
        """out[token, group rows] = acc: one vector store, or lane by lane past n_out."""
        b, n = self.b, self.lanes
        row0 = b.mul(self.g, self.i64(n))
        whole = b.icmp_signed("<=", b.add(row0, self.i64(n)), self.n_out)
        for j in range(self.n_tok):
            tok = b.add(self.t0, self.i64(j))
            with b.if_then(b.icmp_signed("<", tok, self.n_total)):
                at = b.add(b.mul(tok, self.out_stride), b.shl(row0, self.i64(2)))
                v = b.load(acc[j])
                with b.if_else(whole) as (full, partial):
                    with full:
                        b.store(v, self.ptr(self.out, at, vf), align=4)
                    with partial:
                        for lane in range(n):
                            with b.if_then(b.icmp_signed("<", b.add(row0, self.i64(lane)), self.n_out)):
                                b.store(b.extract_element(v, ir.Constant(_I32, lane)),
                                        self.ptr(self.out, b.add(at, self.i64(4 * lane)), _F32), align=4)


def _tile(qtype: int, n_tok: int):
    """tile(wp, g, n_out, xq, xd, xs, xsum, t0, out): out[t0 + j, LANES*g + lane] = row LANES*g + lane
    of the packed matrix wp . activation t0 + j, for j < n_tok and lane < LANES."""

    @intrinsic
    def tile(typingctx, wp, g, n_out, xq, xd, xs, xsum, t0, out):
        want = ((wp, types.uint8), (xq, types.int8), (xd, types.float32), (xs, types.float32),
                (xsum, types.int32), (out, types.float32))
        for arr, dtype in want:
            if not (isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == 2 and arr.layout == "C"):
                return None
        return types.void(wp, g, n_out, xq, xd, xs, xsum, t0, out), (
            lambda context, builder, sig, args: _TileIR(context, builder, sig, args, qtype, n_tok).emit()
            or context.get_dummy_value())

    return tile


_TILE_TOKENS = tile_tokens()
_q8_0_tile1, _q4_0_tile1, _q4_1_tile1 = _tile(T_Q8_0, 1), _tile(T_Q4_0, 1), _tile(T_Q4_1, 1)
_q8_0_tiles, _q4_0_tiles, _q4_1_tiles = (_tile(T_Q8_0, _TILE_TOKENS), _tile(T_Q4_0, _TILE_TOKENS),
                                         _tile(T_Q4_1, _TILE_TOKENS))


@njit(parallel=True, **_fast)
def matmul_packed(wp, wtype, n_out, xq, xd, xs, xsum, out):
    """out (T, n_out) = x @ W.T for a packed Q8_0 / Q4_0 / Q4_1 matrix wp; x given as its Q8 blocks
    (quantize_q8_rows).  Each thread takes whole row groups; within a group, tiles of tokens."""
    n_tok = xq.shape[0]
    if n_tok == 1:
        for g in prange(wp.shape[0]):
            if wtype == T_Q8_0:
                _q8_0_tile1(wp, g, n_out, xq, xd, xs, xsum, 0, out)
            elif wtype == T_Q4_0:
                _q4_0_tile1(wp, g, n_out, xq, xd, xs, xsum, 0, out)
            else:
                _q4_1_tile1(wp, g, n_out, xq, xd, xs, xsum, 0, out)
    else:
        for g in prange(wp.shape[0]):
            for t in range(0, n_tok, _TILE_TOKENS):
                if wtype == T_Q8_0:
                    _q8_0_tiles(wp, g, n_out, xq, xd, xs, xsum, t, out)
                elif wtype == T_Q4_0:
                    _q4_0_tiles(wp, g, n_out, xq, xd, xs, xsum, t, out)
                else:
                    _q4_1_tiles(wp, g, n_out, xq, xd, xs, xsum, t, out)


# ----- scalar helpers in LLVM IR: exp, and the KV cache's storage type --------------------------

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
def matvec(w, wtype, n_out, x, qx, out, f16_table, bf16_table):
    """out (n_out,) = W @ x for a weight of any runtime type: packed groups (n_groups, group_bytes)
    for Q8_0 / Q4_0 / Q4_1, file rows (n_out, row_bytes) for F32 / F16 / BF16.  qx = (xq, xd, xs,
    xsum) must hold quantize_q8(x)."""
    if wtype == T_Q8_0 or wtype == T_Q4_0 or wtype == T_Q4_1:
        xq, xd, xs, xsum = qx
        nb = xd.shape[0]
        matmul_packed(w, wtype, n_out, xq.reshape(1, xq.shape[0]), xd.reshape(1, nb), xs.reshape(1, nb),
                      xsum.reshape(1, nb), out.reshape(1, n_out))
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
    in place: moving a key from position p to p - delta is a rotation by -delta's angles.
    k_cache: (n_layers, n_kv_heads, n_ctx, head_dim), float32 or half bits (uint16)."""
    n_layers, n_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]
    for job in prange(n_layers * n_kv_heads):
        layer, head = job // n_kv_heads, job % n_kv_heads
        key = np.empty(head_dim, np.float32)
        for p in range(start, end):
            row = k_cache[layer, head, p]
            for i in range(head_dim):
                key[i] = _kv_f32(row[i])
            rope(key, 1, head_dim, cos, sin)
            for i in range(head_dim):
                row[i] = _to_kv(key[i], k_cache)


@njit(parallel=True, **_exact)
def store_kv(cache, start, values):
    """cache[h, start + t, :] = values[t, h * head_dim:(h + 1) * head_dim] for T new tokens, in the
    cache's element type.  cache: (n_kv_heads, n_ctx, head_dim) of one layer; values: (T, n_kv*hd)."""
    n_kv_heads, head_dim = cache.shape[0], cache.shape[2]
    for h in prange(n_kv_heads):
        for t in range(values.shape[0]):
            for i in range(head_dim):
                cache[h, start + t, i] = _to_kv(values[t, h * head_dim + i], cache)


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


ATTN_SPAN = 64  # cached positions per job of one-token attention


@njit(**_fast)
def _dot_rows(a, i, b):
    """a[i] . b without slicing a (a slice per call costs reference-count updates in hot loops)."""
    s = np.float32(0.0)
    for j in range(b.shape[0]):
        s += a[i, j] * b[j]
    return s


@njit(**_exact)
def _attend_span(q, k_cache, v_cache, kv, start, end, scale, scratch, partial):
    """The query heads of KV head kv over cached positions start..end-1, not normalized:
    partial[h] = (sum_t e_t * v_t (head_dim), max score, sum_t e_t) with e_t = exp(score_t - max).

    q: (n_heads, head_dim); scratch: (head_dim + group * ATTN_SPAN,): one widened key or value row,
    then the group's scores.  Each cached row is read and widened once for the whole group.
    """
    head_dim = q.shape[1]
    group = q.shape[0] // k_cache.shape[0]
    first = kv * group
    n = end - start
    row = scratch[:head_dim]
    scores = scratch[head_dim:head_dim + group * ATTN_SPAN].reshape(group, ATTN_SPAN)
    keys, values = k_cache[kv], v_cache[kv]
    for t in range(n):
        for i in range(head_dim):
            row[i] = _kv_f32(keys[start + t, i])
        for g in range(group):
            scores[g, t] = _dot_rows(q, first + g, row) * scale
    for g in range(group):
        best = np.float32(-np.inf)
        for t in range(n):
            best = max(best, scores[g, t])
        for t in range(n):
            scores[g, t] = _expf(scores[g, t] - best)
        total = 0.0
        for t in range(n):
            total += scores[g, t]
        partial[first + g, head_dim] = best
        partial[first + g, head_dim + 1] = total
        for i in range(head_dim):
            partial[first + g, i] = 0.0
    for t in range(n):
        for i in range(head_dim):
            row[i] = _kv_f32(values[start + t, i])
        for g in range(group):
            p = scores[g, t]
            for i in range(head_dim):
                partial[first + g, i] += p * row[i]


@njit(parallel=True, **_exact)
def attention_one(q, k_cache, v_cache, n_pos, scratch, partial, out):
    """One token's grouped-query attention over cached positions 0..n_pos-1 (its own included).

    q, out: (n_heads, head_dim); k_cache, v_cache: (n_kv_heads, n_ctx, head_dim);
    scratch: (n_ctx/ATTN_SPAN rounded up * n_kv_heads, head_dim + group * ATTN_SPAN);
    partial: (n_ctx/ATTN_SPAN rounded up, n_heads, head_dim + 2).
    The positions are cut into spans of ATTN_SPAN, one job per (span, KV head) whatever the thread
    count (so the result does not depend on it), and the spans' softmax sums are merged at the end
    with their maxima (the flash-decoding split): long contexts use every thread.
    """
    n_heads, head_dim = q.shape
    n_kv = k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    n_spans = (n_pos + ATTN_SPAN - 1) // ATTN_SPAN
    for job in prange(n_spans * n_kv):
        span, kv = job // n_kv, job % n_kv
        _attend_span(q, k_cache, v_cache, kv, span * ATTN_SPAN, min(n_pos, (span + 1) * ATTN_SPAN), scale,
                     scratch[job], partial[span])
    for h in range(n_heads):
        best = np.float32(-np.inf)
        for s in range(n_spans):
            best = max(best, partial[s, h, head_dim])
        total = 0.0
        out[h, :] = 0.0
        for s in range(n_spans):
            w = _expf(partial[s, h, head_dim] - best)
            total += partial[s, h, head_dim + 1] * w
            for i in range(head_dim):
                out[h, i] += w * partial[s, h, i]
        inv = np.float32(1.0 / total)
        for i in range(head_dim):
            out[h, i] *= inv


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
def _layer_matvec(blob, packed, mat_table, i, x, qx, out, f16_table, bf16_table):
    """matvec with layer matrix i of mat_table: (offset, rows, row bytes, type id, n_out) of a view
    into packed (quantized types) or into blob, the mapped file (float types)."""
    offset, n_rows, row_bytes, wtype, n_out = (mat_table[i, 0], mat_table[i, 1], mat_table[i, 2],
                                              mat_table[i, 3], mat_table[i, 4])
    source = packed if wtype == T_Q8_0 or wtype == T_Q4_0 or wtype == T_Q4_1 else blob
    w = source[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    matvec(w, wtype, n_out, x, qx, out, f16_table, bf16_table)


@njit(**_exact)
def decode_token(token, pos, embd, embd_type, blob, packed, mat_table, norms, output_norm, output,
                 output_type, eps, n_heads, n_kv_heads, head_dim, cos_table, sin_table, k_cache, v_cache,
                 x, xb, qx, q, k, v, att, hb, hb2, qh, attn_scratch, attn_partial, logits, f16_table,
                 bf16_table):
    """Run one token at position ``pos`` through every layer; write its logits.

    blob: the mapped file; packed: every quantized layer matrix, packed; mat_table[7*l + j]: layer
    l's j-th matrix of (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down), see
    _layer_matvec; output: the vocabulary projection, packed or file rows; norms: (n_layers, 2, dim)
    = (attn_norm, ffn_norm); k_cache, v_cache: (n_layers, n_kv_heads, n_ctx, head_dim), float32 or
    half bits (uint16).  Buffers: x, xb, att: (dim,); qx = (xq (dim,) int8, xd, xs (dim/32,) f32,
    xsum (dim/32,) int32); q (n_heads*head_dim,); k, v (n_kv_heads*head_dim,); hb, hb2: (ffn,);
    qh: like qx for (ffn,); attn_scratch, attn_partial: see attention_one; logits: (n_vocab,).
    """
    n_layers = norms.shape[0]
    dequantize_row(embd[token], embd_type, x, f16_table, bf16_table)
    cos = cos_table[pos]
    sin = sin_table[pos]
    xq, xd, xs, xsum = qx
    hq, hd, hs, hsum = qh
    for l in range(n_layers):
        m = 7 * l
        # attention block: pre-norm, one quantized activation shared by q, k and v
        rmsnorm(x, norms[l, 0], eps, xb)
        quantize_q8(xb, xq, xd, xs, xsum)
        _layer_matvec(blob, packed, mat_table, m, xb, qx, q, f16_table, bf16_table)
        _layer_matvec(blob, packed, mat_table, m + 1, xb, qx, k, f16_table, bf16_table)
        _layer_matvec(blob, packed, mat_table, m + 2, xb, qx, v, f16_table, bf16_table)
        rope(q, n_heads, head_dim, cos, sin)
        rope(k, n_kv_heads, head_dim, cos, sin)
        # the new key/value enter the cache at slot pos, then the query attends over 0..pos
        for h in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[l, h, pos, i] = _to_kv(k[h * head_dim + i], k_cache)
                v_cache[l, h, pos, i] = _to_kv(v[h * head_dim + i], v_cache)
        attention_one(q.reshape(n_heads, head_dim), k_cache[l], v_cache[l], pos + 1, attn_scratch,
                      attn_partial, att.reshape(n_heads, head_dim))
        # output projection and residual
        quantize_q8(att, xq, xd, xs, xsum)
        _layer_matvec(blob, packed, mat_table, m + 3, att, qx, xb, f16_table, bf16_table)
        for i in range(x.shape[0]):
            x[i] += xb[i]
        # feed-forward block: pre-norm, SwiGLU, down projection, residual
        rmsnorm(x, norms[l, 1], eps, xb)
        quantize_q8(xb, xq, xd, xs, xsum)
        _layer_matvec(blob, packed, mat_table, m + 4, xb, qx, hb, f16_table, bf16_table)
        _layer_matvec(blob, packed, mat_table, m + 5, xb, qx, hb2, f16_table, bf16_table)
        _swiglu_inplace(hb, hb2)
        quantize_q8(hb, hq, hd, hs, hsum)
        _layer_matvec(blob, packed, mat_table, m + 6, hb, qh, xb, f16_table, bf16_table)
        for i in range(x.shape[0]):
            x[i] += xb[i]
    # final norm and the vocabulary projection
    rmsnorm(x, output_norm, eps, xb)
    quantize_q8(xb, xq, xd, xs, xsum)
    matvec(output, output_type, logits.shape[0], xb, qx, logits, f16_table, bf16_table)


# ----- loading compiled kernels from Numba's cache without the compiler's registries -------------

def _lean_cache_loading() -> None:
    """Load cached kernels without importing Numba's lowering registries.

    Before loading a cached function Numba refreshes its target context, which imports every
    lowering implementation it has (numpy, typed containers, random, ...): about 40 MB of Python
    objects that only compiling needs.  Rebuilding a cached function needs the NRT runtime alone,
    so these dispatchers initialize just that; a cache miss compiles through Numba's usual path
    (which refreshes by itself).  Where Numba's internals differ from the ones this was written
    for, the dispatchers keep their default cache.
    """
    import os

    from numba.core.caching import FunctionCache
    from numba.core.registry import CPUDispatcher

    if os.environ.get("EDGELLAMA_NUMBA_FULL_REFRESH"):
        return
    if not all(hasattr(FunctionCache, a) for a in ("_load_overload", "_guard_against_spurious_io_errors")):
        return

    class LeanCache(FunctionCache):
        def load_overload(self, sig, target_context):
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)

    for value in list(globals().values()):
        if isinstance(value, CPUDispatcher) and type(getattr(value, "_cache", None)) is FunctionCache:
            value._cache = LeanCache(value.py_func)


_lean_cache_loading()
