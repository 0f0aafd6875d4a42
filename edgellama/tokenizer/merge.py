"""Byte-pair merging over a rank table: the BPE engine of the byte-level vocabularies.

``RankTable`` holds byte strings and their ranks (the table tiktoken calls ``mergeable_ranks``:
every single byte, and each token a merge makes, ranked by that merge's place in the list) in three
arrays and an open-addressing hash table, about 4 MB for Llama 3's 128k tokens where tiktoken's core
held about 40 MB (two hash maps and a sorted list of separately allocated byte strings) and took
0.11 s to build on each load.  ``encode_pieces`` turns pre-tokens into ranks exactly as tiktoken's
``encode_ordinary`` does: a pre-token that is itself in the table is one rank; otherwise its bytes
start as single-byte parts and the adjacent pair whose concatenation has the lowest rank is merged,
the leftmost of equal ones, until no adjacent pair is in the table.  tiktoken scans every pair for
each merge (quadratic in a pre-token's length); here the pairs sit in a binary heap, so a hostile
pre-token of a million letters costs n log n.

The hash is FNV-1a with a random per-table seed and a final mix, so that a vocabulary crafted to
collide under one seed does not under the next; a table whose probe runs grow long is rebuilt with
another seed, and refused after a few (no real vocabulary comes near).
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from .vocab import ByteTable, TokenizerError

_FNV_PRIME = np.uint64(1099511628211)
_MAX_PROBE = 64        # longest probe run a built table may have
_SEED_TRIES = 4        # seeds tried before a vocabulary is refused


@njit(cache=True, nogil=True)
def _hash(data, lo, hi, seed):
    h = seed
    for i in range(lo, hi):
        h = (h ^ np.uint64(data[i])) * _FNV_PRIME
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h


@njit(cache=True, nogil=True)
def _build_slots(blob, ends, seed, slots):
    """Insert keys 0..n-1 (blob[ends[k]:ends[k+1]]) into ``slots`` (a power of two, zeros: empty;
    key k stored as k + 1).  The longest probe run, or -1 when a key is there twice."""
    mask = np.uint64(slots.shape[0] - 1)
    longest = 0
    for k in range(ends.shape[0] - 1):
        lo, hi = ends[k], ends[k + 1]
        j = _hash(blob, lo, hi, seed) & mask
        run = 0
        while slots[j] != 0:
            other = slots[j] - 1
            olo, ohi = ends[other], ends[other + 1]
            if ohi - olo == hi - lo:
                same = True
                for t in range(hi - lo):
                    if blob[olo + t] != blob[lo + t]:
                        same = False
                        break
                if same:
                    return -1
            j = (j + np.uint64(1)) & mask
            run += 1
        slots[j] = k + 1
        longest = max(longest, run)
    return longest


@njit(cache=True, nogil=True)
def _rank_of(data, lo, hi, blob, ends, ranks, slots, seed):
    """The rank of data[lo:hi], or -1 when it is not in the table."""
    mask = np.uint64(slots.shape[0] - 1)
    j = _hash(data, lo, hi, seed) & mask
    n = hi - lo
    while slots[j] != 0:
        k = slots[j] - 1
        klo = ends[k]
        if ends[k + 1] - klo == n:
            same = True
            for t in range(n):
                if blob[klo + t] != data[lo + t]:
                    same = False
                    break
            if same:
                return ranks[k]
        j = (j + np.uint64(1)) & mask
    return -1


@njit(cache=True, nogil=True)
def _heap_push(heap, size, key):
    i = size
    heap[i] = key
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= heap[i]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent
    return size + 1


@njit(cache=True, nogil=True)
def _heap_pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and heap[left + 1] < heap[left]:
            child = left + 1
        if heap[i] <= heap[child]:
            break
        heap[i], heap[child] = heap[child], heap[i]
        i = child
    return top, size


@njit(cache=True, nogil=True)
def _encode(data, piece_ends, blob, ends, ranks, slots, seed, out):
    """Ranks of every piece data[piece_ends[p-1]:piece_ends[p]] into out (room for len(data)); how
    many.  A pair's heap key is rank << 32 | left part's start (in its piece): the lowest rank
    first, then the leftmost; a key whose pair has since changed is skipped when it comes up."""
    n_out = 0
    longest = 0
    prev_end = 0
    for p in range(piece_ends.shape[0]):
        longest = max(longest, piece_ends[p] - prev_end)
        prev_end = piece_ends[p]
    nxt = np.empty(longest + 1, np.int64)       # part starting at i: where the next part starts
    prv = np.empty(longest + 1, np.int64)       # ... and where the previous one starts (-1: none)
    pair = np.empty(longest + 1, np.int64)      # the rank of part i joined with the next (-1: none)
    heap = np.empty(3 * longest + 1, np.int64)  # each merge pushes at most two keys
    lo = 0
    for p in range(piece_ends.shape[0]):
        hi = piece_ends[p]
        n = hi - lo
        if n == 0:
            continue
        whole = _rank_of(data, lo, hi, blob, ends, ranks, slots, seed)
        if whole >= 0:
            out[n_out] = whole
            n_out += 1
            lo = hi
            continue
        size = 0
        for i in range(n):
            nxt[i] = i + 1
            prv[i] = i - 1
            pair[i] = -1
            if i + 1 < n:
                r = _rank_of(data, lo + i, lo + i + 2, blob, ends, ranks, slots, seed)
                pair[i] = r
                if r >= 0:
                    size = _heap_push(heap, size, (r << 32) | i)
        while size > 0:
            key, size = _heap_pop(heap, size)
            r, i = key >> 32, key & 0xFFFFFFFF
            if pair[i] != r or nxt[i] > n:   # stale: part i merged away, or its pair changed
                continue
            # merge part i with the next part j
            j = nxt[i]
            nxt[i] = nxt[j]
            nxt[j] = n + 1                   # j is gone
            pair[j] = -1
            if nxt[i] < n:
                prv[nxt[i]] = i
            pair[i] = -1
            if nxt[i] < n:
                r2 = _rank_of(data, lo + i, lo + nxt[nxt[i]], blob, ends, ranks, slots, seed)
                pair[i] = r2
                if r2 >= 0:
                    size = _heap_push(heap, size, (r2 << 32) | i)
            h = prv[i]
            if h >= 0:
                r3 = _rank_of(data, lo + h, lo + nxt[i], blob, ends, ranks, slots, seed)
                pair[h] = r3
                if r3 >= 0:
                    size = _heap_push(heap, size, (r3 << 32) | h)
        i = 0
        while i < n:
            out[n_out] = _rank_of(data, lo + i, lo + nxt[i], blob, ends, ranks, slots, seed)
            n_out += 1
            i = nxt[i]
        lo = hi
    return n_out


class RankTable:
    """Byte strings with ranks, looked up by hashing.  ``blob``/``ends``: the strings, key k being
    blob[ends[k]:ends[k+1]]; ``ranks``: key k's rank (0 <= rank < 2**31, each rank once)."""

    __slots__ = ("blob", "ends", "ranks", "slots", "seed")

    def __init__(self, blob: bytes | np.ndarray, ends: np.ndarray, ranks: np.ndarray):
        # (the same array types on every path, so that the kernels compile once: a read-only blob)
        self.blob = np.frombuffer(bytes(blob), np.uint8)
        self.ends = np.array(ends, np.int64)
        self.ranks = np.array(ranks, np.int64)
        n = len(self.ranks)
        if len(self.ends) != n + 1 or (n and (self.ends[0] != 0 or self.ends[-1] != len(self.blob)
                                              or np.any(np.diff(self.ends) < 0))):
            raise TokenizerError("the BPE table's strings do not match their offsets")
        if n and not (0 <= self.ranks.min() and self.ranks.max() < 2 ** 31):
            raise TokenizerError("a BPE rank is out of range")
        if n and np.any(np.diff(np.sort(self.ranks)) == 0):
            raise TokenizerError("two strings of the BPE table have the same rank")
        singles = np.flatnonzero(np.diff(self.ends) == 1)
        if np.count_nonzero(np.bincount(self.blob[self.ends[singles]], minlength=256)) != 256:  # (not np.unique: imports numpy.ma, 10 ms)
            raise TokenizerError("the BPE table lacks some of the 256 single bytes (every text must "
                                 "be writable in its tokens)")
        size = 1 << max(4, (2 * n - 1).bit_length())  # at most half full
        for _ in range(_SEED_TRIES):
            seed = np.uint64(int.from_bytes(os.urandom(8), "little"))
            slots = np.zeros(size, np.int32)
            longest = _build_slots(self.blob, self.ends, seed, slots)
            if longest < 0:
                raise TokenizerError("a string is in the BPE table twice")
            if longest <= _MAX_PROBE:
                self.slots, self.seed = slots, seed
                self.encode_pieces([b"ab"])  # the merging compiled (or loaded) now, with the table
                return
        raise TokenizerError(f"the BPE table's strings collide in its hash table (probe runs over "
                             f"{_MAX_PROBE} with {_SEED_TRIES} seeds): not a real vocabulary")

    @classmethod
    def from_dict(cls, ranks: dict[bytes, int]) -> "RankTable":
        keys = ByteTable(list(ranks))
        return cls(keys._blob, np.frombuffer(keys._ends, np.int64), np.fromiter(ranks.values(), np.int64, len(ranks)))

    def __len__(self) -> int:
        return len(self.ranks)

    def rank(self, key: bytes) -> int:
        """The rank of ``key`` (-1: not in the table)."""
        data = np.frombuffer(key, np.uint8)
        return int(_rank_of(data, 0, len(data), self.blob, self.ends, self.ranks, self.slots, self.seed))

    def encode_pieces(self, pieces: list[bytes]) -> np.ndarray:
        """The ranks of each pre-token in turn (see the module docstring)."""
        if not pieces:
            return np.zeros(0, np.int32)
        joined = ByteTable(pieces)
        data = np.frombuffer(joined._blob, np.uint8)
        piece_ends = np.frombuffer(joined._ends, np.int64)[1:]
        out = np.empty(len(data), np.int32)  # (ranks are below 2**31; a 4M-character text: 16M at most)
        n = _encode(data, piece_ends, self.blob, self.ends, self.ranks, self.slots, self.seed, out)
        return out[:n]


def _install_cache() -> None:
    """Cache these functions like the kernels (edgellama/kernels/cache.py): stamped with this file,
    found by every copy of it, loaded without Numba's compiler registries."""
    import sys
    from pathlib import Path

    from ..kernels.cache import install

    install([sys.modules[__name__]], (Path(__file__).resolve(),), kind="tokenizer")


_install_cache()
