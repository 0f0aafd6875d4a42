"""Elementwise work of the decoder: RMS normalization, the rotary embedding, SwiGLU."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .parallel import parallel_rows

from .common import EXACT
from .llvm import _expf


@njit(**EXACT)
def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight;  x, out: (n,)."""
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i]) * x[i]
    scale = np.float32(1.0 / math.sqrt(ss / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * weight[i]


@njit(**EXACT)
def rmsnorm_rows(x, weight, eps, out):
    parallel_rows(_rmsnorm_range, x.shape[0], (x, weight, eps, out))


@njit(**EXACT)
def _rmsnorm_range(lo, hi, x, weight, eps, out):
    for t in range(lo, hi):
        rmsnorm(x[t], weight, eps, out[t])


@njit(**EXACT)
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


@njit(**EXACT)
def rope_rows(x, positions, n_heads, head_dim, cos_table, sin_table):
    """x: (T, n_heads * head_dim); row t is at position positions[t]."""
    parallel_rows(_rope_range, x.shape[0], (x, positions, n_heads, head_dim, cos_table, sin_table))


@njit(**EXACT)
def _rope_range(lo, hi, x, positions, n_heads, head_dim, cos_table, sin_table):
    for t in range(lo, hi):
        p = positions[t]
        rope(x[t], n_heads, head_dim, cos_table[p], sin_table[p])


@njit(**EXACT)
def _swiglu_inplace(g, u):
    # g in place and a loop from 0: with a third output array, or start/end bounds, LLVM cannot
    # prove the store never meets a later load and does not vectorize the loop
    for i in range(g.shape[0]):
        g[i] = g[i] / (np.float32(1.0) + _expf(-g[i])) * u[i]


@njit(**EXACT)
def swiglu(gate, up):
    """gate = silu(gate) * up, in place, elementwise over any matching C-contiguous shapes."""
    g = gate.reshape(-1)
    u = up.reshape(-1)
    parallel_rows(_swiglu_spans, (g.shape[0] + 4095) // 4096, (g, u))


@njit(**EXACT)
def _swiglu_spans(lo, hi, g, u):
    for span in range(lo, hi):
        start, end = span * 4096, min(g.shape[0], (span + 1) * 4096)
        _swiglu_inplace(g[start:end], u[start:end])
