"""Perplexity of a model on a text, the way llama.cpp's ``llama-perplexity`` measures it.

The text is tokenized once and cut into chunks of n_ctx tokens (a last partial chunk is left out);
each chunk is evaluated from an empty cache (with the vocabulary's BOS in place of its first token
where the model adds one), and only the predictions in its second half are scored, so that every
scored token sees at least n_ctx/2 tokens of context.  The result is exp(mean negative
log-likelihood) over all scored tokens, with the standard error of that estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["PerplexityResult", "perplexity", "next_token_nll"]


@dataclass
class PerplexityResult:
    ppl: float                   # exp(mean NLL) over every scored token
    ppl_stderr: float            # its standard error (delta method: ppl * stderr of the mean NLL)
    n_scored: int                # tokens scored
    n_chunks: int
    n_ctx: int
    chunk_ppl: list[float] = field(default_factory=list)  # running perplexity after each chunk
    nll: np.ndarray | None = None                          # (n_scored,) per-token NLL, in order


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[t])[targets[t]] for each row t, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(targets)), targets]


def perplexity(model, ids, n_ctx: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on token ids ``ids`` in chunks of ``n_ctx`` (default: the model's
    context).  ``progress(chunk, n_chunks, running_ppl)`` is called after each chunk."""
    n_ctx = model.n_ctx if n_ctx is None else int(n_ctx)
    if not 4 <= n_ctx <= model.n_ctx:
        raise ValueError(f"the chunk size must be in [4, n_ctx = {model.n_ctx}], got {n_ctx}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n_chunks = len(ids) // n_ctx
    if n_chunks == 0:
        raise ValueError(f"the text has {len(ids)} tokens: perplexity needs at least one chunk of "
                         f"{n_ctx} (use a longer text or a smaller context)")
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    parts, running, total = [], [], 0.0
    for c in range(n_chunks):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        logits = model.logits(chunk)                      # (n_ctx, n_vocab), from an empty cache
        # position j predicts token j + 1; the first half only serves as context
        nll = next_token_nll(logits[first:n_ctx - 1], ids[c * n_ctx + first + 1:(c + 1) * n_ctx])
        parts.append(nll)
        total += float(nll.sum())
        count = sum(len(p) for p in parts)
        running.append(_exp(total / count))
        if progress is not None:
            progress(c + 1, n_chunks, running[-1])
    nll = np.concatenate(parts)
    mean = float(nll.mean())
    stderr = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    ppl = _exp(mean)
    return PerplexityResult(ppl, ppl * stderr, len(nll), n_chunks, n_ctx, running, nll)


def _exp(x: float) -> float:
    """exp, inf beyond float range (a mean NLL over ~709 nats: a model file whose logits are huge)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
