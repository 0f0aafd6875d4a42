"""The packed layout of quantized weights, and the values the bytes of every runtime type hold.

The file stores a quantized matrix row after row, block after block, each type in its own layout.
At load every quantized matrix is repacked once into groups of LANES rows (LANES = the int32 lanes
of one vector: 16 with AVX-512, 8 with AVX2, 4 elsewhere) and into one of a few internal block
forms, so that one vector load brings 4 consecutive weight bytes of each of LANES rows.  Per group,
per 32-element block (PACKED_FORMATS below says which pieces a type has):

  scales   n_scales x LANES  f16, or for K-quants the block's own factor byte (6-bit unsigned,
                             Q6_K: int8; 2 for Q6_K, one per 16 elements)
  minimums LANES             f16 (Q4_1, Q5_1), or the 6-bit minimum factor byte (Q4_K, Q5_K)
  high     high x LANES      the 5th (Q5_x: 4 bytes) or 5th+6th bits (Q6_K: 8 bytes) of the values,
                             placed so that a shift and a mask line them up with the nibbles (below)
  quants   steps x LANES x 4 bytes: 4 nibble steps (byte i of step s holds elements 4s+i in its
           low and 16+4s+i in its high half) or 8 byte steps (element 4s+i), unsigned integers
           whose value is scale * (q - offset) + minimum

and, after the last block, for K-quants per 256-element super-block LANES f16 factors d (and
LANES dmin): a block's scale is d * its factor, its minimum -dmin * its factor, as ggml
dequantizes.  So a packed matrix takes the bytes of the file (+2-3% for Q4_K / Q5_K, whose 6-bit
factors get a byte each); Q8_0 is stored as q + 128 on CPUs with VNNI (see below).  Every value
stays exactly what ggml dequantizes.

The high bits: for Q5_x, byte i of a lane's 4-byte word holds in bit s the 5th bit of element
4s+i and in bit 4+s that of element 16+4s+i, so nibble step s takes (word << (4-s)) & 16 and
(word >> s) & 16.  For Q6_K two such words hold the bit pairs (bits 2s, 2s+1 of byte i: element
4s+i in the first, 16+4s+i in the second), lined up by a shift of 4-2s and the mask 48.

A product then needs no horizontal sums: lane l accumulates row l.  For each block and token, one
4-byte group of the activation is broadcast to all lanes and one int8 dot-product instruction
(vpdpbusd on AVX-VNNI / AVX-512 VNNI: unsigned x signed bytes, 4 products per int32 lane; sdot on
arm64 with dotprod; vpmaddubsw + vpmaddwd on other x86 with AVX2; portable IR elsewhere) adds 4 products to every row's integer sum.  Offsets
stay in integers as in ggml: the sum starts at -offset * (sum of the activation's integers).  The
exact block sum is then scaled once per block: acc += isum * d_w * d_x, one fused multiply-add,
plus m_w * s (the activation block's half-rounded scaled sum) for Q4_1 / Q5_1.  The K-quants take
the activation with one scale per 256 values (quantize_q8k, ggml's Q8_K) and, as ggml, sum a
super-block in integers: S = sum of isum * the block's factor (per half block for Q6_K), M = sum
of the minimum factor * the activation block's sum, then acc += S * (d * d_x) - M * (dmin * d_x).

The inner work is LLVM IR emitted by the intrinsics below (Numba has no vector types, and LLVM
finds neither the dot-product instructions nor this data layout in scalar loops).  One call
computes a tile: one row group x n_tok tokens, the group's weights staying in L1 while tokens
stream past.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..quants import BLOCK_LAYOUT, RUNTIME_FLOAT, GGMLType
from .common import EXACT, I32, QK, SUPER_BLOCK, T_BF16, T_F16, T_F32, T_Q4_0, T_Q4_1, T_Q4_K, T_Q5_0, T_Q5_1, \
    T_Q5_K, T_Q6_K, T_Q8_0
from .llvm import _f16_at, _load_u32, _put_half, _store_u32
from .parallel import parallel_rows
from .target import packing

# file bytes per block (Q4_K / Q5_K / Q6_K: per 256-element super-block), from THE table
_BLOCK_BYTES = {t: BLOCK_LAYOUT[GGMLType(t)][1] for t in (T_Q8_0, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q4_K,
                                                         T_Q5_K, T_Q6_K)}
_B_Q8_0, _B_Q4_0, _B_Q4_1, _B_Q5_0, _B_Q5_1 = (_BLOCK_BYTES[t] for t in (T_Q8_0, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1))
_B_Q4_K, _B_Q5_K, _B_Q6_K = (_BLOCK_BYTES[t] for t in (T_Q4_K, T_Q5_K, T_Q6_K))
_BLOCK_BYTES_BY_ID = np.zeros(T_BF16 + 1, np.int64)  # the same, indexable inside the kernels
for _t, _b in _BLOCK_BYTES.items():
    _BLOCK_BYTES_BY_ID[_t] = _b


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



@njit(**EXACT)
def _k_scale_min(q, o, j):
    """K-quant sub-block j's 6-bit (scale, minimum) factors from the 12 packed bytes at q[o:]."""
    if j < 4:
        return I32(q[o + j]) & 63, I32(q[o + j + 4]) & 63
    sc = (I32(q[o + j + 4]) & 15) | ((I32(q[o + j - 4]) >> 6) << 4)
    m = (I32(q[o + j + 4]) >> 4) | ((I32(q[o + j]) >> 6) << 4)
    return sc, m


@njit(**EXACT)
def unpack_block(row, wtype, b, vals, scales):
    """Block b (elements 32b .. 32b+31) of a quantized file row: vals[0:32] its integers (int32),
    scales[0:2] the scales of its two halves (the same value except for Q6_K); returns its minimum
    (0 where the type has none), so that element i = scales[i // 16] * (vals[i] - offset) + minimum
    with the type's offset from PACKED_FORMATS (Q8_0: signed values, offset 0).  This is ggml's
    dequantization, per type."""
    minimum = np.float32(0.0)
    if wtype == T_Q8_0:
        o = _B_Q8_0 * b
        d = _f16_at(row, o)
        for i in range(QK):
            vals[i] = I32(np.int8(row[o + 2 + i]))
    elif wtype == T_Q4_0 or wtype == T_Q4_1:
        o = (_B_Q4_0 if wtype == T_Q4_0 else _B_Q4_1) * b
        d = _f16_at(row, o)
        q = o + 2
        if wtype == T_Q4_1:
            minimum = _f16_at(row, o + 2)
            q = o + 4
        for j in range(16):
            vals[j] = I32(row[q + j]) & 15
            vals[j + 16] = I32(row[q + j]) >> 4
    elif wtype == T_Q5_0 or wtype == T_Q5_1:
        o = (_B_Q5_0 if wtype == T_Q5_0 else _B_Q5_1) * b
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
        o = (_B_Q4_K if wtype == T_Q4_K else _B_Q5_K) * (b // SUPER_BLOCK)
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
        o = _B_Q6_K * (b // SUPER_BLOCK)
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


@njit(**EXACT)
def is_quantized(wtype):
    """Whether the kernels read this ggml type packed (the quantized types) rather than as file rows."""
    return wtype != T_F32 and wtype != T_F16 and wtype != T_BF16


assert {T_F32, T_F16, T_BF16} == {int(t) for t in RUNTIME_FLOAT}, "is_quantized must follow quants.TYPES"


def _is_k_quant(wtype) -> bool:
    """Whether a packed type is a K-quant (256-value super-blocks, 6-bit or int8 block factors)."""
    return PACKED_FORMATS[wtype][2] == 1


@njit(**EXACT)
def is_k_quant(wtype):
    """Whether the int8 products take this packed type's activations as quantize_q8k's super-blocks."""
    return wtype == T_Q4_K or wtype == T_Q5_K or wtype == T_Q6_K


assert {c for c in PACKED_FORMATS if _is_k_quant(c)} == {T_Q4_K, T_Q5_K, T_Q6_K}, "is_k_quant must follow PACKED_FORMATS"


# PACKED_FORMATS as an array the kernels can index (Numba freezes global arrays into the code)
_FORMAT_TABLE = np.zeros((T_BF16 + 1, 6), np.int64)
for _qtype, _format in PACKED_FORMATS.items():
    _FORMAT_TABLE[_qtype] = _format


@njit(**EXACT)
def _packed_format(wtype):
    """PACKED_FORMATS[wtype] inside the kernels: (quant bytes, high-bit bytes, scale bytes, scales,
    minimum bytes, offset)."""
    f = _FORMAT_TABLE[wtype]
    return f[0], f[1], f[2], f[3], f[4], f[5]


@njit(**EXACT)
def _k_factors(row, wtype, b):
    """K-quant block b's factor bytes and where its super-block's f16 d sits in the file row:
    (scale factor, minimum factor, offset of d) for Q4_K / Q5_K (dmin follows d), (int8 scale of
    the first half, of the second half, offset of d) for Q6_K."""
    if wtype == T_Q6_K:
        o = _B_Q6_K * (b // SUPER_BLOCK)
        at = o + 192 + 8 * ((b % 8) // 4) + 2 * (b % 4)
        return I32(row[at]), I32(row[at + 1]), o + 208
    o = (_B_Q4_K if wtype == T_Q4_K else _B_Q5_K) * (b // SUPER_BLOCK)
    sc, m = _k_scale_min(row, o + 4, b % SUPER_BLOCK)
    return sc, m, o


@njit(**EXACT)
def _group_layout(wtype, lanes):
    """(bytes of one block record, bytes of one super-block's factors) of a packed group: the
    kernels' record_bytes and super_block_bytes, times lanes."""
    quant, high, scale_bytes, n_scales, min_bytes, _ = _packed_format(wtype)
    record = lanes * (scale_bytes * n_scales + min_bytes + high + quant)
    return record, (lanes * 2 * (1 + (min_bytes == 1)) if scale_bytes == 1 else 0)


_LOW_NIBBLES = np.uint32(0x0F0F0F0F)
_HIGH_NIBBLES = np.uint32(0xF0F0F0F0)
_LOW_PAIRS = np.uint32(0x03030303)


@njit(**EXACT)
def pack_rows_moved(w, wtype, lanes, unsigned_q8, out):
    """pack_rows for every type, moving bytes and 4-byte words instead of decoding values.

    Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 file blocks already hold their quants in the packed order
    (nibble byte j: elements j and 16 + j; Q8_0 byte j: element j): each 4-byte slice of the group
    is a 4-byte word of the file (Q8_0 stored unsigned: its top bits flipped).  Q4_K and Q5_K hold
    a pair of sub-blocks per 32 bytes (low nibbles the first, high nibbles the second): a slice is
    two words' nibbles.  Q6_K holds four 32-element quarters per 128 elements: low or high nibbles of
    64 bytes, and one bit pair of 32 high-bit bytes (4 pairs per byte), moved as words the same way.
    Q5_x's high-bit bytes are gathered bit by bit; scales and factors are copied as the file has them."""
    parallel_rows(_pack_rows_moved_range, out.shape[0], (w, wtype, lanes, unsigned_q8, out))


@njit(**EXACT)
def _pack_rows_moved_range(lo, hi, w, wtype, lanes, unsigned_q8, out):
    quant, high, scale_bytes, n_scales, min_bytes, _ = _packed_format(wtype)
    record, sb_bytes = _group_layout(wtype, lanes)
    k_quant = scale_bytes == 1
    n_blocks = SUPER_BLOCK * out.shape[1] // (SUPER_BLOCK * record + sb_bytes)
    table = n_blocks * record
    flip = np.uint32(0x80808080) if unsigned_q8 and wtype == T_Q8_0 else np.uint32(0)
    block = _BLOCK_BYTES_BY_ID[wtype]
    for g in range(lo, hi):
        group = out[g]
        for lane in range(min(lanes, w.shape[0] - g * lanes)):
            row = w[g * lanes + lane]
            for b in range(n_blocks):
                rec = b * record
                mins = rec + n_scales * lanes * scale_bytes
                highs = mins + lanes * min_bytes
                quants = highs + lanes * high
                if wtype == T_Q6_K:  # the int8 scales of both halves, d once per super-block
                    j = b % SUPER_BLOCK
                    o = (b // SUPER_BLOCK) * block
                    half, quarter = j // 4, j % 4  # which 128 elements of the super-block, which 32 of them
                    at = o + 192 + 8 * half + 2 * quarter
                    group[rec + lane] = row[at]
                    group[rec + lanes + lane] = row[at + 1]
                    if j == 0:
                        at = table + (b // SUPER_BLOCK) * sb_bytes + 2 * lane
                        group[at] = row[o + 208]
                        group[at + 1] = row[o + 209]
                    # low nibbles: 64 bytes per half, the odd quarters 32 bytes in, the last two
                    # quarters in the high nibbles; high bit pairs: 32 bytes per half, pair `quarter`
                    q = o + 64 * half + 32 * (quarter % 2)
                    qh = o + 128 + 32 * half
                    hbits = np.uint32(2 * quarter)
                    w1 = np.uint32(0)
                    w2 = np.uint32(0)
                    for st in range(4):
                        lo = _load_u32(row, q + 4 * st)
                        hi = _load_u32(row, q + 16 + 4 * st)
                        if quarter < 2:
                            v = (lo & _LOW_NIBBLES) | ((hi & _LOW_NIBBLES) << np.uint32(4))
                        else:
                            v = ((lo >> np.uint32(4)) & _LOW_NIBBLES) | (hi & _HIGH_NIBBLES)
                        _store_u32(group, quants + (st * lanes + lane) * 4, v)
                        shift = np.uint32(2 * st)  # element 4st+i's pair -> bits 2st of byte i
                        w1 |= ((_load_u32(row, qh + 4 * st) >> hbits) & _LOW_PAIRS) << shift
                        w2 |= ((_load_u32(row, qh + 16 + 4 * st) >> hbits) & _LOW_PAIRS) << shift
                    _store_u32(group, highs + lane * 4, w1)
                    _store_u32(group, highs + 4 * lanes + lane * 4, w2)
                    continue
                if k_quant:  # Q4_K / Q5_K: factor bytes, d and dmin once per super-block, 2 words per slice
                    j = b % SUPER_BLOCK
                    o = (b // SUPER_BLOCK) * block
                    sc, m = _k_scale_min(row, o + 4, j)
                    group[rec + lane] = sc
                    group[mins + lane] = m
                    if j == 0:
                        at = table + (b // SUPER_BLOCK) * sb_bytes + 2 * lane
                        group[at] = row[o]
                        group[at + 1] = row[o + 1]
                        group[at + 2 * lanes] = row[o + 2]
                        group[at + 2 * lanes + 1] = row[o + 3]
                    q = o + (16 if wtype == T_Q4_K else 48) + 32 * (j // 2)
                    for st in range(4):
                        lo = _load_u32(row, q + 4 * st)
                        hi = _load_u32(row, q + 16 + 4 * st)
                        if j % 2 == 0:
                            v = (lo & _LOW_NIBBLES) | ((hi & _LOW_NIBBLES) << np.uint32(4))
                        else:
                            v = ((lo >> np.uint32(4)) & _LOW_NIBBLES) | (hi & _HIGH_NIBBLES)
                        _store_u32(group, quants + (st * lanes + lane) * 4, v)
                    if high:  # Q5_K: bit j of qh[i] is element i's 5th bit
                        qh = o + 16
                        for i in range(4):
                            byte = I32(0)
                            for st in range(4):
                                byte |= ((I32(row[qh + 4 * st + i]) >> j) & 1) << st
                                byte |= ((I32(row[qh + 16 + 4 * st + i]) >> j) & 1) << (4 + st)
                            group[highs + lane * 4 + i] = byte
                    continue
                o = b * block
                group[rec + 2 * lane] = row[o]
                group[rec + 2 * lane + 1] = row[o + 1]
                q = o + 2
                if min_bytes:
                    group[mins + 2 * lane] = row[q]
                    group[mins + 2 * lane + 1] = row[q + 1]
                    q += 2
                if high:  # bit s of byte i: element 4s+i's 5th bit; bit 4+s: element 16+4s+i's
                    qh = _load_u32(row, q)
                    q += 4
                    for i in range(4):
                        byte = np.uint32(0)
                        for st in range(4):
                            byte |= ((qh >> np.uint32(4 * st + i)) & np.uint32(1)) << np.uint32(st)
                            byte |= ((qh >> np.uint32(16 + 4 * st + i)) & np.uint32(1)) << np.uint32(4 + st)
                        group[highs + lane * 4 + i] = byte
                for st in range(quant // 4):  # 4-byte slices, one per lane per step
                    _store_u32(group, quants + (st * lanes + lane) * 4, _load_u32(row, q + 4 * st) ^ flip)


def pack_rows(w, wtype, lanes, unsigned_q8, out):
    """w: (n_out, row_bytes) file rows of a quantized type -> out: (n_groups, group_bytes), the
    layout above.  out must arrive zeroed: the last group's padding rows stay so.  Every type's bytes
    and words are moved into place (``pack_rows_moved``, at about a copy's speed);
    ``pack_rows_decoded``, which decodes each block's integers and re-encodes them, is the slow,
    obvious twin the tests hold it to."""
    pack_rows_moved(w, wtype, lanes, unsigned_q8, out)


@njit(**EXACT)
def pack_rows_decoded(w, wtype, lanes, unsigned_q8, out):
    """pack_rows by decoding each block's integers and writing them into the layout (any type)."""
    parallel_rows(_pack_rows_decoded_range, out.shape[0], (w, wtype, lanes, unsigned_q8, out))


@njit(**EXACT)
def _pack_rows_decoded_range(lo, hi, w, wtype, lanes, unsigned_q8, out):
    quant, high, scale_bytes, n_scales, min_bytes, _ = _packed_format(wtype)
    record, sb_bytes = _group_layout(wtype, lanes)
    factors = scale_bytes == 1                                  # K-quants
    n_blocks = SUPER_BLOCK * out.shape[1] // (SUPER_BLOCK * record + sb_bytes)
    table = n_blocks * record                                   # the super-block factors
    flip = 128 if unsigned_q8 and wtype == T_Q8_0 else 0
    for g in range(lo, hi):
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


@njit(**EXACT)
def dequantize_row(row, wtype, out, f16_table, bf16_table):
    """One weight row (bytes) -> out (n,) float32."""
    n = out.shape[0]
    if wtype == T_F32:
        rf = row.view(np.float32)
        for i in range(n):  # a loop: a slice assignment compiles Numba's shape-error formatting (~8 s)
            out[i] = rf[i]
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


@njit(**EXACT)
def dequantize_rows(w, wtype, out, f16_table, bf16_table):
    """w: (n_rows, row_bytes) -> out: (n_rows, n) float32."""
    parallel_rows(_dequantize_rows_range, w.shape[0], (w, wtype, out, f16_table, bf16_table))


@njit(**EXACT)
def _dequantize_rows_range(lo, hi, w, wtype, out, f16_table, bf16_table):
    for r in range(lo, hi):
        dequantize_row(w[r], wtype, out[r], f16_table, bf16_table)


_PACKED_LANES, _UNSIGNED_Q8 = packing()  # the layout pack_rows writes on this target


@njit(**EXACT)
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


@njit(**EXACT)
def embed_row(embd, embd_type, embd_packed, token, out, f16_table, bf16_table):
    """out = the embedding of ``token``: a row of the file's table, or of its packed copy (tied
    embeddings, whose packed output matrix holds the same rows: the file's pages stay unused)."""
    if embd_packed:
        dequantize_packed_row(embd, embd_type, token, out)
    else:
        dequantize_row(embd[token], embd_type, out, f16_table, bf16_table)


@njit(**EXACT)
def embed_rows(tokens, embd, embd_type, embd_packed, out, f16_table, bf16_table):
    """out[t] = the embedding of ``tokens[t]`` (see embed_row)."""
    for t in range(tokens.shape[0]):
        embed_row(embd, embd_type, embd_packed, tokens[t], out[t], f16_table, bf16_table)
