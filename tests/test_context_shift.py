"""Context shift: dropping cached positions and re-rotating the moved keys instead of re-evaluating."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

import edgellama
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

TOKENS = [5, 17, 200, 3, 99, 42, 42, 7, 130, 250, 11, 64]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("shift") / "m.gguf", GGMLType.F32, rope_freqs=True)


@pytest.fixture(scope="module")
def q8_path(tmp_path_factory):  # head size 32: whole Q8_0 blocks
    return write_tiny_model(tmp_path_factory.mktemp("shift") / "m32.gguf", GGMLType.F32, rope_freqs=True,
                            n_heads=2, n_kv_heads=1)


def _values(cache: np.ndarray) -> np.ndarray:
    """Cache entries as float32 (an f16 cache holds half bit patterns, a q8_0 one Q8_0 blocks)."""
    if cache.dtype == np.uint8:
        return gguf_dequantize(np.ascontiguousarray(cache), QT.Q8_0).reshape(*cache.shape[:-1], -1)
    return cache.view(np.float16).astype(np.float32) if cache.dtype == np.uint16 else cache


@pytest.mark.parametrize("cache_type, rel", [("f32", 1e-5), ("f16", 1.5 * 2.0 ** -10), ("q8_0", 2 / 127)])
def test_shifted_cache_equals_evaluating_the_kept_tokens_at_their_new_positions(path, q8_path, cache_type, rel):
    """rel (of the largest key entry): a rotated pair (a, b) mixes both rounded entries, then is
    rounded to the cache's precision again: f16 errors up to (|a| + |b|) / 2^11 + |result| / 2^11;
    q8_0 (steps of a block's max / 127) up to sqrt(2) / 2 + 1/2 steps, and the fresh keys 1/2."""
    path = q8_path if cache_type == "q8_0" else path
    model = edgellama.load(path, n_ctx=16, cache_type=cache_type)
    model.eval(TOKENS)
    old_v = model.state.v_cache.copy()
    n_keep, n_discard = 2, 5
    model.shift_context(n_keep, n_discard)
    kept = TOKENS[:n_keep] + TOKENS[n_keep + n_discard:]
    assert model.state.n_past == len(kept) and model.state.tokens == kept
    # values move untouched
    np.testing.assert_array_equal(model.state.v_cache[:, :, n_keep:len(kept)], old_v[:, :, n_keep + n_discard:len(TOKENS)])
    # layer 0's keys depend only on each token and its position: the re-rotated keys must equal
    # a fresh evaluation of the kept tokens at their new positions
    fresh = edgellama.load(path, n_ctx=16, cache_type=cache_type)
    fresh.eval(kept)
    got = _values(model.state.k_cache[0, :, :len(kept)])
    want = _values(fresh.state.k_cache[0, :, :len(kept)])
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())
    # deeper layers differ (they saw the dropped tokens), but stay finite and usable
    logits = model.eval([9])
    assert np.isfinite(logits).all() and model.state.n_past == len(kept) + 1


def test_shift_with_nothing_kept_and_bad_arguments(path):
    model = edgellama.load(path, n_ctx=16)
    model.eval(TOKENS[:6])
    model.shift_context(0, 3)
    assert model.state.tokens == TOKENS[3:6] and model.n_shifted == 3
    for n_keep, n_discard in [(0, 0), (2, 10), (-1, 1)]:
        with pytest.raises(ValueError):
            model.shift_context(n_keep, n_discard)


def _statm_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_generation_runs_for_many_contexts_at_flat_memory(smollm2_path):
    """4.7 x n_ctx tokens of sampled text on the real model: the cache never grows, logits stay
    finite, and the text stays as predictable to the model after shifts as before the first one."""
    n_ctx = 64
    model = edgellama.load(smollm2_path, n_ctx=n_ctx, threads=2)
    cache = model.state.k_cache
    nll = []  # negative log-likelihood of each sampled token under the model that sampled it

    from edgellama.sampling import Sampler

    inner = Sampler(temperature=0.8, seed=0)

    def sampler(logits):
        assert np.isfinite(logits).all()
        token = inner(logits)
        z = logits.astype(np.float64) - logits.max()
        nll.append(float(np.log(np.exp(z).sum()) - z[token]))
        return token

    prompt = "Once upon a time, in a small village by the sea, there lived"
    chunks = model.generate(prompt, max_tokens=300, sampler=sampler, stop_ids=(), context_shift=True)
    # memory is read once shifts have happened (their kernels are loaded, or compiled on a cold
    # cache), then at the end: 2 x n_ctx and 4.7 x n_ctx tokens
    rest, rss_before = [], None
    for chunk in chunks:
        rest.append(chunk)
        if len(rest) == 2 * n_ctx:
            rss_before = _statm_rss_mb()
    rss_after = _statm_rss_mb()
    tokens = [c.token for c in rest if c.token is not None]
    if rest[-1].finish_reason == "stop":
        pytest.skip("the model ended its text before filling the context several times")
    assert len(tokens) == 300 and model.n_shifted >= 3 * n_ctx
    assert model.state.k_cache is cache and cache.shape[2] == n_ctx      # preallocated, never grown
    assert rss_before is not None and rss_after - rss_before < 8         # MiB: flat memory
    assert model.state.n_past <= n_ctx
    # Before the first shift the model sees the whole text; after, a window of it.  A broken cache
    # (wrong rotation, misplaced values) makes the model's own samples look like noise to it: their
    # negative log-likelihood would rise towards log(vocab) ~ 10.8.  A sound shift keeps it near the
    # unshifted level; the bound allows for the lost context.
    before = np.mean(nll[:n_ctx - 20])
    after = np.mean(nll[n_ctx:])
    assert after < 1.5 * before + 1.0, (before, after)
    assert after < 5.0
    print(f"mean NLL before the first shift {before:.2f}, after {after:.2f}")
