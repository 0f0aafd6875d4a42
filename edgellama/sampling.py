"""Logits -> next token, with llama.cpp's sampler chain.

``Sampler(...)`` is a callable ``sampler(logits) -> token id``; ``sampler.sample(logits)`` also returns
the log-probabilities when ``logprobs`` is set.  The chain runs in llama.cpp's default order:

    logit bias -> penalties -> top-k -> typical -> top-p -> min-p -> temperature -> draw

(llama.cpp's ``common_sampler_init`` adds the logit bias before its sampler list, whose default
begins with the penalties.)  Each step keeps llama.cpp's definition:

- logit bias: ``logit += bias[id]``; a bias of ``-inf`` bans the token.
- penalties, over the last ``penalty_last_n`` tokens given to ``accept`` (the prompt, then each
  generated token): a token seen ``c`` times there has its logit divided by ``repeat_penalty`` if
  positive, multiplied by it otherwise, then lowered by ``c * frequency_penalty + presence_penalty``.
- top-k: the ``k`` largest logits (0 = all).
- typical: softmax over the candidates, entropy ``H``; candidates ordered by ``|-log p - H|``,
  kept until their probability sum exceeds ``typical_p`` (1 = off).
- top-p: candidates by decreasing probability, kept until their sum reaches ``top_p`` (1 = off).
- min-p: keep ``logit >= max logit + log(min_p)``, i.e. ``p >= min_p * p_max`` (0 = off).
- temperature: 0 takes the candidate with the largest logit (greedy); otherwise logits / T,
  softmax, one draw from a seeded ``numpy.random.Generator`` (same seed + settings = same tokens).

Log-probabilities (``logprobs=N``) describe the model's own distribution: ``log_softmax`` of the raw
logits, before bias, penalties, filters and temperature (as llama.cpp's server and vLLM report by
default): the chosen token's, and the ``N`` most likely tokens'.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Iterable, Mapping, NamedTuple

import numpy as np

MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling or generation parameter is out of range."""


class TokenLogprob(NamedTuple):
    token: int
    logprob: float


class Sampled(NamedTuple):
    token: int
    logprob: float | None = None                       # log p(token) under the model (None: not asked)
    top_logprobs: list[TokenLogprob] | None = None     # the N most likely tokens, most likely first


class Sampler:
    """The sampler chain and the penalty window.

    ``sample(logits)`` / ``sampler(logits)`` choose a token without recording it; ``accept(token)``
    records a token in the penalty window, and ``reset(tokens)`` restarts the window from a prompt.
    The generation loop calls ``reset(prompt_ids)`` once, then ``accept`` after each sampled token.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None, *, typical_p: float = 1.0, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, penalty_last_n: int = 64,
                 logit_bias: Mapping[int, float] | None = None, logprobs: int | None = None,
                 n_vocab: int | None = None):
        self.temperature = _number(temperature, "temperature", 0.0, math.inf)
        self.top_k = _integer(top_k, "top_k", 0)
        self.top_p = _number(top_p, "top_p", 0.0, 1.0)
        self.min_p = _number(min_p, "min_p", 0.0, 1.0)
        self.typical_p = _number(typical_p, "typical_p", 0.0, 1.0, open_low=True)
        self.repeat_penalty = _number(repeat_penalty, "repeat_penalty", 0.0, math.inf, open_low=True)
        self.presence_penalty = _number(presence_penalty, "presence_penalty", 0.0, math.inf)
        self.frequency_penalty = _number(frequency_penalty, "frequency_penalty", 0.0, math.inf)
        self.penalty_last_n = _integer(penalty_last_n, "penalty_last_n", 0)
        if logprobs is not None:
            logprobs = _integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
        self.logprobs = logprobs
        if seed is not None:
            seed = _integer(seed, "seed", 0)
        self.seed = seed
        self.n_vocab = None if n_vocab is None else _integer(n_vocab, "n_vocab", 1)
        self.logit_bias = _logit_bias(logit_bias)
        self._bias_ids = np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=len(self.logit_bias))
        self._bias_values = np.fromiter(self.logit_bias.values(), dtype=np.float64, count=len(self.logit_bias))
        self.rng = np.random.default_rng(seed)
        self.penalizes = self.penalty_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)
        self._window: deque[int] = deque(maxlen=max(self.penalty_last_n, 1))
        self._counts: Counter[int] = Counter()
        self._max_token = -1  # largest id accepted since the last reset (checked against the logits)
        if self.n_vocab is not None:
            self._check_vocab(self.n_vocab)

    def __repr__(self) -> str:
        names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "penalty_last_n", "seed", "logprobs")
        return "Sampler(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    # ----- penalty window ------------------------------------------------------------------------

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) in the penalty window."""
        token = _token_id(token, self.n_vocab)
        if not self.penalizes:
            return
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._window.append(token)
        self._counts[token] += 1
        self._max_token = max(self._max_token, token)

    def reset(self, tokens: Iterable[int] = ()) -> None:
        """Empty the penalty window, then accept ``tokens`` (only the last ``penalty_last_n`` count).
        The random generator keeps its state: a reused sampler continues its sequence."""
        self._window.clear()
        self._counts.clear()
        self._max_token = -1
        tokens = list(tokens)
        for token in tokens[-self.penalty_last_n:] if self.penalty_last_n else ():
            self.accept(token)

    # ----- the chain -----------------------------------------------------------------------------

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits).token

    def sample(self, logits: np.ndarray) -> Sampled:
        raw = np.asarray(logits)
        if raw.ndim != 1 or raw.size == 0:
            raise SamplingError(f"logits must be one non-empty row, got shape {raw.shape}")
        self._check_vocab(raw.size)
        x = self.adjusted_logits(raw)
        ids, vals = self.candidates(x)
        if self.temperature == 0.0:
            token = int(ids[np.argmax(vals)])
        else:
            z = vals / self.temperature
            cum = np.cumsum(np.exp(z - z.max()))
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            token = int(ids[min(i, len(ids) - 1)])
        if self.logprobs is None:
            return Sampled(token)
        return Sampled(token, *token_logprobs(raw, token, self.logprobs))

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` with the logit bias and the penalties applied."""
        x = np.array(logits, dtype=np.float64)
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_values
        if self.penalizes and self._counts:
            ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float64, count=len(self._counts))
            v = x[ids]
            v = np.where(v <= 0.0, v * self.repeat_penalty, v / self.repeat_penalty)
            x[ids] = v - (counts * self.frequency_penalty + self.presence_penalty)
        return x

    def candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run top-k, typical, top-p and min-p over adjusted logits: (candidate ids, their logits).

        Candidates are in no particular order unless top-p ran (then most likely first).
        """
        top = x.max()  # NaN if any logit is NaN
        if np.isnan(top):
            raise SamplingError("the logits contain NaN")
        if top == -math.inf:
            raise SamplingError("every token is banned (all logits are -inf after the logit bias)")
        if self.logit_bias and np.isneginf(x[self._bias_ids]).any():
            ids = np.flatnonzero(x > -math.inf)  # banned tokens are never candidates
            vals = x[ids]
        else:
            ids, vals = np.arange(x.size), x
        if 0 < self.top_k < len(ids):
            part = np.argpartition(-vals, self.top_k - 1)[:self.top_k]
            ids, vals = ids[part], vals[part]
        if self.typical_p < 1.0 and len(ids) > 1:
            probs = _softmax(vals)
            with np.errstate(divide="ignore"):
                surprise = -np.log(probs)
            entropy = float(np.sum(probs * np.where(probs > 0, surprise, 0.0)))
            keep = _shortest_prefix(np.abs(surprise - entropy), probs, self.typical_p, strict=True)
            ids, vals = ids[keep], vals[keep]
        if self.top_p < 1.0 and len(ids) > 1:
            keep = _shortest_prefix(-vals, _softmax(vals), self.top_p, strict=False)
            ids, vals = ids[keep], vals[keep]
        if self.min_p > 0.0 and len(ids) > 1:
            keep = vals >= vals.max() + math.log(self.min_p)
            ids, vals = ids[keep], vals[keep]
        return ids, vals

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution ``sample`` draws from, over the whole vocabulary (zeros outside the
        candidates; at temperature 0 all mass on the greedy token).  For tests and inspection."""
        raw = np.asarray(logits)
        self._check_vocab(raw.size)
        ids, vals = self.candidates(self.adjusted_logits(raw))
        out = np.zeros(raw.size)
        if self.temperature == 0.0:
            out[ids[np.argmax(vals)]] = 1.0
        else:
            out[ids] = _softmax(vals / self.temperature)
        return out

    def _check_vocab(self, n_vocab: int) -> None:
        if self.n_vocab is not None and n_vocab != self.n_vocab:
            raise SamplingError(f"the logits have {n_vocab} entries but the sampler was made for a vocabulary "
                                f"of {self.n_vocab}")
        if self._bias_ids.size and int(self._bias_ids.max()) >= n_vocab:
            raise SamplingError(f"logit_bias token id {int(self._bias_ids.max())} is outside the vocabulary "
                                f"[0, {n_vocab})")
        if self._max_token >= n_vocab:
            raise SamplingError(f"token id {self._max_token} in the penalty window is outside the vocabulary "
                                f"[0, {n_vocab})")


def token_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[TokenLogprob]]:
    """log_softmax(logits)[token] and the ``n`` most likely (token, logprob), most likely first
    (ties: lower id first)."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max()
    lse = top + math.log(np.exp(x - top).sum())
    alternatives: list[TokenLogprob] = []
    if n > 0:
        n = min(n, x.size)
        part = np.argpartition(-x, n - 1)[:n] if n < x.size else np.arange(x.size)
        part = part[np.lexsort((part, -x[part]))]
        alternatives = [TokenLogprob(int(i), float(x[i] - lse)) for i in part]
    return float(x[token] - lse), alternatives


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _shortest_prefix(keys: np.ndarray, probs: np.ndarray, mass: float, strict: bool) -> np.ndarray:
    """Positions in increasing ``keys`` order up to the first whose running probability sum reaches
    ``mass`` (exceeds it if ``strict``); all positions if it never does.

    Sorts only as many as needed: the ``m`` smallest keys by partition, ``m`` growing 8x, so a peaked
    distribution over a 128k vocabulary costs a partition, not a full sort.
    """
    n = keys.size
    m = 64
    while True:
        if m >= n:
            order = np.argsort(keys, kind="stable")
        else:
            part = np.argpartition(keys, m - 1)[:m]
            order = part[np.argsort(keys[part], kind="stable")]
        cum = np.cumsum(probs[order])
        cut = int(np.searchsorted(cum, mass, side="right" if strict else "left"))
        if cut < len(order):
            return order[:cut + 1]
        if m >= n:
            return order
        m *= 8


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _number(value, name: str, lo: float, hi: float, open_low: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value) and (lo < value if open_low else lo <= value) and value <= hi)
    if not ok:
        low = "(" if open_low else "["
        high = "inf)" if hi == math.inf else f"{hi}]"
        raise SamplingError(f"{name} must be a finite number in {low}{lo}, {high}, got {value!r}")
    return float(value)


def _integer(value, name: str, lo: int, hi: int | None = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SamplingError(f"{name} must be an integer {where}, got {value!r}")
    return int(value)


def _token_id(token, n_vocab: int | None) -> int:
    if not _is_int(token) or token < 0 or (n_vocab is not None and token >= n_vocab):
        bound = f"[0, {n_vocab})" if n_vocab is not None else ">= 0"
        raise SamplingError(f"token id must be an integer in {bound}, got {token!r}")
    return int(token)


def _logit_bias(bias) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise SamplingError(f"logit_bias must be a mapping of token id -> bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for token, value in bias.items():
        if not _is_int(token) or token < 0:
            raise SamplingError(f"logit_bias token id must be a non-negative integer, got {token!r}")
        ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
              and (math.isfinite(value) or value == -math.inf))
        if not ok:
            raise SamplingError(f"logit_bias[{token}] must be a finite number or -inf (ban), got {value!r}")
        out[int(token)] = float(value)
    return out
