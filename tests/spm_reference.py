"""The SentencePiece encoder as it was before 2026-12-05 (tuples of strings per merge candidate),
kept as an independent reference for the compact one in edgellama/tokenizer/spm.py: it was checked
against the sentencepiece package and llama.cpp (tests/test_tokenizer.py, the golden fixtures)."""

from __future__ import annotations

import heapq

import numpy as np


class ReferenceSentencePieceBPE:
    """The encoder of one SentencePiece vocabulary."""

    def __init__(self, token_to_id: dict[str, int], scores: np.ndarray, unk_id: int | None):
        self.token_to_id = token_to_id
        self.scores = scores
        self.unk_id = unk_id
        byte_ids: list[int | None] = []
        for b in range(256):
            i = token_to_id.get(f"<0x{b:02X}>")
            if i is None and b < 128:
                i = token_to_id.get(chr(b))
            byte_ids.append(i)
        self.byte_ids = byte_ids

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (spaces already U+2581) to ``out``.

        llama.cpp's SPM tokenizer: merge adjacent symbols whose union is a token, best score
        first (ties: leftmost); symbols that are no token fall back to byte tokens."""
        t2i, scores = self.token_to_id, self.scores
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
            s = syms[i]
            tid = t2i.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bid = self.byte_ids[b]
                    if bid is not None:
                        out.append(bid)
                    elif self.unk_id is not None:
                        out.append(self.unk_id)
            i = nxt[i]
