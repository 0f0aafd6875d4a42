"""One token through the whole decoder in one compiled call (the decode step).

Its arguments come in named bundles (NamedTuples of arrays: Numba types each field), so that a
reader can check a call and pairs of the same type cannot be swapped: the weights, the model's
dimensions, the rope tables, the KV cache, the buffers of one sequence, the 16-bit float tables.
A layer's seven matrices are rows of ``DecodeWeights.mat_table`` in the order of ``LAYER_MATRICES``,
addressed by the slot constants ``ATTN_Q .. FFN_DOWN`` defined here once (the loader builds the
table with the same constants).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .attention import attention_one
from .common import EXACT, FAST
from .kv import _kv_store
from .layout import embed_row, is_k_quant, is_quantized
from .ops import _swiglu_inplace, rmsnorm, rope
from .parallel import num_threads, parallel_rows
from .products import Activation, Formats, _row_tile, activation_forms_of, as_formats, matvec, quantize_activation

# the seven matrices of a layer, as GGUF names them; slot i of a layer is LAYER_MATRICES[i]
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN = range(len(LAYER_MATRICES))
N_LAYER_MATRICES = len(LAYER_MATRICES)
# mat_table columns: where a matrix's view starts, its shape, its type, its output rows
MAT_OFFSET, MAT_ROWS, MAT_ROW_BYTES, MAT_TYPE, MAT_OUT = range(5)


class DecodeWeights(NamedTuple):
    """Every weight the decode step reads."""

    embd: np.ndarray        # embedding rows: the file's table, or the packed output copy (tied)
    embd_type: int          # their ggml type id
    embd_packed: bool       # whether embd is a packed copy
    blob: np.ndarray        # (file bytes,) uint8: the mapped file (float matrices are read from it)
    packed: np.ndarray      # (bytes,) uint8: every quantized layer matrix, packed
    mat_table: np.ndarray   # (n_layers * N_LAYER_MATRICES, 5) int64: MAT_* columns per matrix
    norms: np.ndarray       # (n_layers, 2, dim) float32: (attn_norm, ffn_norm) per layer
    output_norm: np.ndarray  # (dim,) float32
    output: np.ndarray      # the vocabulary projection: packed groups, or file rows
    output_type: int        # its ggml type id
    formats: Formats        # the packed types among all these matrices (the tiles compiled: products.Formats)


class Dims(NamedTuple):
    eps: np.float32         # RMSNorm epsilon
    n_heads: int
    n_kv_heads: int
    head_dim: int


class RopeTables(NamedTuple):
    cos: np.ndarray         # (n_ctx, rope_dim/2) float32
    sin: np.ndarray         # (n_ctx, rope_dim/2) float32


class KVCache(NamedTuple):
    k: np.ndarray           # (n_layers, n_kv_heads, n_ctx, row length) of a KV cache element type
    v: np.ndarray           # the same for values


class DecodeBuffers(NamedTuple):
    """What one token's pass writes; allocated once per sequence."""

    x: np.ndarray           # (dim,) residual stream
    xb: np.ndarray          # (dim,) normed / projected activation
    qx: Activation          # xb (or att) quantized, (dim,)
    q: np.ndarray           # (n_heads * head_dim,) query
    k: np.ndarray           # (n_kv_heads * head_dim,) key
    v: np.ndarray           # (n_kv_heads * head_dim,) value
    att: np.ndarray         # (dim,) attention output
    hb: np.ndarray          # (ffn,) gate, then silu(gate) * up
    hb2: np.ndarray         # (ffn,) up
    qh: Activation          # hb quantized, (ffn,)
    attn_scratch: np.ndarray  # see attention_one
    attn_partial: np.ndarray  # see attention_one
    logits: np.ndarray      # (n_vocab,)


class HalfTables(NamedTuple):
    f16: np.ndarray         # 65536 float32: IEEE half bit pattern -> value
    bf16: np.ndarray        # 65536 float32: bfloat16 bit pattern -> value


@njit(**EXACT)
def _layer_matvec(w, i, x, qx, out, tables):
    """out = matrix ``i`` of mat_table @ x (i = layer * N_LAYER_MATRICES + slot): a view into the packed
    buffer (quantized types) or into the mapped file (float types), as mat_table describes it.  The
    callers pass ``m + SLOT`` with ``m = layer * N_LAYER_MATRICES``, a run-time integer: a slot constant
    passed alone would be a literal, and Numba would compile this once per slot."""
    entry = w.mat_table[i]
    offset, n_rows, row_bytes, wtype = entry[MAT_OFFSET], entry[MAT_ROWS], entry[MAT_ROW_BYTES], entry[MAT_TYPE]
    source = w.packed if is_quantized(wtype) else w.blob
    m = source[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    matvec(m, wtype, entry[MAT_OUT], x, qx, out, tables.f16, tables.bf16, w.formats)


@njit(**EXACT)
def _layer_matvecs(w, first, end, x, qx, outs, tables):
    """outs[i - first] = matrix i of mat_table @ x for first <= i < end (matrices that take the same
    input: q, k, v; gate, up): when all are quantized, one parallel launch over all their row groups,
    each thread taking an equal share of their bytes (one launch and one wait instead of one per
    matrix, and no thread idle at the end of a small matrix such as k or v); the tiles are
    matvec_packed's, so every output is the same as _layer_matvec's.  ``outs``: a tuple of as many
    arrays as matrices or more (the rest unused)."""
    if all_quantized(w, first, end):
        threads = num_threads()
        parallel_rows(_byte_shares, threads, (w.packed, w.mat_table, first, end, qx, outs, threads, as_formats(w.formats)))
    else:
        for i in range(first, end):
            _layer_matvec(w, i, x, qx, outs[i - first], tables)


@njit(**EXACT)
def all_quantized(w, first, end):
    """Whether matrices first .. end-1 of mat_table are all packed (quantized) ones."""
    for i in range(first, end):
        if not is_quantized(w.mat_table[i, MAT_TYPE]):
            return False
    return True


@njit(**FAST)
def _byte_shares(lo, hi, packed, table, first, end, qx, outs, threads, formats):
    """Shares lo .. hi-1 of ``threads`` equal shares of the bytes of matrices first .. end-1, with
    the one-token tile."""
    for share in range(lo, hi):
        start, stop = share_bytes(table, first, end, share, threads)
        at = 0
        for i in range(first, end):
            n_groups, group_bytes = table[i, MAT_ROWS], table[i, MAT_ROW_BYTES]
            g0, g1 = groups_between(at, start, stop, n_groups, group_bytes)
            if g0 < g1:
                wtype, n_out = table[i, MAT_TYPE], table[i, MAT_OUT]
                offset = table[i, MAT_OFFSET]
                wp = packed[offset:offset + n_groups * group_bytes].reshape(n_groups, group_bytes)
                xq, xd, xs, xsum = qx.supers if is_k_quant(wtype) else qx.blocks
                nb = xd.shape[0]
                xq2, xd2, xs2, xsum2 = xq.reshape(1, xq.shape[0]), xd.reshape(1, nb), xs.reshape(1, nb), \
                    xsum.reshape(1, xsum.shape[0])
                out2 = outs[i - first].reshape(1, n_out)
                for g in range(g0, g1):
                    _row_tile(formats, wtype, wp, g, n_out, xq2, xd2, xs2, xsum2, 0, out2)
            at += n_groups * group_bytes


@njit(**EXACT)
def share_bytes(table, first, end, share, n_shares):
    """(start, stop): the bytes of share ``share`` of n_shares equal shares of matrices first ..
    end-1 of mat_table, counted from the first one's start."""
    total = 0
    for i in range(first, end):
        total += table[i, MAT_ROWS] * table[i, MAT_ROW_BYTES]
    return total * share // n_shares, total * (share + 1) // n_shares


@njit(**EXACT)
def groups_between(at, start, stop, n_groups, group_bytes):
    """(g0, g1): the row groups of a matrix whose bytes begin at ``at`` that begin within [start,
    stop) (a group belongs to the share its first byte falls in)."""
    g0 = max(0, -((at - start) // group_bytes))  # ceil((start - at) / group_bytes)
    return g0, min(n_groups, -((at - stop) // group_bytes))


@njit(**EXACT)
def consumer_forms(w, first, end):
    """(blocks, supers): the activation forms that matrices first .. end-1 of mat_table take
    (products.Activation): an input is quantized only as its consumers need it.  (Run-time
    integers, as _layer_matvec's: literals would compile this once per call site.)"""
    blocks = supers = False
    for i in range(first, end):
        b, k = activation_forms_of(w.mat_table[i, MAT_TYPE])
        blocks, supers = blocks or b, supers or k
    return blocks, supers


@njit(**EXACT)
def _quantize(x, qx, w, first, end):
    """x into qx as matrices first .. end-1 of mat_table take it."""
    quantize_activation(x, qx, w.formats, consumer_forms(w, first, end))


@njit(**EXACT)
def decode_token(token, pos, w, dims, rope_tables, cache, buf, tables):
    """Run one token at position ``pos`` through every layer; write its logits into buf.logits.

    w: DecodeWeights; dims: Dims; rope_tables: RopeTables; cache: KVCache, whose slot pos of every
    layer and KV head receives the token's key and value; buf: DecodeBuffers; tables: HalfTables.
    """
    n_heads, n_kv_heads, head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
    x, xb, att, hb = buf.x, buf.xb, buf.att, buf.hb
    embed_row(w.embd, w.embd_type, w.embd_packed, token, x, tables.f16, tables.bf16)
    cos = rope_tables.cos[pos]
    sin = rope_tables.sin[pos]
    for l in range(w.norms.shape[0]):
        m = l * N_LAYER_MATRICES  # this layer's first row of mat_table
        # attention block: pre-norm, one quantized activation shared by q, k and v
        rmsnorm(x, w.norms[l, 0], dims.eps, xb)
        _quantize(xb, buf.qx, w, m + ATTN_Q, m + ATTN_V + 1)
        _layer_matvecs(w, m + ATTN_Q, m + ATTN_V + 1, xb, buf.qx, (buf.q, buf.k, buf.v), tables)
        rope(buf.q, n_heads, head_dim, cos, sin)
        rope(buf.k, n_kv_heads, head_dim, cos, sin)
        # the new key/value enter the cache at slot pos, then the query attends over 0..pos
        for h in range(n_kv_heads):
            _kv_store(buf.k[h * head_dim:(h + 1) * head_dim], cache.k[l, h, pos])
            _kv_store(buf.v[h * head_dim:(h + 1) * head_dim], cache.v[l, h, pos])
        attention_one(buf.q.reshape(n_heads, head_dim), cache.k[l], cache.v[l], pos + 1, buf.attn_scratch,
                      buf.attn_partial, att.reshape(n_heads, head_dim))
        # output projection and residual
        _quantize(att, buf.qx, w, m + ATTN_OUTPUT, m + ATTN_OUTPUT + 1)
        _layer_matvec(w, m + ATTN_OUTPUT, att, buf.qx, xb, tables)
        for i in range(x.shape[0]):
            x[i] += xb[i]
        # feed-forward block: pre-norm, SwiGLU, down projection, residual
        rmsnorm(x, w.norms[l, 1], dims.eps, xb)
        _quantize(xb, buf.qx, w, m + FFN_GATE, m + FFN_UP + 1)
        _layer_matvecs(w, m + FFN_GATE, m + FFN_UP + 1, xb, buf.qx, (hb, buf.hb2, buf.hb2), tables)
        _swiglu_inplace(hb, buf.hb2)
        _quantize(hb, buf.qh, w, m + FFN_DOWN, m + FFN_DOWN + 1)
        _layer_matvec(w, m + FFN_DOWN, hb, buf.qh, xb, tables)
        for i in range(x.shape[0]):
            x[i] += xb[i]
    # final norm and the vocabulary projection
    rmsnorm(x, w.output_norm, dims.eps, xb)
    quantize_activation(xb, buf.qx, w.formats, activation_forms_of(w.output_type))
    matvec(w.output, w.output_type, buf.logits.shape[0], xb, buf.qx, buf.logits, tables.f16, tables.bf16, w.formats)
