"""Every Numba kernel of the runtime.  Each has a numpy twin in the tests.

Quantized weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) arrive as the row-interleaved copy
``pack_rows`` makes once at load (the file's bytes, reordered: still quantized, never expanded to
floats, about the file's size); float weights as
read-only ``(n_out, row_bytes)`` uint8 views of the memory-mapped GGUF file; both with their ggml
type id.  Each activation row is quantized once to int8 blocks of 32 (ggml's Q8_0 / Q8_1 activation
format) and reused by every matrix that reads it; a block's exact integer dot product is scaled once.
One token and a whole prompt go through the same product kernels.

Type ids (ggml): F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12,
Q5_K = 13, Q6_K = 14, BF16 = 30.
``half_table`` arguments are 65536-entry float32 tables mapping a 16-bit pattern to its value
(``F16_TABLE`` for IEEE half, ``BF16_TABLE`` for bfloat16).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from .memory import release_compiler_pages

T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 6, 7, 8, 30
T_Q4_K, T_Q5_K, T_Q6_K = 12, 13, 14
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


@njit(parallel=True, **_exact)
def quantize_q8_rows(x, xq, xd, xs, xsum):
    """quantize_q8 of every row: x (T, n) -> xq (T, n), xd and xs (T, n/32), xsum (T, n/16)."""
    for t in prange(x.shape[0]):
        quantize_q8(x[t], xq[t], xd[t], xs[t], xsum[t])


# ----- quantized products over row-interleaved ("packed") weights --------------------------------

# The file stores a quantized matrix row after row, block after block, each type in its own layout.
# At load every quantized matrix is repacked once into groups of LANES rows (LANES = the int32 lanes
# of one vector: 16 with AVX-512, 8 with AVX2, 4 elsewhere) and into one of a few internal block
# forms, so that one vector load brings 4 consecutive weight bytes of each of LANES rows.  Per group,
# per 32-element block (PACKED_FORMATS below says which pieces a type has):
#
#   scales   n_scales x LANES  f16, or for K-quants the block's own factor byte (6-bit unsigned,
#                              Q6_K: int8; 2 for Q6_K, one per 16 elements)
#   minimums LANES             f16 (Q4_1, Q5_1), or the 6-bit minimum factor byte (Q4_K, Q5_K)
#   high     high x LANES      the 5th (Q5_x: 4 bytes) or 5th+6th bits (Q6_K: 8 bytes) of the values,
#                              placed so that a shift and a mask line them up with the nibbles (below)
#   quants   steps x LANES x 4 bytes: 4 nibble steps (byte i of step s holds elements 4s+i in its
#            low and 16+4s+i in its high half) or 8 byte steps (element 4s+i), unsigned integers
#            whose value is scale * (q - offset) + minimum
#
# and, after the last block, for K-quants per 256-element super-block LANES f16 factors d (and
# LANES dmin): a block's scale is d * its factor, its minimum -dmin * its factor, products taken in
# float32 inside the kernel exactly as ggml dequantizes.  So a packed matrix takes the bytes of the
# file (+2-3% for Q4_K / Q5_K, whose 6-bit factors get a byte each); Q8_0 is stored as q + 128 on
# CPUs with VNNI (see below).  Every value stays exactly what ggml dequantizes.
#
# The high bits: for Q5_x, byte i of a lane's 4-byte word holds in bit s the 5th bit of element
# 4s+i and in bit 4+s that of element 16+4s+i, so nibble step s takes (word << (4-s)) & 16 and
# (word >> s) & 16.  For Q6_K two such words hold the bit pairs (bits 2s, 2s+1 of byte i: element
# 4s+i in the first, 16+4s+i in the second), lined up by a shift of 4-2s and the mask 48.
#
# A product then needs no horizontal sums: lane l accumulates row l.  For each block and token, one
# 4-byte group of the activation is broadcast to all lanes and one int8 dot-product instruction
# (vpdpbusd on AVX-VNNI / AVX-512 VNNI: unsigned x signed bytes, 4 products per int32 lane; sdot on
# arm64 with dotprod; portable IR elsewhere) adds 4 products to every row's integer sum.  Offsets
# stay in integers as in ggml: the sum starts at -offset * (sum of the activation's integers).  The
# exact block sum is then scaled once per block (per half for Q6_K): acc += isum * d_w * d_x, one
# fused multiply-add, plus m_w * (sum of the activation block) for the formats with a minimum.
#
# The inner work is LLVM IR emitted by the intrinsics below (Numba has no vector types, and LLVM
# finds neither the dot-product instructions nor this data layout in scalar loops).  One call
# computes a tile: one row group x n_tok tokens, the group's weights staying in L1 while tokens
# stream past.

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()

# qtype: (quant bytes per 32 elements: 16 nibbles or 32 bytes, high-bit bytes, bytes per scale
#         (1: a K-quant factor byte), scales per block, bytes per minimum (0: none, 1: a K-quant
#         factor byte), offset); Q8_0's offset becomes 128 when stored unsigned
PACKED_FORMATS = {
    T_Q4_0: (16, 0, 2, 1, 0, 8),
    T_Q4_1: (16, 0, 2, 1, 2, 0),
    T_Q5_0: (16, 4, 2, 1, 0, 16),
    T_Q5_1: (16, 4, 2, 1, 2, 0),
    T_Q8_0: (32, 0, 2, 1, 0, 0),
    T_Q4_K: (16, 0, 1, 1, 1, 0),
    T_Q5_K: (16, 4, 1, 1, 1, 0),
    T_Q6_K: (16, 8, 1, 2, 0, 32),
}
SUPER_BLOCK = 8  # 32-element blocks per K-quant super-block


def record_bytes(qtype: int) -> int:
    """Packed bytes of one row's 32-element block."""
    quant, high, scale, n_scales, minimum, _ = PACKED_FORMATS[qtype]
    return scale * n_scales + minimum + high + quant


def super_block_bytes(qtype: int) -> int:
    """Packed bytes of one row's super-block factors (d, and dmin with minimums): K-quants only."""
    _, _, scale, _, minimum, _ = PACKED_FORMATS[qtype]
    return 0 if scale != 1 else 2 * (1 + (minimum == 1))


def group_bytes(qtype: int, n_in: int, lanes: int) -> int:
    """Bytes of one packed group of LANES rows of n_in elements."""
    nb = n_in // QK
    return lanes * (nb * record_bytes(qtype) + nb // SUPER_BLOCK * super_block_bytes(qtype))


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


@njit(**_exact)
def _f16_at(row, o):
    """The IEEE half stored at bytes o, o+1 of a byte row, as float32."""
    return _as_f32(np.uint16(I32(row[o]) | (I32(row[o + 1]) << 8)))


@njit(**_exact)
def _k_scale_min(q, o, j):
    """K-quant sub-block j's 6-bit (scale, minimum) factors from the 12 packed bytes at q[o:]."""
    if j < 4:
        return I32(q[o + j]) & 63, I32(q[o + j + 4]) & 63
    sc = (I32(q[o + j + 4]) & 15) | ((I32(q[o + j - 4]) >> 6) << 4)
    m = (I32(q[o + j + 4]) >> 4) | ((I32(q[o + j]) >> 6) << 4)
    return sc, m


@njit(**_exact)
def unpack_block(row, wtype, b, vals, scales):
    """Block b (elements 32b .. 32b+31) of a quantized file row: vals[0:32] its integers (int32),
    scales[0:2] the scales of its two halves (the same value except for Q6_K); returns its minimum
    (0 where the type has none), so that element i = scales[i // 16] * (vals[i] - offset) + minimum
    with the type's offset from PACKED_FORMATS (Q8_0: signed values, offset 0).  This is ggml's
    dequantization, per type."""
    minimum = np.float32(0.0)
    if wtype == T_Q8_0:
        o = 34 * b
        d = _f16_at(row, o)
        for i in range(QK):
            vals[i] = I32(np.int8(row[o + 2 + i]))
    elif wtype == T_Q4_0 or wtype == T_Q4_1:
        o = (18 if wtype == T_Q4_0 else 20) * b
        d = _f16_at(row, o)
        q = o + 2
        if wtype == T_Q4_1:
            minimum = _f16_at(row, o + 2)
            q = o + 4
        for j in range(16):
            vals[j] = I32(row[q + j]) & 15
            vals[j + 16] = I32(row[q + j]) >> 4
    elif wtype == T_Q5_0 or wtype == T_Q5_1:
        o = (22 if wtype == T_Q5_0 else 24) * b
        d = _f16_at(row, o)
        h = o + 2
        if wtype == T_Q5_1:
            minimum = _f16_at(row, o + 2)
            h = o + 4
        high = I32(row[h]) | (I32(row[h + 1]) << 8) | (I32(row[h + 2]) << 16) | (I32(row[h + 3]) << 24)
        for j in range(16):
            byte = I32(row[h + 4 + j])
            vals[j] = (byte & 15) | (((high >> j) & 1) << 4)
            vals[j + 16] = (byte >> 4) | (((high >> (j + 16)) & 1) << 4)
    elif wtype == T_Q4_K or wtype == T_Q5_K:
        o = (144 if wtype == T_Q4_K else 176) * (b // 8)
        j = b % 8
        sc, m = _k_scale_min(row, o + 4, j)
        d = _f16_at(row, o) * np.float32(sc)
        minimum = -(_f16_at(row, o + 2) * np.float32(m))
        quants = o + (16 if wtype == T_Q4_K else 48) + 32 * (j // 2)  # 32 bytes: 64 elements
        shift = 4 * (j % 2)                                              # low or high nibbles
        for i in range(QK):
            vals[i] = (I32(row[quants + i]) >> shift) & 15
            if wtype == T_Q5_K:
                vals[i] |= ((I32(row[o + 16 + i]) >> j) & 1) << 4
    else:  # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d
        o = 210 * (b // 8)
        half, quarter = (b % 8) // 4, (b % 8) % 4   # which 128 elements, which 32 of them
        d = _f16_at(row, o + 208)
        low = o + 64 * half + (32 if quarter % 2 else 0)
        shift = 4 if quarter >= 2 else 0
        high = o + 128 + 32 * half
        for i in range(QK):
            vals[i] = ((I32(row[low + i]) >> shift) & 15) | (((I32(row[high + i]) >> (2 * quarter)) & 3) << 4)
        s = o + 192 + 8 * half + 2 * quarter
        scales[0] = d * np.float32(np.int8(row[s]))
        scales[1] = d * np.float32(np.int8(row[s + 1]))
        return minimum
    scales[0] = d
    scales[1] = d
    return minimum


@njit(**_exact)
def is_quantized(wtype):
    """Whether the kernels read this ggml type packed (the quantized types) rather than as file rows."""
    return wtype != T_F32 and wtype != T_F16 and wtype != T_BF16


# PACKED_FORMATS as an array the kernels can index (Numba freezes global arrays into the code)
_FORMAT_TABLE = np.zeros((T_BF16 + 1, 6), np.int64)
for _qtype, _format in PACKED_FORMATS.items():
    _FORMAT_TABLE[_qtype] = _format


@njit(**_exact)
def _packed_format(wtype):
    """PACKED_FORMATS[wtype] inside the kernels: (quant bytes, high-bit bytes, scale bytes, scales,
    minimum bytes, offset)."""
    f = _FORMAT_TABLE[wtype]
    return f[0], f[1], f[2], f[3], f[4], f[5]


@njit(**_exact)
def _k_factors(row, wtype, b):
    """K-quant block b's factor bytes and where its super-block's f16 d sits in the file row:
    (scale factor, minimum factor, offset of d) for Q4_K / Q5_K (dmin follows d), (int8 scale of
    the first half, of the second half, offset of d) for Q6_K."""
    if wtype == T_Q6_K:
        o = 210 * (b // SUPER_BLOCK)
        at = o + 192 + 8 * ((b % 8) // 4) + 2 * (b % 4)
        return I32(row[at]), I32(row[at + 1]), o + 208
    o = (144 if wtype == T_Q4_K else 176) * (b // SUPER_BLOCK)
    sc, m = _k_scale_min(row, o + 4, b % SUPER_BLOCK)
    return sc, m, o


@njit(**_exact)
def _group_layout(wtype, lanes):
    """(bytes of one block record, bytes of one super-block's factors) of a packed group: the
    kernels' record_bytes and super_block_bytes, times lanes."""
    quant, high, scale_bytes, n_scales, min_bytes, _ = _packed_format(wtype)
    record = lanes * (scale_bytes * n_scales + min_bytes + high + quant)
    return record, (lanes * 2 * (1 + (min_bytes == 1)) if scale_bytes == 1 else 0)


@njit(parallel=True, **_exact)
def pack_rows(w, wtype, lanes, unsigned_q8, out):
    """w: (n_out, row_bytes) file rows of a quantized type -> out: (n_groups, group_bytes), the
    layout above.  out must arrive zeroed: the last group's padding rows stay so."""
    quant, high, scale_bytes, n_scales, min_bytes, _ = _packed_format(wtype)
    record, sb_bytes = _group_layout(wtype, lanes)
    factors = scale_bytes == 1                                  # K-quants
    n_blocks = SUPER_BLOCK * out.shape[1] // (SUPER_BLOCK * record + sb_bytes)
    table = n_blocks * record                                   # the super-block factors
    flip = 128 if unsigned_q8 and wtype == T_Q8_0 else 0
    for g in prange(out.shape[0]):
        group = out[g]
        vals = np.empty(QK, np.int32)
        scales = np.empty(2, np.float32)
        for lane in range(min(lanes, w.shape[0] - g * lanes)):
            row = w[g * lanes + lane]
            for b in range(n_blocks):
                minimum = unpack_block(row, wtype, b, vals, scales)
                rec = b * record
                mins = rec + n_scales * lanes * scale_bytes
                if factors:  # the factor bytes, and d (dmin) as the file has them, once per super-block
                    f0, f1, d_at = _k_factors(row, wtype, b)
                    group[rec + lane] = f0
                    group[(rec + lanes + lane) if n_scales == 2 else (mins + lane)] = f1
                    if b % SUPER_BLOCK == 0:
                        at = table + (b // SUPER_BLOCK) * sb_bytes + 2 * lane
                        for i in range(sb_bytes // lanes):  # d, then dmin lanes * 2 bytes later
                            group[at + (i // 2) * 2 * lanes + i % 2] = row[d_at + i]
                else:
                    _put_half(group, rec + lane * 2, scales[0])
                    if min_bytes:
                        _put_half(group, mins + lane * 2, minimum)
                highs = mins + lanes * min_bytes
                quants = highs + lanes * high
                for s in range(quant // 4):          # 4-byte slices, one per lane per step
                    at = quants + (s * lanes + lane) * 4
                    for i in range(4):
                        lo = vals[4 * s + i]
                        if quant == 32:
                            group[at + i] = (lo + flip) & 255
                            continue
                        hi = vals[16 + 4 * s + i]
                        group[at + i] = (lo & 15) | ((hi & 15) << 4)
                        if high == 4:    # bit s: element 4s+i, bit 4+s: element 16+4s+i
                            group[highs + lane * 4 + i] |= (((lo >> 4) & 1) << s) | (((hi >> 4) & 1) << (4 + s))
                        elif high == 8:  # bits 2s, 2s+1 of the first word, of the second
                            group[highs + lane * 4 + i] |= ((lo >> 4) & 3) << (2 * s)
                            group[highs + 4 * lanes + lane * 4 + i] |= ((hi >> 4) & 3) << (2 * s)


@njit(**_exact)
def _put_half(group, at, value):
    """A scale or minimum into a packed record as IEEE half bits."""
    bits = I32(_half_bits(value))
    group[at] = bits & 255
    group[at + 1] = bits >> 8


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
        quant, high, scale_bytes, n_scales, min_bytes, offset = PACKED_FORMATS[qt]
        if qt == T_Q8_0 and self.unsigned_q8:
            offset = 128
        record = n * record_bytes(qt)
        table_at = b.add(self.group_at, b.mul(self.nb, self.i64(record)))  # K-quants' super-block factors
        sb_bytes = n * super_block_bytes(qt)

        def lane_values(at):  # n half scales or minimums -> float32 vector
            return _half_to_f32(b, self.load(self.wp, at, _vec(_I16, n)), self.native_half)

        def factors(at, base):  # n factor bytes (6-bit, or Q6_K's int8) x the super-block's f16 -> float32
            return b.fmul(b.sitofp(self.load(self.wp, at, _vec(_I8, n)), vf), base)

        def masked(v, shift, mask):  # (v << shift) & mask on every byte; a negative shift goes right
            if shift > 0:
                v = b.shl(v, _const_vec(_I8, [shift] * (4 * n)))
            elif shift < 0:
                v = b.lshr(v, _const_vec(_I8, [-shift] * (4 * n)))
            return b.and_(v, _const_vec(_I8, [mask] * (4 * n)))

        with cgutils.for_range(b, self.nb) as loop:
            blk = loop.index
            rec = b.add(self.group_at, b.mul(blk, self.i64(record)))
            mins_at = b.add(rec, self.i64(n * n_scales * scale_bytes))
            if scale_bytes == 1:  # K-quants: block factor x super-block d (dmin), ggml's float32 products
                sb_at = b.add(table_at, b.mul(b.lshr(blk, self.i64(3)), self.i64(sb_bytes)))
                d_sb = lane_values(sb_at)
                d_w = [factors(b.add(rec, self.i64(s * n)), d_sb) for s in range(n_scales)]
                if min_bytes:
                    m_w = b.fmul(factors(mins_at, lane_values(b.add(sb_at, self.i64(2 * n)))),
                                 ir.Constant(vf, [-1.0] * n))
            else:
                d_w = [lane_values(rec)]
                if min_bytes:
                    m_w = lane_values(mins_at)
            highs_at = b.add(mins_at, self.i64(n * min_bytes))
            quants = b.add(highs_at, self.i64(n * high))
            high_words = [self.load(self.wp, b.add(highs_at, self.i64(4 * n * k)), vb) for k in range(high // 4)]
            # integer sums (one per scale: per half block for Q6_K), starting from the offset term
            isum = []
            for j in range(self.n_tok):
                halves = [self.token_value("xsum", j, b.add(b.shl(blk, self.i64(1)), self.i64(h)), _I32)
                          for h in range(2)]
                sums = [b.add(halves[0], halves[1])] if n_scales == 1 else halves
                isum.append([self.splat(b.mul(s, ir.Constant(_I32, -offset))) if offset else
                             ir.Constant(vi, [0] * n) for s in sums])
            x_at = [b.add(self.rows_of["xq"][j], b.shl(blk, self.i64(5))) for j in range(self.n_tok)]
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
                    for j in range(self.n_tok):
                        x4 = self.load(self.xq, b.add(x_at[j], self.i64(element)), _I32)
                        isum[j][half] = self.dot(isum[j][half], weights, b.bitcast(self.splat(x4), vb))
            # one scaling per block (per half): acc += isum * d_w * d_x (+ m_w * sum of x)
            for j in range(self.n_tok):
                d_x = self.splat(self.token_value("xd", j, blk, _F32))
                total = b.load(acc[j])
                for h in range(n_scales):
                    total = b.call(fma, [b.sitofp(isum[j][h], vf), b.fmul(d_w[h], d_x), total])
                if min_bytes == 2:    # Q4_1, Q5_1: ggml's half-rounded s = d * sum(q) of Q8_1
                    total = b.call(fma, [m_w, self.splat(self.token_value("xs", j, blk, _F32)), total])
                elif min_bytes == 1:  # K-quants: the exact block sum, as ggml's Q8_K sums
                    x_sum = b.add(*[self.token_value("xsum", j, b.add(b.shl(blk, self.i64(1)), self.i64(h)), _I32)
                                    for h in range(2)])
                    total = b.call(fma, [m_w, b.fmul(d_x, self.splat(b.sitofp(x_sum, _F32))), total])
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


def _tile(n_tok: int):
    """tile(wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out): out[t0 + j, LANES*g + lane] = row
    LANES*g + lane of the packed matrix wp (of ggml type wtype) . activation t0 + j, for j < n_tok
    and lane < LANES.  One switch over the packed formats, each case its own tile."""

    @intrinsic
    def tile(typingctx, wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out):
        want = ((wp, types.uint8), (xq, types.int8), (xd, types.float32), (xs, types.float32),
                (xsum, types.int32), (out, types.float32))
        for arr, dtype in want:
            if not (isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == 2 and arr.layout == "C"):
                return None
        if not isinstance(wtype, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            which = context.cast(builder, args[0], sig.args[0], types.int64)
            done = builder.append_basic_block("tile.done")
            switch = builder.switch(which, done)
            for qtype in PACKED_FORMATS:
                case = builder.append_basic_block(f"tile.type{qtype}")
                switch.add_case(ir.Constant(_I64, qtype), case)
                builder.position_at_end(case)
                _TileIR(context, builder, sig, args, qtype, n_tok).emit()
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(wtype, wp, g, n_out, xq, xd, xs, xsum, t0, out), codegen

    return tile


_TILE_TOKENS = tile_tokens()
_row_tile, _token_tile = _tile(1), _tile(_TILE_TOKENS)


@njit(parallel=True, **_fast)
def matvec_packed(wp, wtype, n_out, xq, xd, xs, xsum, out):
    """out (n_out,) = W @ x for one token: a packed quantized matrix wp of ggml type wtype, x given
    as its Q8 blocks (quantize_q8): xq (n,), xd, xs (n/32,), xsum (n/16,).  Each thread takes whole
    row groups.  (Its own kernel, apart from matmul_packed, so that the decode step carries only the
    one-token tiles.)"""
    if xd.shape[0] * QK != xq.shape[0] or xsum.shape[0] != 2 * xd.shape[0] or xs.shape[0] != xd.shape[0]:
        raise ValueError("activation blocks do not match (xq: n, xd and xs: n/32, xsum: n/16)")
    nb = xd.shape[0]
    xq2, xd2, xs2, xsum2 = xq.reshape(1, QK * nb), xd.reshape(1, nb), xs.reshape(1, nb), xsum.reshape(1, 2 * nb)
    out2 = out.reshape(1, n_out)
    for g in prange(wp.shape[0]):
        _row_tile(wtype, wp, g, n_out, xq2, xd2, xs2, xsum2, 0, out2)


@njit(parallel=True, **_fast)
def matmul_packed(wp, wtype, n_out, xq, xd, xs, xsum, out):
    """out (T, n_out) = x @ W.T for a packed quantized matrix wp of ggml type wtype; x given as its
    Q8 blocks (quantize_q8_rows): xq (T, n), xd, xs (T, n/32), xsum (T, n/16).  Each thread takes
    whole row groups; within a group, tiles of _TILE_TOKENS tokens (a short last tile computes its
    last token again, stores it once)."""
    if xd.shape[1] * QK != xq.shape[1] or xsum.shape[1] != 2 * xd.shape[1] or xs.shape[1] != xd.shape[1]:
        raise ValueError("activation blocks do not match (xq: n, xd and xs: n/32, xsum: n/16 per row)")
    for g in prange(wp.shape[0]):
        for t in range(0, xq.shape[0], _TILE_TOKENS):
            _token_tile(wtype, wp, g, n_out, xq, xd, xs, xsum, t, out)


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
    for the quantized types, file rows (n_out, row_bytes) for F32 / F16 / BF16.  qx = (xq, xd, xs,
    xsum) must hold quantize_q8(x)."""
    if is_quantized(wtype):
        xq, xd, xs, xsum = qx
        matvec_packed(w, wtype, n_out, xq, xd, xs, xsum, out)
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
    else:
        offset = _packed_format(wtype)[5]
        vals = np.empty(QK, np.int32)
        scales = np.empty(2, np.float32)
        for b in range(n // QK):
            minimum = unpack_block(row, wtype, b, vals, scales)
            for i in range(QK):
                out[b * QK + i] = scales[i // 16] * np.float32(vals[i] - offset) + minimum


@njit(parallel=True, **_exact)
def dequantize_rows(w, wtype, out, f16_table, bf16_table):
    """w: (n_rows, row_bytes) -> out: (n_rows, n) float32."""
    for r in prange(w.shape[0]):
        dequantize_row(w[r], wtype, out[r], f16_table, bf16_table)


_PACKED_LANES, _UNSIGNED_Q8 = packing()  # the layout pack_rows writes on this target


@njit(**_exact)
def dequantize_packed_row(wp, wtype, r, out):
    """Row r of a packed quantized matrix wp (pack_rows, this target's layout) -> out (n,)
    float32: the same values as dequantize_row of the file row."""
    quant, high, scale_bytes, n_scales, min_bytes, offset = _packed_format(wtype)
    lanes = _PACKED_LANES
    if wtype == T_Q8_0 and _UNSIGNED_Q8:
        offset = 128
    record, sb_bytes = _group_layout(wtype, lanes)
    nb = out.shape[0] // QK
    group, lane = wp[r // lanes], r % lanes
    for b in range(nb):
        rec = b * record
        mins = rec + n_scales * lanes * scale_bytes
        minimum = np.float32(0.0)
        if scale_bytes == 1:  # K-quants: factor bytes x the super-block's d (dmin)
            sb = nb * record + (b // SUPER_BLOCK) * sb_bytes + 2 * lane
            d = _f16_at(group, sb)
            s0 = d * np.float32(np.int8(group[rec + lane]))
            s1 = d * np.float32(np.int8(group[rec + lanes + lane])) if n_scales == 2 else s0
            if min_bytes:
                minimum = -(_f16_at(group, sb + 2 * lanes) * np.float32(group[mins + lane]))
        else:
            s0 = _f16_at(group, rec + 2 * lane)
            s1 = s0
            if min_bytes:
                minimum = _f16_at(group, mins + 2 * lane)
        highs = mins + lanes * min_bytes
        quants = highs + lanes * high
        for s in range(quant // 4):
            at = quants + (s * lanes + lane) * 4
            for i in range(4):
                byte = I32(group[at + i])
                if quant == 32:
                    v = byte if _UNSIGNED_Q8 else I32(np.int8(group[at + i]))
                    out[QK * b + 4 * s + i] = s0 * np.float32(v - offset) + minimum
                    continue
                lo, hi = byte & 15, byte >> 4
                if high == 4:
                    w = I32(group[highs + lane * 4 + i])
                    lo |= ((w >> s) & 1) << 4
                    hi |= ((w >> (4 + s)) & 1) << 4
                elif high == 8:
                    lo |= ((I32(group[highs + lane * 4 + i]) >> (2 * s)) & 3) << 4
                    hi |= ((I32(group[highs + 4 * lanes + lane * 4 + i]) >> (2 * s)) & 3) << 4
                out[QK * b + 4 * s + i] = s0 * np.float32(lo - offset) + minimum
                out[QK * b + 16 + 4 * s + i] = s1 * np.float32(hi - offset) + minimum


@njit(**_exact)
def embed_row(embd, embd_type, embd_packed, token, out, f16_table, bf16_table):
    """out = the embedding of ``token``: a row of the file's table, or of its packed copy (tied
    embeddings, whose packed output matrix holds the same rows: the file's pages stay unused)."""
    if embd_packed:
        dequantize_packed_row(embd, embd_type, token, out)
    else:
        dequantize_row(embd[token], embd_type, out, f16_table, bf16_table)


@njit(**_exact)
def embed_rows(tokens, embd, embd_type, embd_packed, out, f16_table, bf16_table):
    """out[t] = the embedding of ``tokens[t]`` (see embed_row)."""
    for t in range(tokens.shape[0]):
        embed_row(embd, embd_type, embd_packed, tokens[t], out[t], f16_table, bf16_table)


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


# ----- KV cache rows ------------------------------------------------------------------------------

# A cached key or value row of head_dim elements is float32, IEEE half bits (uint16), or Q8_0
# blocks (uint8, KV_Q8_BLOCK bytes per 32 elements: the f16 scale d, then 32 int8 q; value d * q,
# quantized as ggml's reference quantize_row_q8_0 does).  These four helpers are the only code that
# knows the element format; each is specialized per cache dtype when a kernel is compiled.

KV_Q8_BLOCK = 34


def kv_row_length(head_dim: int, dtype) -> int:
    """Elements of the cache array per row of head_dim values."""
    return head_dim // QK * KV_Q8_BLOCK if np.dtype(dtype) == np.uint8 else head_dim


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


F16_LOAD_WIDTH = 8  # halves widened per vector step of an f16 cache row (head sizes are multiples of 8)


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


@njit(**_exact)
def _q8_scale(row, b):
    """The f16 scale of Q8_0 block b of a cached row, as float32."""
    return _f16_at(row, KV_Q8_BLOCK * b)


@njit(**_exact)
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


@njit(parallel=True, **_exact)
def rerotate_keys(k_cache, start, end, cos, sin, head_dim):
    """Rotate cached keys at slots start..end-1 of every layer and head by the angles (cos, sin),
    in place: moving a key from position p to p - delta is a rotation by -delta's angles.
    k_cache: (n_layers, n_kv_heads, n_ctx, row length), any KV element type (see _kv_load)."""
    n_layers, n_kv_heads = k_cache.shape[0], k_cache.shape[1]
    for job in prange(n_layers * n_kv_heads):
        layer, head = job // n_kv_heads, job % n_kv_heads
        key = np.empty(head_dim, np.float32)
        for p in range(start, end):
            row = k_cache[layer, head, p]
            _kv_load(row, key)
            rope(key, 1, head_dim, cos, sin)
            _kv_store(key, row)


@njit(parallel=True, **_exact)
def store_kv(cache, start, values):
    """cache[h, start + t] = values[t, h * head_dim:(h + 1) * head_dim] for T new tokens, in the
    cache's element type.  cache: (n_kv_heads, n_ctx, row length) of one layer; values: (T, n_kv*hd)."""
    n_kv_heads = cache.shape[0]
    head_dim = values.shape[1] // n_kv_heads
    for h in prange(n_kv_heads):
        for t in range(values.shape[0]):
            _kv_store(values[t, h * head_dim:(h + 1) * head_dim], cache[h, start + t])


@njit(**_exact)
def _attend(q, k_cache, v_cache, n_pos, scale, scores, out):
    """One head: softmax(q . K[:n_pos] * scale) @ V[:n_pos].  k/v_cache: (n_ctx, head_dim)."""
    best = np.float32(-np.inf)
    for t in range(n_pos):
        s = _kv_dot(q, k_cache[t]) * scale
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
        _kv_axpy(scores[t] * inv, v_cache[t], out)


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
        _kv_load(keys[start + t], row)
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
        _kv_load(values[start + t], row)
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
    source = packed if is_quantized(wtype) else blob
    w = source[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    matvec(w, wtype, n_out, x, qx, out, f16_table, bf16_table)


@njit(**_exact)
def decode_token(token, pos, embd, embd_type, embd_packed, blob, packed, mat_table, norms, output_norm, output,
                 output_type, eps, n_heads, n_kv_heads, head_dim, cos_table, sin_table, k_cache, v_cache,
                 x, xb, qx, q, k, v, att, hb, hb2, qh, attn_scratch, attn_partial, logits, f16_table,
                 bf16_table):
    """Run one token at position ``pos`` through every layer; write its logits.

    embd, embd_type, embd_packed: where token embeddings come from (see embed_row);
    blob: the mapped file; packed: every quantized layer matrix, packed; mat_table[7*l + j]: layer
    l's j-th matrix of (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down), see
    _layer_matvec; output: the vocabulary projection, packed or file rows; norms: (n_layers, 2, dim)
    = (attn_norm, ffn_norm); k_cache, v_cache: (n_layers, n_kv_heads, n_ctx, row length) of any KV
    element type (see _kv_load).  Buffers: x, xb, att: (dim,); qx = (xq (dim,) int8, xd, xs (dim/32,) f32,
    xsum (dim/32,) int32); q (n_heads*head_dim,); k, v (n_kv_heads*head_dim,); hb, hb2: (ffn,);
    qh: like qx for (ffn,); attn_scratch, attn_partial: see attention_one; logits: (n_vocab,).
    """
    n_layers = norms.shape[0]
    embed_row(embd, embd_type, embd_packed, token, x, f16_table, bf16_table)
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
            _kv_store(k[h * head_dim:(h + 1) * head_dim], k_cache[l, h, pos])
            _kv_store(v[h * head_dim:(h + 1) * head_dim], v_cache[l, h, pos])
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
                loaded = self._load_overload(sig, target_context)
            release_compiler_pages()  # the kernel is linked: LLVM's code is not needed until the next one
            return loaded

        def save_overload(self, sig, data):  # after a compilation (a cache miss), likewise
            super().save_overload(sig, data)
            release_compiler_pages()

    for value in list(globals().values()):
        if isinstance(value, CPUDispatcher) and type(getattr(value, "_cache", None)) is FunctionCache:
            value._cache = LeanCache(value.py_func)


_lean_cache_loading()
release_compiler_pages()  # what importing Numba touched of LLVM (its static initializers)
