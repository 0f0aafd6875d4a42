"""The batched step's kernels (edgellama/kernels/batch.py) compute every row exactly as the one-token
kernels do, whatever the other rows: exact equality, not tolerances, because batch invariance
(tests/test_batch.py) rests on it.

* the int8 tiles: a token's row of ``matmul_packed`` (tiles of several tokens) and of
  ``matmul_rows`` (tiles of 8, 4 and 1) equals ``matvec_packed`` (one token) bit for bit, at every
  place in a tile and for every row count;
* ``attention_rows`` gives each row, in any slot, at any position, mixed with any other rows,
  ``attention_one``'s result bit for bit, for every KV cache element type.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellama import kernels as K
from test_kernels import (QUANT_TYPES, TYPE_NAMES, fit, packed, q8_cache, quantized_activation, random_activation,
                          random_matrix, threads, weight_bytes)  # noqa: F401  (threads: a fixture)


@pytest.mark.parametrize("wtype", QUANT_TYPES, ids=TYPE_NAMES.get)
def test_tile_rows_equal_one_token_rows(wtype, threads):
    """Rows of the several-token tiles = the one-token tile's, for 1..2 tiles + 1 tokens starting
    anywhere: a token's numbers do not depend on its neighbours in a tile, nor on how many there are."""
    rng = np.random.default_rng(wtype)
    n, rows = fit(wtype, 320), 37                 # a partial last row group
    raw = weight_bytes(random_matrix(rng, rows, n), wtype)
    weights = packed(raw, wtype)
    n_tok = 2 * K.tile_tokens() + 3
    x = np.stack([random_activation(rng, n, zero_block=(t % 3 == 0)) for t in range(n_tok)])
    qx = quantized_activation(x, wtype)
    alone = np.empty((n_tok, rows), np.float32)
    for t in range(n_tok):
        K.matvec_packed(weights, wtype, rows, *(a[t] for a in qx), alone[t])
    for count in range(1, 2 * K.tile_tokens() + 2):
        for start in (0, 1, n_tok - count):
            for kernel in (K.matmul_packed, K.matmul_rows):
                out = np.full((count, rows), np.nan, np.float32)
                kernel(weights, wtype, rows, *(np.ascontiguousarray(a[start:start + count]) for a in qx), out)
                np.testing.assert_array_equal(out, alone[start:start + count],
                                              err_msg=f"{kernel.__name__}: {count} tokens from {start}")


def _cache(kind, rng, n_slots, n_layers, n_kv, n_ctx, head_dim):
    """A slot cache of random keys or values: (n_slots, n_layers, n_kv, n_ctx, row)."""
    values = rng.standard_normal((n_slots, n_layers, n_kv, n_ctx, head_dim)) * 2
    if kind == "f32":
        return values.astype(np.float32)
    if kind == "f16":
        return values.astype(np.float16).view(np.uint16)
    flat = q8_cache(values.reshape(-1, n_ctx, head_dim), n_ctx)
    return flat.reshape(n_slots, n_layers, n_kv, n_ctx, -1)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_attention_rows_equal_attention_one(kind, threads):
    """Rows in different slots and layers' caches, at positions within, at and across span
    boundaries, some of them several positions of one slot (a prompt's chunk), in any order: each
    equals attention_one of that row alone over its slot."""
    rng = np.random.default_rng(len(kind))
    n_slots, n_layers, n_kv, group, head_dim, n_ctx = 3, 2, 2, 3, 32, 200
    n_heads = n_kv * group
    k = _cache(kind, rng, n_slots, n_layers, n_kv, n_ctx, head_dim)
    v = _cache(kind, rng, n_slots, n_layers, n_kv, n_ctx, head_dim)
    slots = np.array([0, 2, 1, 1, 1, 2, 0], np.int64)
    positions = np.array([0, 63, 64, 65, 66, 199, 130], np.int64)
    q = (rng.standard_normal((len(slots), n_heads, head_dim)) * 2).astype(np.float32)
    n_spans = -(-n_ctx // K.ATTN_SPAN)
    layer = 1
    want = np.empty_like(q)
    for t in range(len(slots)):
        scratch = np.full((n_spans * n_kv, head_dim + group * K.ATTN_SPAN), np.nan, np.float32)
        partial = np.full((n_spans, n_heads, head_dim + 2), np.nan, np.float32)
        K.attention_one(q[t], k[slots[t], layer], v[slots[t], layer], positions[t] + 1, scratch, partial, want[t])
    for order in (np.arange(len(slots)), np.arange(len(slots))[::-1], np.array([3, 0, 6, 1, 5, 2, 4])):
        for chunks in (1, 3, 16):
            rows = K.BatchRows(np.zeros(len(slots), np.int64), positions[order].copy(), slots[order].copy())
            jobs = np.full(len(slots) * n_spans * n_kv, -1, np.int64)
            first = np.full(len(slots), -1, np.int64)
            n_jobs = K.attention_jobs(rows, n_kv, jobs, first)
            scratch = np.full((chunks, head_dim + group * K.ATTN_SPAN), np.nan, np.float32)
            partial = np.full((len(slots), n_spans, n_heads, head_dim + 2), np.nan, np.float32)
            out = np.full_like(q, np.nan)
            K.attention_rows(np.ascontiguousarray(q[order]), k, v, layer, rows, jobs, first, n_jobs, scratch, partial,
                             out)
            np.testing.assert_array_equal(out, want[order], err_msg=f"order {order}, {chunks} chunks")
