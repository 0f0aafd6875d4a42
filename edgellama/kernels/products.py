"""Products with weights: activations quantized to int8 blocks once, the int8 tiles over packed
quantized weights (LLVM IR: one dot-product instruction advances every row of a group), float
weights, and the per-type dispatch."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import NativeValue, intrinsic, register_model, typeof_impl, unbox

from .common import EXACT, FAST, I32, QK, SUPER_BLOCK, T_F16, T_F32, T_Q8_0
from .layout import PACKED_FORMATS, _is_k_quant, is_k_quant, is_quantized, record_bytes, super_block_bytes
from .parallel import parallel_rows
from .llvm import _F32, _I8, _I16, _I32, _I64, _const_vec, _half_to_f32, _round_half, _splat, _vec
from .target import _arch, _has_vnni, _native_half, _target_features, maddubs_intrinsics, packing, tile_tokens


# ----- activation quantization ------------------------------------------------------------------

@njit(**EXACT)
def round_to_f16(v):
    """The float32 value nearest to v that IEEE half can hold (ties to even), as ggml's FP32_TO_FP16."""
    return _round_half(np.float32(v))


@njit(**FAST)
def _abs_max(x, o):
    """max |x[o:o+32]| (a max is exact in any order, so fastmath may vectorize it)."""
    amax = np.float32(0.0)
    for i in range(QK):
        amax = max(amax, abs(x[o + i]))
    return amax


@njit(**EXACT)
def quantize_q8(x, xq, xd, xs, xsum):
    """x: (n,) f32 -> xq: (n,) int8, xd: (n/32,) block scales, xs: (n/32,) scale * block sum of xq,
    xsum: (n/16,) int32 sums of xq over each half block (16 elements; Q6_K scales halves).

    Per 32-block, as ggml's x86 quantize_row_q8_1: d = max|x| / 127 (stored as half),
    q = round-to-nearest-even(x * 127 / max|x|), s = half(d * sum(q)).
    """
    for b in range(x.shape[0] // QK):
        o = b * QK
        amax = _abs_max(x, o)
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
        for h in range(2):
            total = I32(0)
            for i in range(16 * h, 16 * h + 16):
                q = I32(np.rint(x[o + i] * inv))
                xq[o + i] = q
                total += q
            xsum[2 * b + h] = total
        xd[b] = round_to_f16(d)
        xs[b] = round_to_f16(d * np.float32(xsum[2 * b] + xsum[2 * b + 1]))


@njit(**EXACT)
def quantize_q8k(x, xq, xd, xs, xsum):
    """x: (n,) f32, n a multiple of 256 -> the super-block activation of the K-quant products, as
    ggml's quantize_row_q8_K (the reference, which x86 uses): per 256 values, with m the value of
    largest magnitude (the first of equals), iscale = -127 / m, q = min(127, round-to-nearest-even(x *
    iscale)), d = 1 / iscale in float32 (no half rounding); a super-block of zeros: d = 0, q = 0.
    xq: (n,) int8; xd: (n/32,) each block's super-block d; xs: (n/32,) float32 block sums of q
    (exact integers); xsum: (n/16,) int32 half-block sums."""
    for sb in range(x.shape[0] // (SUPER_BLOCK * QK)):
        o = sb * SUPER_BLOCK * QK
        amax = np.float32(0.0)
        first = 0          # the first block holding the largest magnitude
        for b in range(SUPER_BLOCK):
            block_max = _abs_max(x, o + b * QK)
            if block_max > amax:
                amax = block_max
                first = b
        m = np.float32(0.0)
        for i in range(o + first * QK, o + first * QK + QK):
            if abs(x[i]) == amax:
                m = x[i]
                break
        iscale = np.float32(-127.0) / m if amax != 0.0 else np.float32(0.0)
        d = np.float32(1.0) / iscale if amax != 0.0 else np.float32(0.0)
        for i in range(o, o + SUPER_BLOCK * QK):
            xq[i] = min(I32(127), I32(np.rint(x[i] * iscale)))
        for h in range(o // 16, o // 16 + 2 * SUPER_BLOCK):
            total = I32(0)
            for i in range(16 * h, 16 * h + 16):
                total += I32(xq[i])
            xsum[h] = total
        for b in range(o // QK, o // QK + SUPER_BLOCK):
            xd[b] = d
            xs[b] = np.float32(xsum[2 * b] + xsum[2 * b + 1])


@njit(**EXACT)
def quantize_q8_rows(x, xq, xd, xs, xsum):
    """quantize_q8 of every row: x (T, n) -> xq (T, n), xd and xs (T, n/32), xsum (T, n/16)."""
    parallel_rows(_quantize_range, x.shape[0], (x, xq, xd, xs, xsum, False))


@njit(**EXACT)
def quantize_q8k_rows(x, xq, xd, xs, xsum):
    """quantize_q8k of every row: x (T, n) -> xq (T, n), xd and xs (T, n/32), xsum (T, n/16)."""
    parallel_rows(_quantize_range, x.shape[0], (x, xq, xd, xs, xsum, True))


@njit(**EXACT)
def _quantize_range(lo, hi, x, xq, xd, xs, xsum, supers):
    """Rows lo..hi-1 of x quantized by quantize_q8k (``supers``) or quantize_q8."""
    for t in range(lo, hi):
        if supers:
            quantize_q8k(x[t], xq[t], xd[t], xs[t], xsum[t])
        else:
            quantize_q8(x[t], xq[t], xd[t], xs[t], xsum[t])



class Q8Activation(NamedTuple):
    """An activation (n values, or rows of n) quantized to int8 blocks of 32: by quantize_q8 (the
    scale of each block; every packed type but the K-quants) or by quantize_q8k (the scale of each
    256-value super-block, repeated in d for its 8 blocks; the K-quants)."""

    q: np.ndarray       # (n,) int8
    d: np.ndarray       # (n/32,) float32 block scales
    s: np.ndarray       # (n/32,) float32: scale * block sum (quantize_q8k: the block sum)
    sums: np.ndarray    # (n/16,) int32 half-block sums


class Activation(NamedTuple):
    """An activation quantized for the int8 products in the forms the model's packed types need
    (quantize_activation): ``blocks`` for the types with one scale per 32 values, ``supers`` for
    the K-quants.  A form no type of the model needs may be left empty (zero-length arrays)."""

    blocks: Q8Activation
    supers: Q8Activation


# ----- which packed types a model has: a compile-time constant ---------------------------------

class Formats:
    """A set of packed ggml types (PACKED_FORMATS' keys) given to the product kernels as a
    compile-time constant: Numba types it as ``FormatsType(codes)``, so that a kernel called with
    it compiles the int8 tiles of these types only (a model has two or three; compiling all eight
    costs most of a first run's compilation), once per set (Numba caches each).  The tiles' switch
    has no case for a type outside the set, and the kernels refuse a weight of such a type
    (ValueError): give every packed type of the model.  ``ALL_FORMATS``: every packed type (the
    default of the kernels' ``formats`` argument)."""

    __slots__ = ("codes",)

    def __init__(self, codes):
        self.codes = tuple(sorted({int(c) for c in codes if int(c) in PACKED_FORMATS}))

    def __eq__(self, other):
        return isinstance(other, Formats) and other.codes == self.codes

    def __hash__(self):
        return hash(self.codes)

    def __repr__(self):
        return f"Formats({self.codes})"


class FormatsType(types.Dummy):
    """Numba's type of a Formats value: the set is in the type (its name), the value holds nothing."""

    def __init__(self, codes):
        self.codes = tuple(codes)
        super().__init__(name=f"Formats{self.codes}")


register_model(FormatsType)(models.OpaqueModel)


@typeof_impl.register(Formats)
def _typeof_formats(value, c):
    return FormatsType(value.codes)


@unbox(FormatsType)
def _unbox_formats(typ, obj, c):
    return NativeValue(c.context.get_constant_null(typ))


ALL_FORMATS = Formats(PACKED_FORMATS)


def _format_codes(formats) -> tuple[int, ...] | None:
    """The packed types a ``formats`` argument's Numba type stands for: FormatsType, or the default
    (``types.Omitted`` of ALL_FORMATS)."""
    if isinstance(formats, FormatsType):
        return formats.codes
    if isinstance(formats, types.Omitted) and isinstance(formats.value, Formats):
        return formats.value.codes
    return None


@intrinsic
def as_formats(typingctx, formats):
    """A ``formats`` argument (a Formats, or the omitted default) as a FormatsType value."""
    codes = _format_codes(formats)
    if codes is None:
        return None
    result = FormatsType(codes)

    def codegen(context, builder, sig, args):
        return context.get_constant_null(result)

    return result(formats), codegen


@intrinsic
def in_formats(typingctx, formats, wtype):
    """Whether ggml type wtype (an integer) is one of ``formats``' (a Formats or the default)."""
    codes = _format_codes(formats)
    if codes is None or not isinstance(wtype, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        which = context.cast(builder, args[1], sig.args[1], types.int64)
        found = ir.Constant(ir.IntType(1), 0)
        for code in codes:
            found = builder.or_(found, builder.icmp_signed("==", which, ir.Constant(_I64, code)))
        return found

    return types.boolean(formats, wtype), codegen


@intrinsic
def activation_forms(typingctx, formats):
    """(blocks, supers): whether ``formats`` (a Formats or the default) has a packed type that takes
    quantize_q8's blocks, and one that takes quantize_q8k's super-blocks (the K-quants): constants."""
    codes = _format_codes(formats)
    if codes is None:
        return None
    forms = (any(not _is_k_quant(c) for c in codes), any(_is_k_quant(c) for c in codes))
    result = types.UniTuple(types.boolean, 2)

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, result, [context.get_constant(types.boolean, f) for f in forms])

    return result(formats), codegen


def activation_room(n: int, rows: int | None = None, formats: Formats = ALL_FORMATS) -> Activation:
    """Zeroed room for an Activation of n values (or of ``rows`` rows of n): each form sized only
    where a packed type of ``formats`` needs it (the super-blocks only for n a multiple of 256)."""
    lead = () if rows is None else (rows,)
    k_quants = [_is_k_quant(c) for c in formats.codes]

    def form(needed: bool) -> Q8Activation:
        m = n if needed else 0
        return Q8Activation(np.zeros(lead + (m,), np.int8), np.zeros(lead + (m // QK,), np.float32),
                            np.zeros(lead + (m // QK,), np.float32), np.zeros(lead + (m // 16,), np.int32))

    return Activation(form(not all(k_quants)), form(any(k_quants) and n % (SUPER_BLOCK * QK) == 0))


@njit(**EXACT)
def activation_forms_of(wtype):
    """(blocks, supers): the activation forms a weight of ggml type wtype takes (none for floats)."""
    return is_quantized(wtype) and not is_k_quant(wtype), is_k_quant(wtype)


@njit(**EXACT)
def quantize_activation(x, a, formats=ALL_FORMATS, forms=(True, True)):
    """x (n,) quantized into Activation a in the forms that ``forms`` (blocks, supers) asks for
    and the packed types of ``formats`` take (_wanted_forms)."""
    blocks, supers = _wanted_forms(formats, forms, x.shape[0])
    if blocks:
        quantize_q8(x, a.blocks.q, a.blocks.d, a.blocks.s, a.blocks.sums)
    if supers:
        quantize_q8k(x, a.supers.q, a.supers.d, a.supers.s, a.supers.sums)


@njit(**EXACT)
def _wanted_forms(formats, forms, n):
    """The forms to make of an activation of n values: asked for (forms), taken by a packed type of
    ``formats``, and the super-blocks only for n a multiple of 256 (no K-quant matrix takes others)."""
    blocks, supers = activation_forms(formats)
    return blocks and forms[0], supers and forms[1] and n % (SUPER_BLOCK * QK) == 0


@njit(**EXACT)
def quantize_activation_rows(x, a, formats=ALL_FORMATS, forms=(True, True)):
    """quantize_activation of every row: x (T, n) into an Activation of (T, ...) arrays, rows in
    parallel."""
    parallel_rows(quantize_activation_range, x.shape[0], (x, a, as_formats(formats), forms))


@njit(**EXACT)
def quantize_activation_range(lo, hi, x, a, formats, forms):
    """quantize_activation of rows lo..hi-1 of x (T, n) into an Activation of (T, ...) arrays."""
    blocks, supers = _wanted_forms(formats, forms, x.shape[1])
    if blocks:
        _quantize_range(lo, hi, x, a.blocks.q, a.blocks.d, a.blocks.s, a.blocks.sums, False)
    if supers:
        _quantize_range(lo, hi, x, a.supers.q, a.supers.d, a.supers.s, a.supers.sums, True)


# ----- the int8 tiles over packed weights --------------------------------------------------------

# How far ahead of the block it computes a tile asks for the weights (software prefetch, each line
# of the record PREFETCH_BYTES further on).  A tile walks its row group's bytes in order, so the
# hardware prefetchers see a stream too, but they run only a few lines ahead of the loads and stop
# at page ends: with the compute of several tokens per block between loads, memory sat idle.
# Measured on a 2-core Xeon (AVX-512 VNNI), 2 threads, interleaved runs, 2026-12-03: 8B shape Q4_0,
# 4 sequences per step (the server's batched step) 284-318 -> 230-232 ms per step (1 sequence:
# 204-212, the memory bound); 1B shape Q4_0 decode, median of 6: 20.0 -> 23.8 tok/s, prompt (pp64)
# 117 -> 132; SmolLM2 (weights that nearly fit the caches) unchanged within the noise.  1024 bytes
# ahead gained less; 4096 and 8192 no more than 2048.
# Where the lines go (llvm.prefetch's locality): for the one-token tile (decode), the L2 cache
# (2: prefetcht1 on x86, PLDL2KEEP on arm64); for the token tiles (prompts, batched steps), L1 (3:
# prefetcht0).  Measured on an AMD EPYC Zen 4 (2 threads, variants alternating in one process,
# 2026-12-04): into L1, the one-token tile's prefetches cost 10-20% on Q4_K rows streamed from DRAM
# (23-25 -> 27-30 GB/s into L2), up to 7% on Q4_0 / Q6_K / Q8_0, and 1B-shape decode 1-9% with the
# minute's bandwidth (Q4_K_M 1.03-1.05x, Q4_0 1.01-1.07x; 8B Q4_0 1.00-1.03x); into L2, the token tiles lost 12-19% on 4-row batched
# steps (8B Q4_0 170 -> 195 ms, 1B Q4_0 28.8 -> 35.5 ms), prompts unchanged.  2048 bytes ahead
# stayed the best distance into L2 (1024 and 4096 measured); no prefetch at all decoded as fast as
# L2 there but cost prompts 8%.
PREFETCH_BYTES = 2048
PREFETCH_LOCALITY = {1: 2}   # tokens per tile -> locality; other tiles: 3


class _TileIR:
    """Emits one packed tile into a Numba intrinsic's builder.  Compile-time code only.

    Arguments (as the intrinsic receives them): wtype, wp (n_groups, group_bytes) uint8 packed weights,
    g the row group, n_out, xq (T, n_in) int8, xd / xs (T, n_in/32) float32, xsum (T, n_in/16)
    int32, t0 the first token, out (T, n_out) float32.  Tokens past T are clamped (computed again,
    never stored); rows past n_out are never stored.
    """

    def __init__(self, context, builder, sig, args, qtype, n_tok):
        feats = _target_features()
        self.b, self.qtype, self.n_tok = builder, qtype, n_tok
        self.lanes, self.unsigned_q8 = packing()
        self.vnni = _has_vnni(feats)
        self.arm_dot = _arch() == "aarch64" and "dotprod" in feats   # sdot: signed x signed bytes
        # x86 without VNNI: vpmaddubsw then vpmaddwd by ones (sums of 4 int32), the instructions ggml's
        # AVX2 path uses; LLVM does not find them in the portable pattern below (4-5x slower on a Zen 1)
        self.maddubs = None if self.vnni and self.lanes in (8, 16) else maddubs_intrinsics(feats, self.lanes)
        self.native_half = _native_half(feats)
        arrays = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (1, 4, 5, 6, 7, 9))
        self.wp, self.xq, self.xd, self.xs, self.xsum, self.out = arrays
        index = lambda i: context.cast(builder, args[i], sig.args[i], types.intp)
        self.g, self.n_out, self.t0 = index(2), index(3), index(8)
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
        """Entry blk of per-block activation array `name` for token j (4-byte elements; xsum has
        one entry per half block)."""
        return self.load(getattr(self, name), self.b.add(self.rows_of[name][j], self.b.shl(blk, self.i64(2))), ty, 4)

    def splat(self, s):
        return _splat(self.b, s, self.lanes)

    def weights(self, u, signed):
        """What dot takes for the weight bytes u: with vpmaddubsw and signed weights (Q8_0 kept
        signed), |u| and what moves u's sign onto the activations (ggml's trick; |u| <= 128 and
        |x| <= 127 keep each pair sum within int16): u itself for AVX2's vpsignb, else the lanes
        where u < 0 (AVX-512 has no vpsignb)."""
        if self.maddubs is None or not signed:
            return u, None
        b, vb = self.b, u.type
        negative = b.icmp_signed("<", u, ir.Constant(vb, [0] * vb.count))
        magnitude = b.select(negative, b.sub(ir.Constant(vb, [0] * vb.count), u), u)
        return magnitude, (u if self.lanes == 8 else negative)  # AVX2: vpsignb takes u itself

    def pairs(self, w, s):
        """vpmaddubsw (x86 without VNNI): int16 sums of 2 adjacent byte products u * s, w =
        self.weights(u, ...), s signed; each within int16 (at most 2 * 128 * 128 - 256)."""
        b = self.b
        u, sign = w
        if sign is not None and self.lanes == 8:  # vpsignb: s where u > 0, -s where u < 0, 0 where u = 0
            psign = cgutils.get_or_insert_function(b.module, ir.FunctionType(s.type, [s.type, s.type]),
                                                   "llvm.x86.avx2.psign.b")
            s = b.call(psign, [s, sign])
        elif sign is not None:  # the lanes where u < 0
            s = b.select(sign, b.sub(ir.Constant(s.type, [0] * s.type.count), s), s)
        pairs_t = _vec(_I16, 2 * self.lanes)
        maddubs = cgutils.get_or_insert_function(b.module, ir.FunctionType(pairs_t, [u.type, s.type]),
                                                 self.maddubs[0])
        return b.call(maddubs, [u, s])

    def widen(self, acc, pairs):
        """acc + vpmaddwd(pairs, 1): each lane's int32 sum of its 2 int16 pair sums."""
        b, n = self.b, self.lanes
        pairs_t, words_t = _vec(_I16, 2 * n), _vec(_I32, n)
        maddwd = cgutils.get_or_insert_function(b.module, ir.FunctionType(words_t, [pairs_t, pairs_t]),
                                                self.maddubs[1])
        return b.add(acc, b.call(maddwd, [pairs, ir.Constant(pairs_t, [1] * (2 * n))]))

    def dot(self, acc, w, s):
        """acc + per-lane sums of 4 adjacent byte products u * s, w = self.weights(u, ...) (s signed;
        u unsigned with VNNI).  Every path is exact: the same integers."""
        n, b = self.lanes, self.b
        u, negative = w
        if self.maddubs is not None:
            return self.widen(acc, self.pairs(w, s))
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
        vf = _vec(_F32, n)
        self.fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vf, [vf] * 3), f"llvm.fmuladd.v{n}f32")
        self.prefetch = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
        acc = [cgutils.alloca_once_value(b, ir.Constant(vf, [0.0] * n)) for _ in range(self.n_tok)]
        _, _, scale_bytes, n_scales, min_bytes, _ = PACKED_FORMATS[qt]
        self.record = n * record_bytes(qt)
        if scale_bytes == 1:
            self.emit_super_blocks(acc, n_scales, min_bytes)
            self.store(acc, vf)
            return
        with cgutils.for_range(b, self.nb) as loop:
            blk = loop.index
            rec, isum = self.block_sums(blk)
            d_w = self.lane_values(rec)
            if min_bytes:
                m_w = self.lane_values(b.add(rec, self.i64(2 * n)))
            # one scaling per block: acc += isum * d_w * d_x (+ m_w * s, Q4_1 / Q5_1: ggml's
            # half-rounded s = d * sum(q) of Q8_1)
            for j in range(self.n_tok):
                d_x = self.splat(self.token_value("xd", j, blk, _F32))
                total = b.call(self.fma, [b.sitofp(isum[j][0], vf), b.fmul(d_w, d_x), b.load(acc[j])])
                if min_bytes:
                    total = b.call(self.fma, [m_w, self.splat(self.token_value("xs", j, blk, _F32)), total])
                b.store(total, acc[j])
        self.store(acc, vf)

    def lane_values(self, at):
        """n half scales or minimums of the packed weights at byte offset ``at`` -> float32 vector."""
        return _half_to_f32(self.b, self.load(self.wp, at, _vec(_I16, self.lanes)), self.native_half)

    def emit_super_blocks(self, acc, n_scales, min_bytes):
        """The K-quants against super-block activations (quantize_q8k: one scale d_x per 256
        values), as ggml's vec_dot_q*_K_q8_K: per super-block, the integer block sums times the
        blocks' 6-bit (Q6_K: int8) factors summed in int32, and the minimum factors times the
        activation's block sums (exact in float32: at most 8 x 63 x 4064 < 2^24); then per lane
        acc += S * (d * d_x) - M * (dmin * d_x), with the super-block's f16 d and dmin."""
        b, n = self.b, self.lanes
        vf, vi = _vec(_F32, n), _vec(_I32, n)
        sums = [cgutils.alloca_once_value(b, ir.Constant(vi, [0] * n)) for _ in range(self.n_tok)]
        mins = [cgutils.alloca_once_value(b, ir.Constant(vf, [0.0] * n)) for _ in range(self.n_tok)]
        table_at = b.add(self.group_at, b.mul(self.nb, self.i64(self.record)))  # d (dmin) per super-block
        sb_bytes = n * super_block_bytes(self.qtype)
        with cgutils.for_range(b, b.lshr(self.nb, self.i64(3))) as outer:
            sb = outer.index
            for j in range(self.n_tok):
                b.store(ir.Constant(vi, [0] * n), sums[j])
                b.store(ir.Constant(vf, [0.0] * n), mins[j])
            with cgutils.for_range(b, self.i64(SUPER_BLOCK)) as inner:
                blk = b.add(b.shl(sb, self.i64(3)), inner.index)
                rec, isum = self.block_sums(blk)
                factors = [b.sext(self.load(self.wp, b.add(rec, self.i64(h * n)), _vec(_I8, n)), vi)
                           for h in range(n_scales)]
                if min_bytes:
                    m_w = b.sitofp(self.load(self.wp, b.add(rec, self.i64(n * n_scales)), _vec(_I8, n)), vf)
                for j in range(self.n_tok):
                    total = b.load(sums[j])
                    for h in range(n_scales):
                        total = b.add(total, b.mul(isum[j][h], factors[h]))
                    b.store(total, sums[j])
                    if min_bytes:
                        x_sum = self.splat(self.token_value("xs", j, blk, _F32))
                        b.store(b.call(self.fma, [m_w, x_sum, b.load(mins[j])]), mins[j])
            sb_at = b.add(table_at, b.mul(sb, self.i64(sb_bytes)))
            d_w = self.lane_values(sb_at)
            if min_bytes:
                m_w = b.fmul(self.lane_values(b.add(sb_at, self.i64(2 * n))), ir.Constant(vf, [-1.0] * n))
            for j in range(self.n_tok):
                d_x = self.splat(self.token_value("xd", j, b.shl(sb, self.i64(3)), _F32))
                total = b.call(self.fma, [b.sitofp(b.load(sums[j]), vf), b.fmul(d_w, d_x), b.load(acc[j])])
                if min_bytes:
                    total = b.call(self.fma, [b.load(mins[j]), b.fmul(m_w, d_x), total])
                b.store(total, acc[j])

    def block_sums(self, blk):
        """Block blk's exact integer sums: (its record's byte offset, isum[token][scale]), one
        int32 vector per token and scale (per half block for Q6_K), the offset term included."""
        b, n, qt = self.b, self.lanes, self.qtype
        vi, vb = _vec(_I32, n), _vec(_I8, 4 * n)
        quant, high, scale_bytes, n_scales, min_bytes, offset = PACKED_FORMATS[qt]
        if qt == T_Q8_0 and self.unsigned_q8:
            offset = 128

        def masked(v, shift, mask):  # (v << shift) & mask on every byte; a negative shift goes right
            if shift > 0:
                v = b.shl(v, _const_vec(_I8, [shift] * (4 * n)))
            elif shift < 0:
                v = b.lshr(v, _const_vec(_I8, [-shift] * (4 * n)))
            return b.and_(v, _const_vec(_I8, [mask] * (4 * n)))

        rec = b.add(self.group_at, b.mul(blk, self.i64(self.record)))
        # ask for the weights PREFETCH_BYTES ahead now, a line at a time (a hint: never a fault,
        # past the end included); see PREFETCH_BYTES
        locality = ir.Constant(_I32, PREFETCH_LOCALITY.get(self.n_tok, 3))
        for line in range(0, self.record, 64):
            b.call(self.prefetch, [self.ptr(self.wp, b.add(rec, self.i64(PREFETCH_BYTES + line)), _I8),
                                   ir.Constant(_I32, 0), locality, ir.Constant(_I32, 1)])
        highs_at = b.add(rec, self.i64(n * (n_scales * scale_bytes + min_bytes)))
        quants = b.add(highs_at, self.i64(n * high))
        high_words = [self.load(self.wp, b.add(highs_at, self.i64(4 * n * k)), vb) for k in range(high // 4)]
        # integer sums (one per scale: per half block for Q6_K), starting from the offset term
        isum = []
        for j in range(self.n_tok):
            if not offset:
                isum.append([ir.Constant(vi, [0] * n)] * n_scales)
                continue
            halves = [self.token_value("xsum", j, b.add(b.shl(blk, self.i64(1)), self.i64(h)), _I32)
                      for h in range(2)]
            sums = [b.add(*halves)] if n_scales == 1 else halves
            isum.append([self.splat(b.mul(s, ir.Constant(_I32, -offset))) for s in sums])
        x_at = [b.add(self.rows_of["xq"][j], b.shl(blk, self.i64(5))) for j in range(self.n_tok)]
        # vpmaddubsw's int16 pair sums of unsigned weights are added as int16 over several steps
        # before one vpmaddwd widens them (the multiplier port is what bounds these tiles on AVX2):
        # as many steps as cannot overflow, |pair| <= 2 * top * 128 (top = the largest weight)
        pending = [[None] * n_scales for _ in range(self.n_tok)]
        run = 1
        if self.maddubs is not None and quant == 16:
            top = {0: 15, 4: 31, 8: 63}[high]
            run = 32767 // (2 * top * 128)  # 8 steps for 4-bit weights, 4 for 5-bit, 2 for 6-bit
        for s in range(quant // 4):
            v = self.load(self.wp, b.add(quants, self.i64(4 * n * s)), vb)
            if quant == 32:
                steps = [(v, 4 * s)]
            else:  # low nibbles: elements 4s.., high nibbles: elements 16+4s..; then their high bits
                lo = b.and_(v, _const_vec(_I8, [15] * (4 * n)))
                hi = b.lshr(v, _const_vec(_I8, [4] * (4 * n)))
                if high == 4:
                    lo = b.or_(lo, masked(high_words[0], 4 - s, 16))
                    hi = b.or_(hi, masked(high_words[0], -s, 16))
                elif high == 8:
                    lo = b.or_(lo, masked(high_words[0], 4 - 2 * s, 48))
                    hi = b.or_(hi, masked(high_words[1], 4 - 2 * s, 48))
                steps = [(lo, 4 * s), (hi, 16 + 4 * s)]
            for weights, element in steps:
                half = element // 16 if n_scales == 2 else 0
                w = self.weights(weights, signed=quant == 32 and not offset)
                for j in range(self.n_tok):
                    x4 = b.bitcast(self.splat(self.load(self.xq, b.add(x_at[j], self.i64(element)), _I32)), vb)
                    if run == 1:
                        isum[j][half] = self.dot(isum[j][half], w, x4)
                        continue
                    p = self.pairs(w, x4)
                    if pending[j][half] is None:
                        pending[j][half] = (p, 1)
                    else:
                        pending[j][half] = (b.add(pending[j][half][0], p), pending[j][half][1] + 1)
                    if pending[j][half][1] == run:
                        isum[j][half] = self.widen(isum[j][half], pending[j][half][0])
                        pending[j][half] = None
        for j in range(self.n_tok):
            for h in range(n_scales):
                if pending[j][h] is not None:
                    isum[j][h] = self.widen(isum[j][h], pending[j][h][0])
        return rec, isum

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


def _tile(n_tok: int):
    """tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out): out[t0 + j, LANES*g + lane] =
    row LANES*g + lane of the packed matrix wp (of ggml type wtype) . activation t0 + j, for j <
    n_tok and lane < LANES.  One switch over the packed formats of ``formats`` (a FormatsType: a
    compile-time set), each case its own tile; another wtype computes nothing."""

    @intrinsic
    def tile(typingctx, formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out):
        want = ((wp, types.uint8), (xq, types.int8), (xd, types.float32), (xs, types.float32),
                (xsum, types.int32), (out, types.float32))
        for arr, dtype in want:
            if not (isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == 2 and arr.layout == "C"):
                return None
        if not isinstance(wtype, types.Integer) or not isinstance(formats, FormatsType):
            return None

        def codegen(context, builder, sig, args):
            args = args[1:]  # the tile's own arguments (the formats are in the type)
            sig = types.void(*sig.args[1:])
            which = context.cast(builder, args[0], sig.args[0], types.int64)
            done = builder.append_basic_block("tile.done")
            switch = builder.switch(which, done)
            for qtype in PACKED_FORMATS:
                if qtype not in formats.codes:
                    continue
                case = builder.append_basic_block(f"tile.type{qtype}")
                switch.add_case(ir.Constant(_I64, qtype), case)
                builder.position_at_end(case)
                _TileIR(context, builder, sig, args, qtype, n_tok).emit()
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out), codegen

    return tile


_TILE_TOKENS = tile_tokens()
_row_tile, _token_tile = _tile(1), _tile(_TILE_TOKENS)


@njit(**FAST)
def matvec_packed(wp, wtype, n_out, xq, xd, xs, xsum, out, formats=ALL_FORMATS):
    """out (n_out,) = W @ x for one token: a packed quantized matrix wp of ggml type wtype, x given
    as its Q8 blocks (quantize_q8): xq (n,), xd, xs (n/32,), xsum (n/16,).  Each thread takes whole
    row groups.  (Its own kernel, apart from matmul_packed, so that the decode step carries only the
    one-token tiles.)  ``formats``: the packed types to compile tiles for (Formats; wtype among them)."""
    if xd.shape[0] * QK != xq.shape[0] or xsum.shape[0] != 2 * xd.shape[0] or xs.shape[0] != xd.shape[0]:
        raise ValueError("activation blocks do not match (xq: n, xd and xs: n/32, xsum: n/16)")
    if not in_formats(formats, wtype):
        raise ValueError("the weight type is not among the formats the tiles were compiled for")
    nb = xd.shape[0]
    xq2, xd2, xs2, xsum2 = xq.reshape(1, QK * nb), xd.reshape(1, nb), xs.reshape(1, nb), xsum.reshape(1, 2 * nb)
    out2 = out.reshape(1, n_out)
    parallel_rows(_matvec_groups, wp.shape[0], (wp, wtype, n_out, xq2, xd2, xs2, xsum2, out2, as_formats(formats)))


@njit(**FAST)
def _matvec_groups(lo, hi, wp, wtype, n_out, xq, xd, xs, xsum, out, formats):
    for g in range(lo, hi):
        _row_tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, 0, out)


@njit(**FAST)
def matmul_packed(wp, wtype, n_out, xq, xd, xs, xsum, out, formats=ALL_FORMATS):
    """out (T, n_out) = x @ W.T for a packed quantized matrix wp of ggml type wtype; x given as its
    Q8 blocks (quantize_q8_rows): xq (T, n), xd, xs (T, n/32), xsum (T, n/16).  Each thread takes
    whole row groups; within a group, tiles of _TILE_TOKENS tokens (a short last tile computes its
    last token again, stores it once).  ``formats``: as matvec_packed's."""
    if xd.shape[1] * QK != xq.shape[1] or xsum.shape[1] != 2 * xd.shape[1] or xs.shape[1] != xd.shape[1]:
        raise ValueError("activation blocks do not match (xq: n, xd and xs: n/32, xsum: n/16 per row)")
    if not in_formats(formats, wtype):
        raise ValueError("the weight type is not among the formats the tiles were compiled for")
    parallel_rows(_matmul_groups, wp.shape[0], (wp, wtype, n_out, xq, xd, xs, xsum, out, as_formats(formats)))


@njit(**FAST)
def _matmul_groups(lo, hi, wp, wtype, n_out, xq, xd, xs, xsum, out, formats):
    for g in range(lo, hi):
        for t in range(0, xq.shape[0], _TILE_TOKENS):
            _token_tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t, out)


# ----- float weights and the per-type dispatch ---------------------------------------------------

@njit(**FAST)
def matvec_f32(w, x, out):
    """w: (n_out, 4 * n_in) bytes of float32 rows."""
    parallel_rows(_f32_rows, w.shape[0], (w.view(np.float32), x, out))


@njit(**FAST)
def _f32_rows(lo, hi, wf, x, out):
    for r in range(lo, hi):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += wf[r, i] * x[i]
        out[r] = acc


@njit(**FAST)
def matvec_half(w, x, out, half_table):
    """w: (n_out, 2 * n_in) bytes of 16-bit floats (F16 or BF16, chosen by ``half_table``)."""
    parallel_rows(_half_rows, w.shape[0], (w.view(np.uint16), x, out, half_table))


@njit(**FAST)
def _half_rows(lo, hi, wh, x, out, half_table):
    for r in range(lo, hi):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += half_table[wh[r, i]] * x[i]
        out[r] = acc


@njit(**EXACT)
def matvec(w, wtype, n_out, x, qx, out, f16_table, bf16_table, formats=ALL_FORMATS):
    """out (n_out,) = W @ x for a weight of any runtime type: packed groups (n_groups, group_bytes)
    for the quantized types, file rows (n_out, row_bytes) for F32 / F16 / BF16.  qx: an Activation
    holding quantize_activation(x, qx, formats).  ``formats``: as matvec_packed's."""
    if is_quantized(wtype):
        xq, xd, xs, xsum = qx.supers if is_k_quant(wtype) else qx.blocks
        matvec_packed(w, wtype, n_out, xq, xd, xs, xsum, out, as_formats(formats))
    elif wtype == T_F32:
        matvec_f32(w, x, out)
    elif wtype == T_F16:
        matvec_half(w, x, out, f16_table)
    else:
        matvec_half(w, x, out, bf16_table)
