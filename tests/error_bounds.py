"""Where the numeric tolerances of the tests come from: the rounding of float32, IEEE half and ggml's
int8 blocks, bounded from the magnitudes involved (u = 2^-24, the float32 unit roundoff;
gamma(n) = n u / (1 - n u); Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
sections 2.2 and 3.1).

One step (a kernel test): the computed result is within a worst-case bound of the exact one.

* a sum of n products in float32, in any order, vector width, with or without FMA (every kernel,
  any BLAS): |fl(sum w_i x_i) - sum w_i x_i| <= gamma(n) sum |w_i x_i|.  The int8 kernels sum exact
  integer block products, so only the per-block scalings and the running sum round: gamma(3 n/32 + 2)
  (the K-quants, summed in integers per 256 values: gamma(2 n/256 + 3)).
* exp: the kernels' _expf is within 2 ulp (4u relative; 1.7u measured over the float32 range),
  numpy's within 1.  Other elementwise steps: one u per operation.
* the softmax of scores off by eps_j: each weight's ratio to the exact one lies within
  exp(+-(eps_j + max eps)).

A whole forward pass (prefill against decode, another CPU's code path, the numpy model): worst-case
bounds do not survive composition.  Propagated through two layers as intervals (an input off by e_i
moves a product by sum |w_i| e_i, whatever the signs) they exceed the logits themselves (the tiny
F32 model: 0.3 on the residual stream after one layer, overflow after the second): every
product multiplies the bound by |W| (about 3-6 here) where the actual error grows by about ||W||,
and an f16 KV cache entry or an int8 activation within that bound of a rounding boundary adds a
whole step.  Real rounding errors are not adversarial.  So the model tests take their tolerance from
the spread of the model's own float64 forward under the rounding model (``envelope``): each sample
is one possible float32 execution, in which every step's result is moved by a uniform draw within
that step's worst-case bound (above), and the exact roundings that follow (the KV cache's half or
Q8_0 blocks, ggml's int8 activation grid with its half-rounded scales, themselves computed from
float32 products that are perturbed too) round the perturbed values, so near-boundary values flip
as often as such an execution makes them.  Draws at the worst-case magnitude make a sample deviate
more than a real execution (whose dot products err by about sqrt(n) u, not n u); the tolerance is
MARGIN (2) times the largest deviation of any logit over SAMPLES (16) samples, per implementation,
one figure for a model.  A bug (a wrong position, mask, cache slot or weight) moves logits by O(1),
orders of magnitude more, and the model tests check that broken variants fail the same checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

U = 2.0 ** -24            # float32 unit roundoff
EXP_REL = 4 * U           # _expf: within 2 ulp (kernels.py), numpy's exp within 1
QK = 32


def gamma(n):
    n = np.asarray(n, np.float64)
    return n * U / (1.0 - n * U)


K_QUANTS = (12, 13, 14)  # Q4_K, Q5_K, Q6_K: their products take the activation per 256 values


def int8_terms(n_in: int, qtype: int) -> int:
    """Roundings of an int8 product over n_in inputs that any one term goes through.  Per 32-block
    up to two scaled integer sums and a minimum term, each rounded once, plus the accumulation.
    The K-quants sum a 256-value super-block in integers (the minimum term exactly in float32):
    a term is rounded by the conversion of that sum, the product d * d_x and the fused add (3), and
    by the running sum's two fused adds per super-block."""
    if qtype in K_QUANTS:
        return 2 * (n_in // 256) + 3
    return 3 * (n_in // QK) + 2


# ----- IEEE half ----------------------------------------------------------------------------------

def to_half(a) -> np.ndarray:
    """float64 -> nearest half (ties to even) -> float64 (numpy converts float64 to half directly)."""
    with np.errstate(over="ignore"):
        return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)


# ----- weights --------------------------------------------------------------------------------------

_GGUF = {0: QT.F32, 1: QT.F16, 2: QT.Q4_0, 3: QT.Q4_1, 6: QT.Q5_0, 7: QT.Q5_1, 8: QT.Q8_0,
         12: QT.Q4_K, 13: QT.Q5_K, 14: QT.Q6_K, 30: QT.BF16}
FLOAT_TYPES = (0, 1, 30)
# types with a minimum: (block bytes, byte ranges that hold it, byte ranges that hold the quants)
_MINIMUM_FIELDS = {3: (20, [(2, 4)], [(4, 20)]), 7: (24, [(2, 4)], [(4, 24)]),
                   12: (144, [(2, 4)], [(16, 144)]), 13: (176, [(2, 4)], [(16, 176)])}


class Matrix(NamedTuple):
    """A weight as the kernels compute with it: W = S + M exactly, S the scaled quants, M the block
    minimum (zero for types without one); block_min (n_out, n_in/32) for Q4_1 / Q5_1, whose products
    take the minimum times the activation's half-rounded block term s (ggml's Q8_1).  Transposed
    copies (n_in, n_out) for the products: W, |S| + |M| (the magnitudes of a product's terms)."""
    qtype: int
    S: np.ndarray
    M: np.ndarray
    block_min: np.ndarray | None
    WT: np.ndarray
    magT: np.ndarray

    @property
    def W(self) -> np.ndarray:
        return self.WT.T

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def has_minimum(self) -> bool:
        return self.qtype in _MINIMUM_FIELDS


def matrix(raw: np.ndarray, qtype: int, shape: tuple[int, int]) -> Matrix:
    """A weight from its file bytes (or float array) and ggml type id.  S and M come from gguf-py's
    dequantizer applied to copies whose minimum or quants are zeroed: each is one exact product
    (a half times a small integer), so S + M in float64 is the exact weight, where gguf-py's own
    float32 d * q + m is rounded."""
    qtype = int(qtype)
    deq = lambda a: gguf_dequantize(np.ascontiguousarray(a), _GGUF[qtype]).astype(np.float64).reshape(shape)
    if qtype not in _MINIMUM_FIELDS:
        S, M, block_min = deq(raw), np.zeros(shape), None
    else:
        size, minimum, quants = _MINIMUM_FIELDS[qtype]
        blocks = np.array(raw, np.uint8).reshape(-1, size)
        no_min, no_quants = blocks.copy(), blocks.copy()
        for a, b in minimum:
            no_min[:, a:b] = 0
        for a, b in quants:
            no_quants[:, a:b] = 0
        S, M = deq(no_min), deq(no_quants)
        block_min = M[:, ::QK].copy() if qtype in (3, 7) else None
    mag = np.abs(S) if block_min is not None else np.abs(S) + np.abs(M)
    return Matrix(qtype, S, M, block_min, np.ascontiguousarray((S + M).T), np.ascontiguousarray(mag.T))


def product_bound(m: Matrix, x: np.ndarray, xs: np.ndarray | None = None) -> np.ndarray:
    """Worst-case rounding of x @ W.T as the kernels compute it: float weights gamma(n) sum |w x|;
    int8 products gamma(int8_terms) times the magnitudes of their terms (|S| + |M|) |x| (Q4_1 /
    Q5_1: |S| |x| + |m| |s|).  x: the float input, or the int8 grid values for quantized weights."""
    n_in = m.S.shape[1]
    if not m.quantized:
        return gamma(n_in) * (np.abs(x) @ m.magT)
    bound = np.abs(x) @ m.magT
    if m.block_min is not None:
        bound = bound + np.abs(xs) @ np.abs(m.block_min).T
    return gamma(int8_terms(n_in, m.qtype)) * bound


# ----- the rounding model of one execution ----------------------------------------------------------

class Rounding:
    """The float32 roundings of one execution: none (the exact model, ``Rounding()``) or, with a
    seed, each step's result moved by a uniform draw within that step's worst-case bound."""

    def __init__(self, seed: int | None = None):
        self.rng = None if seed is None else np.random.default_rng(seed)

    def __call__(self, v, bound):
        if self.rng is None:
            return v
        return v + np.asarray(bound) * self.rng.uniform(-1.0, 1.0, np.shape(v))


EXACT = Rounding()


def _blocks(a):
    return a.reshape(*a.shape[:-1], -1, QK)


def q8_activation(x: np.ndarray, R: Rounding = EXACT):
    """ggml's Q8 activation blocks as the kernels make them (quantize_q8, x86 quantize_row_q8_1):
    d = fl(amax / 127), q = rint(fl(x * fl(127 / amax))) (ties to even), grid values half(d) * q,
    and the block term s = half(fl(d * sum q)) of Q4_1 / Q5_1 products.  Returns (grid, s)."""
    b = _blocks(x)
    amax = np.abs(b).max(-1, keepdims=True)
    d = R(amax / 127.0, U * amax / 127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(amax > 0, b * 127.0 / np.where(amax > 0, amax, 1.0), 0.0)
    t = R(t, gamma(2) * np.abs(t))
    q = np.rint(t)
    s = R(d * q.sum(-1, keepdims=True), U * np.abs(d * q.sum(-1, keepdims=True)))
    return (to_half(d) * q).reshape(x.shape), to_half(s)[..., 0]


def q8k_activation(x: np.ndarray, R: Rounding = EXACT) -> np.ndarray:
    """ggml's Q8_K activation as the kernels make it for the K-quants (quantize_q8k, ggml's
    quantize_row_q8_K_ref): per 256 values, m the first value of largest magnitude, iscale =
    fl(-127 / m), q = min(127, rint(fl(x * iscale))) (ties to even), d = fl(1 / iscale) (float32,
    not half); grid values d * q."""
    b = x.reshape(*x.shape[:-1], -1, 256)
    first = np.abs(b).argmax(-1)[..., None]
    m = np.take_along_axis(b, first, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(m != 0, -127.0 / np.where(m != 0, m, 1.0), 0.0)
        iscale = R(iscale, U * np.abs(iscale))
        t = R(b * iscale, U * np.abs(b * iscale))
        d = np.where(m != 0, 1.0 / np.where(iscale != 0, iscale, 1.0), 0.0)
    d = R(d, U * np.abs(d))
    q = np.minimum(np.rint(t), 127.0)
    return (d * q).reshape(x.shape)


def q8_0_cache(x: np.ndarray, R: Rounding = EXACT) -> np.ndarray:
    """A q8_0 KV cache entry (ggml's quantize_row_q8_0_ref): d = fl(amax / 127), q = roundf(fl(x *
    fl(1 / d))) (ties away from zero), value half(d) * q."""
    b = _blocks(x)
    amax = np.abs(b).max(-1, keepdims=True)
    d = R(amax / 127.0, U * amax / 127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d > 0, b / np.where(d > 0, d, 1.0), 0.0)
    t = R(t, gamma(2) * np.abs(t))
    q = np.sign(t) * np.floor(np.abs(t) + 0.5)
    return (to_half(d) * q).reshape(x.shape)


def cache_store(x: np.ndarray, cache_type: str, R: Rounding = EXACT) -> np.ndarray:
    if cache_type == "f32":
        return x
    if cache_type == "f16":
        return to_half(x)
    assert cache_type == "q8_0", cache_type
    return q8_0_cache(x, R)


def embed(m: Matrix, ids, R: Rounding = EXACT) -> np.ndarray:
    """Embedding rows: float32 scale * q + minimum, one rounding where there is a minimum."""
    ids = np.asarray(ids)
    w = m.W[ids]
    return R(w, U * (np.abs(m.S[ids]) + np.abs(m.M[ids]))) if m.has_minimum else w


def linear(x: np.ndarray, m: Matrix, R: Rounding = EXACT, quantize_activations: bool = True) -> np.ndarray:
    """x (..., n_in) @ W.T: float weights see x; quantized weights see x on the int8 grid (the
    K-quants on Q8_K's, one scale per 256 values), and Q4_1 / Q5_1 take their minimum times the
    block term s."""
    if not (m.quantized and quantize_activations):
        if m.quantized:  # float activations on quantized weights: a float product of W
            return R(x @ m.WT, gamma(m.S.shape[1]) * (np.abs(x) @ np.abs(m.WT)))
        return R(x @ m.WT, product_bound(m, x))
    if m.qtype in K_QUANTS:
        g = q8k_activation(x, R)
        return R(g @ m.WT, product_bound(m, g))
    g, s = q8_activation(x, R)
    if m.block_min is not None:
        return R(g @ m.S.T + s @ m.block_min.T, product_bound(m, g, s))
    return R(g @ m.WT, product_bound(m, g))


def rmsnorm(x: np.ndarray, weight, eps: float, R: Rounding = EXACT) -> np.ndarray:
    """x * fl(1 / sqrt(mean x^2 + eps)) * weight: the sum of squares in float64 (both kernels),
    then three float32 roundings."""
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(weight, np.float64)
    return R(y, gamma(3) * np.abs(y))


def rope(x: np.ndarray, positions, cos_table, sin_table, n_heads: int, head_dim: int,
         R: Rounding = EXACT) -> np.ndarray:
    """Adjacent pairs (a, b) -> (a c - b s, a s + b c) with the float32 tables of each position:
    gamma(2) (|a c| + |b s|) per result, and u (|a| + |b|) for a table entry rounded differently."""
    T = x.shape[0]
    c = np.asarray(cos_table, np.float64)[positions][:, None, :]     # (T, 1, n_rot/2)
    s = np.asarray(sin_table, np.float64)[positions][:, None, :]
    n_rot = 2 * c.shape[-1]
    v = x.reshape(T, n_heads, head_dim).copy()
    a, b = v[..., 0:n_rot:2].copy(), v[..., 1:n_rot:2].copy()
    table = U * (np.abs(a) + np.abs(b))
    v[..., 0:n_rot:2] = R(a * c - b * s, gamma(2) * (np.abs(a * c) + np.abs(b * s)) + table)
    v[..., 1:n_rot:2] = R(a * s + b * c, gamma(2) * (np.abs(a * s) + np.abs(b * c)) + table)
    return v.reshape(x.shape)


def swiglu(gate: np.ndarray, up: np.ndarray, R: Rounding = EXACT) -> np.ndarray:
    """g / (1 + exp(-g)) * up: exp within EXP_REL, then three roundings."""
    with np.errstate(over="ignore"):
        y = gate / (1.0 + np.exp(-gate)) * up
    return R(y, gamma(3 + 4) * np.abs(y))


def add(a: np.ndarray, b: np.ndarray, R: Rounding = EXACT) -> np.ndarray:
    return R(a + b, U * np.abs(a + b))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int, scale: float,
              R: Rounding = EXACT) -> np.ndarray:
    """Causal grouped-query attention of T queries (T, n_heads, hd) at positions first_pos.. over
    cached keys and values (n_pos, n_kv, hd), as stored.  Scores: a dot product of hd terms (and a
    q8_0 cache's block scalings), times the float32 scale; weights: exp of (score - max) within
    2 EXP_REL (the decode kernel's span merge exponentiates again), the subtraction rounded twice,
    the normalizer gamma(n) and a division; the output sum gamma(n + n/64 + 8) (n additions, and
    per span of 64 one more rounding: the one-token path's merge of span partials, or the prompt
    path's rescaling of its running sums when the maximum grows; the final scaling).  The prompt
    path multiplies a lane's sums and its normalizer by the same rounded factor, so that factor's
    own error cancels in their ratio."""
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    nb = max(hd // QK, 1)
    out = np.zeros(q.shape)
    for t in range(T):
        n = first_pos + t + 1
        for h in range(n_heads):
            keys, values, qv = k[:n, h // group], v[:n, h // group], q[t, h]
            s = R((keys @ qv) * scale, gamma(hd + 2 * nb + 4) * scale * (np.abs(keys) @ np.abs(qv)))
            z = R(s - s.max(), 2 * U * np.abs(s - s.max()))
            w = R(np.exp(z), 2 * EXP_REL * np.exp(z))
            p = R(w / w.sum(), (gamma(n) + 2 * U) * w / w.sum())
            out[t, h] = R(p @ values, gamma(n + n // 64 + 8) * (p @ np.abs(values)))
    return out


def attention_bound(q, k, v, first_pos: int, scale: float) -> np.ndarray:
    """Worst-case rounding of one attention call on exact inputs (q (T, n_heads, hd); k, v
    (n_pos, n_kv, hd) as stored), by the steps of ``attention``: scores off by eps_j = gamma(hd + 2 nb
    + 4) scale sum |q k_j|; each weight's exponent off by eps_j plus 2u |s_j - max| plus the
    maximum's own error, its exponential (and the normalizer's) by 2 EXP_REL, the normalizer by
    gamma(n) + 4u, so p'_j / p_j lies within exp(+-lam_j); weights below 2^-64 of the largest may
    be 0 (SOFTMAX_FLOOR); then the output sum's gamma(n + n/64 + 8)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    nb = max(hd // QK, 1)
    bound = np.zeros(q.shape)
    for t in range(T):
        n = first_pos + t + 1
        for h in range(n_heads):
            keys, values, qv = k[:n, h // group], v[:n, h // group], q[t, h]
            s = (keys @ qv) * scale
            eps = gamma(hd + 2 * nb + 4) * scale * (np.abs(keys) @ np.abs(qv))
            rho = eps + 2 * U * (np.abs(s - s.max()) + 2 * eps.max())
            lam = rho + rho.max() + 4 * EXP_REL + gamma(n) + 4 * U
            w = np.exp(s - s.max())
            p = w / w.sum()
            # weights under 2^-64 of the largest (kernels.attention.SOFTMAX_FLOOR, reached with the
            # rounding above) may be 0: theirs is lost whole, and the normalizer loses their sum
            gone = w <= 2.0 ** -64 * np.exp(lam)
            lam = lam + w[gone].sum() / w.sum()
            dp = np.where(gone, p, p * np.expm1(lam))
            bound[t, h] = dp @ np.abs(values) + gamma(n + n // 64 + 8) * ((p + dp) @ np.abs(values))
    return bound


# ----- a whole LLaMA forward ------------------------------------------------------------------------

class Spec(NamedTuple):
    """What the forward needs: token_embd, output (Matrix; the same object when tied), layers:
    [{name: Matrix}] with attn_q ... ffn_down, norms: (n_layers, 2, dim), output_norm, cos, sin
    (float32 tables (n_ctx, n_rot/2), as the runtime builds them), eps (the float32 value)."""
    token_embd: Matrix
    output: Matrix
    layers: list
    norms: np.ndarray
    output_norm: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    n_heads: int
    n_kv_heads: int
    eps: float


class Forward(NamedTuple):
    logits: np.ndarray           # (T, n_vocab)
    k_cache: list                # per layer: (T, n_kv, hd), as stored
    v_cache: list


def forward(spec: Spec, ids, cache_type: str = "f16", R: Rounding = EXACT,
            quantize_activations: bool = True) -> Forward:
    """Every position's logits for ``ids`` at positions 0.. from an empty cache (what prefill, in any
    chunks, and token-by-token decode both compute), in float64 under the rounding model R.
    quantize_activations=False: float activations even for quantized weights (not the runtime)."""
    lin = lambda x, m: linear(x, m, R, quantize_activations)
    T = len(ids)
    dim = spec.norms.shape[-1]
    hd = dim // spec.n_heads
    positions = np.arange(T)
    scale = float(np.float32(1.0 / math.sqrt(hd)))   # both attention kernels multiply by this float32
    x = embed(spec.token_embd, ids, R)
    ks, vs = [], []
    for l, layer in enumerate(spec.layers):
        # attention block: q, k, v of the normed stream; keys rotated; both rounded into the cache
        h = rmsnorm(x, spec.norms[l, 0], spec.eps, R)
        q = rope(lin(h, layer["attn_q"]), positions, spec.cos, spec.sin, spec.n_heads, hd, R)
        k = rope(lin(h, layer["attn_k"]), positions, spec.cos, spec.sin, spec.n_kv_heads, hd, R)
        kc = cache_store(k.reshape(T, spec.n_kv_heads, hd), cache_type, R)
        vc = cache_store(lin(h, layer["attn_v"]).reshape(T, spec.n_kv_heads, hd), cache_type, R)
        ks.append(kc)
        vs.append(vc)
        att = attention(q.reshape(T, spec.n_heads, hd), kc, vc, 0, scale, R)
        x = add(x, lin(att.reshape(T, dim), layer["attn_output"]), R)
        # feed-forward block
        h = rmsnorm(x, spec.norms[l, 1], spec.eps, R)
        x = add(x, lin(swiglu(lin(h, layer["ffn_gate"]), lin(h, layer["ffn_up"]), R), layer["ffn_down"]), R)
    logits = lin(rmsnorm(x, spec.output_norm, spec.eps, R), spec.output)
    return Forward(logits, ks, vs)


# ----- tolerances for whole forward passes -----------------------------------------------------------

SAMPLES = 16   # executions drawn per envelope
MARGIN = 2.0   # tolerance per implementation: MARGIN x the largest deviation of the samples


class Envelope(NamedTuple):
    value: np.ndarray        # (T, V) the exact model's logits
    deviation: float         # the largest |sample - value| over all samples and logits
    caches: tuple            # (k, v): per layer (T, n_kv, hd), the exact model's cached values
    cache_deviation: float   # the largest |sample - value| over all samples and cached values


def envelope(spec: Spec, ids, cache_type: str = "f16", quantize_activations: bool = True,
             samples: int = SAMPLES) -> Envelope:
    """The exact model's logits and how far SAMPLES executions under the rounding model stray."""
    from threadpoolctl import threadpool_limits

    ids = list(ids)
    with threadpool_limits(1):  # small products: threads only cost here
        exact = forward(spec, ids, cache_type, EXACT, quantize_activations)
        dev = cache_dev = 0.0
        for seed in range(samples):
            got = forward(spec, ids, cache_type, Rounding(seed), quantize_activations)
            dev = max(dev, float(np.abs(got.logits - exact.logits).max()))
            for a, b in zip(got.k_cache + got.v_cache, exact.k_cache + exact.v_cache):
                cache_dev = max(cache_dev, float(np.abs(a - b).max()))
    return Envelope(exact.logits, dev, (exact.k_cache, exact.v_cache), cache_dev)


def tolerance(env: Envelope, n_impl: int, of: str = "logits") -> float:
    """Allowed |a - b| of logits (or of="cache": cached keys and values): n_impl = 1 for an
    implementation against the model value, 2 for two implementations (each within MARGIN x
    deviation of the model value).  One figure for all positions: a position where no sample
    happened to flip a rounding may still flip in another execution, by as much as a flip moves
    the others."""
    if of == "cache":
        scale = max(float(np.abs(c).max()) for c in env.caches[0] + env.caches[1])
        return n_impl * MARGIN * env.cache_deviation + 2.0 ** -40 * scale
    return n_impl * MARGIN * env.deviation + 2.0 ** -40 * float(np.abs(env.value).max())


def check(got, want, tol, what: str = "") -> None:
    """|got - want| <= tol elementwise (tol broadcasts), naming the worst position and the margin."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    tol = np.broadcast_to(tol, diff.shape)
    bad = diff > tol
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(tol, 1e-300), 0.0)), diff.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {diff.size} values beyond the derived tolerance; "
                             f"worst at {i}: |diff| {diff[i]:.3g} > {tol[i]:.3g}; max|diff| {diff.max():.3g}")
