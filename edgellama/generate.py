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

Stop strings: at most MAX_STOP_STRINGS of at most MAX_STOP_CHARS characters each (the server
takes OpenAI's 4).  Matching them costs O(characters x stop strings) over a whole generation,
whatever their length (``StopStrings``: one Knuth-Morris-Pratt automaton per stop string).

Sampler protocol: any callable ``logits -> token id`` works.  If it also has ``sample(logits)``
(returning ``sampling.Sampled``), ``reset(prompt_ids)`` and ``accept(token)``, the loop uses them for
log-probabilities and the penalty window, as ``sampling.Sampler`` does.

Errors in generation options (``max_tokens``, ``stop``, ``stop_ids``, ``n_keep``, a sampler that is
not callable or returns no token id) are ``GenerationError``s naming the parameter in ``param``;
the sampler's own settings raise ``sampling.SamplingError``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ._validate import ParameterError, is_int
from .sampling import Sampled, TokenLogprob

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000


class GenerationError(ParameterError):
    """A generation option (not a sampler setting) is wrong; ``param`` names it."""


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

    Each stop string runs a Knuth-Morris-Pratt automaton over the text, one character at a time:
    its state is the length of the longest prefix of the stop string that ends the text so far
    (which is also what must be held back for it).  The work is amortized O(1) per character and
    stop string (``steps`` counts it), so a stop string of length L costs O(L) once, to build its
    failure table, and nothing per token that grows with L.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(stops)
        self.pending = ""
        self._fail = [_failure_table(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.steps = 0  # automaton transitions taken (a deterministic measure of the work done)

    def push(self, text: str) -> tuple[str, bool]:
        pending = self.pending + text
        if not self.stops:
            self.pending = ""
            return pending, False
        state, base = self._state, len(self.pending)
        for offset, ch in enumerate(text):
            longest = 0  # the longest stop string completed at this character (the earliest start)
            for i, (stop, fail) in enumerate(zip(self.stops, self._fail)):
                q = state[i]
                while q and stop[q] != ch:
                    q = fail[q - 1]
                    self.steps += 1
                if stop[q] == ch:
                    q += 1
                self.steps += 1
                if q == len(stop):
                    longest = max(longest, q)
                    q = fail[q - 1]
                state[i] = q
            if longest:
                self._state = [0] * len(self.stops)
                self.pending = ""
                return pending[:base + offset + 1 - longest], True
        cut = len(pending) - max(state)
        self.pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """What is still held back (generation ended without completing a stop string)."""
        text, self.pending = self.pending, ""
        self._state = [0] * len(self.stops)
        return text


def _failure_table(s: str) -> list[int]:
    """KMP failure table: fail[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def check_stop(stop) -> tuple[str, ...]:
    """``None``, one string, or a list of strings -> a tuple of non-empty strings: at most
    MAX_STOP_STRINGS of at most MAX_STOP_CHARS characters each."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    expected = f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
    try:
        stops = tuple(stop)
    except TypeError:
        raise GenerationError(f"stop must be a string or a list of strings, got {type(stop).__name__}",
                              param="stop") from None
    if len(stops) > MAX_STOP_STRINGS:
        raise GenerationError(f"stop must be {expected}, got {len(stops)} strings", param="stop",
                              expected=expected, value=len(stops))
    for s in stops:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            shown = f"{s[:40]!r}... ({len(s)} characters)" if isinstance(s, str) and len(s) > 40 else repr(s)
            raise GenerationError(f"stop must be {expected}, got {shown}", param="stop", expected=expected, value=s)
    return stops


def check_n_keep(n_keep, n_ctx: int, *, context_shift: bool, truncate: bool) -> None:
    """``n_keep`` (tokens kept at the start by a context shift or a truncation): below n_ctx/2 with
    a context shift, non-negative with a truncation; unused otherwise."""
    if context_shift and not (is_int(n_keep) and 0 <= n_keep < n_ctx // 2):
        raise GenerationError(f"n_keep must be an integer in [0, n_ctx/2 = {n_ctx // 2}), got {n_keep!r}",
                              param="n_keep")
    if truncate and not (is_int(n_keep) and n_keep >= 0):
        raise GenerationError(f"n_keep must be a non-negative integer, got {n_keep!r}", param="n_keep")


def truncate_prompt(ids: list[int], n_ctx: int, n_keep: int, room: int) -> list[int]:
    """A prompt cut to fit the context with ``room`` positions left for the reply: its first
    ``n_keep`` tokens (a BOS, a system prompt) and its end, the middle dropped.  A prompt that fits
    comes back unchanged."""
    limit = n_ctx - room
    if len(ids) <= limit:
        return list(ids)
    n_keep = max(0, min(n_keep, limit // 2))
    return list(ids[:n_keep]) + list(ids[len(ids) - (limit - n_keep):])


def check_generation(tokenizer, max_tokens: int | None, sampler, stop_ids=(), stop=()) \
        -> tuple[int | None, frozenset[int], tuple[str, ...]]:
    """Generation options checked (GenerationError naming the parameter otherwise): (max_tokens,
    the ids that end generation: ``stop_ids`` and the tokenizer's end-of-generation ones, the stop
    strings)."""
    if max_tokens is not None and not (is_int(max_tokens) and max_tokens >= 0):
        raise GenerationError(f"max_tokens must be a non-negative integer or None, got {max_tokens!r}",
                              param="max_tokens")
    if not callable(sampler):
        raise GenerationError(f"sampler must be callable (logits -> token id), got {type(sampler).__name__}",
                              param="sampler")
    stops = check_stop(stop)
    n_vocab = tokenizer.n_vocab
    ids = list(stop_ids) if isinstance(stop_ids, Iterable) and not isinstance(stop_ids, (str, bytes)) else None
    if ids is None or not all(is_int(i) and 0 <= i < n_vocab for i in ids):
        raise GenerationError(f"stop_ids must be token ids in [0, {n_vocab}), got {str(stop_ids)[:100]}",
                              param="stop_ids")
    extra_ids = frozenset(int(i) for i in ids)
    return None if max_tokens is None else int(max_tokens), extra_ids | tokenizer.eog_ids, stops


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
    max_tokens, stop_ids, stops = check_generation(model.tokenizer, max_tokens, sampler, stop_ids, stop)
    return _generate(model, list(prompt_ids), max_tokens, sampler, stop_ids, stops, n_keep)


class Continuation:
    """The rules of one generation between evaluations: each ``next(logits)`` samples a token and
    turns it into a Chunk (streamed text held back by the UTF-8 decoder and the stop-string matcher)
    or ends the generation at an end-of-generation id; ``last(...)`` is the final chunk.  The one
    loop of ``generate_tokens`` and every sequence of a batch (edgellama.batch) run on it."""

    def __init__(self, tokenizer, prompt_ids: list[int], max_tokens: int | None, sampler, stop_ids: frozenset[int],
                 stops: tuple[str, ...]):
        self.max_tokens = max_tokens
        self.prompt_tokens = len(prompt_ids)
        self._sampler = sampler
        self._sample = getattr(sampler, "sample", None)
        self._accept = getattr(sampler, "accept", None)
        self._stop_ids = stop_ids
        reset = getattr(sampler, "reset", None)
        if reset is not None:
            reset(prompt_ids)  # the prompt opens the penalty window
        self._decoder = tokenizer.stream_decoder()
        self._matcher = StopStrings(stops)
        self.produced = 0
        self.finish = "length"
        self.stopped_by_string = False

    @property
    def room(self) -> bool:
        """Whether max_tokens allows another token."""
        return self.max_tokens is None or self.produced < self.max_tokens

    def next(self, logits: np.ndarray) -> Chunk | None:
        """The chunk of the token sampled from ``logits``; None when it is an end-of-generation id
        (then finish is "stop").  A completed stop string sets ``stopped_by_string``."""
        picked = self._sample(logits) if self._sample is not None else self._sampler(logits)
        if not isinstance(picked, Sampled):
            picked = Sampled(picked)
        token = picked.token
        if not (is_int(token) and 0 <= token < len(logits)):
            raise GenerationError(f"the sampler returned {token!r}, not a token id in [0, {len(logits)})",
                                  param="sampler")
        token = int(token)
        if token in self._stop_ids:
            self.finish = "stop"
            return None
        self.produced += 1
        if self._accept is not None:
            self._accept(token)
        text, self.stopped_by_string = self._matcher.push(self._decoder.feed(token))
        if self.stopped_by_string:
            self.finish = "stop"
        return Chunk(text, token, logprob=picked.logprob, top_logprobs=picked.top_logprobs)

    def last(self, cached: int, prompt_seconds: float, generation_seconds: float) -> Chunk:
        """The final chunk: what the decoder and the matcher still hold, finish_reason and usage."""
        text = ""
        if not self.stopped_by_string:
            # what the decoder and the matcher still hold is text too; a stop string may yet complete in
            # the decoder's last bytes
            text, self.stopped_by_string = self._matcher.push(self._decoder.flush())
            if self.stopped_by_string:
                self.finish = "stop"
            else:
                text += self._matcher.flush()
        usage = Usage(self.prompt_tokens, cached, self.produced, prompt_seconds, generation_seconds)
        return Chunk(text, None, self.finish, usage)


def _context_mark(model) -> tuple:
    """What tells whether the model's context is still the one a paused generation left."""
    tokens = model.state.tokens
    return model.state, model.state.n_past, len(tokens), tokens[-1] if tokens else None


def _generate(model, prompt_ids: list[int], max_tokens: int | None, sampler, stop_ids: frozenset[int],
              stops: tuple[str, ...], n_keep: int | None = None) -> Iterator[Chunk]:
    t0 = time.perf_counter()
    logits, cached = model.eval_prompt(prompt_ids)
    t1 = time.perf_counter()
    rules = Continuation(model.tokenizer, prompt_ids, max_tokens, sampler, stop_ids, stops)
    while rules.room:
        chunk = rules.next(logits)
        if chunk is None:
            break
        mark = _context_mark(model)
        yield chunk
        if _context_mark(model) != mark:  # (its next token would extend someone else's context)
            raise GenerationError("the model's context changed while this generation was paused (another "
                                  "generate, chat, eval, reset or truncate on the same model): one generation "
                                  "at a time per model; start this one again")
        if rules.stopped_by_string:
            break
        if model.state.n_past >= model.n_ctx:
            if n_keep is None:
                break  # the context is full: nothing more fits
            model.shift_context(n_keep, (model.state.n_past - n_keep) // 2)
        if not rules.room:
            break
        logits = model.eval([chunk.token])
    yield rules.last(cached, t1 - t0, time.perf_counter() - t1)
