"""Context shift: dropping cached positions and re-rotating the moved keys instead of re-evaluating."""

from __future__ import annotations

import numpy as np
import pytest

import edgellama
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

TOKENS = [5, 17, 200, 3, 99, 42, 42, 7, 130, 250, 11, 64]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("shift") / "m.gguf", GGMLType.F32, rope_freqs=True)


def test_shifted_cache_equals_evaluating_the_kept_tokens_at_their_new_positions(path):
    model = edgellama.load(path, n_ctx=16)
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
    fresh = edgellama.load(path, n_ctx=16)
    fresh.eval(kept)
    got = model.state.k_cache[0, :, :len(kept)]
    want = fresh.state.k_cache[0, :, :len(kept)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
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
