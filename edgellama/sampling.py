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
- temperature: 0 takes the candidate with the largest logit (greedy); otherwise
  softmax((logits - max logit) / T) and one draw from a seeded ``numpy.random.Generator`` (same seed
  + settings = same tokens).

**Ranges.**  The settings are the fields of ``Sampler``; each one's accepted values are in
``SAMPLING_OPTIONS`` (read by the CLI for its flags and by the server for its JSON fields), and a
value outside them is a ``SamplingError`` whose ``param`` names the setting.  Extreme values that
are still in range keep a meaning:

- a temperature below ``GREEDY_TEMPERATURE`` (1e-6) is greedy.  At such a temperature a logit gap
  of 1e-4 (a few float32 roundings of a logit near 100) already leaves the runner-up e^-100 of the
  top token's probability: a draw could only differ from the greedy pick on exact ties, and
  ``logits / T`` would overflow for the tiniest ones (5e-324 made every candidate NaN and quietly
  drew the last one).  Above it, logits are shifted by their maximum before the division, so no
  temperature, bias or penalty in range can overflow to NaN;
- ``repeat_penalty`` is in [1/MAX_PENALTY, MAX_PENALTY] = [0.001, 1000] and ``presence_penalty``
  and ``frequency_penalty`` in [0, MAX_PENALTY]: 1000 already removes a repeated token from any
  real distribution, and within these bounds a penalized logit stays finite (1e308 made
  ``logit * penalty`` infinite); ``penalty_last_n`` is at most MAX_PENALTY_LAST_N (2^30).

Log-probabilities (``logprobs=N``) describe the model's own distribution: ``log_softmax`` of the raw
logits, before bias, penalties, filters and temperature (as llama.cpp's server and vLLM report by
default): the chosen token's, and the ``N`` most likely tokens'.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from ._validate import ParameterError, is_int, is_number

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-6     # temperatures below this are greedy (see the module docstring)
MAX_PENALTY = 1000.0          # repeat_penalty in [1/MAX_PENALTY, MAX_PENALTY]; presence/frequency in [0, MAX_PENALTY]
MAX_PENALTY_LAST_N = 1 << 30  # the longest penalty window (longer than any context)


class SamplingError(ParameterError):
    """A sampling parameter is out of range, or the logits cannot be sampled from.

    ``param`` names the ``Sampler`` setting at fault (``"temperature"``, ``"logit_bias"``, ...), or
    is None when the logits themselves are the problem (NaN, every token banned)."""


class TokenLogprob(NamedTuple):
    token: int
    logprob: float


class Sampled(NamedTuple):
    token: int
    logprob: float | None = None                       # log p(token) under the model (None: not asked)
    top_logprobs: list[TokenLogprob] | None = None     # the N most likely tokens, most likely first


@dataclass(frozen=True)
class Option:
    """One sampler setting: its type, default and accepted range, and a line of help.

    ``rule`` states the accepted values in words (the CLI's messages use it as is: "--top-p must be
    in [0, 1], got 1.5"); ``nullable`` settings also take None (seed: random; logprobs: none)."""

    kind: type                      # int or float
    default: Any
    low: float
    high: float = math.inf
    open_low: bool = False
    nullable: bool = False
    rule: str = ""
    help: str = ""

    @property
    def expected(self) -> str:
        """What is accepted, as in "must be {expected}"."""
        kind = "an integer" if self.kind is int else "a finite number"
        return f"{kind} {self.rule}" + (" or None" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind is int:
            if not is_int(value):
                return False
        elif not (is_number(value) and math.isfinite(value)):
            return False
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high

    def check(self, name: str, value: Any):
        """``value`` as the setting's type, or a SamplingError naming ``name``."""
        if not self.accepts(value):
            raise SamplingError(f"{name} must be {self.expected}, got {value!r}", param=name,
                                expected=self.expected, value=value)
        return None if value is None else self.kind(value)


def _option(default, kind: type = float, low: float = 0.0, high: float = math.inf, *, open_low: bool = False,
            nullable: bool = False, rule: str, help: str):
    spec = Option(kind, default, low, high, open_low, nullable, rule, help)
    return field(default=default, metadata={"option": spec})


@dataclass(eq=False)
class Sampler:
    """The sampler chain and the penalty window.

    The fields are the settings (ranges: ``SAMPLING_OPTIONS``); the first five may be given by
    position.  ``sample(logits)`` / ``sampler(logits)`` choose a token without recording it;
    ``accept(token)`` records a token in the penalty window, and ``reset(tokens)`` restarts the window
    from a prompt.  The generation loop calls ``reset(prompt_ids)`` once, then ``accept`` after each
    sampled token.  ``n_vocab`` (when known) is checked against every row of logits.
    """

    temperature: float = _option(0.0, rule=">= 0 (0: greedy)", help="temperature (0: greedy)")
    top_k: int = _option(0, int, rule=">= 0", help="keep the k most likely tokens (0: all)")
    top_p: float = _option(1.0, high=1.0, rule="in [0, 1]",
                           help="nucleus sampling: keep the most likely tokens up to this total probability (1: off)")
    min_p: float = _option(0.0, high=1.0, rule="in [0, 1]",
                           help="drop the tokens less likely than min-p x the most likely one (0: off)")
    seed: int | None = _option(None, int, nullable=True, rule=">= 0",
                               help="random seed for sampling (None: from the operating system)")
    _: KW_ONLY
    typical_p: float = _option(1.0, high=1.0, open_low=True, rule="in (0, 1]",
                               help="locally typical sampling threshold (1: off)")
    repeat_penalty: float = _option(1.0, low=1.0 / MAX_PENALTY, high=MAX_PENALTY,
                                    rule=f"in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}] (1: off)",
                                    help="divide the positive logits of the tokens in the penalty window by this "
                                         "(multiply the negative ones) (1: off)")
    presence_penalty: float = _option(0.0, high=MAX_PENALTY, rule=f"in [0, {MAX_PENALTY:g}]",
                                      help="lower the logits of the tokens in the penalty window by this (0: off)")
    frequency_penalty: float = _option(0.0, high=MAX_PENALTY, rule=f"in [0, {MAX_PENALTY:g}]",
                                       help="lower the logits of the tokens in the penalty window by this times "
                                            "their count (0: off)")
    penalty_last_n: int = _option(64, int, high=MAX_PENALTY_LAST_N, rule=f"in [0, {MAX_PENALTY_LAST_N}]",
                                  help="tokens the penalties look back over")
    logit_bias: Mapping[int, float] | None = field(default=None, repr=False)
    logprobs: int | None = _option(None, int, high=MAX_LOGPROBS, nullable=True, rule=f"in [0, {MAX_LOGPROBS}]",
                                   help="log-probabilities of the chosen token and of this many most likely ones")
    n_vocab: int | None = None

    def __post_init__(self):
        for f in fields(self):
            spec = f.metadata.get("option")
            if spec is not None:
                setattr(self, f.name, spec.check(f.name, getattr(self, f.name)))
        if self.n_vocab is not None:
            if not is_int(self.n_vocab) or self.n_vocab < 1:
                raise SamplingError(f"n_vocab must be an integer >= 1, got {self.n_vocab!r}", param="n_vocab",
                                    expected="an integer >= 1", value=self.n_vocab)
            self.n_vocab = int(self.n_vocab)
        self.logit_bias = _logit_bias(self.logit_bias)
        self._bias_ids = np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=len(self.logit_bias))
        self._bias_values = np.fromiter(self.logit_bias.values(), dtype=np.float64, count=len(self.logit_bias))
        self.rng = np.random.default_rng(self.seed)
        self.penalizes = self.penalty_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)
        self._window: deque[int] = deque(maxlen=max(self.penalty_last_n, 1))
        self._counts: Counter[int] = Counter()
        self._max_token = -1  # largest id accepted since the last reset (checked against the logits)
        if self.n_vocab is not None:
            self._check_vocab(self.n_vocab)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

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
        if self.greedy:
            token = int(ids[np.argmax(vals)])
        else:
            cum = np.cumsum(self._weights(vals))
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            token = int(ids[min(i, len(ids) - 1)])
        if self.logprobs is None:
            return Sampled(token)
        return Sampled(token, *token_logprobs(raw, token, self.logprobs))

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` with the logit bias and the penalties applied."""
        x = np.array(logits, dtype=np.float64)
        with np.errstate(over="ignore"):  # (only float64 logits near 1e308 can overflow: candidates() refuses +inf)
            if self._bias_ids.size:
                x[self._bias_ids] += self._bias_values
            if self.penalizes and self._counts:
                ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
                counts = np.fromiter(self._counts.values(), dtype=np.float64, count=len(self._counts))
                v = x[ids]
                v = np.where(v <= 0.0, v * self.repeat_penalty, v / self.repeat_penalty)
                x[ids] = v - (counts * self.frequency_penalty + self.presence_penalty)
        return x

    def _weights(self, vals: np.ndarray) -> np.ndarray:
        """Unnormalized probabilities exp((vals - max) / T): the largest is 1, none is NaN (the shift
        comes first, so a tiny T or a huge logit cannot make inf / inf)."""
        with np.errstate(over="ignore"):
            return np.exp((vals - vals.max()) / self.temperature)

    def candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run top-k, typical, top-p and min-p over adjusted logits: (candidate ids, their logits).

        Candidates are in no particular order unless top-p ran (then most likely first).
        """
        top = x.max()  # NaN if any logit is NaN
        if np.isnan(top):
            raise SamplingError("the logits contain NaN")
        if top == math.inf:
            raise SamplingError("the logits contain +inf (after the logit bias and penalties)")
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
        candidates; below GREEDY_TEMPERATURE all mass on the greedy token).  For tests and inspection."""
        raw = np.asarray(logits)
        self._check_vocab(raw.size)
        ids, vals = self.candidates(self.adjusted_logits(raw))
        out = np.zeros(raw.size)
        if self.greedy:
            out[ids[np.argmax(vals)]] = 1.0
        else:
            weights = self._weights(vals)
            out[ids] = weights / weights.sum()
        return out

    def _check_vocab(self, n_vocab: int) -> None:
        if self.n_vocab is not None and n_vocab != self.n_vocab:
            raise SamplingError(f"the logits have {n_vocab} entries but the sampler was made for a vocabulary "
                                f"of {self.n_vocab}", param="n_vocab")
        if self._bias_ids.size and int(self._bias_ids.max()) >= n_vocab:
            raise SamplingError(f"logit_bias token id {int(self._bias_ids.max())} is outside the vocabulary "
                                f"[0, {n_vocab})", param="logit_bias")
        if self._max_token >= n_vocab:
            raise SamplingError(f"token id {self._max_token} in the penalty window is outside the vocabulary "
                                f"[0, {n_vocab})")


# setting name -> Option, in the order of Sampler's fields: the one list of the sampler's settings
SAMPLING_OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(Sampler) if "option" in f.metadata}


def make_sampler(sampler=None, options: Mapping[str, Any] | None = None, n_vocab: int | None = None):
    """The sampler a generation call uses: ``sampler`` as given (a Sampler or any callable
    logits -> token id), or one ``Sampler(**options, n_vocab=n_vocab)``; giving both is an error
    (the options would be silently ignored).  An unknown option is a TypeError, as for any call."""
    options = dict(options or {})
    if sampler is None:
        return Sampler(**options, n_vocab=n_vocab)
    if options:
        raise SamplingError(f"give either sampler= or sampling options ({', '.join(options)}), not both",
                            param=next(iter(options)))
    return sampler


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


def _token_id(token, n_vocab: int | None) -> int:
    if not is_int(token) or token < 0 or (n_vocab is not None and token >= n_vocab):
        bound = f"[0, {n_vocab})" if n_vocab is not None else ">= 0"
        raise SamplingError(f"token id must be an integer in {bound}, got {token!r}")
    return int(token)


def _logit_bias(bias) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise SamplingError(f"logit_bias must be a mapping of token id -> bias, got {type(bias).__name__}",
                            param="logit_bias")
    out: dict[int, float] = {}
    for token, value in bias.items():
        if not is_int(token) or token < 0:
            raise SamplingError(f"logit_bias token id must be a non-negative integer, got {token!r}",
                                param="logit_bias")
        if not (is_number(value) and (math.isfinite(value) or value == -math.inf)):
            raise SamplingError(f"logit_bias[{token}] must be a finite number or -inf (ban), got {value!r}",
                                param="logit_bias")
        out[int(token)] = float(value)
    return out
