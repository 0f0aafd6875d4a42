"""Prefill + decode loop as a generator of text chunks.

Each chunk is a ``str`` (so ``for piece in model.generate(...): print(piece, end="")`` just works)
that also carries the token id it came from and, on the last chunk, why generation ended and the
counts.  Text is streamed through the tokenizer's stream decoder, which holds back the bytes of an
incomplete UTF-8 character until the character is whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


class Chunk(str):
    """A piece of generated text plus what produced it."""

    token: int | None
    finish_reason: str | None   # None until the last chunk: "stop" (end-of-generation token) or "length"
    usage: "Usage | None"

    def __new__(cls, text: str, token: int | None = None, finish_reason: str | None = None,
                usage: "Usage | None" = None):
        self = super().__new__(cls, text)
        self.token = token
        self.finish_reason = finish_reason
        self.usage = usage
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


def generate_tokens(model, prompt_ids: list[int], max_tokens: int | None,
                    sampler: Callable[[np.ndarray], int], stop_ids=frozenset()) -> Iterator[Chunk]:
    """Evaluate the prompt (reusing the cached prefix) and sample until a stop rule fires.

    max_tokens None means until an end-of-generation token or the end of the context.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 0):
        raise ValueError(f"max_tokens must be a non-negative integer or None, got {max_tokens!r}")
    stop_ids = frozenset(stop_ids) | model.tokenizer.eog_ids
    t0 = time.perf_counter()
    logits, cached = model.eval_prompt(prompt_ids)
    t1 = time.perf_counter()
    decoder = model.tokenizer.stream_decoder()
    produced = 0
    finish = "length"
    while max_tokens is None or produced < max_tokens:
        token = sampler(logits)
        if token in stop_ids:
            finish = "stop"
            break
        produced += 1
        yield Chunk(decoder.feed(token), token)
        if model.state.n_past >= model.n_ctx:
            break  # the context is full: nothing more fits
        if max_tokens is not None and produced >= max_tokens:
            break
        logits = model.eval([token])
    usage = Usage(len(prompt_ids), cached, produced, t1 - t0, time.perf_counter() - t1)
    yield Chunk(decoder.flush(), None, finish, usage)
