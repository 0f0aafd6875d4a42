"""Several sequences through the decoder in one compiled call (the batch step).

A batch is a set of rows: each row is one token of one sequence, at its own position, with its own
region of the KV cache (its slot).  A step may mix the next prompt tokens of some sequences with
one generated token of others.  The products run over all rows at once (``matmul_rows``: each
quantized weight is read once per step for every sequence, which is what makes a batch fast on a
memory-bound decode), everything else is per row: RMSNorm, activation quantization, RoPE at the
row's position, the KV store into the row's slot, and attention over the row's own slot.

**Batch invariance.**  A row's numbers do not depend on the other rows of its batch, nor on how a
prompt is cut into steps: the int8 tiles give every token the same arithmetic whatever the tile
(tests/test_kernels_batch.py checks every type, tile size and position in the tile), float
weights go through the one-token kernels row by row (never BLAS), and every row, prompt or
generated, attends through the one-token path: spans of ATTN_SPAN cached positions, one job per
(row, span, KV head) whatever the batch, merged per row in span order exactly as
``attention_one`` merges them.  A generated token's row therefore computes what ``decode_token``
computes for it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from .attention import ATTN_SPAN, _attend_span, _merge_head
from .common import EXACT, FAST, T_F16, T_F32
from .decode import (ATTN_OUTPUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP, MAT_OFFSET, MAT_OUT, MAT_ROW_BYTES,
                     MAT_ROWS, MAT_TYPE, N_LAYER_MATRICES, all_quantized, consumer_forms, groups_between,
                     share_bytes)
from .kv import _kv_store
from .layout import embed_row, is_k_quant, is_quantized
from .parallel import num_threads, parallel_rows
from .ops import _swiglu_inplace, rmsnorm, rmsnorm_rows, rope, rope_rows, swiglu
from .products import _TILE_TOKENS, ALL_FORMATS, _row_tile, _tile, _token_tile, as_formats, in_formats, \
    Activation, activation_forms_of, matvec_f32, matvec_half, quantize_activation_range, quantize_activation_rows

# up to this many rows (a step of generated tokens), the per-row work runs on one thread: a few
# microseconds each, less than waking the others (the products and attention still use them all)
SERIAL_ROWS = 8


class BatchRows(NamedTuple):
    """What each row of a step carries."""

    tokens: np.ndarray      # (R,) int64 token ids
    positions: np.ndarray   # (R,) int64: the row's position in its sequence
    slots: np.ndarray       # (R,) int64: the KV cache region (slot) of the row's sequence


class SlotCache(NamedTuple):
    """One KV cache region per slot: slot s is laid out exactly as a one-sequence cache."""

    k: np.ndarray           # (n_slots, n_layers, n_kv_heads, n_ctx, row length) of a KV cache element type
    v: np.ndarray           # the same for values


class BatchBuffers(NamedTuple):
    """What a step writes, for R rows (views of the first R rows of buffers allocated once), and M
    output rows (the rows whose logits or hidden states are wanted)."""

    x: np.ndarray           # (R, dim) residual stream
    xb: np.ndarray          # (R, dim) normed / projected activations
    qx: Activation          # xb (or att) quantized: forms of (R, dim) int8, (R, dim/32) x2, (R, dim/16)
    q: np.ndarray           # (R, n_heads * head_dim) queries
    k: np.ndarray           # (R, n_kv_heads * head_dim) keys
    v: np.ndarray           # (R, n_kv_heads * head_dim) values
    att: np.ndarray         # (R, dim) attention outputs
    hb: np.ndarray          # (R, ffn) gate, then silu(gate) * up
    hb2: np.ndarray         # (R, ffn) up
    qh: Activation          # hb quantized, (R, ffn)
    attn_jobs: np.ndarray   # (R * n_spans,) int64: the row of each (row, span, KV head) attention job
    attn_first: np.ndarray  # (R,) int64: each row's first job
    attn_scratch: np.ndarray  # (n_chunks, head_dim + group * ATTN_SPAN): one per chunk of jobs
    attn_partial: np.ndarray  # (R, n_spans, n_heads, head_dim + 2): each row's per-span partial sums
    out_rows: np.ndarray    # (M,) int64: the rows whose final hidden state (and logits) are wanted
    hidden: np.ndarray      # (M, dim): their final normed hidden states
    qo: Activation          # hidden quantized, (M, dim)
    logits: np.ndarray      # (M, n_vocab)


_quad_tile = _tile(4) if _TILE_TOKENS > 4 else _token_tile


@njit(**FAST)
def matmul_rows(wp, wtype, n_out, xq, xd, xs, xsum, out, formats=ALL_FORMATS):
    """out (R, n_out) = x @ W.T for a packed quantized W, as ``matmul_packed`` computes it, but with
    no token computed twice: whole tiles of _TILE_TOKENS tokens, then of 4, then single tokens (a
    step of 4 generated tokens takes one tile of 4 where a tile of 8 would compute 8).  Every token's
    row is the same whatever the tile (tests/test_kernels_batch.py).  ``formats``: the packed types
    to compile tiles for (products.Formats; wtype among them)."""
    if not in_formats(formats, wtype):
        raise ValueError("the weight type is not among the formats the tiles were compiled for")
    parallel_rows(_matmul_rows_groups, wp.shape[0], (wp, wtype, n_out, xq, xd, xs, xsum, out, as_formats(formats)))


@njit(**FAST)
def _matmul_rows_groups(lo, hi, wp, wtype, n_out, xq, xd, xs, xsum, out, formats):
    n = xq.shape[0]
    for g in range(lo, hi):
        t = 0
        while n - t >= _TILE_TOKENS:
            _token_tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t, out)
            t += _TILE_TOKENS
        while n - t >= 4:
            _quad_tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t, out)
            t += 4
        while t < n:
            _row_tile(formats, wtype, wp, g, n_out, xq, xd, xs, xsum, t, out)
            t += 1


@njit(**EXACT)
def _row_products(m, wtype, n_out, x, qx, out, tables, formats):
    """out (R, n_out) = x @ W.T: the int8 tiles over every row at once for a quantized W, the
    one-token float kernels row by row otherwise (the numbers of decode, never BLAS's)."""
    if is_quantized(wtype):
        a = qx.supers if is_k_quant(wtype) else qx.blocks
        matmul_rows(m, wtype, n_out, a.q, a.d, a.s, a.sums, out, formats)
    elif wtype == T_F32:
        for t in range(x.shape[0]):
            matvec_f32(m, x[t], out[t])
    elif wtype == T_F16:
        for t in range(x.shape[0]):
            matvec_half(m, x[t], out[t], tables.f16)
    else:
        for t in range(x.shape[0]):
            matvec_half(m, x[t], out[t], tables.bf16)


@njit(**EXACT)
def _layer_products(w, i, x, qx, out, tables):
    """out = x @ (matrix ``i`` of mat_table).T, i = layer * N_LAYER_MATRICES + slot (as decode's
    _layer_matvec: a run-time integer, so that this compiles once, not once per slot literal)."""
    entry = w.mat_table[i]
    offset, n_rows, row_bytes, wtype = entry[MAT_OFFSET], entry[MAT_ROWS], entry[MAT_ROW_BYTES], entry[MAT_TYPE]
    source = w.packed if is_quantized(wtype) else w.blob
    m = source[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    _row_products(m, wtype, entry[MAT_OUT], x, qx, out, tables, w.formats)


@njit(**EXACT)
def _layer_products_fused(w, first, end, x, qx, outs, tables):
    """outs[i - first] = x @ (matrix i of mat_table).T for first <= i < end (matrices that take the
    same input: q, k, v; gate, up): when all are quantized, one parallel launch over all their row
    groups, each thread an equal share of their bytes (decode._layer_matvecs' shares), each group
    as matmul_rows computes it, so every row is _layer_products'.  ``outs``: a tuple of as many
    arrays as matrices or more (the rest unused)."""
    if all_quantized(w, first, end):
        threads = num_threads()
        parallel_rows(_rows_byte_shares, threads,
                      (w.packed, w.mat_table, first, end, qx, outs, threads, as_formats(w.formats)))
    else:
        for i in range(first, end):
            _layer_products(w, i, x, qx, outs[i - first], tables)


@njit(**FAST)
def _rows_byte_shares(lo, hi, packed, table, first, end, qx, outs, threads, formats):
    for share in range(lo, hi):
        start, stop = share_bytes(table, first, end, share, threads)
        at = 0
        for i in range(first, end):
            n_groups, group_bytes = table[i, MAT_ROWS], table[i, MAT_ROW_BYTES]
            g0, g1 = groups_between(at, start, stop, n_groups, group_bytes)
            if g0 < g1:
                wtype, offset = table[i, MAT_TYPE], table[i, MAT_OFFSET]
                wp = packed[offset:offset + n_groups * group_bytes].reshape(n_groups, group_bytes)
                a = qx.supers if is_k_quant(wtype) else qx.blocks
                _matmul_rows_groups(g0, g1, wp, wtype, table[i, MAT_OUT], a.q, a.d, a.s, a.sums, outs[i - first],
                                    formats)
            at += n_groups * group_bytes


# Per-row work: the one-token functions row by row, on one thread for a few rows, else in parallel
# over rows (the same function computes each row either way: the same numbers).

@njit(**EXACT)
def _rmsnorm_rows(x, weight, eps, out):
    if x.shape[0] > SERIAL_ROWS:
        rmsnorm_rows(x, weight, eps, out)
    else:
        for t in range(x.shape[0]):
            rmsnorm(x[t], weight, eps, out[t])


@njit(**EXACT)
def _quantize_rows(x, qx, formats, forms):
    if x.shape[0] > SERIAL_ROWS:
        quantize_activation_rows(x, qx, formats, forms)
    else:
        quantize_activation_range(0, x.shape[0], x, qx, formats, forms)


@njit(**EXACT)
def _rope_rows(x, positions, n_heads, head_dim, rope_tables):
    if x.shape[0] > SERIAL_ROWS:
        rope_rows(x, positions, n_heads, head_dim, rope_tables.cos, rope_tables.sin)
    else:
        for t in range(x.shape[0]):
            p = positions[t]
            rope(x[t], n_heads, head_dim, rope_tables.cos[p], rope_tables.sin[p])


@njit(**EXACT)
def _swiglu_rows(gate, up):
    if gate.shape[0] > SERIAL_ROWS:
        swiglu(gate, up)
    else:
        for t in range(gate.shape[0]):
            _swiglu_inplace(gate[t], up[t])


@njit(**EXACT)
def _store_row(k_cache, v_cache, layer, rows, k, v, t):
    n_kv = k_cache.shape[2]
    head_dim = k.shape[1] // n_kv
    slot, pos = rows.slots[t], rows.positions[t]
    for h in range(n_kv):
        _kv_store(k[t, h * head_dim:(h + 1) * head_dim], k_cache[slot, layer, h, pos])
        _kv_store(v[t, h * head_dim:(h + 1) * head_dim], v_cache[slot, layer, h, pos])


@njit(**EXACT)
def _store_row_range(lo, hi, k_cache, v_cache, layer, rows, k, v):
    for t in range(lo, hi):
        _store_row(k_cache, v_cache, layer, rows, k, v, t)


@njit(**EXACT)
def store_rows(k_cache, v_cache, layer, rows, k, v):
    """Each row's key and value into its slot at its position, for every KV head.
    k_cache, v_cache: (n_slots, n_layers, n_kv_heads, n_ctx, row length); k, v: (R, n_kv * head_dim)."""
    if k.shape[0] > SERIAL_ROWS:
        parallel_rows(_store_row_range, k.shape[0], (k_cache, v_cache, layer, rows, k, v))
    else:
        for t in range(k.shape[0]):
            _store_row(k_cache, v_cache, layer, rows, k, v, t)


@njit(**EXACT)
def attention_jobs(rows, n_kv, jobs, first):
    """The (row, span, KV head) jobs of one-token attention for every row: jobs[j] = the row of
    job j, first[t] = row t's first job; returns their count."""
    total = 0
    for t in range(rows.positions.shape[0]):
        first[t] = total
        n = (rows.positions[t] + ATTN_SPAN) // ATTN_SPAN * n_kv  # spans over positions 0..pos
        for j in range(n):
            jobs[total + j] = t
        total += n
    return total


@njit(**EXACT)
def attention_rows(q, k_cache, v_cache, layer, rows, jobs, first, n_jobs, scratch, partial, out):
    """One-token grouped-query attention of every row over its own slot, positions 0..pos.

    q, out: (R, n_heads, head_dim); k_cache, v_cache: (n_slots, n_layers, n_kv_heads, n_ctx, row);
    jobs, first, n_jobs: from attention_jobs; scratch: (n_chunks, head_dim + group * ATTN_SPAN);
    partial: (R, n_spans, n_heads, head_dim + 2).  Each job is ``attention_one``'s job for that
    row, span and KV head, and each row's spans are merged as ``attention_one`` merges them: a row
    gets attention_one's numbers, whatever the other rows and whichever chunk runs its jobs.
    """
    scale = np.float32(1.0 / math.sqrt(q.shape[2]))
    n_chunks = min(scratch.shape[0], n_jobs)
    parallel_rows(_attention_chunks, n_chunks,
                  (q, k_cache, v_cache, layer, rows, jobs, first, n_jobs, n_chunks, scale, scratch, partial))
    parallel_rows(_merge_spans, q.shape[0], (rows, partial, out))


@njit(**EXACT)
def _attention_chunks(lo, hi, q, k_cache, v_cache, layer, rows, jobs, first, n_jobs, n_chunks, scale, scratch,
                      partial):
    n_kv = k_cache.shape[2]
    group = q.shape[1] // n_kv
    for c in range(lo, hi):
        for job in range(c, n_jobs, n_chunks):
            t = jobs[job]
            local = job - first[t]
            span, kv = local // n_kv, local % n_kv
            n_pos = rows.positions[t] + 1
            slot = rows.slots[t]
            _attend_span(q[t], k_cache[slot, layer], v_cache[slot, layer], kv, span * ATTN_SPAN,
                         min(n_pos, (span + 1) * ATTN_SPAN), scale, scratch[c], partial[t, span], kv * group)


@njit(**EXACT)
def _merge_spans(lo, hi, rows, partial, out):
    for t in range(lo, hi):
        n_spans = (rows.positions[t] + ATTN_SPAN) // ATTN_SPAN
        for h in range(out.shape[1]):
            _merge_head(partial[t], n_spans, h, out[t, h])


@njit(**EXACT)
def forward_rows(rows, w, dims, rope_tables, cache, buf, tables, want_logits):
    """Run every row of a step through the decoder: rows (BatchRows) of R tokens, each at its
    position in its slot of ``cache`` (SlotCache), whose K/V there it writes; then the final
    normed hidden state of each of buf.out_rows into buf.hidden and, with ``want_logits``, their
    logits into buf.logits.  w: DecodeWeights; dims: Dims; rope_tables: RopeTables;
    buf: BatchBuffers of R rows; tables: HalfTables.
    """
    n_heads, n_kv_heads, head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
    n_rows = rows.tokens.shape[0]
    x, xb, att, hb = buf.x, buf.xb, buf.att, buf.hb
    for t in range(n_rows):
        embed_row(w.embd, w.embd_type, w.embd_packed, rows.tokens[t], x[t], tables.f16, tables.bf16)
    n_jobs = attention_jobs(rows, n_kv_heads, buf.attn_jobs, buf.attn_first)
    q3 = buf.q.reshape(n_rows, n_heads, head_dim)
    att3 = att.reshape(n_rows, n_heads, head_dim)
    for l in range(w.norms.shape[0]):
        m = l * N_LAYER_MATRICES  # this layer's first row of mat_table
        # attention block: pre-norm, one quantized activation per row shared by q, k and v
        _rmsnorm_rows(x, w.norms[l, 0], dims.eps, xb)
        _quantize_rows(xb, buf.qx, w.formats, consumer_forms(w, m + ATTN_Q, m + ATTN_V + 1))
        _layer_products_fused(w, m + ATTN_Q, m + ATTN_V + 1, xb, buf.qx, (buf.q, buf.k, buf.v), tables)
        _rope_rows(buf.q, rows.positions, n_heads, head_dim, rope_tables)
        _rope_rows(buf.k, rows.positions, n_kv_heads, head_dim, rope_tables)
        # every row's key/value enter its slot first, then each row attends over its slot's 0..pos
        store_rows(cache.k, cache.v, l, rows, buf.k, buf.v)
        attention_rows(q3, cache.k, cache.v, l, rows, buf.attn_jobs, buf.attn_first, n_jobs, buf.attn_scratch,
                       buf.attn_partial, att3)
        # output projection and residual
        _quantize_rows(att, buf.qx, w.formats, consumer_forms(w, m + ATTN_OUTPUT, m + ATTN_OUTPUT + 1))
        _layer_products(w, m + ATTN_OUTPUT, att, buf.qx, xb, tables)
        for t in range(n_rows):
            for i in range(x.shape[1]):
                x[t, i] += xb[t, i]
        # feed-forward block: pre-norm, SwiGLU, down projection, residual
        _rmsnorm_rows(x, w.norms[l, 1], dims.eps, xb)
        _quantize_rows(xb, buf.qx, w.formats, consumer_forms(w, m + FFN_GATE, m + FFN_UP + 1))
        _layer_products_fused(w, m + FFN_GATE, m + FFN_UP + 1, xb, buf.qx, (hb, buf.hb2, buf.hb2), tables)
        _swiglu_rows(hb, buf.hb2)
        _quantize_rows(hb, buf.qh, w.formats, consumer_forms(w, m + FFN_DOWN, m + FFN_DOWN + 1))
        _layer_products(w, m + FFN_DOWN, hb, buf.qh, xb, tables)
        for t in range(n_rows):
            for i in range(x.shape[1]):
                x[t, i] += xb[t, i]
    # final norm of the wanted rows, and their vocabulary projection
    for i in range(buf.out_rows.shape[0]):
        rmsnorm(x[buf.out_rows[i]], w.output_norm, dims.eps, buf.hidden[i])
    if want_logits:
        _quantize_rows(buf.hidden, buf.qo, w.formats, activation_forms_of(w.output_type))
        _row_products(w.output, w.output_type, buf.logits.shape[1], buf.hidden, buf.qo, buf.logits, tables,
                      w.formats)
