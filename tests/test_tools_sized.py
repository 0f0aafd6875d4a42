"""tools/make_sized_model.py's names: SHAPE.TYPE where the shape's own name has dots."""

from __future__ import annotations

import pytest

from tools.make_sized_model import FILE_TYPES, SHAPES, parse_sized


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_every_shape_and_type_parses_back(shape, ftype):
    assert parse_sized(f"{shape}.{ftype}") == (shape, ftype)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.2-1b.q5_0", "llama-3.q8_0", "q8_0", "", "llama-3-8b.q4_0.gguf"])
def test_a_name_that_is_not_one_says_what_is(name):
    with pytest.raises(ValueError, match=r"is not SHAPE\.TYPE: shapes llama-3-8b, llama-3\.2-1b, llama-3\.2-3b; types"):
        parse_sized(name)


def test_random_q4_k_blocks_have_zero_mean_values():
    """The sized files' Q4_K blocks decode (gguf-py, ggml's dequantization) to values of mean zero:
    each sub-block's minimum is 7.5 of its scale steps, so no row carries the bias that made
    activations overflow within a few layers (a model computing infinities measures other code)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize

    from edgellama.quants import GGMLType
    from tools.make_sized_model import random_blocks

    rows = random_blocks(np.random.default_rng(0), GGMLType.Q4_K, 64, 2048)
    values = dequantize(rows, QT.Q4_K).reshape(64, 2048).astype(np.float64)
    assert np.isfinite(values).all() and values.std() > 0
    # values d * sc * (q - 7.5), q uniform: a row's mean of 2048 lies within a few std / 45 of zero
    # (the biased blocks of before had row means about one std)
    std = values.std()
    assert abs(values.mean()) < 0.02 * std and np.abs(values.mean(axis=1)).max() < 0.2 * std
