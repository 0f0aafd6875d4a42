"""Streaming detokenization: text as tokens arrive, never half a UTF-8 character."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the new complete text, holding back the bytes
    of a UTF-8 character that is not finished yet; ``flush()`` returns what is left (an unfinished
    character becomes U+FFFD)."""

    def __init__(self, tokenizer: "Tokenizer", special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._buf = b""

    def feed(self, token_id: int) -> str:
        tok = self._tok
        piece = tok.token_bytes(token_id)
        if not self._special and tok.is_control(token_id):
            return ""
        buf = self._buf + piece
        cut = complete_utf8_prefix(buf)
        self._buf = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        buf, self._buf = self._buf, b""
        return buf.decode("utf-8", errors="replace")


def complete_utf8_prefix(buf: bytes) -> int:
    """Length of ``buf`` without a trailing, still incomplete UTF-8 sequence."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b < 0x80:
            return n  # ASCII: nothing pending
        if b >= 0xC0:  # a lead byte: how long its character is
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 1
            return n - back if back < need else n
        # continuation byte: keep looking for its lead
    return n
