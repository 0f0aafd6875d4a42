"""Every Numba kernel of edgellama.kernels against an independent numpy twin written here.

The twins share no code with the kernels: weight bytes are made and decoded by gguf-py
(``gguf.quants``), the Q8 activation grid, RoPE, attention, RMSNorm and SwiGLU are re-derived in
numpy (mostly float64).  Shapes include row counts that are not multiples of the thread count,
single blocks, read-only weight views and a real read-only ``np.memmap``; every kernel that runs a
parallel loop (kernels.parallel.parallel_rows) is run with 1 and 2 threads.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgellama import kernels as K
from edgellama.quants import BLOCK_LAYOUT, GGMLType

import error_bounds as eb

F16, BF16 = K.F16_TABLE, K.BF16_TABLE
GGUF_TYPES = {0: QT.F32, 1: QT.F16, 2: QT.Q4_0, 3: QT.Q4_1, 6: QT.Q5_0, 7: QT.Q5_1, 8: QT.Q8_0,
              12: QT.Q4_K, 13: QT.Q5_K, 14: QT.Q6_K, 30: QT.BF16}
TYPE_NAMES = {t: q.name for t, q in GGUF_TYPES.items()}
ALL_TYPES = list(GGUF_TYPES)
QUANT_TYPES = (2, 3, 6, 7, 8, 12, 13, 14)
K_TYPES = (12, 13, 14)   # 256-element super-blocks
ODD_ROWS = [1, 3, 7, 33, 257]


# ----- fixtures and builders --------------------------------------------------------------------

@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba has only {numba.config.NUMBA_NUM_THREADS} thread(s)")
    old = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(old)


def random_matrix(rng, rows, cols, zero_row=True, zero_block=True):
    """float32 (rows, cols) with per-row scales spanning decades, one all-zero row and block."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= np.float32(10.0) ** rng.uniform(-2, 1, size=(rows, 1)).astype(np.float32)
    if zero_row and rows > 2:
        w[rows // 2] = 0.0
    if zero_block and cols >= 64:
        w[0, 32:64] = 0.0
    return w


def fit(wtype: int, n: int) -> int:
    """A row length near n that type wtype can hold (K-quants: multiples of 256)."""
    return -(-n // 256) * 256 if wtype in K_TYPES else n


def kquant_bytes(w: np.ndarray, wtype: int) -> np.ndarray:
    """K-quant rows shaped like w (gguf-py has no K-quant quantizer): random quants and 6-bit
    factors, which are all valid, under finite f16 super-block scales that follow w's magnitudes;
    w's all-zero rows get zero scales."""
    rows, cols = w.shape
    block = {12: 144, 13: 176, 14: 210}[wtype]
    rng = np.random.default_rng(rows * 1000 + cols + wtype)
    raw = rng.integers(0, 256, (rows, cols // 256, block), dtype=np.uint8)
    size = np.abs(w).reshape(rows, -1, 256).mean(axis=-1)                       # (rows, super-blocks)
    d = (size * rng.uniform(0.02, 0.06, size.shape)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if wtype == 14:
        raw[..., 208:210] = d
    else:
        raw[..., 0:2] = d
        dmin = (size * rng.uniform(0.01, 0.04, size.shape)).astype(np.float16)
        raw[..., 2:4] = dmin.view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def weight_bytes(w: np.ndarray, wtype: int) -> np.ndarray:
    """(rows, cols) float32 -> (rows, row_bytes) uint8 in ggml type ``wtype`` (writable)."""
    if wtype in K_TYPES:
        return kquant_bytes(w, wtype)
    if wtype == 0:
        raw = np.ascontiguousarray(w, dtype=np.float32).view(np.uint8)
    elif wtype == 1:
        raw = np.ascontiguousarray(w.astype(np.float16)).view(np.uint8)
    else:
        raw = gguf_quantize(np.ascontiguousarray(w, dtype=np.float32), GGUF_TYPES[wtype])
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(w.shape[0], -1)
    return raw


def reference_weights(raw: np.ndarray, wtype: int) -> np.ndarray:
    return gguf_dequantize(np.array(raw), GGUF_TYPES[wtype]).astype(np.float32).reshape(raw.shape[0], -1)


def place(raw: np.ndarray, how: str, tmp_path) -> np.ndarray:
    """The bytes as the kernels get them (always read-only, so each kernel compiles once per array
    type, as in the model): a read-only array, or a read-only slice of an ``np.memmap`` over a
    file where the tensor sits at an aligned offset."""
    if how == "readonly":
        ro = raw.copy()
        ro.setflags(write=False)
        return ro
    assert how == "memmap"
    offset = 96  # GGUF data is 32-byte aligned; the tensor is not at the start of the file
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(b"\xab" * offset + raw.tobytes() + b"\xcd" * 40)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    view = mm[offset:offset + raw.size].reshape(raw.shape)
    assert not view.flags.writeable and isinstance(view, np.memmap)
    return view


def half_round(v):
    """float32 -> nearest IEEE half (ties to even) -> float32, numpy's own conversion."""
    return np.asarray(v, dtype=np.float32).astype(np.float16).astype(np.float32)


def q8_twin(x: np.ndarray):
    """ggml's x86 activation quantization of a (n,) float32 vector, per 32-block:
    amax = max|x|, d = amax/127, q = rint(x * (127/amax)) (ties to even, float32 product),
    stored d = half(d), s = half(d * sum(q)).  Returns (q int8, d_half, s_half, d_unrounded)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127.0)
    inv = np.zeros_like(amax)
    np.divide(np.float32(127.0), amax, out=inv, where=amax != 0)
    q = np.rint(blocks * inv[:, None])
    assert q.dtype == np.float32 and np.abs(q).max(initial=0) <= 127
    s = half_round(d * q.sum(axis=1).astype(np.float32))
    return q.astype(np.int8).reshape(-1), half_round(d), s, d


def q8k_twin(x: np.ndarray):
    """ggml's quantize_row_q8_K_ref (what x86 uses for the K-quants' activations) of a (n,) float32
    vector, per 256 values: m = the first value of largest magnitude, iscale = fl(-127 / m),
    q = min(127, rint(fl(x * iscale))) (ties to even), d = fl(1 / iscale); all zeros: d = 0, q = 0.
    Returns (q int8, d per super-block)."""
    supers = np.asarray(x, dtype=np.float32).reshape(-1, 256)
    first = np.abs(supers).argmax(axis=1)               # argmax: the first of equal magnitudes
    m = supers[np.arange(len(supers)), first]
    iscale = np.zeros_like(m)
    np.divide(np.float32(-127.0), m, out=iscale, where=m != 0)
    d = np.zeros_like(m)
    np.divide(np.float32(1.0), iscale, out=d, where=m != 0)
    q = np.minimum(np.rint(supers * iscale[:, None]), np.float32(127.0))
    assert q.dtype == np.float32 and d.dtype == np.float32 and np.abs(q).max(initial=0) <= 127
    return q.astype(np.int8).reshape(-1), d


def q8_grid(x: np.ndarray) -> np.ndarray:
    """x as the int8 activation blocks represent it: half(d) * q, float32."""
    q, d, _, _ = q8_twin(x)
    return (q.reshape(-1, 32).astype(np.float32) * d[:, None]).reshape(-1)


def matvec_twin(raw: np.ndarray, wtype: int, x: np.ndarray):
    """ggml's W @ x in float64, and the bound on the kernels' rounding (error_bounds.product_bound:
    gamma(n) sum |w x| for float weights; for int8 products gamma(3 n/32 + 2), the K-quants'
    gamma(2 n/256 + 3), times the magnitudes of their per-block terms).  Float weights see x itself; quantized weights see x on the Q8 grid
    (the kernels' own, bit for bit: test_quantize_q8); Q4_1 and Q5_1 (ggml's vec_dot_q4_1_q8_1,
    _q5_1_q8_1) use the stored block term s = half(d*sum q) for m; the K-quants see x on the grid of
    ggml's Q8_K (one scale per 256 values: q8k_twin), their minimums times its exact block sums.  Weights exactly as ggml dequantizes them (scaled quants plus
    minimum, error_bounds.matrix)."""
    elements, block_bytes = BLOCK_LAYOUT[GGMLType(wtype)]
    m = eb.matrix(raw, wtype, (raw.shape[0], raw.shape[1] // block_bytes * elements))
    if wtype in (0, 1, 30):
        x64 = x.astype(np.float64)
        return x64 @ m.WT, eb.product_bound(m, x64)
    if wtype in K_TYPES:  # ggml's vec_dot_q*_K_q8_K: the activation per 256 values, exact block sums
        q, d = q8k_twin(x)
        grid = (q.reshape(-1, 256).astype(np.float64) * d[:, None].astype(np.float64)).reshape(-1)
        return grid @ m.WT, eb.product_bound(m, grid)
    grid = q8_grid(x).astype(np.float64)
    if wtype not in (3, 7):
        return grid @ m.WT, eb.product_bound(m, grid)
    _, _, s, _ = q8_twin(x)
    s = s.astype(np.float64)
    return grid @ m.S.T + s @ m.block_min.T, eb.product_bound(m, grid, s)


def random_activation(rng, n, zero_block=True):
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.repeat(np.float32(10.0) ** rng.uniform(-3, 2, size=n // 32).astype(np.float32), 32)
    if zero_block and n >= 96:
        x[64:96] = 0.0
    return x


# ----- round_to_f16 ------------------------------------------------------------------------------

@numba.njit
def _round_all(v, out):  # not cached: a cached wrapper would not notice edits to kernels.py
    for i in range(v.shape[0]):
        out[i] = K.round_to_f16(v[i])


def _round_to_f16_cases() -> np.ndarray:
    rng = np.random.default_rng(0)
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # +0 .. 65504
    nxt = np.append(halves[1:], np.float32(65536.0))                                 # the next half up
    mid = ((halves.astype(np.float64) + nxt) / 2).astype(np.float32)                  # exact ties
    pos = np.concatenate([
        halves, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf)),
        rng.uniform(0, 2.0 ** -14, 20000).astype(np.float32),                         # subnormal range
        (np.float32(2.0) ** rng.uniform(-40, 17, 200000)).astype(np.float32),          # all exponents
        np.float32([2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -24, 2.0 ** -14, 65504, 65519.996, 65520,
                    65536, 1e5, 3e38, np.inf, np.finfo(np.float32).tiny, 1e-45]),
        np.nextafter(np.float32([2.0 ** -14, 65520.0]), np.float32(0)),
    ])
    bits = rng.integers(0, 2 ** 32, 300000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = bits[np.isfinite(bits)]                                                    # random patterns
    return np.concatenate([pos, -pos, bits]).astype(np.float32)


def test_round_to_f16_matches_numpy_half_conversion():
    v = _round_to_f16_cases()
    got = np.empty_like(v)
    _round_all(v, got)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).astype(np.float32)
    bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, [(float(v[i]), float(want[i]), float(got[i])) for i in bad[:10]]


@pytest.mark.parametrize("v, want", [(65519.0, 65504.0), (65520.0, np.inf), (-65520.0, -np.inf),
                                     (2.0 ** -25, 0.0), (3 * 2.0 ** -25, 2.0 ** -23),
                                     (1.0 + 2.0 ** -11, 1.0), (1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -9)])
def test_round_to_f16_named_values(v, want):
    assert K.round_to_f16(np.float32(v)) == np.float32(want)


# ----- activation quantization ------------------------------------------------------------------

def _activation_cases():
    rng = np.random.default_rng(1)
    cases = {}
    cases["one_block"] = random_activation(rng, 32)
    cases["zeros"] = np.zeros(64, np.float32)
    cases["random_256"] = random_activation(rng, 256)
    # amax = 127 -> 127/amax == 1 exactly, so half-integers are exact ties (ties go to even)
    t1 = np.float32(rng.integers(-126, 126, 32)) + np.float32(0.5)
    t1[0] = 127.0
    # amax = 63.5 -> 127/amax == 2 exactly, so quarter values tie
    t2 = np.float32(rng.integers(-250, 250, 32)) / np.float32(4.0) + np.float32(0.25)
    t2[5] = -63.5
    t3 = np.float32([-0.5, 0.5, 1.5, 2.5, -1.5, -2.5, 3.5, -3.5] * 4)
    t3[0] = 127.0
    cases["ties"] = np.concatenate([t1, t2, t3, np.zeros(32, np.float32)])
    cases["tiny_and_huge"] = np.concatenate([random_activation(rng, 32, False) * np.float32(1e-9),
                                             random_activation(rng, 32, False) * np.float32(1e4)])
    cases["subnormal_d"] = random_activation(rng, 64, False) * np.float32(1e-4)
    return cases


ACTIVATIONS = _activation_cases()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_quantize_q8(name):
    x = ACTIVATIONS[name]
    nb = x.shape[0] // 32
    xq = np.full(x.shape[0], 99, np.int8)
    xd = np.full(nb, np.nan, np.float32)
    xs = np.full(nb, np.nan, np.float32)
    xsum = np.full(2 * nb, 12345, np.int32)
    K.quantize_q8(x, xq, xd, xs, xsum)
    q, d, s, _ = q8_twin(x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xd.view(np.uint32), d.view(np.uint32))
    np.testing.assert_array_equal(xs, s)  # == so that half(0 * -x) = -0 equals 0
    np.testing.assert_array_equal(xsum, q.reshape(-1, 16).astype(np.int64).sum(axis=1))


def test_quantize_q8_ties_round_to_even():
    x = ACTIVATIONS["ties"]
    xq = np.empty(x.shape[0], np.int8)
    K.quantize_q8(x, xq, np.empty(4, np.float32), np.empty(4, np.float32), np.empty(8, np.int32))
    np.testing.assert_array_equal(xq[64:72], [127, 0, 2, 2, -2, -2, 4, -4])  # -0.5 0.5 1.5 2.5 ...
    assert not xq[96:].any()


def test_quantize_q8_read_only_input():
    x = ACTIVATIONS["random_256"].copy()
    x.setflags(write=False)
    xq, xd, xs = np.empty(256, np.int8), np.empty(8, np.float32), np.empty(8, np.float32)
    K.quantize_q8(x, xq, xd, xs, np.empty(16, np.int32))
    q, d, s, _ = q8_twin(x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, s)


@pytest.mark.parametrize("rows", [1, 3, 7, 33])
@pytest.mark.parametrize("n", [32, 96, 256])
def test_quantize_q8_rows(rows, n, threads):
    rng = np.random.default_rng(rows * 1000 + n)
    x = np.stack([random_activation(rng, n, zero_block=(r % 2 == 0)) for r in range(rows)])
    x[0, :32] = ACTIVATIONS["ties"][:32]
    xq = np.full((rows, n), 99, np.int8)
    xd, xs = np.full((rows, n // 32), np.nan, np.float32), np.full((rows, n // 32), np.nan, np.float32)
    xsum = np.full((rows, n // 16), 12345, np.int32)
    K.quantize_q8_rows(x, xq, xd, xs, xsum)
    for r in range(rows):
        q, d, s, _ = q8_twin(x[r])
        np.testing.assert_array_equal(xq[r], q)
        np.testing.assert_array_equal(xd[r].view(np.uint32), d.view(np.uint32))
        np.testing.assert_array_equal(xs[r], s)
        np.testing.assert_array_equal(xsum[r], q.reshape(-1, 16).astype(np.int64).sum(axis=1))


def _q8k_cases():
    rng = np.random.default_rng(2)
    cases = {"random_512": random_activation(rng, 512), "zeros_then_random": np.zeros(512, np.float32)}
    cases["zeros_then_random"][256:] = random_activation(rng, 256, False)
    # m = -127: iscale = 1 exactly, so half-integers tie (to even); m = 127: iscale = -1
    ties = np.float32(rng.integers(-126, 126, 512)) + np.float32(0.5)
    ties[7], ties[300] = -127.0, 127.0
    cases["ties"] = ties
    # equal magnitudes of both signs: the first one sets the sign of d
    signs = random_activation(rng, 512, False)
    signs[[3, 10]] = [-40.0, 40.0]
    signs[[260, 270]] = [40.0, -40.0]
    signs[np.abs(signs) > 39] = 1.0
    signs[[3, 10, 260, 270]] = [-40.0, 40.0, 40.0, -40.0]
    cases["first_of_equal_magnitudes"] = signs
    cases["tiny_and_huge"] = np.concatenate([random_activation(rng, 256, False) * np.float32(1e-30),
                                             random_activation(rng, 256, False) * np.float32(1e30)])
    return cases


Q8K_ACTIVATIONS = _q8k_cases()


@pytest.mark.parametrize("name", list(Q8K_ACTIVATIONS))
def test_quantize_q8k_is_ggmls_q8_k(name):
    """quantize_q8k = ggml's quantize_row_q8_K_ref bit for bit (q8k_twin), with d repeated for the
    super-block's 8 blocks, the blocks' exact sums (float32) and the half-block sums."""
    x = Q8K_ACTIVATIONS[name]
    n = x.shape[0]
    xq, xd = np.full(n, 99, np.int8), np.full(n // 32, np.nan, np.float32)
    xs, xsum = np.full(n // 32, np.nan, np.float32), np.full(n // 16, 12345, np.int32)
    K.quantize_q8k(x, xq, xd, xs, xsum)
    q, d = q8k_twin(x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xd.view(np.uint32), np.repeat(d, 8).view(np.uint32))
    np.testing.assert_array_equal(xs, q.reshape(-1, 32).astype(np.int64).sum(axis=1))
    np.testing.assert_array_equal(xsum, q.reshape(-1, 16).astype(np.int64).sum(axis=1))


def test_quantize_q8k_named_values():
    x = Q8K_ACTIVATIONS["ties"]
    xq, xd = np.empty(512, np.int8), np.empty(16, np.float32)
    K.quantize_q8k(x, xq, xd, np.empty(16, np.float32), np.empty(32, np.int32))
    assert xd[0] == np.float32(1.0) and xd[8] == np.float32(-1.0)   # 1 / (-127 / m)
    assert xq[7] == -127 and xq[300] == -127                         # the largest magnitude: -127
    half = np.flatnonzero(np.abs(x[:256] - np.rint(x[:256])) == 0.5)[:8]
    np.testing.assert_array_equal(xq[half], np.rint(x[half]))         # ties to even
    signs = Q8K_ACTIVATIONS["first_of_equal_magnitudes"]
    K.quantize_q8k(signs, xq, xd, np.empty(16, np.float32), np.empty(32, np.int32))
    assert xd[0] > 0 and xd[8] < 0 and xq[3] == -127 and xq[10] == 127 and xq[260] == -127
    K.quantize_q8k(np.zeros(256, np.float32), xq[:256], xd[:8], np.empty(8, np.float32), np.empty(16, np.int32))
    assert not xq[:256].any() and not xd[:8].any()


@pytest.mark.parametrize("codes", [(K.T_Q4_0,), (K.T_Q4_K,), (K.T_Q6_K, K.T_Q8_0)])
@pytest.mark.parametrize("n", [256, 96])
def test_quantize_activation_makes_the_forms_the_types_need(codes, n):
    """The blocks for types other than the K-quants, the super-blocks for the K-quants (and only
    for widths a K-quant matrix can have: multiples of 256); a form not needed is left alone and
    activation_room makes it empty."""
    formats = K.Formats(codes)
    x = random_activation(np.random.default_rng(n), n)
    a = K.activation_room(n)
    for form in a:
        for arr in form:
            arr.fill(7)
    K.quantize_activation(x, a, formats)
    wants_blocks = any(not K.is_k_quant(c) for c in codes)
    wants_supers = any(K.is_k_quant(c) for c in codes) and n % 256 == 0
    np.testing.assert_array_equal(a.blocks.q, q8_twin(x)[0] if wants_blocks else 7)
    np.testing.assert_array_equal(a.supers.q, q8k_twin(x)[0] if wants_supers else 7)
    room = K.activation_room(n, 3, formats)
    assert room.blocks.q.shape == (3, n if wants_blocks else 0)
    assert room.supers.q.shape == (3, n if wants_supers else 0) and room.supers.sums.shape[1] == room.supers.q.shape[1] // 16


# ----- matrix-vector products -------------------------------------------------------------------

MATVEC_SHAPES = [(1, 32), (3, 64), (7, 160), (33, 256), (257, 96), (64, 1024)]


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: weights reach the kernels read-only (the mapped file, the packed views),
    and a kernel compiles once per array type, so the tests pass what the model passes."""
    view = a.view()
    view.setflags(write=False)
    return view


def packed(raw: np.ndarray, wtype: int) -> np.ndarray:
    """The packed copy of quantized rows that the model makes at load (read-only, as the model's)."""
    lanes, unsigned_q8 = K.packing()
    elements, block_bytes = BLOCK_LAYOUT[GGMLType(wtype)]
    n_in = raw.shape[1] // block_bytes * elements
    out = np.zeros((-(-raw.shape[0] // lanes), K.group_bytes(wtype, n_in, lanes)), np.uint8)
    K.pack_rows(readonly(raw), wtype, lanes, unsigned_q8, out)
    return readonly(out)


def quantized_activation(x: np.ndarray, wtype: int):
    """(xq, xd, xs, xsum) as the products of ggml type wtype take x, a (n,) vector or (T, n) rows:
    quantize_q8's blocks, or quantize_q8k's super-blocks for the K-quants (quantize_activation_rows)."""
    x = np.atleast_2d(x)
    qx = K.activation_room(x.shape[1], x.shape[0])
    K.quantize_activation_rows(x, qx)
    return qx.supers if K.is_k_quant(wtype) else qx.blocks


def _run_matvec(w, wtype, x, via):
    """W @ x through K.matvec (the decode dispatch) or the type's own kernel."""
    n_out = w.shape[0]
    weights = packed(w, wtype) if wtype in QUANT_TYPES else w
    out = np.full(n_out, np.nan, np.float32)
    if via == "matvec":
        qx = K.activation_room(len(x))
        K.quantize_activation(x, qx)
        K.matvec(weights, wtype, n_out, x, qx, out, F16, BF16)
    elif wtype in QUANT_TYPES:
        K.matvec_packed(weights, wtype, n_out, *(a[0] for a in quantized_activation(x, wtype)), out)
    elif wtype == 0:
        K.matvec_f32(w, x, out)
    else:
        K.matvec_half(w, x, out, F16 if wtype == 1 else BF16)
    return out


def packed_values_twin(packed_rows: np.ndarray, wtype: int, n_out: int, lanes: int, unsigned_q8: bool):
    """The weights (n_out, n_in) read back from a packed copy by the layout described in kernels.py:
    per group and 32-block, n_scales x lanes scales, lanes minimums, the high-bit words, the quant
    steps; after the blocks, K-quants' per-super-block d (and dmin) of each lane."""
    quant, high, scale_bytes, n_scales, min_bytes, offset = K.PACKED_FORMATS[wtype]
    offset = 128 if (wtype == 8 and unsigned_q8) else offset
    record = lanes * K.record_bytes(wtype)
    sb = lanes * K.super_block_bytes(wtype)
    n_groups = packed_rows.shape[0]
    nb = 8 * packed_rows.shape[1] // (8 * record + sb)
    out = np.zeros((n_groups * lanes, nb * 32))
    for g in range(n_groups):
        table = packed_rows[g, nb * record:]
        for b in range(nb):
            rec = packed_rows[g, b * record:(b + 1) * record]
            at = n_scales * lanes * scale_bytes
            if scale_bytes == 1:  # factor bytes x the super-block's f16 d (dmin)
                d = table[(b // 8) * sb:(b // 8 + 1) * sb].copy().view(np.float16).astype(np.float64)
                factor = rec[:at].view(np.int8).astype(np.float64).reshape(n_scales, lanes)
                scales = factor * d[:lanes]
                mins = -rec[at:at + lanes].astype(np.float64) * d[lanes:] if min_bytes else np.zeros(lanes)
            else:
                scales = rec[:at].copy().view(np.float16).reshape(n_scales, lanes).astype(np.float64)
                mins = (rec[at:at + lanes * min_bytes].copy().view(np.float16).astype(np.float64)
                        if min_bytes else np.zeros(lanes))
            at += lanes * min_bytes
            words = rec[at:at + lanes * high].reshape(max(high // 4, 1), lanes, 4).astype(np.int64) if high else None
            steps = rec[at + lanes * high:].reshape(quant // 4, lanes, 4)
            for lane in range(lanes):
                q = steps[:, lane].reshape(-1).astype(np.int64)
                if quant == 16:
                    vals = np.zeros(32, np.int64)
                    for s in range(4):
                        vals[4 * s:4 * s + 4] = q[4 * s:4 * s + 4] & 15
                        vals[16 + 4 * s:20 + 4 * s] = q[4 * s:4 * s + 4] >> 4
                        if high == 4:
                            vals[4 * s:4 * s + 4] |= ((words[0, lane] >> s) & 1) << 4
                            vals[16 + 4 * s:20 + 4 * s] |= ((words[0, lane] >> (4 + s)) & 1) << 4
                        elif high == 8:
                            vals[4 * s:4 * s + 4] |= ((words[0, lane] >> (2 * s)) & 3) << 4
                            vals[16 + 4 * s:20 + 4 * s] |= ((words[1, lane] >> (2 * s)) & 3) << 4
                elif wtype == 8 and not unsigned_q8:
                    vals = q.astype(np.uint8).view(np.int8).astype(np.int64)
                else:
                    vals = q
                scale = np.repeat(scales[:, lane], 32 // n_scales)
                out[g * lanes + lane, 32 * b:32 * b + 32] = scale * (vals - offset) + mins[lane]
    assert not out[n_out:].any(), "padding rows must stay zero"
    return out[:n_out]


@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize("wtype", QUANT_TYPES, ids=TYPE_NAMES.get)
def test_packed_rows_take_the_files_bytes(wtype, lanes):
    """A packed row is as long as the file's row, but for Q4_K / Q5_K, whose sixteen 6-bit factors
    per 256 elements (12 bytes) get a byte each: +4 bytes (2-3%)."""
    elements, block_bytes = BLOCK_LAYOUT[GGMLType(wtype)]
    n_in = 4096
    file_row = n_in // elements * block_bytes
    packed_row = K.group_bytes(wtype, n_in, lanes) / lanes
    assert packed_row == file_row + (n_in // 256 * 4 if wtype in (12, 13) else 0), (file_row, packed_row)


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("wtype", QUANT_TYPES, ids=TYPE_NAMES.get)
def test_pack_rows_layout(wtype, rows, threads):
    """Packing keeps every weight exactly what gguf-py dequantizes from the file."""
    rng = np.random.default_rng(rows + wtype)
    n = fit(wtype, 96)
    raw = weight_bytes(random_matrix(rng, rows, n), wtype)
    lanes, unsigned_q8 = K.packing()
    got = packed(raw, wtype)
    assert got.shape == (-(-rows // lanes), K.group_bytes(wtype, n, lanes))
    # the twin's float64 scale * q + minimum is exact; gguf-py's float32 one rounds once (u,
    # relative to the exact value) where a type has a minimum, nowhere else
    exact = packed_values_twin(got, wtype, rows, lanes, unsigned_q8)
    np.testing.assert_allclose(reference_weights(raw, wtype), exact, rtol=eb.U, atol=0)
    # the packer that moves bytes writes exactly what the one that decodes each block writes
    decoded = np.zeros_like(got)
    K.pack_rows_decoded(readonly(raw), wtype, lanes, unsigned_q8, decoded)
    np.testing.assert_array_equal(got, decoded)


@pytest.mark.parametrize("wtype", K_TYPES, ids=TYPE_NAMES.get)
def test_pack_rows_over_several_super_blocks(wtype):
    """The moved K-quant words land where the decoding packer puts them in every super-block, not
    only the first (each super-block has its own factors, d, and Q6_K quarters)."""
    rng = np.random.default_rng(wtype)
    raw = weight_bytes(random_matrix(rng, 19, 3 * 256), wtype)
    lanes, unsigned_q8 = K.packing()
    got = packed(raw, wtype)
    decoded = np.zeros_like(got)
    K.pack_rows_decoded(readonly(raw), wtype, lanes, unsigned_q8, decoded)
    np.testing.assert_array_equal(got, decoded)
    exact = packed_values_twin(got, wtype, 19, lanes, unsigned_q8)
    np.testing.assert_allclose(reference_weights(raw, wtype), exact, rtol=eb.U, atol=0)


@pytest.mark.parametrize("n_tok", [1, 2, 5, 8, 9, 17])
@pytest.mark.parametrize("rows", [7, 33])
@pytest.mark.parametrize("wtype", QUANT_TYPES, ids=TYPE_NAMES.get)
def test_matmul_packed_many_tokens(wtype, rows, n_tok, threads):
    """Prompt products: tiles of tokens, including a partial last tile and a partial last row group."""
    rng = np.random.default_rng(rows * 31 + n_tok + wtype)
    n = fit(wtype, 160)
    raw = weight_bytes(random_matrix(rng, rows, n), wtype)
    x = np.stack([random_activation(rng, n, zero_block=(t % 3 == 0)) for t in range(n_tok)])
    out = np.full((n_tok, rows), np.nan, np.float32)
    K.matmul_packed(packed(raw, wtype), wtype, rows, *quantized_activation(x, wtype), out)
    for t in range(n_tok):
        want, bound = matvec_twin(raw, wtype, x[t])
        assert np.all(np.abs(out[t] - want) <= bound), f"token {t}"


@pytest.mark.parametrize("via", ["matvec", "specific"])
@pytest.mark.parametrize("shape", MATVEC_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TYPE_NAMES.get)
def test_matvec(wtype, shape, via, threads):
    rows, n = shape[0], fit(wtype, shape[1])
    rng = np.random.default_rng(rows * 7 + n + wtype)
    raw = weight_bytes(random_matrix(rng, rows, n), wtype)
    raw.setflags(write=False)
    x = random_activation(rng, n)
    got = _run_matvec(raw, wtype, x, via)
    want, bound = matvec_twin(raw, wtype, x)
    ratio = np.abs(got - want) / np.maximum(bound, 1e-300)
    assert np.all(np.abs(got - want) <= bound), (f"{TYPE_NAMES[wtype]} {rows}x{n}: |got-want| = "
                                                 f"{ratio.max():.3g} x the bound; row {np.argmax(ratio)}")


@pytest.mark.parametrize("how", ["readonly", "memmap"])
@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TYPE_NAMES.get)
def test_matvec_weight_storage(wtype, how, tmp_path, threads):
    rng = np.random.default_rng(wtype)
    n = fit(wtype, 128)
    raw = weight_bytes(random_matrix(rng, 33, n), wtype)
    w = place(raw, how, tmp_path)
    x = random_activation(rng, n)
    got = _run_matvec(w, wtype, x, "matvec")
    want, bound = matvec_twin(raw, wtype, x)
    assert np.all(np.abs(got - want) <= bound), f"{TYPE_NAMES[wtype]} {how}: beyond the rounding bound"
    # the storage does not change the result beyond float32 rounding: two runs, each within the
    # bound.  (Not bit-for-bit: fastmath lets LLVM contract Q4_1's `d*xd*s + m*xs` differently in a
    # fresh compile and in a cache-loaded one, so bits depend on Numba's cache state, not on the storage.)
    same = _run_matvec(raw.copy(), wtype, x, "matvec")
    assert np.all(np.abs(got - same) <= 2 * bound)


@pytest.mark.parametrize("shape", MATVEC_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matvec_q8_0_integer_identity(shape, threads):
    """With xq/xd known, out[r] = sum_b d_w[r,b] * xd[b] * (int dot of block b), up to float32
    rounding of each term and of the running sum."""
    rows, n = shape
    rng = np.random.default_rng(n + 3 * rows)
    raw = weight_bytes(random_matrix(rng, rows, n), 8)
    raw.setflags(write=False)
    x = random_activation(rng, n)
    out = _run_matvec(raw, 8, x, "specific")
    xq, xd, _, _ = q8_twin(x)
    blocks = raw.reshape(rows, -1, 34)
    d_w = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)       # (rows, nb)
    q_w = blocks[..., 2:].copy().view(np.int8).astype(np.int64)                     # (rows, nb, 32)
    int_dot = (q_w * xq.reshape(-1, 32).astype(np.int64)).sum(axis=2)                # (rows, nb)
    terms = d_w * xd.astype(np.float64) * int_dot
    want = terms.sum(axis=1)
    bound = (terms.shape[1] + 3) * 2.0 ** -23 * np.abs(terms).sum(axis=1)
    assert np.all(np.abs(out - want) <= bound + 1e-38)


def test_matvec_q8_0_extreme_bytes_are_exact(threads):
    """Q8_0 weights at the ends of int8 (-128 included: a file may hold it, ggml never writes it)
    times activations at +-127: every path's integer sums are exact (x86 without VNNI moves the
    weight's sign onto the activation for vpmaddubsw: |-128| * 127 twice must not saturate int16)."""
    rows, n = 16, 256
    rng = np.random.default_rng(128)
    q_w = rng.choice(np.array([-128, -127, -1, 0, 1, 126, 127], np.int8), size=(rows, n // 32, 32))
    q_w[0] = -128                                       # a row of -128 only: the largest pair sums
    d_w = np.full((rows, n // 32, 1), 0.0078125, np.float16)
    raw = np.concatenate([d_w.view(np.uint8), q_w.view(np.uint8)], axis=2).reshape(rows, -1)
    raw.setflags(write=False)
    x = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)   # quantized to exactly +-127
    x[:32] = -1.0
    out = _run_matvec(raw, 8, x, "specific")
    xq, xd, _, _ = q8_twin(x)
    assert np.all(np.abs(xq) == 127)
    int_dot = (q_w.astype(np.int64) * xq.reshape(-1, 32).astype(np.int64)).sum(axis=2)   # (rows, nb)
    terms = d_w[..., 0].astype(np.float64) * xd.astype(np.float64) * int_dot
    want = terms.sum(axis=1)
    bound = (terms.shape[1] + 3) * 2.0 ** -23 * np.abs(terms).sum(axis=1)
    assert np.all(np.abs(out - want) <= bound + 1e-38), (out, want)


def test_matvec_q4_0_offset_is_exact_integer_math():
    """ggml's vec_dot_q4_0_q8_0 subtracts the 8 in integers: d_w * xd * sum((nibble - 8) * q).
    Using the half-rounded s = half(d * sum q) for the -8 term instead is off by ~1e-3 here."""
    w = np.linspace(-1, 1.2, 32, dtype=np.float32)[None]
    x = np.arange(32, dtype=np.float32) * np.float32(0.37) + np.float32(1.0)
    raw = weight_bytes(w, 2)
    raw.setflags(write=False)
    q, xd, _, _ = q8_twin(x)
    d_w = float(raw[0, :2].copy().view(np.float16)[0])
    nibbles = np.concatenate([raw[0, 2:] & 15, raw[0, 2:] >> 4]).astype(np.int64)
    want = d_w * float(xd[0]) * int(((nibbles - 8) * q.astype(np.int64)).sum())  # 94.5578865...
    got = float(_run_matvec(raw, 2, x, "matvec")[0])
    # one block: fl(d_w * xd) and the fused multiply-add round once each (gamma(2)); want is float64
    assert abs(got - want) <= eb.gamma(2) * abs(want) * (1 + 2.0 ** -20), f"got {got!r}, want {want!r}"


# ----- dequantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [32, 96, 256])
@pytest.mark.parametrize("how", ["readonly", "memmap"])
@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TYPE_NAMES.get)
def test_dequantize_row(wtype, how, n, tmp_path):
    n = fit(wtype, n)
    rng = np.random.default_rng(n + wtype)
    raw = weight_bytes(random_matrix(rng, 3, n), wtype)
    w = place(raw, how, tmp_path)
    want = reference_weights(raw, wtype)
    for r in range(3):
        out = np.full(n, np.nan, np.float32)
        K.dequantize_row(w[r], wtype, out, F16, BF16)
        np.testing.assert_array_equal(out, want[r])


@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("how", ["readonly", "memmap"])
@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TYPE_NAMES.get)
def test_dequantize_rows(wtype, how, rows, tmp_path, threads):
    rng = np.random.default_rng(rows + wtype)
    n = fit(wtype, 96)
    raw = weight_bytes(random_matrix(rng, rows, n), wtype)
    w = place(raw, how, tmp_path)
    out = np.full((rows, n), np.nan, np.float32)
    K.dequantize_rows(w, wtype, out, F16, BF16)
    np.testing.assert_array_equal(out, reference_weights(raw, wtype))
    # a row range of a larger tensor into a slice of a larger tile (how prefill uses it)
    if rows > 2:
        tile = np.full((rows, n), np.nan, np.float32)
        K.dequantize_rows(w[1:rows - 1], wtype, tile[:rows - 2], F16, BF16)
        np.testing.assert_array_equal(tile[:rows - 2], reference_weights(raw, wtype)[1:rows - 1])
        assert np.isnan(tile[rows - 2:]).all()


@pytest.mark.parametrize("how", ["readonly", "memmap"])
@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TYPE_NAMES.get)
def test_embed_rows(wtype, how, tmp_path):
    rng = np.random.default_rng(40 + wtype)
    vocab, dim = 37, fit(wtype, 64)
    raw = weight_bytes(random_matrix(rng, vocab, dim), wtype)
    w = place(raw, how, tmp_path)
    want = reference_weights(raw, wtype)
    for tokens in ([0], [vocab - 1], [5, 5, 0, 36, 18, 1, 2]):
        ids = np.array(tokens, dtype=np.int64)
        out = np.full((len(ids), dim), np.nan, np.float32)
        K.embed_rows(ids, w, wtype, False, out, F16, BF16)
        np.testing.assert_array_equal(out, want[ids])
    if wtype in QUANT_TYPES:  # a tied table's packed copy gives the same embeddings, bit for bit
        ids = np.arange(vocab, dtype=np.int64)[::-1].copy()
        out = np.full((vocab, dim), np.nan, np.float32)
        K.embed_rows(ids, packed(raw, wtype), wtype, True, out, F16, BF16)
        np.testing.assert_array_equal(out, want[ids])


# ----- normalization ----------------------------------------------------------------------------

def rmsnorm_twin(x, weight, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps) * weight


# the kernel sums squares in float64, rounds the scale to float32 once and multiplies twice in
# float32: within gamma(3) of the exact value, relative; the float64 twin adds < 2^-48
RMSNORM_RTOL = float(eb.gamma(3)) + 2.0 ** -48


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("n", [1, 7, 32, 64, 1000])
def test_rmsnorm(n, readonly):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 30).astype(np.float32)
    weight = rng.uniform(-2, 2, n).astype(np.float32)
    if readonly:
        x.setflags(write=False)
        weight.setflags(write=False)
    for eps in (np.float32(1e-5), np.float32(1e-6)):
        out = np.full(n, np.nan, np.float32)
        K.rmsnorm(x, weight, eps, out)
        np.testing.assert_allclose(out, rmsnorm_twin(x, weight, float(eps)), rtol=RMSNORM_RTOL, atol=0)
    # tiny inputs: eps dominates
    small = np.full(n, 1e-6, np.float32)
    out = np.empty(n, np.float32)
    K.rmsnorm(small, weight, np.float32(1e-5), out)
    np.testing.assert_allclose(out, rmsnorm_twin(small, weight, float(np.float32(1e-5))), rtol=RMSNORM_RTOL)


@pytest.mark.parametrize("rows", [1, 3, 7, 33])
def test_rmsnorm_rows(rows, threads):
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 96)) * rng.uniform(0.01, 100, (rows, 1))).astype(np.float32)
    weight = rng.uniform(-2, 2, 96).astype(np.float32)
    weight.setflags(write=False)
    out = np.full_like(x, np.nan)
    K.rmsnorm_rows(x, weight, np.float32(1e-5), out)
    np.testing.assert_allclose(out, rmsnorm_twin(x, weight, float(np.float32(1e-5))), rtol=RMSNORM_RTOL)


# ----- rotary embedding -------------------------------------------------------------------------

def rope_tables(n_ctx, n_half, theta=10000.0):
    """cos/sin (n_ctx, n_half) float32 for rotary dims 2*n_half."""
    inv_freq = theta ** (-np.arange(n_half) * 2.0 / (2 * n_half))
    ang = np.outer(np.arange(n_ctx, dtype=np.float64), inv_freq)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_twin(v, n_heads, head_dim, cos, sin):
    """Rotate pairs (2i, 2i+1) of the first 2*len(cos) dims of each head; the rest pass through."""
    out = v.astype(np.float64).reshape(n_heads, head_dim).copy()
    n = cos.shape[0]
    a, b = out[:, 0:2 * n:2].copy(), out[:, 1:2 * n:2].copy()
    c, s = cos.astype(np.float64), sin.astype(np.float64)
    out[:, 0:2 * n:2] = a * c - b * s
    out[:, 1:2 * n:2] = a * s + b * c
    return out.reshape(-1)


def rope_bound(v, n_heads, head_dim, cos, sin):
    """The kernel's rounding of rope_twin (same float32 tables): a c - b s is two products and a
    difference, within gamma(2) (|a c| + |b s|); likewise a s + b c.  Zero past the rotary dims."""
    mag = np.abs(v.astype(np.float64)).reshape(n_heads, head_dim)
    out = np.zeros_like(mag)
    n = cos.shape[0]
    a, b = mag[:, 0:2 * n:2], mag[:, 1:2 * n:2]
    c, s = np.abs(cos.astype(np.float64)), np.abs(sin.astype(np.float64))
    out[:, 0:2 * n:2] = eb.gamma(2) * (a * c + b * s)
    out[:, 1:2 * n:2] = eb.gamma(2) * (a * s + b * c)
    return out.reshape(-1)


ROPE_SHAPES = [(1, 2, 1), (3, 8, 4), (4, 64, 32), (4, 64, 16), (7, 64, 8), (2, 128, 64), (5, 6, 2)]


@pytest.mark.parametrize("n_heads, head_dim, n_half", ROPE_SHAPES)
@pytest.mark.parametrize("pos", [0, 1, 37, 511])
def test_rope(n_heads, head_dim, n_half, pos):
    rng = np.random.default_rng(pos + head_dim)
    cos_t, sin_t = rope_tables(512, n_half)
    v = (rng.standard_normal(n_heads * head_dim) * 5).astype(np.float32)
    want = rope_twin(v, n_heads, head_dim, cos_t[pos], sin_t[pos])
    got = v.copy()
    K.rope(got, n_heads, head_dim, cos_t[pos], sin_t[pos])
    assert np.all(np.abs(got - want) <= rope_bound(v, n_heads, head_dim, cos_t[pos], sin_t[pos]))
    # dims past the rotary part are untouched, bit for bit
    tail = got.reshape(n_heads, head_dim)[:, 2 * n_half:]
    np.testing.assert_array_equal(tail, v.reshape(n_heads, head_dim)[:, 2 * n_half:])
    if pos == 0:
        np.testing.assert_array_equal(got, v)


@pytest.mark.parametrize("n_heads, head_dim, n_half", ROPE_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 7, 33])
def test_rope_rows(n_heads, head_dim, n_half, rows, threads):
    rng = np.random.default_rng(rows * head_dim)
    cos_t, sin_t = rope_tables(100, n_half)
    cos_t.setflags(write=False)
    sin_t.setflags(write=False)
    positions = rng.integers(0, 100, rows).astype(np.int64)
    x = (rng.standard_normal((rows, n_heads * head_dim)) * 5).astype(np.float32)
    want = np.stack([rope_twin(x[t], n_heads, head_dim, cos_t[p], sin_t[p]) for t, p in enumerate(positions)])
    got = x.copy()
    K.rope_rows(got, positions, n_heads, head_dim, cos_t, sin_t)
    bound = np.stack([rope_bound(x[t], n_heads, head_dim, cos_t[p], sin_t[p]) for t, p in enumerate(positions)])
    assert np.all(np.abs(got - want) <= bound)


def test_rope_is_a_rotation_of_adjacent_pairs():
    """Pair (0,1) by 90 degrees: (a, b) -> (-b, a); pair (2,3) untouched with a zero angle."""
    v = np.float32([1.0, 2.0, 3.0, 4.0])
    K.rope(v, 1, 4, np.float32([0.0, 1.0]), np.float32([1.0, 0.0]))
    np.testing.assert_array_equal(v, [-2.0, 1.0, 3.0, 4.0])


# ----- attention --------------------------------------------------------------------------------

def attention_twin(q, k_cache, v_cache, first_pos):
    """Causal GQA softmax attention in float64, scores scaled by the float32 1/sqrt(head_dim) the
    kernels multiply by."""
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[0]
    scale = float(np.float32(1.0 / np.sqrt(head_dim)))
    out = np.zeros(q.shape, np.float64)
    for t in range(n_tokens):
        n_pos = first_pos + t + 1  # causal: token t sees positions 0 .. first_pos + t
        for h in range(n_heads):
            kv = h // group
            s = k_cache[kv, :n_pos].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v_cache[kv, :n_pos].astype(np.float64)
    return out


def assert_attention_close(out, q, k_values, v_values, first_pos):
    """out within the worst-case rounding of the kernels' attention (error_bounds.attention_bound)
    of the float64 twin.  k_values, v_values: (n_kv, n_pos, head_dim), as the cache holds them."""
    want = attention_twin(q, k_values, v_values, first_pos)
    scale = float(np.float32(1.0 / np.sqrt(q.shape[-1])))
    bound = eb.attention_bound(q, np.swapaxes(k_values, 0, 1), np.swapaxes(v_values, 0, 1), first_pos, scale)
    bad = np.abs(out - want) > bound
    assert not bad.any(), f"{int(bad.sum())} outputs beyond the rounding bound; max|diff| {np.abs(out - want).max():.3g}"


ATTN_CASES = [  # (n_kv_heads, group, head_dim, n_tokens, first_pos)
    (1, 1, 8, 1, 0), (2, 1, 16, 3, 5), (1, 3, 8, 7, 0), (2, 3, 16, 1, 40), (2, 4, 64, 3, 12),
    (1, 4, 32, 7, 3), (3, 1, 8, 33, 0), (2, 4, 16, 33, 9), (4, 3, 8, 2, 100),
]


def prompt_scratch(n_chunks, n_ctx, group, head_dim):
    """K.attention's work rows for n_chunks chunks, NaN-filled (a value read before written: NaN)."""
    return (np.full((n_chunks, K.prompt_work_size(head_dim)), np.nan, np.float32),)


@pytest.mark.parametrize("score_rows", [1, 2, 64])
@pytest.mark.parametrize("n_kv, group, head_dim, n_tokens, first_pos", ATTN_CASES)
def test_attention(n_kv, group, head_dim, n_tokens, first_pos, score_rows, threads):
    rng = np.random.default_rng(n_kv * 100 + group * 10 + n_tokens + first_pos)
    n_heads = n_kv * group
    n_valid = first_pos + n_tokens
    n_ctx = n_valid + 5
    q = (rng.standard_normal((n_tokens, n_heads, head_dim)) * 2).astype(np.float32)
    k_cache = np.full((n_kv, n_ctx, head_dim), np.nan, np.float32)  # unwritten slots: NaN
    v_cache = np.full((n_kv, n_ctx, head_dim), np.nan, np.float32)
    k_cache[:, :n_valid] = rng.standard_normal((n_kv, n_valid, head_dim)) * 2
    v_cache[:, :n_valid] = rng.standard_normal((n_kv, n_valid, head_dim))
    out = np.full_like(q, np.nan)
    K.attention(q, k_cache, v_cache, first_pos, *prompt_scratch(score_rows, n_ctx, group, head_dim), out)
    assert_attention_close(out, q, k_cache[:, :n_valid], v_cache[:, :n_valid], first_pos)


def q8_cache(values: np.ndarray, n_ctx: int) -> np.ndarray:
    """A Q8_0 KV cache (n_kv, n_ctx, head_dim/32*34) whose first positions hold values (n_kv, n, hd)
    as gguf-py quantizes them; the other slots are garbage bytes that must never be read."""
    n_kv, n, hd = values.shape
    cache = np.full((n_kv, n_ctx, K.kv_row_length(hd, np.uint8)), 0x7F, np.uint8)
    cache[:, :n] = gguf_quantize(np.ascontiguousarray(values, np.float32), QT.Q8_0).reshape(n_kv, n, -1)
    return cache


def q8_values(cache: np.ndarray) -> np.ndarray:
    """The values a Q8_0 KV cache holds, as gguf-py dequantizes them (float32)."""
    return gguf_dequantize(np.ascontiguousarray(cache), QT.Q8_0).reshape(*cache.shape[:-1], -1)


@pytest.mark.parametrize("n_rows, head_dim", [(1, 32), (7, 64), (40, 128)])
def test_store_kv_q8_0_is_ggml_q8_0(n_rows, head_dim, threads):
    """Rows stored into a Q8_0 KV cache are byte for byte what gguf-py (ggml's reference
    quantize_row_q8_0) makes of them: zero blocks, ties at .5, tiny and huge magnitudes included."""
    rng = np.random.default_rng(n_rows + head_dim)
    n_kv = 2
    values = (rng.standard_normal((n_rows, n_kv * head_dim)) * rng.choice([1e-3, 1.0, 300.0], (n_rows, 1)))
    values = values.astype(np.float32)
    values[0, :32] = 0.0                                      # a zero block
    tie = values[-1, head_dim:head_dim + 32]                  # a block of maximum 127: d = 1, exact
    tie[:] = rng.integers(-100, 100, 32) + 0.5                 # ties at .5 everywhere
    tie[0] = 127.0
    cache = np.full((n_kv, n_rows + 3, K.kv_row_length(head_dim, np.uint8)), 0xAB, np.uint8)
    K.store_kv(cache, 2, values)
    want = gguf_quantize(values.reshape(n_rows, n_kv, head_dim).transpose(1, 0, 2).copy(), QT.Q8_0)
    np.testing.assert_array_equal(cache[:, 2:2 + n_rows], want.reshape(n_kv, n_rows, -1))
    assert (cache[:, :2] == 0xAB).all() and (cache[:, 2 + n_rows:] == 0xAB).all()


@pytest.mark.parametrize("n_kv, group, head_dim, n_tokens, first_pos", [(1, 1, 32, 1, 0), (2, 3, 64, 7, 5),
                                                                        (2, 4, 64, 33, 9)])
def test_attention_q8_0_cache(n_kv, group, head_dim, n_tokens, first_pos, threads):
    """Prompt attention over a Q8_0 cache equals the plain softmax over its dequantized values."""
    rng = np.random.default_rng(n_kv + group + n_tokens)
    n_heads, n_valid = n_kv * group, first_pos + n_tokens
    q = (rng.standard_normal((n_tokens, n_heads, head_dim)) * 2).astype(np.float32)
    k = q8_cache(rng.standard_normal((n_kv, n_valid, head_dim)) * 2, n_valid + 5)
    v = q8_cache(rng.standard_normal((n_kv, n_valid, head_dim)), n_valid + 5)
    out = np.full_like(q, np.nan)
    K.attention(q, k, v, first_pos, *prompt_scratch(2, n_valid + 5, group, head_dim), out)
    assert_attention_close(out, q, q8_values(k[:, :n_valid]), q8_values(v[:, :n_valid]), first_pos)


# head sizes: the two unrolled ones (64, 128), whole 64-blocks and 16-chunks (16, 32, 192), with
# a last 8 (8, 24, 40, 72, 136), and one the vector loops do not take (12: float32 only); position
# counts that end a group of four early (1, 2, 3, 6) and spans that end early (63, 65, 130)
ONE_CASES = [(1, 1, 8, 1), (3, 3, 64, 63), (3, 3, 64, 64), (3, 3, 64, 65), (2, 4, 32, 300), (4, 2, 16, 1000),
             (2, 4, 128, 130), (1, 2, 24, 70), (2, 1, 72, 2), (1, 3, 40, 3), (1, 2, 136, 66), (2, 2, 192, 6),
             (1, 2, 12, 67)]


@pytest.mark.parametrize("n_kv, group, head_dim, n_pos, half", [
    (*case, kind) for case in ONE_CASES for kind in (False, True, "q8_0")
    if (kind != "q8_0" or case[2] % 32 == 0) and (kind is not True or case[2] % 8 == 0)])
def test_attention_one(n_kv, group, head_dim, n_pos, half, threads):
    """One-token attention split in spans of ATTN_SPAN positions and merged (also across span
    boundaries and with half-precision caches) equals the plain softmax; unwritten slots are NaN."""
    rng = np.random.default_rng(n_kv * 1000 + n_pos + head_dim)
    n_heads, n_ctx = n_kv * group, n_pos + 7
    q = (rng.standard_normal((n_heads, head_dim)) * 2).astype(np.float32)
    k = np.full((n_kv, n_ctx, head_dim), np.nan, np.float32)
    v = np.full((n_kv, n_ctx, head_dim), np.nan, np.float32)
    k[:, :n_pos] = rng.standard_normal((n_kv, n_pos, head_dim)) * 2
    v[:, :n_pos] = rng.standard_normal((n_kv, n_pos, head_dim))
    if half == "q8_0":
        k, v = q8_cache(k[:, :n_pos], n_ctx), q8_cache(v[:, :n_pos], n_ctx)
        values = q8_values(k[:, :n_pos]), q8_values(v[:, :n_pos])
    elif half:
        k, v = k.astype(np.float16), v.astype(np.float16)
        values = k[:, :n_pos].astype(np.float32), v[:, :n_pos].astype(np.float32)
        k, v = k.view(np.uint16), v.view(np.uint16)
    else:
        values = k[:, :n_pos], v[:, :n_pos]
    n_spans = -(-n_ctx // K.ATTN_SPAN)
    scratch = np.full((n_spans * n_kv, head_dim + group * K.ATTN_SPAN), np.nan, np.float32)
    partial = np.full((n_spans, n_heads, head_dim + 2), np.nan, np.float32)
    out = np.full_like(q, np.nan)
    K.attention_one(q, k, v, n_pos, scratch, partial, out)
    assert_attention_close(out[None], q[None], *values, n_pos - 1)
    # each job's scores fill its span's positions only (a row of scratch is one job's: a score
    # written past them would land in the next job's row); the scratch's NaN is a payload no
    # arithmetic makes
    sentinel = np.uint32(0x7FBADBAD)
    scratch.view(np.uint32)[...] = sentinel
    K.attention_one(q, k, v, n_pos, scratch, partial, out)
    for job in range(-(-n_pos // K.ATTN_SPAN) * n_kv):
        span = job // n_kv
        used = min(n_pos, (span + 1) * K.ATTN_SPAN) - span * K.ATTN_SPAN
        scores = scratch[job, head_dim:].reshape(group, K.ATTN_SPAN)
        assert not np.isnan(scores[:, :used]).any() and (scores[:, used:].view(np.uint32) == sentinel).all()


@pytest.mark.parametrize("n_kv, group, head_dim, n_tokens, first_pos, kind", [
    (1, 1, 8, 5, 0, "f32"), (3, 3, 64, 70, 0, "f16"), (2, 4, 64, 9, 60, "f32"), (2, 4, 128, 4, 190, "f16"),
    (1, 5, 12, 7, 3, "f32"), (2, 3, 32, 5, 125, "q8_0"), (2, 2, 72, 3, 64, "f16"), (1, 20, 16, 3, 70, "f32"),
    (1, 16, 24, 2, 0, "f32")])
def test_prompt_attention_of_a_token_depends_on_nothing_else(n_kv, group, head_dim, n_tokens, first_pos, kind,
                                                             threads):
    """A prompt's query rows go down the cache LANES at a time; the lanes never mix: each token
    gets exactly (bit for bit) what it gets evaluated alone at its position, whatever tokens share
    its block of lanes (groups of 3 and 5 straddle blocks, 16 fills one, 20 spans two) and
    whatever the chunk count; and it is within the rounding bound of the exact attention
    (f32, f16 and Q8_0 caches; spans crossed and ended early; head sizes not a multiple of 8)."""
    rng = np.random.default_rng(n_kv * 7 + n_tokens + first_pos + head_dim)
    n_heads, n_valid = n_kv * group, first_pos + n_tokens
    n_ctx = n_valid + 3
    q = (rng.standard_normal((n_tokens, n_heads, head_dim)) * 3).astype(np.float32)
    k = (rng.standard_normal((n_kv, n_valid, head_dim)) * 2).astype(np.float32)
    v = rng.standard_normal((n_kv, n_valid, head_dim)).astype(np.float32)
    if kind == "q8_0":
        k, v = q8_cache(k, n_ctx), q8_cache(v, n_ctx)
        values = q8_values(k[:, :n_valid]), q8_values(v[:, :n_valid])
    else:
        pad = np.full((n_kv, n_ctx - n_valid, head_dim), np.nan, np.float32)
        k, v = np.concatenate([k, pad], 1), np.concatenate([v, pad], 1)
        if kind == "f16":
            k, v = k.astype(np.float16), v.astype(np.float16)
            values = k[:, :n_valid].astype(np.float32), v[:, :n_valid].astype(np.float32)
            k, v = k.view(np.uint16), v.view(np.uint16)
        else:
            values = k[:, :n_valid], v[:, :n_valid]
    outs = []
    for chunks in (1, 3, 64):
        out = np.full_like(q, np.nan)
        K.attention(q, k, v, first_pos, *prompt_scratch(chunks, n_ctx, group, head_dim), out)
        outs.append(out)
    assert_attention_close(outs[0], q, *values, first_pos)
    for out in outs[1:]:
        np.testing.assert_array_equal(out.view(np.uint32), outs[0].view(np.uint32))
    for t in range(n_tokens):
        alone = np.full((1, n_heads, head_dim), np.nan, np.float32)
        K.attention(q[t:t + 1], k, v, first_pos + t, *prompt_scratch(2, n_ctx, group, head_dim), alone)
        np.testing.assert_array_equal(alone[0].view(np.uint32), outs[0][t].view(np.uint32), err_msg=f"token {t}")


@pytest.mark.parametrize("half", [False, True])
def test_attention_with_widely_spread_scores(half, threads):
    """Scores hundreds apart (a sharp head): the weights under 2^-64 of the largest are dropped
    (SOFTMAX_FLOOR), within the rounding bound of the exact softmax, prompt and one-token paths."""
    rng = np.random.default_rng(7)
    n_kv, group, hd, n_pos = 2, 4, 64, 300
    n_heads = n_kv * group
    q = (rng.standard_normal((n_heads, hd)) * 12).astype(np.float32)
    k = (rng.standard_normal((n_kv, n_pos, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((n_kv, n_pos, hd)).astype(np.float32)
    s = np.einsum("khd,kpd->khp", q.reshape(n_kv, group, hd), k) / 8
    spread = s.max(-1, keepdims=True) - s
    # weights beyond exp's subnormal range (dropped, as before), and many tiny ones that must be
    # kept: a floor at e^-6 would be 70x beyond the bound
    assert (spread > 104).mean() > 0.03 and ((spread > 6) & (spread < 44)).mean() > 0.15
    if half:
        k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        values = k.view(np.float16).astype(np.float32), v.view(np.float16).astype(np.float32)
    else:
        values = k, v
    n_spans = -(-n_pos // K.ATTN_SPAN)
    scratch = np.full((n_spans * n_kv, hd + group * K.ATTN_SPAN), np.nan, np.float32)
    partial = np.full((n_spans, n_heads, hd + 2), np.nan, np.float32)
    out = np.full_like(q, np.nan)
    K.attention_one(q, k, v, n_pos, scratch, partial, out)
    assert_attention_close(out[None], q[None], *values, n_pos - 1)
    if not half:
        prompt_out = np.full((1, n_heads, hd), np.nan, np.float32)
        K.attention(q[None], k, v, n_pos - 1, *prompt_scratch(1, n_pos, group, hd), prompt_out)
        assert_attention_close(prompt_out, q[None], *values, n_pos - 1)


def test_attention_causal_mask_and_sharp_softmax():
    """Token 0 at position 0 sees only itself; scores of 1e4 spread do not overflow exp."""
    q = np.zeros((2, 2, 4), np.float32)
    q[:, :, 0] = 1000.0
    k = np.zeros((1, 3, 4), np.float32)
    k[0, :2, 0] = [0.0, 20.0]
    k[0, 2] = np.inf  # a future slot: must never be read
    v = np.zeros((1, 3, 4), np.float32)
    v[0, 0] = 1.0
    v[0, 1] = 2.0
    v[0, 2] = np.nan
    out = np.empty_like(q)
    K.attention(q, k, v, 0, *prompt_scratch(2, 3, 2, 4), out)
    np.testing.assert_array_equal(out[0], np.ones((2, 4)))
    np.testing.assert_array_equal(out[1], np.full((2, 4), 2.0))


# ----- feed-forward -----------------------------------------------------------------------------

def swiglu_twin(gate, up):
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * up


@pytest.mark.parametrize("shape", [(1,), (96,), (3, 64), (7, 33), (5, 4099)])
def test_swiglu(shape):
    rng = np.random.default_rng(sum(shape))
    gate = (rng.standard_normal(shape) * 4).astype(np.float32)
    flat = gate.reshape(-1)
    flat[: min(4, flat.size)] = np.float32([-200.0, 200.0, 0.0, -90.0])[: min(4, flat.size)]
    up = rng.standard_normal(shape).astype(np.float32)
    want = swiglu_twin(gate, up)
    K.swiglu(gate, up)
    # _expf within 2 ulp (4u), then 1 + e, the division and the product: gamma(7) relative; the
    # kernel clamps exp's argument at 89, which changes results below 1e-36 only (atol)
    np.testing.assert_allclose(gate, want, rtol=float(eb.gamma(7)), atol=1e-30)


# ----- one decode step of a tiny random model ---------------------------------------------------

DIM, N_HEADS, N_KV, FFN, VOCAB, N_LAYERS, N_CTX = 64, 4, 2, 96, 50, 2, 8
HEAD_DIM = DIM // N_HEADS
MATS = K.LAYER_MATRICES  # the kernel's slot order
MAT_SHAPES = {"attn_q": (DIM, DIM), "attn_k": (N_KV * HEAD_DIM, DIM), "attn_v": (N_KV * HEAD_DIM, DIM),
              "attn_output": (DIM, DIM), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
DECODE_VARIANTS = {
    # name: (embedding type, 2 layers x 7 matrix types, output type, rotary pairs per head)
    "q8_q41_f32": (8, [8, 3, 0, 8, 3, 8, 3, 3, 8, 3, 0, 8, 3, 8], 0, HEAD_DIM // 2),
    "q41_embd_q8_out_partial_rope": (3, [3, 8, 8, 0, 8, 3, 0, 8, 0, 3, 3, 3, 8, 0], 8, HEAD_DIM // 4),
    "f16_bf16": (1, [30, 1, 1, 30, 1, 30, 30, 1, 30, 30, 1, 1, 30, 1], 30, HEAD_DIM // 2),
    "q5_0_q5_1_q4_0": (6, [6, 7, 2, 7, 6, 6, 7, 2, 7, 6, 6, 7, 2, 6], 7, HEAD_DIM // 2),
}


def _tiny_model(variant, seed):
    embd_type, mat_types, out_type, n_half = DECODE_VARIANTS[variant]
    rng = np.random.default_rng(seed)
    raws = {"token_embd": weight_bytes(rng.standard_normal((VOCAB, DIM)).astype(np.float32), embd_type),
            "output": weight_bytes((rng.standard_normal((VOCAB, DIM)) * 0.3).astype(np.float32), out_type)}
    for l in range(N_LAYERS):
        for j, name in enumerate(MATS):
            rows, cols = MAT_SHAPES[name]
            w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
            raws[f"blk.{l}.{name}"] = weight_bytes(w, mat_types[7 * l + j])
    types = {"token_embd": embd_type, "output": out_type}
    types.update({f"blk.{l}.{m}": mat_types[7 * l + j] for l in range(N_LAYERS) for j, m in enumerate(MATS)})
    norms = rng.uniform(0.5, 1.5, (N_LAYERS, 2, DIM)).astype(np.float32)
    output_norm = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    cos_t, sin_t = rope_tables(N_CTX, n_half, theta=500.0)
    return raws, types, norms, output_norm, cos_t, sin_t


def _decode_twin(tokens, raws, types, norms, output_norm, cos_t, sin_t, eps, half_cache=False):
    """numpy, one token at a time: logits per position and the final K/V caches (rounded to half
    precision as they enter the cache, with half_cache)."""
    stored = (lambda a: a.astype(np.float32).astype(np.float16).astype(np.float64)) if half_cache else (lambda a: a)
    lin = lambda x, name: matvec_twin(raws[name], types[name], np.asarray(x, np.float32))[0]
    k_cache = np.zeros((N_LAYERS, N_KV, N_CTX, HEAD_DIM))
    v_cache = np.zeros((N_LAYERS, N_KV, N_CTX, HEAD_DIM))
    embd = reference_weights(raws["token_embd"], types["token_embd"])
    all_logits = []
    for pos, token in enumerate(tokens):
        x = embd[token].astype(np.float64)
        for l in range(N_LAYERS):
            b = f"blk.{l}."
            xb = rmsnorm_twin(x, norms[l, 0], eps)
            q = rope_twin(lin(xb, b + "attn_q"), N_HEADS, HEAD_DIM, cos_t[pos], sin_t[pos])
            k = rope_twin(lin(xb, b + "attn_k"), N_KV, HEAD_DIM, cos_t[pos], sin_t[pos])
            k_cache[l, :, pos] = stored(k.reshape(N_KV, HEAD_DIM))
            v_cache[l, :, pos] = stored(lin(xb, b + "attn_v").reshape(N_KV, HEAD_DIM))
            att = attention_twin(q.reshape(1, N_HEADS, HEAD_DIM), k_cache[l], v_cache[l], pos)
            x = x + lin(att.reshape(-1), b + "attn_output")
            xb = rmsnorm_twin(x, norms[l, 1], eps)
            h = swiglu_twin(lin(xb, b + "ffn_gate"), lin(xb, b + "ffn_up"))
            x = x + lin(h, b + "ffn_down")
        all_logits.append(lin(rmsnorm_twin(x, output_norm, eps), "output"))
    return np.array(all_logits), k_cache, v_cache


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("how", ["readonly", "memmap"])
@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
def test_decode_token(variant, how, kv, tmp_path, threads):
    raws, types, norms, output_norm, cos_t, sin_t = _tiny_model(variant, seed=7)
    eps = np.float32(1e-5)
    tokens = [3, 49, 0, 17, 17, 8]
    placed = {}
    for i, (name, raw) in enumerate(raws.items()):
        sub = tmp_path / str(i)
        sub.mkdir()
        placed[name] = place(raw, how, sub)
    # as the model lays them out: float layer matrices in one byte blob (the mapped file), quantized
    # ones packed into another; each located by (offset, rows, row bytes, type, n_out)
    names = [f"blk.{l}.{m}" for l in range(N_LAYERS) for m in MATS]
    views = {n: packed(raws[n], types[n]) if types[n] in QUANT_TYPES else raws[n] for n in names}
    table, parts, sizes = [], {"file": [], "packed": []}, {"file": 0, "packed": 0}
    for n in names:
        where = "packed" if types[n] in QUANT_TYPES else "file"
        table.append((sizes[where], *views[n].shape, types[n], raws[n].shape[0]))
        parts[where].append(views[n].reshape(-1))
        sizes[where] += views[n].nbytes
    mat_table = np.array(table, np.int64)
    blob_dir = tmp_path / "blob"
    blob_dir.mkdir()
    blob = place(np.concatenate(parts["file"] or [np.zeros(1, np.uint8)]), how, blob_dir).reshape(-1)
    packed_blob = np.concatenate(parts["packed"] or [np.zeros(1, np.uint8)])
    packed_blob.setflags(write=False)
    output = packed(raws["output"], types["output"]) if types["output"] in QUANT_TYPES else placed["output"]
    f32 = np.float32
    cache_type = np.uint16 if kv == "f16" else f32
    k_cache = np.zeros((N_LAYERS, N_KV, N_CTX, HEAD_DIM), cache_type)
    v_cache = np.zeros_like(k_cache)
    n_spans = -(-N_CTX // K.ATTN_SPAN)
    logits = np.zeros(VOCAB, f32)
    buffers = K.DecodeBuffers(x=np.zeros(DIM, f32), xb=np.zeros(DIM, f32), qx=K.activation_room(DIM), q=np.zeros(DIM, f32),
                              k=np.zeros(N_KV * HEAD_DIM, f32), v=np.zeros(N_KV * HEAD_DIM, f32),
                              att=np.zeros(DIM, f32), hb=np.zeros(FFN, f32), hb2=np.zeros(FFN, f32), qh=K.activation_room(FFN),
                              attn_scratch=np.zeros((n_spans * N_KV, HEAD_DIM + N_HEADS // N_KV * K.ATTN_SPAN), f32),
                              attn_partial=np.zeros((n_spans, N_HEADS, HEAD_DIM + 2), f32), logits=logits)
    weights = K.DecodeWeights(placed["token_embd"], types["token_embd"], False, blob, packed_blob, mat_table,
                              readonly(norms), readonly(output_norm), output, types["output"], K.ALL_FORMATS)
    dims = K.Dims(eps, N_HEADS, N_KV, HEAD_DIM)

    want, want_k, want_v = _decode_twin(tokens, raws, types, norms, output_norm, cos_t, sin_t, float(eps),
                                        half_cache=kv == "f16")
    env = _decode_envelope(variant, tuple(tokens), kv, float(eps))
    tol, cache_tol = eb.tolerance(env, 1), eb.tolerance(env, 1, of="cache")
    # the twin is a second float64 model of the same computation (one token at a time)
    eb.check(want, env.value, tol, "twin vs error_bounds model")
    for pos, token in enumerate(tokens):
        K.decode_token(token, pos, weights, dims, K.RopeTables(cos_t, sin_t), K.KVCache(k_cache, v_cache), buffers,
                       K.HalfTables(F16, BF16))
        eb.check(logits, want[pos], tol, f"{variant} pos {pos}")
    as_float = (lambda c: c.view(np.float16).astype(np.float64)) if kv == "f16" else (lambda c: c)
    n = len(tokens)
    eb.check(as_float(k_cache)[:, :, :n], want_k[:, :, :n], cache_tol, "k cache")
    eb.check(as_float(v_cache)[:, :, :n], want_v[:, :, :n], cache_tol, "v cache")
    assert not as_float(k_cache)[:, :, n:].any() and not as_float(v_cache)[:, :, n:].any()


@functools.lru_cache(maxsize=None)
def _decode_envelope(variant, tokens, kv, eps) -> eb.Envelope:
    """The tolerance scale of the decode test: error_bounds' model of the same weights."""
    raws, types, norms, output_norm, cos_t, sin_t = _tiny_model(variant, seed=7)
    shape = lambda name: (raws[name].shape[0], DIM if name in ("token_embd", "output") else MAT_SHAPES[name.split(".")[-1]][1])
    mat = {name: eb.matrix(raw, types[name], shape(name)) for name, raw in raws.items()}
    layers = [{m: mat[f"blk.{l}.{m}"] for m in MATS} for l in range(N_LAYERS)]
    spec = eb.Spec(mat["token_embd"], mat["output"], layers, norms.astype(np.float64),
                   output_norm.astype(np.float64), cos_t, sin_t, N_HEADS, N_KV, eps)
    return eb.envelope(spec, list(tokens), kv)
