"""A byte-level BPE tokenizer's tables, kept between loads of the same model file.

Building a tokenizer from GGUF metadata is pure Python over the whole vocabulary: the token strings
to bytes, the merges to ranks, the special-token rules, the byte table decoding reads.  For Llama 3's
128k tokens that was 0.3-0.45 s of every start on a 2-core Xeon (SmolLM2's 49k: 0.11-0.15 s), the
largest part of a 1B model's first token after importing Numba; read back, 0.24-0.3 s and 0.08 s
(tiktoken's core, which the BPE was then, took 0.1-0.15 s of the first).  What it computes depends only on the
metadata, so the first load keeps it (``edgellama.packed_cache``'s ``tokenizers/``, beside the
parsed headers) and later loads of the same header read it back: only the rank table's hash slots
are made again (milliseconds), from the kept strings and ranks.

The key is the SHA-256 of the file's header bytes (``GGUFFile.header_digest``: the parsed header is
checked against them on every load anyway) and of the sources that turn a header into a tokenizer,
so a changed file or a new edgellama builds again.  The record is ``marshal`` data (strings, bytes,
ints, tuples: no code is run to read it), checked for shape and range before use; anything that
does not fit is ignored and the tokenizer built as without it.  SentencePiece vocabularies (Llama
2's 32k) build in a few milliseconds and are not kept.
"""

from __future__ import annotations

import hashlib
import marshal
from array import array
from pathlib import Path

import numpy as np

from ..gguf import StringArray
from .vocab import ByteTable, named_texts

KIND = "tokenizers"
FORMAT = 1
_STAMP: list[bytes] = []


def _stamp() -> bytes:
    """A hash of the sources that decide what a header's tokenizer is: this package and the GGUF
    parser that made the metadata."""
    if not _STAMP:
        from ..gguf import _source_stamp

        h = hashlib.sha256(_source_stamp())
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _STAMP.append(h.digest())
    return _STAMP[0]


def kept_name(identity: bytes) -> str:
    return hashlib.sha256(b"edgellama-tokenizer\0%d\0" % FORMAT + _stamp() + identity).hexdigest()


def _table_parts(table: ByteTable) -> tuple[bytes, bytes]:
    return table._blob, table._ends.tobytes()


def _table(blob: bytes, ends: bytes, n: int) -> ByteTable | None:
    """A ByteTable of ``n`` items from its parts, if they describe one."""
    offsets = array("q")
    offsets.frombytes(ends)
    if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(blob):
        return None
    if n and np.any(np.diff(np.frombuffer(ends, np.int64)) < 0):
        return None
    table = ByteTable.__new__(ByteTable)
    table._blob, table._ends = blob, offsets
    return table


def keep(tok, identity: bytes) -> None:
    """Keep what ``tok`` (a byte-level BPE Tokenizer just built from a header with this identity)
    computed."""
    from ..packed_cache import keep_blob

    enc = tok._encoder
    table = enc.table
    state = (
        FORMAT, tok.kind, tok.pre, tok.n_vocab,
        (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.unk_id, tok.pad_id),
        (tok.add_bos, tok.add_eos, tok.add_space_prefix, tok.clean_spaces),
        tuple(sorted(tok.eog_ids)),
        tok._attrs.astype(np.uint32).tobytes(), np.packbits(tok._hidden).tobytes(),
        tuple(tok._special_all), tuple(tok._special_user),
        _table_parts(tok._pieces),
        (table.blob.tobytes(), table.ends.tobytes()), table.ranks.tobytes(),
        enc.rank_to_id.astype(np.int64).tobytes(), enc.pattern,
        None if enc.chain is None else tuple(p.pattern for p in enc.chain),
    )
    try:
        keep_blob(KIND, kept_name(identity), marshal.dumps(state))
    except ValueError:  # (not expected: only marshal's types above)
        pass


def _id(v, n: int) -> bool:
    return v is None or (type(v) is int and 0 <= v < n)


def _specials(items, n: int) -> list[tuple[str, int]] | None:
    if type(items) is not tuple or not all(type(x) is tuple and len(x) == 2 and type(x[0]) is str
                                           and _id(x[1], n) and x[1] is not None for x in items):
        return None
    return list(items)


def restore(cls, metadata: dict, source: str, identity: bytes):
    """The Tokenizer kept for this identity, or None (nothing kept, another format, or a record
    that does not describe a tokenizer of this metadata's vocabulary)."""
    from ..packed_cache import load_blob

    data = load_blob(KIND, kept_name(identity))
    if data is None:
        return None
    try:
        (fmt, kind, pre, n, ids, flags, eog, attrs, hidden, special_all, special_user, pieces,
         keys, values, rank_to_id, pattern, chain) = marshal.loads(data)
        texts = metadata["tokenizer.ggml.tokens"]
        if fmt != FORMAT or kind != "bpe" or type(pre) is not str or type(n) is not int \
                or not isinstance(texts, (list, StringArray)) or len(texts) != n or n <= 0:
            return None
        return _build(cls, metadata, source, n, pre, ids, flags, eog, attrs, hidden, special_all,
                      special_user, pieces, keys, values, rank_to_id, pattern, chain)
    except Exception:  # another layout, a record of something else: build
        return None


def _build(cls, metadata, source, n, pre, ids, flags, eog, attrs, hidden, special_all, special_user,
           pieces, keys, values, rank_to_id, pattern, chain):
    import regex

    from .bpe import ByteLevelBPE
    from .merge import RankTable

    if len(ids) != 6 or not all(_id(v, n) for v in ids) or len(flags) != 4 \
            or not all(type(v) is bool for v in flags) or not all(_id(v, n) and v is not None for v in eog):
        return None
    if len(hidden) != (n + 7) // 8:
        return None
    attrs = np.frombuffer(attrs, np.uint32)
    hidden = np.unpackbits(np.frombuffer(hidden, np.uint8), count=n).astype(bool)
    special_all, special_user = _specials(special_all, n), _specials(special_user, n)
    piece_table = _table(*pieces, n)
    if len(attrs) != n or special_all is None or special_user is None or piece_table is None:
        return None
    rank_values = np.frombuffer(values, np.int64)
    rank_to_id = np.frombuffer(rank_to_id, np.int64)
    if (len(rank_values) and not 0 <= rank_values.min() <= rank_values.max() < len(rank_to_id)) \
            or (len(rank_to_id) and not -1 <= rank_to_id.min() <= rank_to_id.max() < n) \
            or type(pattern) is not str or not (chain is None or all(type(p) is str for p in chain)):
        return None
    # RankTable checks the strings (offsets, each once, the 256 bytes) and the ranks (each once):
    # a TokenizerError here means the record is not used (restore)
    blob, ends = keys
    ranks = RankTable(blob, np.frombuffer(ends, np.int64), rank_values)
    self = cls()
    self.kind, self.pre, self.source, self.n_vocab = "bpe", pre, source, n
    self._texts = named_texts(metadata["tokenizer.ggml.tokens"])
    self.bos_id, self.eos_id, self.eot_id, self.eom_id, self.unk_id, self.pad_id = ids
    self.add_bos, self.add_eos, self.add_space_prefix, self.clean_spaces = flags
    self.eog_ids = frozenset(eog)
    self._attrs = attrs.copy()
    self._hidden = hidden
    self._special_all, self._special_user = special_all, special_user
    self._pieces = piece_table
    compiled = None if chain is None else [regex.compile(p) for p in chain]
    self._encoder = ByteLevelBPE(ranks, rank_to_id.copy(), pattern, compiled, source)
    return self
