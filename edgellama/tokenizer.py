"""Text <-> token ids, with the same ids as llama.cpp.

Three vocabularies are supported:

* GGUF ``tokenizer.ggml.model = "gpt2"``: byte-level BPE (SmolLM, Llama 3, Qwen2, ...).  The token
  strings are mapped back to bytes through the GPT-2 byte<->unicode table and every merge
  ``"a b"`` gives the token ``a+b`` the rank of its position in ``tokenizer.ggml.merges``; tiktoken's
  Rust core then does the pre-token split and the BPE.  tiktoken merges the adjacent pair whose
  *result* has the lowest rank, llama.cpp (and HF) the adjacent pair that comes first in the merge
  list; with ranks taken from the merge order the two agree (checked against llama.cpp on millions
  of characters, and by a pure-Python twin of llama.cpp's algorithm in the tests).
* GGUF ``tokenizer.ggml.model = "llama"``: SentencePiece BPE as llama.cpp runs it: spaces become
  U+2581, an optional leading space, adjacent symbols merged by the highest score, bytes that form
  no token fall back to ``<0xNN>`` tokens.
* A tiktoken ``tokenizer.model`` file (Llama 3: one "base64-token rank" line per token), loaded
  with ``Tokenizer.from_file`` together with Llama 3's 256 special tokens.

Special tokens follow llama.cpp: control (and unknown) tokens are matched in the text only with
``special=True``; user-defined tokens always are; longer special tokens are matched first.  Decoding
omits control tokens unless ``special=True``.  End-of-generation ids are chosen by llama.cpp's rules
(eos, eot, eom, the FIM pad/repo/sep tokens and a list of well-known token texts).

Every problem with the metadata raises ``TokenizerError`` naming the source and the key.
"""

from __future__ import annotations

import base64
import bisect
import heapq
from array import array
import operator
import os
import re
from itertools import repeat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import regex
import tiktoken

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder", "spm_model_to_metadata",
           "MAX_INPUT_CHARS"]

# The longest text we tokenize in one call (~1M tokens, far beyond any context): a book is ~1M
# characters, wikitext-2's test set 1.3M.  Beyond this is a mistake or an attack, and the SentencePiece
# path would need gigabytes.
MAX_INPUT_CHARS = 4 * 1024 * 1024
# The largest vocabulary we accept: 4x the biggest real ones (Gemma 3: 262,144 tokens).
MAX_VOCAB = 1024 * 1024
# The most BPE merges we accept, and at most MAX_MERGES_PER_TOKEN per token of the vocabulary: real
# files have about one per token (Qwen2: 151k for 151k) and at most ~2.2 (Llama 3: 280k for 128k).
MAX_MERGES = 2 * 1024 * 1024
MAX_MERGES_PER_TOKEN = 8
# Merges are turned into ranks this many at a time, so that building costs memory in proportion to
# the merges' own bytes (the whole list at once took 9x a hostile file's size).
MERGE_CHUNK = 1 << 16
# A run of this many whitespace characters is split by the pre-tokenizer here rather than inside
# tiktoken, whose regex engine overflows its stack on the lookahead in "\s+(?!\S)" somewhere between
# 300k and 1M characters (a Rust panic, a BaseException).  The pieces are the same either way.
LONG_SPACE_RUN = 4096


class TokenizerError(ValueError):
    """Bad tokenizer metadata, or a bad argument to encode/decode."""


# ----- llama.cpp token types (GGUF tokenizer.ggml.token_type) and attributes ----------------------

TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

_TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                          ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE], dtype=np.uint32)

# ----- token texts llama.cpp recognises (src/llama-vocab.cpp, "auto-detect special tokens") -------

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                  "▁<PRE>", "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                  "▁<SUF>", "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                  "▁<MID>", "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~["))
# gpt-oss: these are always rendered, whatever their type says.
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# ----- pre-tokenizer regexes (as llama.cpp uses them for each tokenizer.ggml.pre) -------------------

# GPT-2's split, with the final "\s+" that llama.cpp's hand-written splitter also applies.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits split off one by one ("\p{N}" first), then GPT-2's split on what is between them, written
# as one regex: a run of spaces before a digit ends its piece, so it is kept whole there.
_RE_DIGITS_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"|\s+(?=\p{N})|\s+(?!\S)|\s+")
_RE_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's chains of splits for pre-tokenizers that are not one regex.
_CHAIN_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_CHAIN_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")


class _Pre:
    """How one ``tokenizer.ggml.pre`` splits text, and the defaults llama.cpp gives it."""

    def __init__(self, split: str | tuple[str, ...], *, clean_spaces: bool = True,
                 ignore_merges: bool = False, add_bos: bool = False, no_bos: bool = False):
        self.split = split
        self.clean_spaces = clean_spaces
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos
        self.no_bos = no_bos


def _pre_table() -> dict[str, _Pre]:
    table: dict[str, _Pre] = {}

    def put(names: Iterable[str], pre: _Pre) -> None:
        for name in names:
            table[name] = pre

    put(["default"], _Pre(_CHAIN_DEFAULT))
    put(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"], _Pre(_RE_LLAMA3, ignore_merges=True, add_bos=True))
    put(["dbrx", "smaug-bpe"], _Pre(_RE_LLAMA3))
    put(["glm4", "chatglm-bpe"], _Pre(_RE_LLAMA3, no_bos=True))
    put(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
         "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "jina-v1-en", "jina-v2-code",
         "roberta-bpe"], _Pre(_RE_GPT2))
    put(["trillion", "granite-docling"], _Pre(_RE_GPT2, clean_spaces=False))
    put(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
        _Pre(_RE_DIGITS_GPT2))
    put(["smollm", "command-r"], _Pre(_RE_DIGITS_GPT2, clean_spaces=False))
    put(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"],
        _Pre(_RE_QWEN2, clean_spaces=False))
    put(["megrez", "stablelm2"], _Pre(_RE_QWEN2))
    put(["falcon"], _Pre(_CHAIN_FALCON))
    return table


_PRE_TYPES = _pre_table()
_LONG_SPACE = regex.compile(r"\s{%d}" % LONG_SPACE_RUN)


# ----- GPT-2 byte <-> unicode table -----------------------------------------------------------------

def _gpt2_byte_chars() -> list[str]:
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


_BYTE_CHARS = _gpt2_byte_chars()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
# str.translate table: GPT-2 character -> the latin-1 character of its byte.
_GPT2_TRANSLATE = {ord(c): b for b, c in enumerate(_BYTE_CHARS)}
_NOT_GPT2_CHAR = re.compile("[^" + re.escape("".join(_BYTE_CHARS)) + "]")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"


def _gpt2_token_bytes(text: str) -> bytes | None:
    """Bytes of a byte-level BPE token string, or None if it has a character outside the table."""
    if _NOT_GPT2_CHAR.search(text):
        return None
    return text.translate(_GPT2_TRANSLATE).encode("latin-1")


def _gpt2_bytes_bulk(texts: list[str]) -> list[bytes | None]:
    """``_gpt2_token_bytes`` of every token, done as a few whole-vocabulary string operations
    (one character of the byte alphabet is one byte, so offsets carry over)."""
    joined = "".join(texts)
    data = joined.translate(_GPT2_TRANSLATE).encode("latin-1", errors="replace")
    ends = np.cumsum([len(t) for t in texts]).tolist()
    out: list[bytes | None] = [data[s:e] for s, e in zip([0] + ends[:-1], ends)]
    bad = [m.start() for m in _NOT_GPT2_CHAR.finditer(joined)]
    if bad:
        for i in set(np.searchsorted(ends, bad, side="right").tolist()):
            out[i] = None
    return out


def _split_merge(m: str) -> list[str]:
    """Split a merge at the first space after its first character (llama.cpp: find(' ', 1))."""
    sp = m.find(" ", 1)
    return [m] if sp < 0 else [m[:sp], m[sp + 1:]]


def _llamacpp_decode_text(text: str) -> bytes:
    """llama.cpp's rendering of a NORMAL byte-level token (llama_decode_text)."""
    out = bytearray()
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


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


# ----- metadata access with validation ------------------------------------------------------------

class _Meta:
    def __init__(self, metadata: dict, source: str):
        if not isinstance(metadata, dict):
            raise TokenizerError(f"{source}: tokenizer metadata must be a dict, got "
                                 f"{type(metadata).__name__}")
        self.m = metadata
        self.source = source

    def fail(self, key: str, msg: str) -> TokenizerError:
        return TokenizerError(f"{self.source}: {key}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.m

    def str(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        if key not in self.m:
            if required:
                raise self.fail(key, "missing")
            return default
        v = self.m[key]
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, got {type(v).__name__}")
        return v

    def bool(self, key: str, default: bool | None = None) -> bool | None:
        if key not in self.m:
            return default
        v = self.m[key]
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        raise self.fail(key, f"expected a bool, got {type(v).__name__} {v!r:.40}")

    def int(self, key: str) -> int | None:
        if key not in self.m:
            return None
        v = self.m[key]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise self.fail(key, f"expected an integer, got {type(v).__name__} {v!r:.40}")
        return int(v)

    def str_list(self, key: str, required: bool = False) -> list[str] | None:
        if key not in self.m:
            if required:
                raise self.fail(key, "missing")
            return None
        v = self.m[key]
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise self.fail(key, f"expected an array of strings, got {type(v).__name__}")
        if set(map(type, v)) - {str}:
            i = next(i for i, item in enumerate(v) if type(item) is not str)
            raise self.fail(key, f"item {i} is {type(v[i]).__name__}, expected a string")
        return list(v)

    def num_array(self, key: str, n: int, kinds: str) -> np.ndarray | None:
        """A 1-D numeric array of at least ``n`` items whose dtype kind is in ``kinds``."""
        if key not in self.m:
            return None
        v = self.m[key]
        if not isinstance(v, np.ndarray):
            raise self.fail(key, f"expected a numeric array, got {type(v).__name__}")
        if v.ndim != 1 or v.dtype.kind not in kinds:
            raise self.fail(key, f"expected a 1-D array of {'integers' if kinds == 'iu' else 'floats'},"
                                 f" got dtype {v.dtype} with shape {v.shape}")
        if len(v) < n:
            raise self.fail(key, f"has {len(v)} items, fewer than the {n} tokens")
        return v[:n]


# ----- the tokenizer ------------------------------------------------------------------------------

class _ByteTable:
    """Byte strings 0..n-1 in one bytes object and an offset array: a vocabulary's 50k separate
    bytes objects cost about 5 MB, this a tenth of it."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, items: Sequence[bytes]):
        self._blob = b"".join(items)
        self._ends = array("q", [0])
        total = 0
        for item in items:
            total += len(item)
            self._ends.append(total)

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, i: int) -> bytes:
        return self._blob[self._ends[i]:self._ends[i + 1]]


def _merge_results(meta: _Meta, merges: list[str], start: int, stop: int,
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


def _core_bpe(name: str, pattern: str, ranks: dict[bytes, int]):
    """tiktoken's BPE engine for these ranks.  The Rust core alone: tiktoken.Encoding would also
    keep the Python dict of ranks (several MB for a 50k vocabulary), which encoding never reads."""
    try:
        from tiktoken import _tiktoken

        return _tiktoken.CoreBPE(ranks, {}, pattern)
    except (ImportError, AttributeError, TypeError):  # another tiktoken layout: the public class
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


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
        self.eog_ids = frozenset()
        self.fim_ids: dict[str, int | None] = {}
        self.add_bos = False
        self.add_eos = False
        self.add_space_prefix = False
        self.clean_spaces = False
        self._texts: list[str] = []
        self._attrs = np.zeros(0, np.uint32)
        self._pieces: _ByteTable = _ByteTable([])
        self._hidden = np.zeros(0, bool)
        self._special_all: list[tuple[str, int]] = []
        self._special_user: list[tuple[str, int]] = []
        # byte-level BPE
        self._enc = None  # tiktoken's BPE core (encode_ordinary)
        self._rank_to_id: np.ndarray | None = None
        self._rank_gaps = False
        self._chain: list[regex.Pattern] | None = None
        self._pattern = ""  # the regex tiktoken splits with
        self._split_re: regex.Pattern | None = None
        # SentencePiece
        self._token_to_id: dict[str, int] = {}
        self._scores = np.zeros(0, np.float32)
        self._byte_ids: list[int | None] = []

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos})")

    # ----- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "<gguf>") -> "Tokenizer":
        """Build from GGUF metadata (a dict of key -> str/bool/int/float/list[str]/np.ndarray)."""
        meta = _Meta(metadata, source)
        model = meta.str("tokenizer.ggml.model", required=True)
        if model == "gpt2":
            kind = "bpe"
        elif model == "llama":
            kind = "spm"
        else:
            raise meta.fail("tokenizer.ggml.model", f"unsupported tokenizer {model!r} "
                                                    "(supported: 'gpt2', 'llama')")
        self = cls()
        self.kind = kind
        self.source = source
        texts = meta.str_list("tokenizer.ggml.tokens", required=True)
        n = len(texts)
        if n == 0:
            raise meta.fail("tokenizer.ggml.tokens", "the vocabulary is empty")
        if n > MAX_VOCAB:
            raise meta.fail("tokenizer.ggml.tokens", f"{n} tokens is more than the {MAX_VOCAB} we accept")
        if "" in texts:
            texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(texts)]  # as llama.cpp does
        token_to_id = dict(zip(texts, range(n)))
        if len(token_to_id) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(texts):
                if t in seen:
                    raise meta.fail("tokenizer.ggml.tokens", f"duplicate token {t[:60]!r} at ids "
                                                             f"{seen[t]} and {i}")
                seen[t] = i
        self.n_vocab = n
        self._texts = texts
        self._token_to_id = token_to_id

        types = meta.num_array("tokenizer.ggml.token_type", n, "iu")
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, np.uint32)
        else:
            t64 = types.astype(np.int64)
            attrs = np.where((t64 >= 0) & (t64 < len(_TYPE_TO_ATTR)),
                             _TYPE_TO_ATTR[np.clip(t64, 0, len(_TYPE_TO_ATTR) - 1)],
                             ATTR_UNDEFINED).astype(np.uint32)
        if kind == "spm":
            scores = meta.num_array("tokenizer.ggml.scores", n, "fi")
            if scores is not None and scores.dtype not in (np.float32, np.int32):
                raise meta.fail("tokenizer.ggml.scores", f"expected float32 (or int32), got {scores.dtype}")
            if scores is not None and scores.dtype.kind == "f" and not np.all(np.isfinite(scores)):
                bad = int(np.argmin(np.isfinite(scores)))
                raise meta.fail("tokenizer.ggml.scores", f"score of token {bad} is {scores[bad]}")
            self._scores = (np.zeros(n, np.float32) if scores is None
                            else np.array(scores, dtype=np.float32))

        pre_name = ""
        pre = None
        if kind == "bpe":
            pre_name = meta.str("tokenizer.ggml.pre", "default") or "default"
            pre = _PRE_TYPES.get(pre_name)
            if pre is None:
                raise meta.fail("tokenizer.ggml.pre", f"unsupported pre-tokenizer {pre_name!r} "
                                                      f"(supported: {', '.join(sorted(_PRE_TYPES))})")
        self.pre = pre_name or "spm"

        # model defaults, as llama.cpp sets them per vocabulary type
        if kind == "spm":
            bos, eos, unk = 1, 2, 0
            self.add_bos, self.add_space_prefix, self.clean_spaces = True, True, False
        else:
            bos, eos, unk = 11, 11, None
            if pre.no_bos:
                bos = None
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
        fim = {name: special_id(f"tokenizer.ggml.fim_{name}_token_id", None, False)
               for name in ("pre", "suf", "mid", "pad", "rep", "sep")}
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
        self._finish_specials(attrs, fim)

        if kind == "bpe":
            merges = meta.str_list("tokenizer.ggml.merges", required=True)
            self._build_bpe(meta, merges, pre)
            self._token_to_id = {}  # only building (and SentencePiece encoding) looks tokens up by text
        else:
            self._build_spm(meta)
        return self

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
            from .gguf import GGUFFile, ModelFormatError
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
        if size > 64 * 1024 * 1024:
            raise TokenizerError(f"{p}: {size} bytes is too large for a tokenizer file")
        data = p.read_bytes()
        if _looks_like_tiktoken(data):
            return cls._from_tiktoken_bytes(data, str(p))
        try:
            meta = spm_model_to_metadata(data, source=str(p))
        except TokenizerError as e:
            raise TokenizerError(f"{p}: neither a GGUF file, a tiktoken tokenizer.model nor a "
                                 f"SentencePiece model ({e})") from None
        return cls.from_gguf_metadata(meta, source=str(p))

    def _finish_specials(self, attrs: np.ndarray, fim: dict[str, int | None]) -> None:
        """llama.cpp's special-token rules: EOT/EOM/FIM detection by text, EOG set, attributes."""
        texts, t2i = self._texts, self._token_to_id

        def find(names: Sequence[str]) -> int | None:
            ids = [t2i[s] for s in names if s in t2i]
            return min(ids) if ids else None

        def force_control(i: int | None) -> None:
            if i is not None:
                attrs[i] |= ATTR_CONTROL

        if self.eot_id is None:
            # llama.cpp takes the first match in hash-map order; "<|eot_id|>" first, then the lowest
            # id gives its choice for Llama 3 (128009) and SmolLM2 (0, <|endoftext|>)
            self.eot_id = t2i.get("<|eot_id|>", find(_EOT_TEXTS))
            force_control(self.eot_id)
        if self.eom_id is None:
            self.eom_id = find(_EOM_TEXTS)
            force_control(self.eom_id)
        for name, names in (("pre", _FIM_PRE_TEXTS), ("suf", _FIM_SUF_TEXTS), ("mid", _FIM_MID_TEXTS),
                            ("pad", _FIM_PAD_TEXTS), ("rep", _FIM_REP_TEXTS), ("sep", _FIM_SEP_TEXTS)):
            if fim[name] is None:
                fim[name] = find(names)
                force_control(fim[name])
        self.fim_ids = dict(fim)
        eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
        for s in _EOG_TEXTS:
            i = t2i.get(s)
            if i is not None:
                eog.add(i)
                force_control(i)
        for s in _ALWAYS_USER_DEFINED:
            i = t2i.get(s)
            if i is not None:
                attrs[i] = ATTR_USER_DEFINED
        eog.update(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None)
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
        present = {texts[i] for i in eog}
        if "<|end|>" in present and (("<|return|>" in present and "<|call|>" in present)
                                     or ("<|calls|>" in present and "<|flush|>" in present)):
            end = t2i["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        # gemma4 / paddleocr: "</s>" is not an end of generation there
        if "<|tool_response>" in present and "</s>" in present:
            s = t2i["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self.eog_ids = frozenset(int(i) for i in eog)
        self._attrs = attrs

        # special tokens matched in the text, longest first (ties: lower id first)
        special = np.flatnonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        order = sorted(special.tolist(), key=lambda i: (-len(texts[i].encode("utf-8")), i))
        self._special_all = [(texts[i], i) for i in order]
        self._special_user = [(texts[i], i) for i in order
                              if not attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]
        self._hidden = (attrs & (ATTR_CONTROL | ATTR_UNKNOWN)) != 0

    def _render_pieces(self, meta: _Meta, normal: list[bytes | None] | None = None) -> None:
        """The bytes each token stands for (llama.cpp token_to_piece with special=True).
        ``normal``: the bytes of each byte-level BPE token string (None where not byte-level)."""
        texts, attrs = self._texts, self._attrs
        spm = self.kind == "spm"
        if spm:
            pieces = [t.replace(_SPM_SPACE, " ").encode("utf-8") for t in texts]
        else:
            pieces = [b if b is not None else _llamacpp_decode_text(t) for t, b in zip(texts, normal)]
        for i in np.flatnonzero((attrs & ATTR_NORMAL) == 0).tolist():
            text, attr = texts[i], int(attrs[i])
            if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
                pieces[i] = text.encode("utf-8")
            elif attr & ATTR_BYTE:
                m = _BYTE_TOKEN.fullmatch(text)
                if m is None:
                    raise meta.fail("tokenizer.ggml.token_type",
                                    f"token {i} {text[:40]!r} has type BYTE but is not <0xNN>")
                pieces[i] = bytes([int(m.group(1), 16)])
            else:
                pieces[i] = b""
        self._pieces = _ByteTable(pieces)

    # ----- byte-level BPE -------------------------------------------------------------------------

    def _build_bpe(self, meta: _Meta, merges: list[str], pre: _Pre) -> None:
        texts, t2i = self._texts, self._token_to_id
        n_merges = len(merges)
        limit = min(MAX_MERGES, MAX_MERGES_PER_TOKEN * len(texts))
        if n_merges > limit:
            raise meta.fail("tokenizer.ggml.merges", f"{n_merges} merges for {len(texts)} tokens is more "
                                                     f"than the {limit} we accept (at most {MAX_MERGES}, "
                                                     f"and {MAX_MERGES_PER_TOKEN} per token)")
        tok_bytes = _gpt2_bytes_bulk(texts)
        self._render_pieces(meta, tok_bytes)
        # res[k]: the token merge k makes (-1: none); the merges are read a chunk at a time
        res = np.empty(n_merges, np.int64)
        for c0 in range(0, n_merges, MERGE_CHUNK):
            results = _merge_results(meta, merges, c0, min(c0 + MERGE_CHUNK, n_merges), t2i)
            res[c0:c0 + len(results)] = np.fromiter(map(t2i.get, results, repeat(-1)), dtype=np.int64,
                                                    count=len(results))
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
        self._rank_to_id = np.concatenate([rank_arr, np.array(unreached, dtype=np.int64)])
        self._rank_gaps = bool((self._rank_to_id[:256] < 0).any())
        if isinstance(pre.split, str):
            pattern = pre.split
            self._chain = None
        else:
            pattern = r"[\s\S]+"  # the chain of regexes splits; tiktoken only does the BPE
            self._chain = [regex.compile(p) for p in pre.split]
        self._pattern = pattern
        try:
            self._enc = _core_bpe(f"edgellama-{self.pre}", pattern, ranks)
        except Exception as e:  # tiktoken rejects the table: say which file
            raise meta.fail("tokenizer.ggml.merges", f"cannot build the BPE table: {e}") from None

    def _bpe_encode(self, text: str) -> list[int]:
        try:
            return self._bpe_encode_unchecked(text)
        except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
            raise
        except BaseException as e:  # tiktoken's Rust panics are BaseExceptions (pyo3 PanicException)
            raise TokenizerError(f"{self.source}: the BPE tokenizer failed on a text of {len(text)} "
                                 f"characters ({type(e).__name__}: {str(e)[:100]})") from None

    def _bpe_encode_unchecked(self, text: str) -> list[int]:
        enc = self._enc
        if self._chain is None and len(text) >= LONG_SPACE_RUN and _LONG_SPACE.search(text):
            # tiktoken's regex engine would overflow on this run: split here (the same regex, the
            # same pieces), and let tiktoken do only the BPE of each piece
            ranks = []
            for m in self._split_regex().finditer(text):
                ranks.extend(enc.encode_single_piece(m.group().encode("utf-8")))
        elif self._chain is None:
            ranks = enc.encode_ordinary(text)
        else:
            ranks = []
            for piece in self._split_chain(text):
                ranks.extend(enc.encode_ordinary(piece))
        ids = self._rank_to_id[np.asarray(ranks, dtype=np.int64)]
        if self._rank_gaps:
            ids = ids[ids >= 0]  # bytes that have no token are dropped, as llama.cpp does
        return ids.tolist()

    def _split_regex(self) -> regex.Pattern:
        """The pre-tokenizer regex, compiled by the regex module (only for texts with long runs)."""
        if self._split_re is None:
            self._split_re = regex.compile(self._pattern)
        return self._split_re

    def _split_chain(self, text: str) -> list[str]:
        """Apply llama.cpp's regexes one after another; text between matches is kept as pieces."""
        pieces = [text]
        for pattern in self._chain:
            out = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    # ----- SentencePiece --------------------------------------------------------------------------

    def _build_spm(self, meta: _Meta) -> None:
        self._render_pieces(meta)
        t2i = self._token_to_id
        byte_ids: list[int | None] = []
        for b in range(256):
            i = t2i.get(f"<0x{b:02X}>")
            if i is None and b < 128:
                i = t2i.get(chr(b))
            byte_ids.append(i)
        self._byte_ids = byte_ids

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM tokenizer: merge adjacent symbols whose union is a token, best score
        first (ties: leftmost); symbols that are no token fall back to byte tokens."""
        t2i, scores = self._token_to_id, self._scores
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
                    bid = self._byte_ids[b]
                    if bid is not None:
                        out.append(bid)
                    elif self.unk_id is not None:
                        out.append(self.unk_id)
            i = nxt[i]

    # ----- tiktoken tokenizer.model (Llama 3) -----------------------------------------------------

    @classmethod
    def _from_tiktoken_bytes(cls, data: bytes, source: str) -> "Tokenizer":
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{source}: line {lineno}: expected 'base64-token rank'")
            try:
                tok = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except ValueError:
                raise TokenizerError(f"{source}: line {lineno}: bad token or rank {line[:60]!r}") from None
            if tok in ranks:
                raise TokenizerError(f"{source}: line {lineno}: duplicate token {tok!r}")
            ranks[tok] = rank
        n_base = len(ranks)
        if n_base == 0 or sorted(ranks.values()) != list(range(n_base)):
            raise TokenizerError(f"{source}: ranks must be 0..{n_base - 1}, each once")
        if n_base > MAX_VOCAB:
            raise TokenizerError(f"{source}: {n_base} tokens is more than the {MAX_VOCAB} we accept")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise TokenizerError(f"{source}: not every single byte is a token")
        specials = llama3_special_tokens(n_base)
        self = cls()
        self.kind = "bpe"
        self.pre = "llama3"
        self.source = source
        n = n_base + len(specials)
        self.n_vocab = n
        by_rank = [b""] * n_base
        for tok, rank in ranks.items():
            by_rank[rank] = tok
        # GGUF-style token strings, so the special-token rules work on texts as for a GGUF file
        texts = ["".join(_BYTE_CHARS[x] for x in tok) for tok in by_rank] + specials
        self._texts = texts
        self._token_to_id = dict(zip(texts, range(n)))
        attrs = np.full(n, ATTR_NORMAL, np.uint32)
        attrs[n_base:] = ATTR_CONTROL
        self.bos_id = self._token_to_id["<|begin_of_text|>"]
        self.eos_id = self._token_to_id["<|end_of_text|>"]
        self.add_bos, self.add_eos, self.clean_spaces = True, False, True
        self._finish_specials(attrs, {k: None for k in ("pre", "suf", "mid", "pad", "rep", "sep")})
        self._pieces = _ByteTable(by_rank + [s.encode("utf-8") for s in specials])
        self._rank_to_id = np.arange(n_base, dtype=np.int64)
        self._pattern = _RE_LLAMA3
        self._enc = _core_bpe("edgellama-llama3", _RE_LLAMA3, ranks)
        self._token_to_id = {}  # not needed to encode byte-level BPE
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
        if special and plain_spans:
            fragments = self._partition_guarded(text, plain_spans) if text else []
        else:
            fragments = self._partition(text, special) if text else []
        if self.kind == "spm":
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_encode(frag.replace(" ", _SPM_SPACE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._bpe_encode(frag))
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

    def is_control(self, token_id: int) -> bool:
        """True for tokens decode() omits unless special=True."""
        self.token_bytes(token_id)
        return bool(self._hidden[int(token_id)])

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the new complete text, holding back the bytes
    of a UTF-8 character that is not finished yet; ``flush()`` returns what is left (an unfinished
    character becomes U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._buf = b""

    def feed(self, token_id: int) -> str:
        tok = self._tok
        piece = tok.token_bytes(token_id)
        if not self._special and tok._hidden[int(token_id)]:
            return ""
        buf = self._buf + piece
        cut = _complete_utf8_prefix(buf)
        self._buf = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        buf, self._buf = self._buf, b""
        return buf.decode("utf-8", errors="replace")


def _complete_utf8_prefix(buf: bytes) -> int:
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


# ----- Llama 3 tiktoken file ------------------------------------------------------------------------

def _looks_like_tiktoken(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def llama3_special_tokens(n_base: int = 128000, n_special: int = 256) -> list[str]:
    """Llama 3's special tokens, in id order from ``n_base``, as Meta's llama-models package (0.3)
    defines them for its ``tokenizer.model``: 12 named ones, then reserved tokens numbered from 2."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
             "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_special - len(named))]


# ----- SentencePiece .model -> GGUF-style metadata ---------------------------------------------------

# sentencepiece ModelProto.SentencePiece.Type -> GGUF token type
_SPM_TYPE_TO_GGUF = {1: TOKEN_TYPE_NORMAL, 2: TOKEN_TYPE_UNKNOWN, 3: TOKEN_TYPE_CONTROL,
                     4: TOKEN_TYPE_USER_DEFINED, 5: TOKEN_TYPE_UNUSED, 6: TOKEN_TYPE_BYTE}


def _read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise TokenizerError(f"truncated or malformed varint in {what}")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes, start: int, end: int, what: str):
    """Yield (field number, wire type, value) of one protobuf message; length-delimited values are
    (start, end) offsets into ``data``."""
    pos = start
    while pos < end:
        key, pos = _read_varint(data, pos, end, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos, end, what)
        elif wire == 1:
            if pos + 8 > end:
                raise TokenizerError(f"truncated {what}")
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos, end, what)
            if pos + length > end:
                raise TokenizerError(f"truncated {what}: field {field} of {length} bytes")
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise TokenizerError(f"truncated {what}")
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire} in {what}")
        yield field, wire, value


def spm_model_to_metadata(data: bytes, source: str = "<spm>") -> dict:
    """Turn a SentencePiece BPE ``.model`` (protobuf bytes) into GGUF-style tokenizer metadata, the
    way llama.cpp's converter does: tokens, scores, token types, bos/eos/unk/pad ids, add_space_prefix.

    Only the fields we need are read: ModelProto.pieces (1: piece, 2: score, 3: type),
    trainer_spec (2: model_type 3, unk/bos/eos/pad ids 40-43), normalizer_spec (3: add_dummy_prefix 3,
    remove_extra_whitespaces 4).
    """
    import struct
    texts: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int] = {}
    normalizer: dict[int, int] = {}
    for field, wire, value in _proto_fields(data, 0, len(data), "ModelProto"):
        if field == 1 and wire == 2:
            piece, score, ptype = None, 0.0, 1
            for f2, w2, v2 in _proto_fields(data, value[0], value[1], "SentencePiece"):
                if f2 == 1 and w2 == 2:
                    try:
                        piece = data[v2[0]:v2[1]].decode("utf-8")
                    except UnicodeDecodeError:
                        raise TokenizerError(f"{source}: piece {len(texts)} is not UTF-8") from None
                elif f2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif f2 == 3 and w2 == 0:
                    ptype = v2
            if piece is None:
                raise TokenizerError(f"{source}: piece {len(texts)} has no text")
            texts.append(piece)
            scores.append(score)
            types.append(_SPM_TYPE_TO_GGUF.get(ptype, TOKEN_TYPE_UNDEFINED))
        elif field in (2, 3) and wire == 2:
            target = trainer if field == 2 else normalizer
            for f2, w2, v2 in _proto_fields(data, value[0], value[1], "spec"):
                if w2 == 0:
                    target[f2] = v2
    if not texts:
        raise TokenizerError(f"{source}: no pieces")
    model_type = trainer.get(3, 1)
    if model_type != 2:
        raise TokenizerError(f"{source}: SentencePiece model type {model_type} is not BPE (2)")

    def sid(field: int, default: int) -> int | None:
        v = trainer.get(field, default)
        if v >= 1 << 63:
            v -= 1 << 64  # int32 -1 is sent as a 10-byte varint
        return v if 0 <= v < len(texts) else None

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": texts,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.add_space_prefix": bool(normalizer.get(3, 1)),
    }
    for key, field, default in (("unknown", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("padding", 43, -1)):
        v = sid(field, default)
        if v is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = v
    return meta
