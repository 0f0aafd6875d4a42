"""Prefill + decode loop as a generator of text chunks.

Each chunk is a ``str`` (so ``for piece in model.generate(...): print(piece, end="")`` just works)
that also carries the token id it came from, its log-probabilities when asked, and, on the last
chunk, why generation ended and the counts.  One chunk per generated token, then one last chunk with
``token=None``, ``finish_reason`` and ``usage``.

Text goes through two hold-back stages before it is yielded:

1. the tokenizer's stream decoder holds back the bytes of an incomplete UTF-8 character;
2. the stop-string matcher holds back the end of the text while it could still be the start of a
   stop string, so a stop string split across tokens never leaks: when one completes, generation
   ends with ``finish_reason="stop"`` and the text is cut just before it.

Sampler protocol: any callable ``logits -> token id`` works.  If it also has ``sample(logits)``
(returning ``sampling.Sampled``), ``reset(prompt_ids)`` and ``accept(token)``, the loop uses them for
log-probabilities and the penalty window, as ``sampling.Sampler`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .sampling import Sampled, SamplingError, TokenLogprob


class Chunk(str):
    """A piece of generated text plus what produced it."""

    token: int | None
    finish_reason: str | None   # None until the last chunk: "stop" (end-of-generation token or stop string) or "length"
    usage: "Usage | None"
    logprob: float | None       # log p(token) under the model, when logprobs were asked for
    top_logprobs: list[TokenLogprob] | None

    def __new__(cls, text: str, token: int | None = None, finish_reason: str | None = None,
                usage: "Usage | None" = None, logprob: float | None = None,
                top_logprobs: list[TokenLogprob] | None = None):
        self = super().__new__(cls, text)
        self.token = token
        self.finish_reason = finish_reason
        self.usage = usage
        self.logprob = logprob
        self.top_logprobs = top_logprobs
        return self

    @property
    def text(self) -> str:
        return str(self)


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int          # prompt tokens reused from the cache instead of evaluated
    completion_tokens: int
    prompt_seconds: float
    generation_seconds: float

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class StopStrings:
    """Finds stop strings in streamed text and holds back what could still become one.

    ``push(text)`` returns ``(releasable text, matched)``.  Generation stops at the first point where
    the text contains a stop string (the earliest end; among stops ending there, the earliest start),
    so the result does not depend on how the text was split into pieces.  Held-back text is always
    a suffix that is a proper prefix of some stop string, hence a match never starts in text already
    released.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        pending = self.pending + text
        if not self.stops:
            self.pending = ""
            return pending, False
        best = None  # (end, start) of the first completed stop string
        for s in self.stops:
            start = pending.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            self.pending = ""
            return pending[:best[1]], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(pending) - hold
        self.pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """What is still held back (generation ended without completing a stop string)."""
        text, self.pending = self.pending, ""
        return text


def check_stop(stop) -> tuple[str, ...]:
    """``None``, one string, or a list of strings -> a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    try:
        stops = tuple(stop)
    except TypeError:
        raise SamplingError(f"stop must be a string or a list of strings, got {type(stop).__name__}") from None
    for s in stops:
        if not isinstance(s, str) or not s:
            raise SamplingError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def truncate_prompt(ids: list[int], n_ctx: int, n_keep: int, room: int) -> list[int]:
    """A prompt cut to fit the context with ``room`` positions left for the reply: its first
    ``n_keep`` tokens (a BOS, a system prompt) and its end, the middle dropped.  A prompt that fits
    comes back unchanged."""
    limit = n_ctx - room
    if len(ids) <= limit:
        return list(ids)
    n_keep = max(0, min(n_keep, limit // 2))
    return list(ids[:n_keep]) + list(ids[len(ids) - (limit - n_keep):])


def generate_tokens(model, prompt_ids: list[int], max_tokens: int | None,
                    sampler: Callable[[np.ndarray], int], stop_ids=frozenset(), *,
                    stop: str | Iterable[str] | None = (), n_keep: int | None = None) -> Iterator[Chunk]:
    """Evaluate the prompt (reusing the cached prefix) and sample until a stop rule fires.

    max_tokens None means until an end-of-generation token or the end of the context.  ``stop_ids``
    (added to the tokenizer's end-of-generation ids) end generation without being emitted; ``stop``
    strings end it when the generated text contains one (the text before it is emitted).
    ``n_keep`` not None turns on context shift: a full cache keeps its first n_keep tokens, drops
    half of the rest and generation goes on (``Model.shift_context``).
    Arguments are checked here, before any evaluation; the work happens when the result is iterated.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 0):
        raise SamplingError(f"max_tokens must be a non-negative integer or None, got {max_tokens!r}")
    if not callable(sampler):
        raise SamplingError(f"sampler must be callable (logits -> token id), got {type(sampler).__name__}")
    stops = check_stop(stop)
    try:
        extra_ids = frozenset(int(i) for i in stop_ids)
    except (TypeError, ValueError):
        raise SamplingError(f"stop_ids must be token ids, got {stop_ids!r}") from None
    return _generate(model, list(prompt_ids), None if max_tokens is None else int(max_tokens), sampler,
                     extra_ids | model.tokenizer.eog_ids, stops, n_keep)


def _generate(model, prompt_ids: list[int], max_tokens: int | None, sampler, stop_ids: frozenset[int],
              stops: tuple[str, ...], n_keep: int | None = None) -> Iterator[Chunk]:
    sample = getattr(sampler, "sample", None)
    accept = getattr(sampler, "accept", None)
    reset = getattr(sampler, "reset", None)
    t0 = time.perf_counter()
    logits, cached = model.eval_prompt(prompt_ids)
    t1 = time.perf_counter()
    if reset is not None:
        reset(prompt_ids)  # the prompt opens the penalty window
    decoder = model.tokenizer.stream_decoder()
    matcher = StopStrings(stops)
    produced = 0
    finish = "length"
    stopped_by_string = False
    while max_tokens is None or produced < max_tokens:
        picked = sample(logits) if sample is not None else sampler(logits)
        if not isinstance(picked, Sampled):
            picked = Sampled(picked)
        token = picked.token
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < len(logits):
            raise SamplingError(f"the sampler returned {token!r}, not a token id in [0, {len(logits)})")
        token = int(token)
        if token in stop_ids:
            finish = "stop"
            break
        produced += 1
        if accept is not None:
            accept(token)
        text, stopped_by_string = matcher.push(decoder.feed(token))
        yield Chunk(text, token, logprob=picked.logprob, top_logprobs=picked.top_logprobs)
        if stopped_by_string:
            finish = "stop"
            break
        if model.state.n_past >= model.n_ctx:
            if n_keep is None:
                break  # the context is full: nothing more fits
            model.shift_context(n_keep, (model.state.n_past - n_keep) // 2)
        if max_tokens is not None and produced >= max_tokens:
            break
        logits = model.eval([token])
    text = ""
    if not stopped_by_string:
        # what the decoder and the matcher still hold is text too; a stop string may yet complete in
        # the decoder's last bytes
        text, stopped_by_string = matcher.push(decoder.flush())
        if stopped_by_string:
            finish = "stop"
        else:
            text += matcher.flush()
    usage = Usage(len(prompt_ids), cached, produced, t1 - t0, time.perf_counter() - t1)
    yield Chunk(text, None, finish, usage)
