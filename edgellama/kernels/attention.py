"""Grouped-query attention over the KV cache: a prompt's tokens (causal), its query rows 16 at a
time in vector lanes with a running softmax (lanes.py); and one token's in spans of cached
positions merged flash-decoding style (every thread works on long contexts).  Neither result
depends on the thread count."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .common import EXACT, FAST
from .kv import _kv_load, _kv_vscores, _kv_vsum
from .lanes import LANES, _lane_scores, _lane_softmax, _lane_values
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
def attention(q, k_cache, v_cache, first_pos, work, out):
    """Causal grouped-query attention of T new tokens over the cache.

    q: (T, n_heads, head_dim) for positions first_pos .. first_pos + T - 1;
    k_cache, v_cache: (n_kv_heads, n_ctx, head_dim) already holding those positions;
    work: (n_chunks, prompt_work_size(head_dim)) float32, one row per chunk of jobs (one chunk
    per thread suffices); out: (T, n_heads, head_dim).  Token t sees positions 0 .. first_pos + t
    (the causal mask); query head h reads KV head h // (n_heads / n_kv_heads).

    A KV head's query rows (token by token, the group's heads in order) are cut into blocks of
    LANES; one job per (block, KV head) takes its rows down the cached positions together, a span
    of ATTN_SPAN at a time (see _attend_lanes).  Jobs are dealt to the chunks in turn, so that the
    early tokens' shorter jobs do not all land on one thread; a row's numbers do not depend on
    the chunk count.
    """
    n_tokens, n_heads, _ = q.shape
    n_kv = k_cache.shape[0]
    n_blocks = (n_tokens * (n_heads // n_kv) + LANES - 1) // LANES
    n_work = n_blocks * n_kv
    n_chunks = min(work.shape[0], n_work)
    scale = np.float32(1.0 / math.sqrt(q.shape[2]))
    parallel_rows(_attend_chunks, n_chunks, (q, k_cache, v_cache, first_pos, n_work, n_chunks, scale, work, out))


def prompt_work_size(head_dim: int) -> int:
    """float32 elements of one row of ``attention``'s work array: a span's keys or values widened
    (ATTN_SPAN, head_dim), the queries and the outputs transposed (head_dim, LANES) each, a span's
    scores (ATTN_SPAN, LANES), and two per-lane rows (running maxima, rescaling factors)."""
    return (ATTN_SPAN + 2 * LANES) * head_dim + ATTN_SPAN * LANES + 2 * LANES


@njit(**EXACT)
def _attend_chunks(lo, hi, q, k_cache, v_cache, first_pos, n_work, n_chunks, scale, work, out):
    n_kv = k_cache.shape[0]
    total = np.empty(LANES, np.float64)  # (this range's: the work rows are float32)
    limit = np.empty(LANES, np.int64)
    for c in range(lo, hi):
        for job in range(c, n_work, n_chunks):
            _attend_lanes(q, k_cache, v_cache, first_pos, job % n_kv, job // n_kv, scale, work[c], total, limit, out)


@njit(**EXACT)
def _attend_lanes(q, k_cache, v_cache, first_pos, kv, block, scale, work, total, limit, out):
    """Rows block * LANES .. of KV head kv's query rows (row r: token r // group, head
    kv * group + r % group), flash-attention style: span by span, each lane's scores (a
    sequential dot product, lanes.py), its running maximum m and weights exp(score - m); when m
    grows, the lane's weight sum and outputs so far are scaled by exp(m_old - m_new) (both by the
    same rounded factor, so that its rounding cancels in their ratio); at the end each output is
    divided by its weight sum.  Positions a lane's token does not see (the causal mask) are -inf."""
    n_tokens, n_heads, hd = q.shape
    group = n_heads // k_cache.shape[0]
    r0 = block * LANES
    count = min(LANES, n_tokens * group - r0)
    o = ATTN_SPAN * hd
    rows = work[:o]
    qt = work[o:o + hd * LANES]
    acct = work[o + hd * LANES:o + 2 * hd * LANES]
    o += 2 * hd * LANES
    st = work[o:o + ATTN_SPAN * LANES]
    o += ATTN_SPAN * LANES
    m, alpha = work[o:o + LANES], work[o + LANES:o + 2 * LANES]
    total[:] = 0.0  # each lane's weight sum
    limit[:] = 0  # positions each lane sees (0: an unused lane)
    qt[:] = 0.0
    acct[:] = 0.0
    m[:] = 0.0  # an unused lane: every position masked, weights exp(-inf) = 0
    for j in range(count):
        t, h = (r0 + j) // group, kv * group + (r0 + j) % group
        limit[j] = first_pos + t + 1
        m[j] = -np.inf
        for i in range(hd):
            qt[i * LANES + j] = q[t, h, i]
    end = limit[count - 1]
    keys, values = k_cache[kv], v_cache[kv]
    for p0 in range(0, end, ATTN_SPAN):
        n = min(ATTN_SPAN, end - p0)
        for t in range(n):
            _kv_load(keys[p0 + t], rows[t * hd:(t + 1) * hd])
        _lane_scores(rows, qt, n, hd, st)
        _lane_softmax(st, n, p0, limit, m, scale, alpha, total)
        for t in range(n):
            _kv_load(values[p0 + t], rows[t * hd:(t + 1) * hd])
        _lane_values(rows, st, n, hd, acct, alpha)
    for j in range(count):
        t, h = (r0 + j) // group, kv * group + (r0 + j) % group
        inv = np.float32(1.0 / total[j])
        for i in range(hd):
            out[t, h, i] = acct[i * LANES + j] * inv


ATTN_SPAN = 64  # cached positions per job of one-token attention, and per step of a prompt's lanes


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
def _attend_span(q, k_cache, v_cache, kv, start, end, scale, scratch, partial, prow):
    """The query heads of KV head kv over cached positions start..end-1, not normalized: for its
    g-th head h, partial[prow + g] = (sum_t e_t * v_t (head_dim), max score, sum_t e_t) with
    e_t = exp(score_t - max).

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
        partial[prow + g, head_dim] = best
    _span_values(scores, group, n, v_cache, kv, start, partial, prow, row)


@njit(**EXACT)
def _attend_spans(lo, hi, q, k_cache, v_cache, n_pos, scale, scratch, partial):
    n_kv = k_cache.shape[0]
    group = q.shape[0] // n_kv
    for job in range(lo, hi):
        span, kv = job // n_kv, job % n_kv
        _attend_span(q, k_cache, v_cache, kv, span * ATTN_SPAN, min(n_pos, (span + 1) * ATTN_SPAN), scale,
                     scratch[job], partial[span], kv * group)


@njit(**EXACT)
def _merge_head(partial, n_spans, h, out):
    """out (head_dim,) = the normalized attention of head row h from its spans' partial sums
    partial[:n_spans, h] (see _attend_span): rescaled by their maxima, added in span order."""
    head_dim = out.shape[0]
    best = np.float32(-np.inf)
    for s in range(n_spans):
        best = max(best, partial[s, h, head_dim])
    total = 0.0
    out[:] = 0.0
    for s in range(n_spans):
        w = _weight(partial[s, h, head_dim] - best)
        total += partial[s, h, head_dim + 1] * w
        for i in range(head_dim):
            out[i] += w * partial[s, h, i]
    inv = np.float32(1.0 / total)
    for i in range(head_dim):
        out[i] *= inv


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
        _merge_head(partial, n_spans, h, out[h])
