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
from numba import njit, prange

T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 8, 30
QK = 32  # elements per quantized block
I32 = np.int32

F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

_fast = {"cache": True, "fastmath": True}  # only for kernels whose floating work is dot products
_exact = {"cache": True}


# ----- activation quantization ------------------------------------------------------------------

@njit(**_exact)
def round_to_f16(v):
    """The float32 value nearest to v that IEEE half can hold (ties to even), as ggml's FP32_TO_FP16."""
    a = abs(v)
    if a >= 65520.0:
        return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
    if a < 6.103515625e-05:  # subnormal halves: a fixed quantum of 2^-24
        return np.float32(np.rint(v * 16777216.0) / 16777216.0)
    m, e = math.frexp(v)
    return np.float32(math.ldexp(np.rint(m * 2048.0) / 2048.0, e))


@njit(**_exact)
def _quantize_block_q8(x, o, q):
    """Quantize x[o:o+32] into q[o:o+32] the way ggml's x86 quantize_row_q8_1 does.

    d = max|x| / 127 (stored as half), q = round-to-nearest-even(x * 127 / max|x|).
    Returns (half-rounded d, half-rounded d * sum(q)).
    """
    amax = np.float32(0.0)
    for i in range(o, o + QK):
        amax = max(amax, abs(x[i]))
    d = amax / np.float32(127.0)
    inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
    total = 0
    for i in range(o, o + QK):
        qi = int(np.rint(x[i] * inv))
        q[i] = qi
        total += qi
    return round_to_f16(d), round_to_f16(d * np.float32(total))


@njit(**_exact)
def quantize_q8(x, xq, xd, xs):
    """x: (n,) f32 -> xq: (n,) int8, xd: (n/32,) block scales, xs: (n/32,) scale * block sum of xq."""
    for b in range(x.shape[0] // QK):
        xd[b], xs[b] = _quantize_block_q8(x, b * QK, xq)


# ----- fused dequantize x matrix-vector products (decode) ----------------------------------------

# Each kernel computes four rows per step so that every activation load serves four weight rows,
# and a tail loop finishes the last n_out % 4 rows.  Integer sums are exact per block; the scale
# is applied once per block and row.  Every integer expression is wrapped in int32: Numba widens
# integer arithmetic to int64, which halves the SIMD width and hides the int16 multiply-add
# (vpmaddwd / sdot) pattern from LLVM, costing about 2x.

@njit(**_fast)
def _half(w, r, o, half_table):
    """The 16-bit float at bytes o, o+1 of row r."""
    return half_table[I32(w[r, o]) | (I32(w[r, o + 1]) << 8)]


@njit(**_fast)
def _int8_dot(wq, r, o, xq, b):
    """sum_i wq[r, o + i] * xq[32 b + i] over one block, exactly, in int32."""
    s = I32(0)
    for i in range(QK):
        s = I32(s + I32(I32(wq[r, o + i]) * I32(xq[b * QK + i])))
    return s


@njit(**_fast)
def _nibble_dot(w, r, o, xq, b, offset):
    """sum_j (lo_j - offset) * xq[b, j] + (hi_j - offset) * xq[b, 16 + j] over the 16 bytes at o."""
    s = I32(0)
    for j in range(16):
        q = I32(w[r, o + j])
        s = I32(s + I32(I32((q & 15) - offset) * I32(xq[b * QK + j])))
        s = I32(s + I32(I32((q >> 4) - offset) * I32(xq[b * QK + 16 + j])))
    return s


@njit(parallel=True, **_fast)
def matvec_q8_0(w, xq, xd, out, half_table):
    """out[r] = sum_b d_w[r,b] * xd[b] * sum_i q_w[r,b,i] * xq[b,i];  w: (n_out, nb*34) Q8_0."""
    nb = xq.shape[0] // QK
    wq = w.view(np.int8)
    n4 = w.shape[0] // 4 * 4
    for g in prange(n4 // 4):
        r = 4 * g
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for b in range(nb):
            o = b * 34 + 2
            s0 = s1 = s2 = s3 = I32(0)
            for i in range(QK):
                x = I32(xq[b * QK + i])
                s0 = I32(s0 + I32(I32(wq[r, o + i]) * x))
                s1 = I32(s1 + I32(I32(wq[r + 1, o + i]) * x))
                s2 = I32(s2 + I32(I32(wq[r + 2, o + i]) * x))
                s3 = I32(s3 + I32(I32(wq[r + 3, o + i]) * x))
            a0 += _half(w, r, o - 2, half_table) * xd[b] * np.float32(s0)
            a1 += _half(w, r + 1, o - 2, half_table) * xd[b] * np.float32(s1)
            a2 += _half(w, r + 2, o - 2, half_table) * xd[b] * np.float32(s2)
            a3 += _half(w, r + 3, o - 2, half_table) * xd[b] * np.float32(s3)
        out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
    for r in range(n4, w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += _half(w, r, b * 34, half_table) * xd[b] * np.float32(_int8_dot(wq, r, b * 34 + 2, xq, b))
        out[r] = acc


@njit(parallel=True, **_fast)
def matvec_q4_0(w, xq, xd, xs, out, half_table):
    """Q4_0 rows (18-byte blocks): x = d * (nibble - 8); the offset stays in the integer sum, as
    ggml's vec_dot_q4_0_q8_0 keeps it (xs is unused, kept for a uniform signature)."""
    nb = xq.shape[0] // QK
    n4 = w.shape[0] // 4 * 4
    for g in prange(n4 // 4):
        r = 4 * g
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for b in range(nb):
            o = b * 18 + 2
            s0 = s1 = s2 = s3 = xsum = I32(0)
            for j in range(16):
                xl = I32(xq[b * QK + j])
                xh = I32(xq[b * QK + 16 + j])
                xsum = I32(xsum + xl + xh)
                q = I32(w[r, o + j])
                s0 = I32(s0 + I32(I32(q & 15) * xl))
                s0 = I32(s0 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 1, o + j])
                s1 = I32(s1 + I32(I32(q & 15) * xl))
                s1 = I32(s1 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 2, o + j])
                s2 = I32(s2 + I32(I32(q & 15) * xl))
                s2 = I32(s2 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 3, o + j])
                s3 = I32(s3 + I32(I32(q & 15) * xl))
                s3 = I32(s3 + I32(I32(q >> 4) * xh))
            # the -8 offset of every nibble, still in exact integers
            s0, s1, s2, s3 = s0 - 8 * xsum, s1 - 8 * xsum, s2 - 8 * xsum, s3 - 8 * xsum
            a0 += _half(w, r, o - 2, half_table) * xd[b] * np.float32(s0)
            a1 += _half(w, r + 1, o - 2, half_table) * xd[b] * np.float32(s1)
            a2 += _half(w, r + 2, o - 2, half_table) * xd[b] * np.float32(s2)
            a3 += _half(w, r + 3, o - 2, half_table) * xd[b] * np.float32(s3)
        out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
    for r in range(n4, w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += _half(w, r, b * 18, half_table) * xd[b] * np.float32(_nibble_dot(w, r, b * 18 + 2, xq, b, 8))
        out[r] = acc


@njit(parallel=True, **_fast)
def matvec_q4_1(w, xq, xd, xs, out, half_table):
    """Q4_1 rows (20-byte blocks): x = d * nibble + m.  xs: xd * block sum of xq (ggml's Q8_1 s)."""
    nb = xq.shape[0] // QK
    n4 = w.shape[0] // 4 * 4
    for g in prange(n4 // 4):
        r = 4 * g
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for b in range(nb):
            o = b * 20 + 4
            s0 = s1 = s2 = s3 = I32(0)
            for j in range(16):
                xl = I32(xq[b * QK + j])
                xh = I32(xq[b * QK + 16 + j])
                q = I32(w[r, o + j])
                s0 = I32(s0 + I32(I32(q & 15) * xl))
                s0 = I32(s0 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 1, o + j])
                s1 = I32(s1 + I32(I32(q & 15) * xl))
                s1 = I32(s1 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 2, o + j])
                s2 = I32(s2 + I32(I32(q & 15) * xl))
                s2 = I32(s2 + I32(I32(q >> 4) * xh))
                q = I32(w[r + 3, o + j])
                s3 = I32(s3 + I32(I32(q & 15) * xl))
                s3 = I32(s3 + I32(I32(q >> 4) * xh))
            a0 += _half(w, r, o - 4, half_table) * xd[b] * np.float32(s0) + _half(w, r, o - 2, half_table) * xs[b]
            a1 += _half(w, r + 1, o - 4, half_table) * xd[b] * np.float32(s1) + _half(w, r + 1, o - 2, half_table) * xs[b]
            a2 += _half(w, r + 2, o - 4, half_table) * xd[b] * np.float32(s2) + _half(w, r + 2, o - 2, half_table) * xs[b]
            a3 += _half(w, r + 3, o - 4, half_table) * xd[b] * np.float32(s3) + _half(w, r + 3, o - 2, half_table) * xs[b]
        out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
    for r in range(n4, w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += (_half(w, r, b * 20, half_table) * xd[b] * np.float32(_nibble_dot(w, r, b * 20 + 4, xq, b, 0))
                    + _half(w, r, b * 20 + 2, half_table) * xs[b])
        out[r] = acc


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
    if wtype == T_Q8_0:
        matvec_q8_0(w, xq, xd, out, f16_table)
    elif wtype == T_Q4_0:
        matvec_q4_0(w, xq, xd, xs, out, f16_table)
    elif wtype == T_Q4_1:
        matvec_q4_1(w, xq, xd, xs, out, f16_table)
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


@njit(parallel=True, **_exact)
def fake_quantize_q8_rows(x):
    """Round every 32-block of every row of x (T, n) to the Q8 activation grid, in place.

    A float GEMM on such rows equals the int8 block dot products of the decode kernels up to
    float summation order, so prefill and decode see the same numbers.
    """
    n_blocks = x.shape[1] // QK
    for job in prange(x.shape[0] * n_blocks):
        row = x[job // n_blocks]
        o = (job % n_blocks) * QK
        amax = np.float32(0.0)
        for i in range(o, o + QK):
            amax = max(amax, abs(row[i]))
        inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
        d = round_to_f16(amax / np.float32(127.0))
        for i in range(o, o + QK):
            row[i] = d * np.rint(row[i] * inv)


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


@njit(**_exact)
def _attend(q, k_cache, v_cache, n_pos, scale, scores, out):
    """One head: softmax(q . K[:n_pos] * scale) @ V[:n_pos].  k/v_cache: (n_ctx, head_dim)."""
    head_dim = q.shape[0]
    best = -np.inf
    for t in range(n_pos):
        s = np.float32(0.0)
        for i in range(head_dim):
            s += q[i] * k_cache[t, i]
        s *= scale
        scores[t] = s
        best = max(best, s)
    total = 0.0
    for t in range(n_pos):
        e = math.exp(scores[t] - best)
        scores[t] = e
        total += e
    inv = 1.0 / total
    for i in range(head_dim):
        out[i] = 0.0
    for t in range(n_pos):
        p = np.float32(scores[t] * inv)
        for i in range(head_dim):
            out[i] += p * v_cache[t, i]


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
def _swiglu_span(g, u, o, start, end):
    for i in range(start, end):
        o[i] = g[i] / (np.float32(1.0) + np.exp(-g[i])) * u[i]


@njit(parallel=True, **_exact)
def swiglu(gate, up, out):
    """out = silu(gate) * up, elementwise over any matching flat shapes."""
    g = gate.reshape(-1)
    u = up.reshape(-1)
    o = out.reshape(-1)
    n_spans = (g.shape[0] + 4095) // 4096
    for span in prange(n_spans):
        _swiglu_span(g, u, o, span * 4096, min(g.shape[0], (span + 1) * 4096))


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
        _swiglu_span(hb, hb2, hb, 0, hb.shape[0])
        quantize_q8(hb, hq, hd, hs)
        _layer_matvec(blob, mat_table, m + 6, hb, hq, hd, hs, xb, f16_table, bf16_table)
        for i in range(x.shape[0]):
            x[i] += xb[i]
    # final norm and the vocabulary projection
    rmsnorm(x, output_norm, eps, xb)
    quantize_q8(xb, xq, xd, xs)
    matvec(output, output_type, xb, xq, xd, xs, logits, f16_table, bf16_table)
