"""Grouped-query attention over the KV cache: a prompt's tokens (causal), and one token's in spans
of cached positions merged flash-decoding style (every thread works on long contexts; the result
does not depend on the thread count)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .common import EXACT, FAST
from .kv import _kv_axpy, _kv_dot, _kv_load, _kv_vscores, _kv_vsum
from .llvm import _expf
from .parallel import parallel_rows

# A softmax weight exp(score - max) below 2^-64 is taken as 0.  The largest weight is 1, so such a
# weight changes no float32 sum it enters (the total is >= 1; an output is >= the largest weight's
# value row, and 2^-64 x the context's positions is far below float32's 2^-24 relative step), but
# computing it gives subnormal numbers (exp(x) for x < -87.3, and the products of tiny weights),
# and each operation on one costs a microcode assist of 100+ cycles on Intel CPUs: measured on a
# 2-core Xeon, one token's attention at 2048 cached positions of a 1B-shaped model took 4x as
# long (44 ms against 11 for its 16 layers) when the scores were spread widely, as a sharp
# attention head's are; 13-15 ms with the floor.
SOFTMAX_FLOOR = np.float32(-64.0 * math.log(2.0))


@njit(**EXACT)
def _weight(d):
    """exp(d) of a score minus the maximum (d <= 0), 0 below SOFTMAX_FLOOR (a NaN stays NaN).  The
    exponential's argument is clamped too: vectorized, it is computed for every lane, and its own
    arithmetic would reach subnormal numbers in the lanes the select then discards."""
    low = d < SOFTMAX_FLOOR
    e = _expf(SOFTMAX_FLOOR if low else d)
    return np.float32(0.0) if low else e


@njit(**EXACT)
def _attend(q, k_cache, v_cache, n_pos, scale, scores, out):
    """One head: softmax(q . K[:n_pos] * scale) @ V[:n_pos].  k/v_cache: (n_ctx, head_dim)."""
    best = np.float32(-np.inf)
    for t in range(n_pos):
        s = _kv_dot(q, k_cache[t]) * scale
        scores[t] = s
        best = max(best, s)
    # exponentials in their own loop so that it vectorizes; the sum in plain order
    for t in range(n_pos):
        scores[t] = _weight(scores[t] - best)
    total = 0.0
    for t in range(n_pos):
        total += scores[t]
    inv = np.float32(1.0 / total)
    out[:] = 0.0
    for t in range(n_pos):
        _kv_axpy(scores[t] * inv, v_cache[t], out)


@njit(**EXACT)
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
    parallel_rows(_attend_chunks, n_chunks,
                  (q, k_cache, v_cache, first_pos, group, n_work, n_chunks, scale, scores, out))


@njit(**EXACT)
def _attend_chunks(lo, hi, q, k_cache, v_cache, first_pos, group, n_work, n_chunks, scale, scores, out):
    n_heads = q.shape[1]
    for c in range(lo, hi):
        for job in range(c, n_work, n_chunks):
            t = job // n_heads
            h = job % n_heads
            kv = h // group
            _attend(q[t, h], k_cache[kv], v_cache[kv], first_pos + t + 1, scale, scores[c], out[t, h])


ATTN_SPAN = 64  # cached positions per job of one-token attention


@njit(**FAST)
def _dot_rows(a, i, b):
    """a[i] . b without slicing a (a slice per call costs reference-count updates in hot loops)."""
    s = np.float32(0.0)
    for j in range(b.shape[0]):
        s += a[i, j] * b[j]
    return s


def _span_scores(q, first, group, k_cache, kv, start, n, scale, row, scores):
    """scores[g, t] = q[first + g] . key start + t of KV head kv, times scale (g < group, t < n)."""


def _span_values(scores, group, n, v_cache, kv, start, partial, first, row):
    """partial[first + g, :head_dim] = sum over t < n of scores[g, t] * value start + t of KV head kv,
    and partial[first + g, head_dim + 1] = sum over t < n of scores[g, t] (both in position order)."""


def _vector_rows(cache) -> bool:
    """Whether the span's loops run on explicit vectors (kv._kv_vscores, kv._kv_vsum) for this cache
    type: float32 and f16 rows (a head size that is a multiple of 8 is checked when running)."""
    return cache.dtype in (types.float32, types.uint16)


@njit(**EXACT)
def _span_scores_rows(q, first, group, k_cache, kv, start, n, scale, row, scores):
    keys = k_cache[kv]
    for t in range(n):  # each cached row read and widened once for the whole group
        _kv_load(keys[start + t], row)
        for g in range(group):
            scores[g, t] = _dot_rows(q, first + g, row) * scale


@njit(**EXACT)
def _span_values_rows(scores, group, n, v_cache, kv, start, partial, first, row):
    head_dim = row.shape[0]
    values = v_cache[kv]
    for g in range(group):
        total = 0.0
        for t in range(n):
            total += scores[g, t]
        partial[first + g, head_dim + 1] = total
        for i in range(head_dim):
            partial[first + g, i] = 0.0
    for t in range(n):
        _kv_load(values[start + t], row)
        for g in range(group):
            p = scores[g, t]
            for i in range(head_dim):
                partial[first + g, i] += p * row[i]


@overload(_span_scores, jit_options={"error_model": "numpy"})
def _span_scores_impl(q, first, group, k_cache, kv, start, n, scale, row, scores):
    if not _vector_rows(k_cache):
        return _span_scores_rows.py_func

    def vectors(q, first, group, k_cache, kv, start, n, scale, row, scores):
        if q.shape[1] % 8:
            _span_scores_rows(q, first, group, k_cache, kv, start, n, scale, row, scores)
            return
        if n <= 0:
            return
        flat = scores.reshape(group * scores.shape[1])
        for g in range(group):
            _kv_vscores(q, first + g, k_cache, kv, start, n, scale, flat, g * scores.shape[1])
    return vectors


@overload(_span_values, jit_options={"error_model": "numpy"})
def _span_values_impl(scores, group, n, v_cache, kv, start, partial, first, row):
    if not _vector_rows(v_cache):
        return _span_values_rows.py_func

    def vectors(scores, group, n, v_cache, kv, start, partial, first, row):
        head_dim = row.shape[0]
        if head_dim % 8:
            _span_values_rows(scores, group, n, v_cache, kv, start, partial, first, row)
            return
        flat = scores.reshape(group * scores.shape[1])
        for g in range(group):
            partial[first + g, head_dim + 1] = _kv_vsum(flat, g * scores.shape[1], n, v_cache, kv, start, partial,
                                                        first + g, head_dim)
    return vectors


@njit(**EXACT)
def _attend_span(q, k_cache, v_cache, kv, start, end, scale, scratch, partial):
    """The query heads of KV head kv over cached positions start..end-1, not normalized:
    partial[h] = (sum_t e_t * v_t (head_dim), max score, sum_t e_t) with e_t = exp(score_t - max).

    q: (n_heads, head_dim); scratch: (head_dim + group * ATTN_SPAN,): one widened key or value row,
    then the group's scores.  Each value row's products are added in position order; the dot
    products' order is kv._kv_vscores's (float32 and f16 caches) or _dot_rows's (Q8_0).
    """
    head_dim = q.shape[1]
    group = q.shape[0] // k_cache.shape[0]
    first = kv * group
    n = end - start
    row = scratch[:head_dim]
    scores = scratch[head_dim:head_dim + group * ATTN_SPAN].reshape(group, ATTN_SPAN)
    _span_scores(q, first, group, k_cache, kv, start, n, scale, row, scores)
    for g in range(group):
        best = np.float32(-np.inf)
        for t in range(n):
            best = max(best, scores[g, t])
        for t in range(n):
            scores[g, t] = _weight(scores[g, t] - best)
        partial[first + g, head_dim] = best
    _span_values(scores, group, n, v_cache, kv, start, partial, first, row)


@njit(**EXACT)
def _attend_spans(lo, hi, q, k_cache, v_cache, n_pos, scale, scratch, partial):
    n_kv = k_cache.shape[0]
    for job in range(lo, hi):
        span, kv = job // n_kv, job % n_kv
        _attend_span(q, k_cache, v_cache, kv, span * ATTN_SPAN, min(n_pos, (span + 1) * ATTN_SPAN), scale,
                     scratch[job], partial[span])


@njit(**EXACT)
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
    parallel_rows(_attend_spans, n_spans * n_kv, (q, k_cache, v_cache, n_pos, scale, scratch, partial))
    for h in range(n_heads):
        best = np.float32(-np.inf)
        for s in range(n_spans):
            best = max(best, partial[s, h, head_dim])
        total = 0.0
        out[h, :] = 0.0
        for s in range(n_spans):
            w = _weight(partial[s, h, head_dim] - best)
            total += partial[s, h, head_dim + 1] * w
            for i in range(head_dim):
                out[h, i] += w * partial[s, h, i]
        inv = np.float32(1.0 / total)
        for i in range(head_dim):
            out[h, i] *= inv
