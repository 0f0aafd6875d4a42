"""The SentencePiece merge loop as it was before 2026-12-05 (tuples of strings per merge candidate),
kept as an independent reference for the compact one in edgellama/tokenizer/spm.py: it was checked
against the sentencepiece package and llama.cpp (tests/test_tokenizer.py, the golden fixtures).
The vocabulary's byte tokens and a final symbol's ids are the encoder's own (what is compared is
the merging)."""

from __future__ import annotations

import heapq

import numpy as np

from edgellama.tokenizer.spm import SentencePieceBPE


class ReferenceSentencePieceBPE(SentencePieceBPE):
    """The encoder of one SentencePiece vocabulary, merging as before."""

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (spaces already U+2581) to ``out``.

        llama.cpp's SPM tokenizer: merge adjacent symbols whose union is a token, best score
        first (ties: leftmost); symbols that are no token fall back to byte tokens."""
        t2i, scores = self.token_to_id, np.asarray(self.scores, np.float32)
        syms = list(text)  # one symbol per character
        n = len(syms)
        if n == 0:
            return
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = syms[left] + syms[right]
            tid = t2i.get(s)
            if tid is not None:
                heapq.heappush(heap, (-float(scores[tid]), left, right, s))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, s = heapq.heappop(heap)
            # stale entry: one side was merged since, so the text no longer matches
            if not syms[left] or not syms[right] or syms[left] + syms[right] != s or nxt[left] != right:
                continue
            syms[left] = s
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            self.append_symbol(syms[i], out)
            i = nxt[i]
