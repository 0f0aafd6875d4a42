"""Byte-level BPE (GGUF ``tokenizer.ggml.model = "gpt2"``: SmolLM, Llama 3, Qwen2, ...).

The token strings are mapped back to bytes through the GPT-2 byte<->unicode table and every merge
``"a b"`` gives the token ``a+b`` the rank of its position in ``tokenizer.ggml.merges``; the
pre-tokenizer's regex splits the text and ``merge.RankTable`` does the BPE of each pre-token, as
tiktoken's core does (which this used before: the same ranks, pieces and results, a tenth of its
memory).  The merge step joins the adjacent pair whose *result* has the lowest rank, llama.cpp (and
HF) the adjacent pair that comes first in the merge list; with ranks taken from the merge order the
two agree (checked against llama.cpp on millions of characters, and by a pure-Python twin of
llama.cpp's algorithm in the tests).
"""

from __future__ import annotations

import hashlib
import operator
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
import regex

from ..packed_cache import keep_table, load_table
from .pretokenize import Pre, split_chain
from .vocab import MAX_MERGES, MAX_MERGES_PER_TOKEN, Meta, TokenizerError

if TYPE_CHECKING:  # (merge imports Numba: only a tokenizer's building does)
    from .merge import RankTable

# Merges are turned into ranks this many at a time, so that building costs memory in proportion to
# the merges' own bytes (the whole list at once took 9x a hostile file's size).
MERGE_CHUNK = 1 << 16


# ----- GPT-2 byte <-> unicode table -----------------------------------------------------------------

def gpt2_byte_chars() -> list[str]:
    """The printable character that stands for each byte 0..255 in byte-level BPE vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = [""] * 256
    for b in printable:
        chars[b] = chr(b)
    n = 0
    for b in range(256):
        if not chars[b]:
            chars[b] = chr(256 + n)
            n += 1
    return chars


_BYTE_CHARS = gpt2_byte_chars()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
# character code -> its byte (-1: not in the byte alphabet); the alphabet's codes are all below 324
_GPT2_CODE_TO_BYTE = np.full(max(map(ord, _BYTE_CHARS)) + 1, -1, np.int16)
_GPT2_CODE_TO_BYTE[[ord(c) for c in _BYTE_CHARS]] = np.arange(256)


def gpt2_bytes_bulk(texts: list[str]) -> list[bytes | None]:
    """The bytes of every token string (None where a character is not in the byte alphabet), done
    as a few whole-vocabulary array operations (one character of the alphabet is one byte)."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    table = _GPT2_CODE_TO_BYTE
    values = table[np.minimum(codes, len(table) - 1)]
    values[codes >= len(table)] = -1
    data = values.astype(np.uint8).tobytes()
    ends = np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts))).tolist()
    out: list[bytes | None] = [data[s:e] for s, e in zip([0] + ends[:-1], ends)]
    bad = np.flatnonzero(values < 0)
    if len(bad):
        for i in set(np.searchsorted(ends, bad, side="right").tolist()):
            out[i] = None
    return out


def _split_merge(m: str) -> list[str]:
    """Split a merge at the first space after its first character (llama.cpp: find(' ', 1))."""
    sp = m.find(" ", 1)
    return [m] if sp < 0 else [m[:sp], m[sp + 1:]]


def llamacpp_decode_text(text: str) -> bytes:
    """llama.cpp's rendering of a NORMAL byte-level token (llama_decode_text)."""
    out = bytearray()
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)



# ----- merges -> ranks -> rank table ------------------------------------------------------------------

def _merge_results(meta: Meta, merges: list[str], start: int, stop: int,
                   t2i: dict[str, int]) -> list[str]:
    """The texts merges[start:stop] make ("a b" -> "ab"), each side checked to be a token."""
    chunk = merges[start:stop]
    n = len(chunk)
    joined = "\n".join(chunk)
    if joined.count(" ") == n and joined.count("\n") == n - 1 and " \n" not in joined \
            and not joined.startswith(" ") and "\n " not in joined and not joined.endswith(" "):
        # the usual case, done in bulk: every merge is "a b" with one space and no newline
        parts = joined.replace(" ", "\n").split("\n")
        results = joined.replace(" ", "").split("\n")
    else:
        pairs = [_split_merge(m) for m in chunk]
        for k, p in enumerate(pairs):
            if len(p) != 2:
                raise meta.fail("tokenizer.ggml.merges", f"merge {start + k} {chunk[k][:60]!r} is not two "
                                                         "tokens separated by a space")
        parts = [x for p in pairs for x in p]
        results = [a + b for a, b in pairs]
    if not all(map(t2i.__contains__, parts)):
        k = next(k for k in range(n) if parts[2 * k] not in t2i or parts[2 * k + 1] not in t2i)
        raise meta.fail("tokenizer.ggml.merges", f"merge {start + k} {chunk[k][:60]!r} refers to a token "
                                                 "that is not in tokenizer.ggml.tokens")
    return results


class ByteLevelBPE:
    """The encoder of one byte-level BPE vocabulary: the rank table made from the merges, the
    pre-tokenizer, and the rank -> token id table."""

    def __init__(self, table: RankTable, rank_to_id: np.ndarray, pattern: str, chain: list[regex.Pattern] | None,
                 source: str):
        self.table = table                   # byte strings -> ranks, and the merging (merge.py)
        self.rank_to_id = rank_to_id         # (n_ranks,) int64; -1: a byte with no token
        self.rank_gaps = bool((rank_to_id[:256] < 0).any())
        self.pattern = pattern               # the pre-tokenizer's regex
        self.chain = chain                   # or a chain of regexes (then pattern is unused)
        self.source = source
        self._split_re: regex.Pattern | None = None

    @classmethod
    def from_merges(cls, meta: Meta, texts: list[str], t2i: dict[str, int], tok_bytes: list[bytes | None],
                    merges: list[str], pre: Pre) -> "ByteLevelBPE":
        n_merges = len(merges)
        limit = min(MAX_MERGES, MAX_MERGES_PER_TOKEN * len(texts))
        if n_merges > limit:
            raise meta.fail("tokenizer.ggml.merges", f"{n_merges} merges for {len(texts)} tokens is more "
                                                     f"than the {limit} we accept (at most {MAX_MERGES}, "
                                                     f"and {MAX_MERGES_PER_TOKEN} per token)")
        # res[k]: the token merge k makes (-1: none); the merges are read a chunk at a time.  Kept
        # for the next load of the same vocabulary and merges (edgellama.packed_cache's tables):
        # only merges that passed these checks are ever kept.
        digest = hashlib.sha256()
        digest.update("\0".join(texts).encode("utf-8", "surrogatepass") + b"\1")
        digest.update("\0".join(merges).encode("utf-8", "surrogatepass"))
        digest = digest.hexdigest()
        res = load_table("bpe-merges", digest, np.int64, n_merges)
        if res is None or (n_merges and not -1 <= res.min() <= res.max() < len(texts)):
            res = np.empty(n_merges, np.int64)
            for c0 in range(0, n_merges, MERGE_CHUNK):
                results = _merge_results(meta, merges, c0, min(c0 + MERGE_CHUNK, n_merges), t2i)
                res[c0:c0 + len(results)] = np.fromiter(map(t2i.get, results, repeat(-1)), dtype=np.int64,
                                                        count=len(results))
            keep_table("bpe-merges", digest, res)
        # Ranks: each single byte b has rank b (single bytes are never compared with merges, only
        # looked up), the token made by merge k has rank 256 + k (the first merge making it wins).
        # A merge whose result is no token, or is not written in the byte alphabet, is left out:
        # llama.cpp would fall back to bytes there, or no text can ever reach it.
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        rank_arr = np.full(256 + n_merges, -1, np.int64)
        for b in range(256):
            i = t2i.get(_BYTE_CHARS[b])
            if i is not None:
                rank_arr[b] = i
        has_bytes = np.fromiter(map(operator.is_not, tok_bytes, repeat(None)), dtype=bool,
                                count=len(tok_bytes))
        ok = np.flatnonzero((res >= 0) & has_bytes[np.maximum(res, 0)])
        tids, first = np.unique(res[ok], return_index=True)
        first_k = ok[first]  # merge index that first makes each token
        ranks.update(zip([tok_bytes[t] for t in tids.tolist()], (first_k + 256).tolist()))
        rank_arr[first_k + 256] = tids
        unreached: list[int] = []
        if pre.ignore_merges:
            # llama.cpp looks a whole pre-token up in the vocabulary first, as tiktoken does; make
            # the tokens no merge reaches findable too (ranked after every merge).
            reached = np.zeros(len(tok_bytes), bool)
            reached[tids] = True
            reached[rank_arr[:256][rank_arr[:256] >= 0]] = True
            for tid in np.flatnonzero(has_bytes & ~reached).tolist():
                key = tok_bytes[tid]
                if key not in ranks:
                    ranks[key] = len(rank_arr) + len(unreached)
                    unreached.append(tid)
        rank_to_id = np.concatenate([rank_arr, np.array(unreached, dtype=np.int64)])
        if isinstance(pre.split, str):
            pattern, chain = pre.split, None
        else:
            pattern = r"[\s\S]+"  # the chain of regexes splits
            chain = [regex.compile(p) for p in pre.split]
        from .merge import RankTable

        try:
            table = RankTable.from_dict(ranks)
        except TokenizerError as e:
            raise meta.fail("tokenizer.ggml.merges", f"cannot build the BPE table: {e}") from None
        return cls(table, rank_to_id, pattern, chain, meta.source)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str, source: str) -> "ByteLevelBPE":
        """A tiktoken file's ranks, which are the token ids."""
        from .merge import RankTable

        try:
            table = RankTable.from_dict(ranks)
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None
        return cls(table, np.arange(len(ranks), dtype=np.int64), pattern, None, source)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text that holds no special token."""
        pieces = [p.encode("utf-8") for p in self._pieces(text)]  # (Tokenizer made lone surrogates U+FFFD)
        ids = self.rank_to_id[self.table.encode_pieces(pieces)]
        if self.rank_gaps:
            ids = ids[ids >= 0]  # bytes that have no token are dropped, as llama.cpp does
        return ids.tolist()

    def _pieces(self, text: str) -> list[str]:
        """The pre-tokens of a text: the chain's pieces, or the pattern's matches."""
        if self.chain is not None:
            return [piece for piece in split_chain(self.chain, text) if piece]
        if self._split_re is None:
            self._split_re = regex.compile(self.pattern)
        split = self._split_re
        if split.groups == 0:
            return split.findall(text)
        return [m.group() for m in split.finditer(text)]
