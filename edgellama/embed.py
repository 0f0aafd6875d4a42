"""Text embeddings as llama.cpp's ``--embedding --pooling mean`` makes them for llama-family models.

llama.cpp's llama graph names the last layer's output after the final RMSNorm (``output_norm``)
``result_norm`` and hands it to the pooling as the token embeddings (``t_embd``, before the
vocabulary projection); mean pooling averages those rows over a sequence's tokens, and its server
normalizes the result to unit length (``embd_normalize`` 2, the Euclidean norm).  Here the same
rows come from the batched pass (edgellama.batch.Rows): the texts of a call share passes, each in
its own KV cache region, so the weights are read once per pass for all of them, and a text's
embedding does not depend on the texts it is evaluated with.
"""

from __future__ import annotations

import numpy as np

EMBED_ROWS = 64    # tokens per pass
EMBED_SLOTS = 8    # texts evaluated together


def embed(model, texts, add_bos: bool | None = None, normalize: bool = True, check=None) -> np.ndarray:
    """(len(texts), dim) float32: per text (a string, or a list of token ids), the mean of its
    tokens' final normed hidden states, L2-normalized unless ``normalize`` is False.

    Texts are evaluated in groups of at most EMBED_SLOTS whose KV cache (slots x the group's
    longest text) holds at most the model's context, so that the memory a call adds is at most one
    more context's cache, whatever the texts.  ``check``: called before every pass (EMBED_ROWS
    tokens); what it raises stops the call (a server's client that went away)."""
    from .batch import Rows
    from .model import ContextOverflowError

    if isinstance(texts, str):
        raise TypeError("embed takes a list of texts (a string, or a list of token ids, each)")
    ids_list = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids = model.tokenize(text, add_bos=add_bos)
        elif isinstance(text, (list, tuple)) and not text:
            ids = []
        else:
            ids = model._check_ids(text).tolist()
        if not ids:
            raise ValueError(f"text {i} has no tokens to embed")
        if len(ids) > model.n_ctx:
            raise ContextOverflowError(f"text {i} has {len(ids)} tokens but the context holds {model.n_ctx}")
        ids_list.append(ids)
    out = np.zeros((len(ids_list), model.args.dim), np.float32)
    for g, group in _groups(ids_list, model.n_ctx):
        rows = Rows(model, len(group), max(2, max(len(ids) for ids in group)), EMBED_ROWS)
        sums = np.zeros((len(group), model.args.dim), np.float64)
        # (text, position) of every token of the group, passes of EMBED_ROWS rows in that order
        todo = [(j, p) for j, ids in enumerate(group) for p in range(len(ids))]
        for start in range(0, len(todo), EMBED_ROWS):
            if check is not None:
                check()
            part = todo[start:start + EMBED_ROWS]
            hidden = rows.forward([group[j][p] for j, p in part], [p for _, p in part], [j for j, _ in part],
                                  list(range(len(part))), want_logits=False)
            for r, (j, _) in enumerate(part):
                sums[j] += hidden[r]
        for j, ids in enumerate(group):
            out[g + j] = sums[j] / len(ids)
    if normalize:
        norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
        out = (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return out


def _groups(ids_list: list[list[int]], n_ctx: int):
    """(index of the first, texts) of consecutive groups of at most EMBED_SLOTS texts with texts x
    longest (at least 2) <= n_ctx positions (a text alone always: none is longer than the context)."""
    start, longest = 0, 0
    for i, ids in enumerate(ids_list):
        wider = max(longest, len(ids), 2)  # (Rows holds at least 2 positions a slot)
        if i > start and ((i - start + 1) * wider > n_ctx or i - start == EMBED_SLOTS):
            yield start, ids_list[start:i]
            start, wider = i, max(len(ids), 2)
        longest = wider
    if start < len(ids_list):
        yield start, ids_list[start:]
