"""Small checks every layer shares (no Numba, no model): what counts as an integer or a number, and
the error that names the parameter it is about.

``True`` is an ``int`` to Python but never a count, a size or a token id here: ``is_int`` and
``is_number`` refuse bools (Python's and numpy's) and accept numpy's integer and float scalars.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["is_int", "is_number", "ParameterError"]


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A real number (int, float, numpy integer or float; not necessarily finite), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class ParameterError(ValueError):
    """A value given for a named parameter is wrong.

    ``param`` is the parameter's Python name (``"temperature"``, ``"max_tokens"``) so that each user
    face can name it in its own terms (the CLI its flag, the server its JSON field) without reading
    the message; ``expected`` (when set) says what is accepted, as in "must be {expected}", and
    ``value`` is what was given."""

    def __init__(self, message: str, param: str | None = None, *, expected: str | None = None,
                 value: Any = None):
        super().__init__(message)
        self.param = param
        self.expected = expected
        self.value = value
