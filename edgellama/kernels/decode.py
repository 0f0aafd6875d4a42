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
from .common import EXACT
from .kv import _kv_store
from .layout import embed_row, is_quantized
from .ops import _swiglu_inplace, rmsnorm, rope
from .products import Activation, Formats, activation_forms_of, matvec, quantize_activation

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
        _layer_matvec(w, m + ATTN_Q, xb, buf.qx, buf.q, tables)
        _layer_matvec(w, m + ATTN_K, xb, buf.qx, buf.k, tables)
        _layer_matvec(w, m + ATTN_V, xb, buf.qx, buf.v, tables)
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
        _layer_matvec(w, m + FFN_GATE, xb, buf.qx, hb, tables)
        _layer_matvec(w, m + FFN_UP, xb, buf.qx, buf.hb2, tables)
        _swiglu_inplace(hb, buf.hb2)
        _quantize(hb, buf.qh, w, m + FFN_DOWN, m + FFN_DOWN + 1)
        _layer_matvec(w, m + FFN_DOWN, hb, buf.qh, xb, tables)
        for i in range(x.shape[0]):
            x[i] += xb[i]
    # final norm and the vocabulary projection
    rmsnorm(x, w.output_norm, dims.eps, xb)
    quantize_activation(xb, buf.qx, w.formats, activation_forms_of(w.output_type))
    matvec(w.output, w.output_type, buf.logits.shape[0], xb, buf.qx, buf.logits, tables.f16, tables.bf16, w.formats)
