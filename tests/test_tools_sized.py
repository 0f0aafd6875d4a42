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
