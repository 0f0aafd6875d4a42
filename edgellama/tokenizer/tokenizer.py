"""The ``Tokenizer`` facade: a vocabulary, its special tokens and one encoder (byte-level BPE or
SentencePiece), built from GGUF metadata or a tokenizer file; text <-> ids."""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..gguf import StringArray
from .bpe import ByteLevelBPE, gpt2_byte_chars, gpt2_bytes_bulk, llamacpp_decode_text
from .files import (MAX_TOKENIZER_FILE_BYTES, llama3_special_tokens, looks_like_tiktoken, read_tiktoken,
                    spm_model_to_metadata)
from .kept import keep, restore
from .pretokenize import PRE_TYPES, Pre
from .spm import SPM_SPACE, SentencePieceBPE
from .stream import StreamDecoder
from .vocab import (ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED, MAX_INPUT_CHARS,
                    MAX_VOCAB, ByteTable, Meta, TokenizerError, attrs_from_types, named_texts,
                    resolve_specials)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FIM_NAMES = ("pre", "suf", "mid", "pad", "rep", "sep")


class Tokenizer:
    """Text <-> token ids.  Build with ``from_gguf_metadata`` or ``from_file``.

    Public attributes: ``n_vocab``, ``bos_id``, ``eos_id``, ``eot_id``, ``eog_ids``, ``add_bos``,
    ``add_eos``, ``kind`` ("bpe" or "spm"), ``pre`` (the pre-tokenizer name).
    """

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool

    def __init__(self) -> None:  # use the from_* constructors
        self.kind = ""
        self.pre = ""
        self.source = ""
        self.n_vocab = 0
        self.bos_id = self.eos_id = self.eot_id = self.eom_id = None
        self.unk_id = self.pad_id = None
        self.eog_ids: frozenset[int] = frozenset()
        self.add_bos = False
        self.add_eos = False
        self.add_space_prefix = False
        self.clean_spaces = False
        self._texts: list[str] = []                      # token strings as the vocabulary has them
        self._pieces = ByteTable([])                     # the bytes each token stands for
        self._hidden = np.zeros(0, bool)                 # decode() omits these unless special
        self._special_all: list[tuple[str, int]] = []    # matched with special=True, longest first
        self._special_user: list[tuple[str, int]] = []   # matched always (user-defined tokens)
        self._encoder: ByteLevelBPE | SentencePieceBPE | None = None

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos})")

    # ----- construction from GGUF metadata --------------------------------------------------------

    @classmethod
    def from_gguf(cls, f) -> "Tokenizer":
        """The tokenizer of an open ``GGUFFile``: built from its metadata, or read back from what
        an earlier load of the same header kept (``kept``; the file's ``header_digest``)."""
        return cls.from_gguf_metadata(f.metadata, source=f.path, identity=getattr(f, "header_digest", None))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "<gguf>", *,
                           identity: bytes | None = None) -> "Tokenizer":
        """Build from GGUF metadata (a dict of key -> str/bool/int/float/list[str]/StringArray/np.ndarray).

        ``identity``: the SHA-256 of the header bytes ``metadata`` was parsed from, when it is a
        file's own (``from_gguf``); a byte-level BPE tokenizer is then kept for the next load of
        that header and read back from it (see ``edgellama.tokenizer.kept``)."""
        if identity is not None:
            kept = restore(cls, metadata, source, identity)
            if kept is not None:
                return kept
        meta = Meta(metadata, source)
        self = cls()
        self.source = source
        self.kind, pre = _model_kind(meta)
        self.pre = "spm" if pre is None else meta.str("tokenizer.ggml.pre", "default") or "default"
        texts, t2i = _read_tokens(meta)
        self._texts, self.n_vocab = texts, len(texts)
        attrs = attrs_from_types(meta.num_array("tokenizer.ggml.token_type", len(texts), "iu"), len(texts))
        fim = self._read_defaults_and_ids(meta, pre)
        self._set_specials(t2i, attrs, fim)
        if self.kind == "bpe":
            tok_bytes = gpt2_bytes_bulk(texts)
            self._render_pieces(meta, tok_bytes)
            merges = meta.str_list("tokenizer.ggml.merges", required=True)
            self._encoder = ByteLevelBPE.from_merges(meta, texts, t2i, tok_bytes, merges, pre)
            if identity is not None:
                keep(self, identity)
        else:
            self._render_pieces(meta)
            self._encoder = SentencePieceBPE(t2i, _read_scores(meta, len(texts)), self.unk_id)
        self._texts = lazy_texts(metadata, texts)
        return self

    def _read_defaults_and_ids(self, meta: Meta, pre: Pre | None) -> dict[str, int | None]:
        """llama.cpp's defaults per vocabulary type, the metadata's overrides, and the special ids
        (bos, eos, eot, eom, unk, pad; returns the fill-in-the-middle ones)."""
        n = self.n_vocab
        if pre is None:  # SentencePiece
            bos, eos, unk = 1, 2, 0
            self.add_bos, self.add_space_prefix, self.clean_spaces = True, True, False
        else:
            bos, eos, unk = (None if pre.no_bos else 11), 11, None
            self.add_bos, self.add_space_prefix, self.clean_spaces = pre.add_bos, False, pre.clean_spaces
        self.add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix", self.add_space_prefix)
        self.add_bos = meta.bool("tokenizer.ggml.add_bos_token", self.add_bos)
        self.add_eos = meta.bool("tokenizer.ggml.add_eos_token", False)

        def special_id(key: str, default: int | None, strict: bool) -> int | None:
            v = meta.int(key)
            if v is None:
                return default if default is not None and default < n else None
            if not 0 <= v < n:
                if strict:
                    raise meta.fail(key, f"token id {v} is outside the vocabulary of {n} tokens")
                return default if default is not None and default < n else None
            return v

        self.bos_id = special_id("tokenizer.ggml.bos_token_id", bos, True)
        self.eos_id = special_id("tokenizer.ggml.eos_token_id", eos, True)
        self.eot_id = special_id("tokenizer.ggml.eot_token_id", None, True)
        self.eom_id = special_id("tokenizer.ggml.eom_token_id", None, True)
        self.unk_id = special_id("tokenizer.ggml.unknown_token_id", unk, False)
        self.pad_id = special_id("tokenizer.ggml.padding_token_id", None, False)
        fim = {name: special_id(f"tokenizer.ggml.fim_{name}_token_id", None, False) for name in _FIM_NAMES}
        for old, name in (("prefix", "pre"), ("suffix", "suf"), ("middle", "mid")):
            v = special_id(f"tokenizer.ggml.{old}_token_id", None, False)
            if v is not None:
                fim[name] = v
        if self.add_bos and self.bos_id is None:
            raise meta.fail("tokenizer.ggml.add_bos_token", "is true, but there is no "
                                                            "tokenizer.ggml.bos_token_id")
        if self.add_eos and self.eos_id is None:
            raise meta.fail("tokenizer.ggml.add_eos_token", "is true, but there is no "
                                                            "tokenizer.ggml.eos_token_id")
        return fim

    def _set_specials(self, t2i: dict[str, int], attrs: np.ndarray, fim: dict[str, int | None]) -> None:
        s = resolve_specials(self._texts, t2i, attrs, self.eos_id, self.eot_id, self.eom_id, fim)
        self.eot_id, self.eom_id, self.eog_ids = s.eot_id, s.eom_id, s.eog_ids
        self._attrs = s.attrs
        self._special_all, self._special_user, self._hidden = s.matched, s.matched_user, s.hidden

    def _render_pieces(self, meta: Meta | None, normal: list[bytes | None] | None = None) -> None:
        """The bytes each token stands for (llama.cpp token_to_piece with special=True).
        ``normal``: the bytes of each byte-level BPE token string (None where not byte-level)."""
        texts, attrs = self._texts, self._attrs
        if self.kind == "spm":
            pieces = [t.replace(SPM_SPACE, " ").encode("utf-8") for t in texts]
        else:
            pieces = [b if b is not None else llamacpp_decode_text(t) for t, b in zip(texts, normal)]
        for i in np.flatnonzero((attrs & ATTR_NORMAL) == 0).tolist():
            text, attr = texts[i], int(attrs[i])
            if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
                pieces[i] = text.encode("utf-8")
            elif attr & ATTR_BYTE:
                m = _BYTE_TOKEN.fullmatch(text)
                if m is None:
                    raise TokenizerError(f"{self.source}: tokenizer.ggml.token_type: token {i} "
                                         f"{text[:40]!r} has type BYTE but is not <0xNN>")
                pieces[i] = bytes([int(m.group(1), 16)])
            else:
                pieces[i] = b""
        self._pieces = ByteTable(pieces)

    # ----- construction from files ----------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer of a ``.gguf`` model, a tiktoken ``tokenizer.model`` (Llama 3, with
        Llama 3's 256 special tokens) or a SentencePiece BPE ``.model``."""
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file")
        with open(p, "rb") as f:
            head = f.read(4)
        if head == b"GGUF":
            from ..gguf import GGUFFile, ModelFormatError
            try:
                gf = GGUFFile(p)
            except ModelFormatError as e:
                raise TokenizerError(str(e)) from None
            try:
                meta = {k: (np.array(v) if isinstance(v, np.ndarray) else v)
                        for k, v in gf.metadata.items() if k.startswith("tokenizer.")}
            finally:
                gf.close()
            return cls.from_gguf_metadata(meta, source=str(p))
        size = p.stat().st_size
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise TokenizerError(f"{p}: {size} bytes is too large for a tokenizer file")
        data = p.read_bytes()
        if looks_like_tiktoken(data):
            return cls.from_tiktoken(data, str(p))
        try:
            meta = spm_model_to_metadata(data, source=str(p))
        except TokenizerError as e:
            raise TokenizerError(f"{p}: neither a GGUF file, a tiktoken tokenizer.model nor a "
                                 f"SentencePiece model ({e})") from None
        return cls.from_gguf_metadata(meta, source=str(p))

    @classmethod
    def from_tiktoken(cls, data: bytes, source: str = "<tiktoken>") -> "Tokenizer":
        """Llama 3's ``tokenizer.model``: its ranks are the ids, then Llama 3's special tokens."""
        ranks = read_tiktoken(data, source)
        n_base = len(ranks)
        specials = llama3_special_tokens(n_base)
        self = cls()
        self.kind, self.pre, self.source = "bpe", "llama3", source
        by_rank = [b""] * n_base
        for tok, rank in ranks.items():
            by_rank[rank] = tok
        # GGUF-style token strings, so the special-token rules work on texts as for a GGUF file
        chars = gpt2_byte_chars()
        texts = ["".join(chars[x] for x in tok) for tok in by_rank] + specials
        self._texts, self.n_vocab = texts, len(texts)
        t2i = dict(zip(texts, range(len(texts))))
        attrs = np.full(len(texts), ATTR_NORMAL, np.uint32)
        attrs[n_base:] = ATTR_CONTROL
        self.bos_id, self.eos_id = t2i["<|begin_of_text|>"], t2i["<|end_of_text|>"]
        self.add_bos, self.add_eos, self.clean_spaces = True, False, True
        self._set_specials(t2i, attrs, dict.fromkeys(_FIM_NAMES))
        self._pieces = ByteTable(by_rank + [s.encode("utf-8") for s in specials])
        self._encoder = ByteLevelBPE.from_ranks(ranks, PRE_TYPES["llama3"].split, source)
        return self

    # ----- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False,
               add_eos: bool | None = None, *, plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of ``text``.

        ``add_bos``/``add_eos``: None means the model's default (``self.add_bos``/``self.add_eos``).
        ``special``: match control tokens written in the text (never do this for user input);
        user-defined tokens are always matched, as in llama.cpp.
        ``plain_spans``: with ``special``, sorted, disjoint (start, end) character ranges of
        ``text`` that are plain text (a chat message's content inside a rendered template): a
        control token is matched only where it lies wholly outside them; inside one, text is
        tokenized as with ``special=False``.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        if len(text) > MAX_INPUT_CHARS:
            raise TokenizerError(f"text of {len(text)} characters is longer than the "
                                 f"{MAX_INPUT_CHARS} we tokenize at once")
        text = _clean_text(text)
        out: list[int] = []
        if add_bos if add_bos is not None else self.add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: this vocabulary has no BOS token")
            out.append(self.bos_id)
        if not text:
            fragments: list[str | int] = []
        elif special and plain_spans:
            fragments = self._partition_guarded(text, plain_spans)
        else:
            fragments = self._partition(text, special)
        encoder = self._encoder
        if isinstance(encoder, SentencePieceBPE):
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                encoder.encode(frag.replace(" ", SPM_SPACE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(encoder.encode(frag))
        if add_eos if add_eos is not None else self.add_eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.source}: this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Split out special tokens (llama.cpp tokenizer_st_partition): longest token first."""
        fragments: list[str | int] = [text]
        for tok_text, tid in (self._special_all if special else self._special_user):
            if tok_text not in text:
                continue
            new: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or tok_text not in frag:
                    new.append(frag)
                    continue
                for k, part in enumerate(frag.split(tok_text)):
                    if k:
                        new.append(tid)
                    if part:
                        new.append(part)
            fragments = new
        return fragments

    def _partition_guarded(self, text: str, plain_spans: Sequence[tuple[int, int]]) -> list[str | int]:
        """``_partition(text, special=True)``, except that an occurrence of a control token that
        touches a plain span stays text (user-defined tokens wholly inside one are still matched,
        as ``special=False`` would)."""
        spans = sorted((int(a), int(b)) for a, b in plain_spans if b > a)
        for (a0, b0), (a1, _) in zip(spans, spans[1:]):
            if a1 < b0:
                raise TokenizerError(f"plain_spans overlap: ({a0}, {b0}) and ({a1}, ...)")
        if spans and (spans[0][0] < 0 or spans[-1][1] > len(text)):
            raise TokenizerError(f"plain_spans reach outside the text of {len(text)} characters")
        starts = [a for a, _ in spans]
        user_defined = {tid for _, tid in self._special_user}

        def allowed(p: int, q: int, tid: int) -> bool:
            k = bisect.bisect_right(starts, q - 1) - 1  # the last span starting before q
            if k < 0 or spans[k][1] <= p:
                return True  # wholly in the template's markup
            return tid in user_defined and spans[k][0] <= p and q <= spans[k][1]

        fragments: list[tuple[int, int] | int] = [(0, len(text))]
        for tok_text, tid in self._special_all:
            if tok_text not in text:
                continue
            n = len(tok_text)
            new: list[tuple[int, int] | int] = []
            for frag in fragments:
                if isinstance(frag, int):
                    new.append(frag)
                    continue
                start, end = frag
                at = pos = start
                while (p := text.find(tok_text, pos, end)) >= 0:
                    if not allowed(p, p + n, tid):
                        pos = p + 1
                        continue
                    if p > at:
                        new.append((at, p))
                    new.append(tid)
                    at = pos = p + n
                if at < end:
                    new.append((at, end))
            fragments = new
        return [f if isinstance(f, int) else text[f[0]:f[1]] for f in fragments]

    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise TokenizerError(f"token ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
            arr = ids.astype(np.int64, copy=False)
        else:
            try:
                seq = list(ids)
            except TypeError:
                raise TokenizerError(f"token ids must be a sequence of ints, got {type(ids).__name__}") from None
            for i, t in enumerate(seq):
                if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                    raise TokenizerError(f"token id at position {i} is {type(t).__name__} {t!r:.40}, "
                                         "not an int")
            arr = np.asarray(seq, dtype=object).astype(np.int64) if seq else np.zeros(0, np.int64)
        if arr.size:
            bad = np.flatnonzero((arr < 0) | (arr >= self.n_vocab))
            if bad.size:
                k = int(bad[0])
                raise TokenizerError(f"token id {int(arr[k])} at position {k} is outside the vocabulary "
                                     f"of {self.n_vocab} tokens")
        return arr.tolist()

    def decode(self, ids, special: bool = False) -> str:
        """Text of ``ids`` as llama.cpp detokenizes it (including its clean-up of spaces before
        punctuation for vocabularies that ask for it); control tokens are omitted unless
        ``special``; invalid UTF-8 becomes U+FFFD.  SentencePiece vocabularies drop the space the
        encoder put in front of the first text piece, as sentencepiece does (llama.cpp keeps it
        when the ids start with BOS)."""
        ids = self._check_ids(ids)
        pieces, hidden = self._pieces, self._hidden
        if special:
            parts = [pieces[i] for i in ids]
        else:
            parts = [pieces[i] for i in ids if not hidden[i]]
        if self.add_space_prefix:
            # the space the encoder put in front of the text is not part of it
            for k, p in enumerate(parts):
                if p:
                    if p[:1] == b" ":
                        parts[k] = p[1:]
                    break
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (control tokens: their text)."""
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TokenizerError(f"token id must be an int, got {type(token_id).__name__}")
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self.n_vocab} tokens")
        return self._pieces[int(token_id)]

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (GGUF form, e.g. 'Ġthe' or '▁the')."""
        self.token_bytes(token_id)
        return self._texts[int(token_id)]

    def token_texts(self) -> tuple[str, ...]:
        """Every token's string, in id order."""
        return tuple(self._texts)

    def is_control(self, token_id: int) -> bool:
        """True for tokens decode() omits unless special=True."""
        self.token_bytes(token_id)
        return bool(self._hidden[int(token_id)])

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)


# ----- the steps of reading GGUF metadata ---------------------------------------------------------------

def _model_kind(meta: Meta) -> tuple[str, Pre | None]:
    """("bpe", its pre-tokenizer) or ("spm", None)."""
    model = meta.str("tokenizer.ggml.model", required=True)
    if model == "llama":
        return "spm", None
    if model != "gpt2":
        raise meta.fail("tokenizer.ggml.model", f"unsupported tokenizer {model!r} (supported: 'gpt2', 'llama')")
    name = meta.str("tokenizer.ggml.pre", "default") or "default"
    pre = PRE_TYPES.get(name)
    if pre is None:
        raise meta.fail("tokenizer.ggml.pre", f"unsupported pre-tokenizer {name!r} "
                                              f"(supported: {', '.join(sorted(PRE_TYPES))})")
    return "bpe", pre


def lazy_texts(metadata: dict, texts: Sequence[str]) -> Sequence[str]:
    """The file's own token strings, read in place (a ``StringArray``), instead of ``texts`` (the
    same strings as a list: ~10 MiB for Llama 3's 128k) where they are the same: no empty token
    (those get a name)."""
    kept = metadata.get("tokenizer.ggml.tokens")
    if isinstance(kept, StringArray) and len(kept) == len(texts) and named_texts(kept) is kept:
        return kept
    return texts


def _read_tokens(meta: Meta) -> tuple[list[str], dict[str, int]]:
    """The token strings (empty ones named as llama.cpp names them) and text -> id, no duplicates."""
    texts = meta.str_list("tokenizer.ggml.tokens", required=True)
    n = len(texts)
    if n == 0:
        raise meta.fail("tokenizer.ggml.tokens", "the vocabulary is empty")
    if n > MAX_VOCAB:
        raise meta.fail("tokenizer.ggml.tokens", f"{n} tokens is more than the {MAX_VOCAB} we accept")
    texts = named_texts(texts)
    t2i = dict(zip(texts, range(n)))
    if len(t2i) != n:
        seen: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t in seen:
                raise meta.fail("tokenizer.ggml.tokens", f"duplicate token {t[:60]!r} at ids {seen[t]} and {i}")
            seen[t] = i
    return texts, t2i


def _read_scores(meta: Meta, n: int) -> np.ndarray:
    scores = meta.num_array("tokenizer.ggml.scores", n, "fi")
    if scores is None:
        return np.zeros(n, np.float32)
    if scores.dtype not in (np.float32, np.int32):
        raise meta.fail("tokenizer.ggml.scores", f"expected float32 (or int32), got {scores.dtype}")
    if scores.dtype.kind == "f" and not np.all(np.isfinite(scores)):
        bad = int(np.argmin(np.isfinite(scores)))
        raise meta.fail("tokenizer.ggml.scores", f"score of token {bad} is {scores[bad]}")
    return np.array(scores, dtype=np.float32)


# ----- text clean-up -------------------------------------------------------------------------------------

def _clean_text(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; llama.cpp sees U+FFFD for invalid input."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces on detokenized bytes (three passes)."""
    # " ?", " !", " .", " ," lose their space
    data = re.sub(rb" (?=[?!.,])", b"", data)
    if b"'" not in data:
        return data
    # " ' " becomes "'" (the following space is consumed and cannot start another match)
    text = bytearray(data)
    out = bytearray(text[:1])
    i = 1
    n = len(text)
    while i < n:
        x = text[i]
        if x == 0x27 and i + 1 < n and text[i - 1] == 0x20 and text[i + 1] == 0x20:
            out.pop()
            i += 1
            text[i] = 0
        out.append(x)
        i += 1
    # " 's", " 'm", " 're", " 've" lose their space
    text = out
    out = bytearray(text[:1])
    n = len(text)
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = text[i + 1]
            if x1 in b"sm":
                out.pop()
            elif i + 2 < n and (x1, text[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                out.pop()
        out.append(x)
    return bytes(out)
