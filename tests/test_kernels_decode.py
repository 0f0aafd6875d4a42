"""The fused launches of the decode step (kernels/decode.py ``_layer_matvecs``: q, k and v, or gate
and up, in one parallel launch whose threads take equal shares of the matrices' bytes) and of the
batched step (kernels/batch.py ``_layer_products_fused``, the same shares over several rows)
compute exactly what one ``_layer_matvec`` / ``_layer_products`` per matrix computes: the same
tiles for every row group, each group once, whatever the types side by side (Q4_K_M puts Q4_K and
Q6_K in one layer), the thread count, the number of rows or of shares; float matrices take the
per-matrix path."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama import kernels as K
from edgellama.kernels import batch as B
from edgellama.kernels import decode as D
from test_kernels import TYPE_NAMES, fit, packed, random_activation, random_matrix, readonly, threads, \
    weight_bytes  # noqa: F401  (threads: a fixture)

# (types of the matrices side by side, their output rows): q, k, v of a GQA layer, or gate and up
CASES = [
    ((12, 12, 14), (80, 37, 37)),   # Q4_K_M's q, k (Q4_K) and v (Q6_K)
    ((2, 2, 2), (64, 16, 16)),      # Q4_0, whole row groups
    ((8, 3, 6), (33, 17, 48)),      # block types of three record sizes, partial groups
    ((14, 13), (96, 96)),           # gate and up
    ((0, 0, 0), (40, 24, 24)),      # float32: one matvec per matrix
    ((2, 1, 2), (40, 24, 24)),      # a float16 matrix among quantized ones: one matvec per matrix
]


def _weights(rng, wtypes, rows, n_in):
    """A DecodeWeights holding these matrices as one layer's first len(wtypes) slots of mat_table:
    the quantized ones packed one after another (as the model's packed buffer), the float ones as
    rows of the file blob."""
    packed_parts, blob_parts, table = [], [], np.zeros((len(wtypes), 5), np.int64)
    at_packed = at_blob = 0
    for i, (wtype, n_out) in enumerate(zip(wtypes, rows)):
        raw = weight_bytes(random_matrix(rng, n_out, n_in), wtype)
        if wtype in (0, 1):
            view, at = raw, at_blob
            blob_parts.append(raw.reshape(-1))
            at_blob += raw.nbytes
        else:
            view, at = packed(raw, wtype), at_packed
            packed_parts.append(view.reshape(-1))
            at_packed += view.nbytes
        table[i] = (at, view.shape[0], view.shape[1], wtype, n_out)
    cat = lambda parts: readonly(np.concatenate(parts) if parts else np.zeros(64, np.uint8))
    empty = np.zeros((1, 1), np.float32)
    # tiles for every packed type: one compilation of each kernel for all the cases (a model's own
    # set of types would compile them once per set: minutes under the arm64 emulation)
    return K.DecodeWeights(empty, 0, False, cat(blob_parts), cat(packed_parts), table, empty, empty[0], empty,
                           0, K.ALL_FORMATS)


def _name(case):
    return "-".join(TYPE_NAMES[t] for t in case[0])


QUANTIZED = [c for c in CASES if not {0, 1} & set(c[0])]


@pytest.mark.parametrize("wtypes, rows", CASES, ids=[_name(c) for c in CASES])
def test_fused_launch_equals_one_matvec_per_matrix(wtypes, rows, threads):
    rng = np.random.default_rng(sum(wtypes) + len(rows))
    n_in = max(fit(t, 320) for t in wtypes)
    w = _weights(rng, wtypes, rows, n_in)
    x = random_activation(rng, n_in)
    qx = K.activation_room(n_in)
    K.quantize_activation(x, qx)
    alone = [np.full(n, np.nan, np.float32) for n in rows]
    for i in range(len(rows)):
        D._layer_matvec(w, i, x, qx, alone[i], K.HALF_TABLES)
    assert all(np.isfinite(a).all() for a in alone)
    outs = [np.full(n, np.nan, np.float32) for n in rows]
    padded = tuple(outs) + (np.zeros(1, np.float32),) * (3 - len(outs))  # the decode step passes 3
    D._layer_matvecs(w, 0, len(rows), x, qx, padded, K.HALF_TABLES)
    for i in range(len(rows)):
        np.testing.assert_array_equal(outs[i], alone[i], err_msg=f"matrix {i} ({TYPE_NAMES[wtypes[i]]})")


@pytest.mark.parametrize("wtypes, rows", QUANTIZED, ids=[_name(c) for c in QUANTIZED])
def test_byte_shares_cover_every_row_group_once(wtypes, rows):
    """Any number of shares, run one after another into outputs filled with NaN, gives every row:
    no group skipped (NaN left) or computed by two shares (each share alone writes only its groups,
    so the outputs of a share and the others' never overlap), at share boundaries inside a matrix,
    between matrices and inside a group."""
    rng = np.random.default_rng(len(rows))
    n_in = max(fit(t, 320) for t in wtypes)
    w = _weights(rng, wtypes, rows, n_in)
    x = random_activation(rng, n_in)
    qx = K.activation_room(n_in)
    K.quantize_activation(x, qx)
    alone = [np.empty(n, np.float32) for n in rows]
    for i in range(len(rows)):
        D._layer_matvec(w, i, x, qx, alone[i], K.HALF_TABLES)
    assert all(np.isfinite(a).all() for a in alone)
    for n_shares in range(1, 12):
        written = [np.zeros(n, np.int64) for n in rows]
        for share in range(n_shares):
            outs = tuple(np.full(n, np.nan, np.float32) for n in rows) + (np.zeros(1, np.float32),) * (3 - len(rows))
            D._byte_shares(share, share + 1, w.packed, w.mat_table, 0, len(rows), qx, outs, n_shares, w.formats)
            for i in range(len(rows)):
                done = ~np.isnan(outs[i])
                np.testing.assert_array_equal(outs[i][done], alone[i][done])
                written[i] += done
        for i in range(len(rows)):
            assert (written[i] == 1).all(), f"{n_shares} shares: matrix {i} rows written {written[i].tolist()}"


@pytest.mark.parametrize("wtypes, rows", CASES, ids=[_name(c) for c in CASES])
def test_fused_batch_products_equal_one_product_per_matrix(wtypes, rows, threads):
    """Rows of the batched step's fused products = _layer_products' (tiles of 8, 4 and 1 rows) for
    1 .. 2 tiles + 5 rows."""
    rng = np.random.default_rng(100 + sum(wtypes))
    n_in = max(fit(t, 320) for t in wtypes)
    w = _weights(rng, wtypes, rows, n_in)
    for n_rows in (1, 3, 4, K.tile_tokens() + 1, 2 * K.tile_tokens() + 5):
        x = np.stack([random_activation(rng, n_in, zero_block=r % 2 == 0) for r in range(n_rows)])
        qx = K.activation_room(n_in, n_rows)
        K.quantize_activation_rows(x, qx)
        alone = [np.full((n_rows, n), np.nan, np.float32) for n in rows]
        for i in range(len(rows)):
            B._layer_products(w, i, x, qx, alone[i], K.HALF_TABLES)
        assert all(np.isfinite(a).all() for a in alone)
        outs = [np.full((n_rows, n), np.nan, np.float32) for n in rows]
        padded = tuple(outs) + (np.zeros((n_rows, 1), np.float32),) * (3 - len(outs))
        B._layer_products_fused(w, 0, len(rows), x, qx, padded, K.HALF_TABLES)
        for i in range(len(rows)):
            np.testing.assert_array_equal(outs[i], alone[i], err_msg=f"{n_rows} rows, matrix {i}")


@pytest.mark.parametrize("wtypes, rows", QUANTIZED, ids=[_name(c) for c in QUANTIZED])
def test_batch_byte_shares_cover_every_row_group_once(wtypes, rows):
    rng = np.random.default_rng(200 + len(rows))
    n_in = max(fit(t, 320) for t in wtypes)
    w = _weights(rng, wtypes, rows, n_in)
    n_rows = K.tile_tokens() + 5
    x = np.stack([random_activation(rng, n_in) for _ in range(n_rows)])
    qx = K.activation_room(n_in, n_rows)
    K.quantize_activation_rows(x, qx)
    alone = [np.empty((n_rows, n), np.float32) for n in rows]
    for i in range(len(rows)):
        B._layer_products(w, i, x, qx, alone[i], K.HALF_TABLES)
    assert all(np.isfinite(a).all() for a in alone)
    for n_shares in (1, 2, 3, 5, 11):
        written = [np.zeros((n_rows, n), np.int64) for n in rows]
        for share in range(n_shares):
            outs = tuple(np.full((n_rows, n), np.nan, np.float32) for n in rows) + \
                (np.zeros((n_rows, 1), np.float32),) * (3 - len(rows))
            B._rows_byte_shares(share, share + 1, w.packed, w.mat_table, 0, len(rows), qx, outs, n_shares,
                                w.formats)
            for i in range(len(rows)):
                done = ~np.isnan(outs[i])
                np.testing.assert_array_equal(outs[i][done], alone[i][done])
                written[i] += done
        for i in range(len(rows)):
            assert (written[i] == 1).all(), f"{n_shares} shares: matrix {i}"
