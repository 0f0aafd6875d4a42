"""SentencePiece BPE (GGUF ``tokenizer.ggml.model = "llama"``) as llama.cpp runs it: spaces become
U+2581, adjacent symbols are merged by the highest score, and bytes that form no token fall back to
``<0xNN>`` tokens (or, for the first 128, a token that is the character itself)."""

from __future__ import annotations

import heapq
from array import array

import numpy as np

SPM_SPACE = "\u2581"


class SentencePieceBPE:
    """The encoder of one SentencePiece vocabulary."""

    def __init__(self, token_to_id: dict[str, int], scores: np.ndarray, unk_id: int | None):
        self.token_to_id = token_to_id
        self.scores = scores
        # each token's place in score order (0: the highest; equal scores share a place), so that
        # a merge candidate is one int: place << 32 | position (best score first, then leftmost)
        scores32 = np.asarray(scores, np.float32)  # (llama.cpp compares them as float32)
        distinct = np.unique(scores32)
        self.rank: list[int] = (len(distinct) - 1 - np.searchsorted(distinct, scores32)).tolist()
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
        first (ties: leftmost); symbols that are no token fall back to byte tokens.

        About 60 bytes per character at the peak (a 4 Mi-character text: 250 MB, where tuples of
        strings per candidate took 280 B/char): a symbol is the text from its first character
        (``size[i]`` characters from ``i``; 0 once merged into its left neighbour), symbols are
        linked in arrays, and a candidate is one int.  A candidate is current when the pair now at
        its position forms a token of its score: that pair's own candidate, pushed when the pair
        formed, has the same int, so either one merges the same symbols at the same moment as
        llama.cpp's size-checked bigrams do."""
        n = len(text)
        if n == 0:
            return
        if n >= 1 << 31:
            raise ValueError(f"text of {n} characters is beyond the 2**31 this encoder indexes")
        t2i, rank = self.token_to_id, self.rank
        size = array("i", [1]) * n
        prev = array("i", range(-1, n - 1))
        nxt = array("i", range(1, n + 1))
        nxt[n - 1] = -1
        heap: list[int] = []
        for i in range(n - 1):
            tid = t2i.get(text[i:i + 2])
            if tid is not None:
                heap.append(rank[tid] << 32 | i)
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            key = pop(heap)
            left = key & 0xFFFFFFFF
            width = size[left]
            right = nxt[left]
            if not width or right < 0:
                continue
            both = width + size[right]
            tid = t2i.get(text[left:left + both])
            if tid is None or rank[tid] != key >> 32:
                continue  # stale: the pair at ``left`` changed since
            size[left] = both
            size[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
                tid = t2i.get(text[left:left + both + size[after]])
                if tid is not None:
                    push(heap, rank[tid] << 32 | left)
            before = prev[left]
            if before >= 0:
                tid = t2i.get(text[before:left + both])
                if tid is not None:
                    push(heap, rank[tid] << 32 | before)
        i = 0
        while i != -1:
            self.append_symbol(text[i:i + size[i]], out)
            i = nxt[i]

    def append_symbol(self, s: str, out: list[int]) -> None:
        """Append a final symbol's id, or its bytes' tokens where it is no token (the unknown
        token for a byte that has none)."""
        tid = self.token_to_id.get(s)
        if tid is not None:
            out.append(tid)
            return
        for b in s.encode("utf-8"):
            bid = self.byte_ids[b]
            if bid is not None:
                out.append(bid)
            elif self.unk_id is not None:
                out.append(self.unk_id)
