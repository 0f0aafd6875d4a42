"""edgellama._validate: the one integer / number check every layer uses (issue 13: it was written out
about 29 times as ``isinstance(x, bool) or not isinstance(x, int)``), and the error naming a parameter."""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest

from edgellama._validate import ParameterError, is_int, is_number


@pytest.mark.parametrize("value", [0, -3, 2 ** 70, np.int8(4), np.uint64(2 ** 63), np.int64(-1)])
def test_integers(value):
    assert is_int(value) and is_number(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, np.float32(2), "3", None, [1], 1 + 0j])
def test_not_integers(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [1.5, -0.0, math.inf, math.nan, np.float32(0.25), np.float64(3), fractions.Fraction(1, 3)])
def test_numbers_that_are_not_integers(value):
    assert is_number(value) and not is_int(value)


@pytest.mark.parametrize("value", [True, np.bool_(False), "1.5", None, 1j, np.array([1.0])])
def test_not_numbers(value):
    assert not is_number(value)


def test_parameter_error_is_a_value_error_naming_its_parameter():
    e = ParameterError("top_k must be an integer >= 0, got -1", "top_k", expected="an integer >= 0", value=-1)
    assert isinstance(e, ValueError) and str(e) == "top_k must be an integer >= 0, got -1"
    assert (e.param, e.expected, e.value) == ("top_k", "an integer >= 0", -1)
    assert ParameterError("no parameter").param is None
