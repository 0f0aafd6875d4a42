"""Logits -> next token.

A ``Sampler`` is a callable ``sampler(logits) -> token id``.  temperature 0 is greedy argmax (ties
go to the lowest id, as numpy's argmax); otherwise the candidates are filtered (top-k, top-p,
min-p), scaled by 1/temperature and drawn from a seeded ``numpy.random.Generator``: the same seed
and settings give the same tokens.
"""

from __future__ import annotations

import math

import numpy as np


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        _check(temperature, "temperature", 0.0, math.inf)
        _check(top_p, "top_p", 0.0, 1.0)
        _check(min_p, "min_p", 0.0, 1.0)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise SamplingError(f"top_k must be a non-negative integer, got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise SamplingError(f"seed must be an integer or None, got {seed!r}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.min_p = float(min_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        ids, probs = self.candidates(logits)
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids (most likely first) and their renormalized probabilities."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.top_k and self.top_k < logits.size:
            ids = np.argpartition(-logits, self.top_k - 1)[:self.top_k]
        else:
            ids = np.arange(logits.size)
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        z = logits[ids] / self.temperature
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = len(ids)
        if self.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), self.top_p) + 1))
        if self.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= self.min_p * probs[0]))))
        ids, probs = ids[:keep], probs[:keep]
        return ids, probs / probs.sum()


def _check(value, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not lo <= value <= hi:
        raise SamplingError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
