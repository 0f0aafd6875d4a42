"""What a vocabulary is made of, the limits we accept, and llama.cpp's rules for special tokens.

Token types are GGUF's ``tokenizer.ggml.token_type`` values; llama.cpp turns them into attribute
bits, and then adjusts some tokens by their text: end-of-turn, end-of-message and fill-in-the-middle
tokens it recognises become control tokens, some become user-defined ones, and the set of
end-of-generation ids is built from them (``resolve_specials``).  ``Meta`` reads GGUF metadata
with a ``TokenizerError`` naming the source and the key for every bad value.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..gguf import StringArray

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

TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                          ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE], dtype=np.uint32)

# ----- token texts llama.cpp recognises (src/llama-vocab.cpp, "auto-detect special tokens") -------

EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
EOM_TEXTS = ("<|eom_id|>",)
FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                  "▁<PRE>", "<|code_prefix|>", "<|prefix|>")
FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                  "▁<SUF>", "<|code_suffix|>", "<|suffix|>")
FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                  "▁<MID>", "<|code_middle|>", "<|middle|>")
FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
FIM_SEP_TEXTS = ("<|file_sep|>",)
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~["))
# gpt-oss: these are always rendered, whatever their type says.
ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


# ----- metadata access with validation ------------------------------------------------------------

def named_texts(tokens: Sequence[str]) -> Sequence[str]:
    """Token strings with the empty ones named as llama.cpp names them (``[EMPTY_<id>]``); a GGUF
    file's StringArray with none empty comes back as it is (read in place, no copy)."""
    if isinstance(tokens, StringArray):
        if tokens.lengths().all():
            return tokens
    elif "" not in tokens:
        return tokens
    return [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]


class Meta:
    def __init__(self, metadata: dict, source: str):
        if not isinstance(metadata, dict):
            raise TokenizerError(f"{source}: tokenizer metadata must be a dict, got "
                                 f"{type(metadata).__name__}")
        self.m = metadata
        self.source = source

    def fail(self, key: str, msg: str) -> TokenizerError:
        return TokenizerError(f"{self.source}: {key}: {msg}")

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
        if isinstance(v, StringArray):  # a GGUF file's (its strings were checked as it was read)
            return list(v)
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


# ----- llama.cpp's special-token rules ------------------------------------------------------------

@dataclass
class Specials:
    """What llama.cpp decides about a vocabulary's special tokens."""

    eot_id: int | None
    eom_id: int | None
    eog_ids: frozenset[int]
    attrs: np.ndarray                      # (n_vocab,) attribute bits, adjusted
    matched: list[tuple[str, int]]         # control, user-defined and unknown tokens, longest first
    matched_user: list[tuple[str, int]]    # the user-defined ones: matched even with special=False
    hidden: np.ndarray                     # (n_vocab,) bool: decode() omits these unless special


def resolve_specials(texts: Sequence[str], t2i: dict[str, int], attrs: np.ndarray, eos_id: int | None,
                     eot_id: int | None, eom_id: int | None, fim: dict[str, int | None]) -> Specials:
    """llama.cpp's rules: EOT/EOM/FIM detection by text, the EOG set, attribute adjustments.
    ``fim``: the fill-in-the-middle ids the metadata gives (pre, suf, mid, pad, rep, sep)."""
    attrs = attrs.copy()
    fim = dict(fim)

    def find(names: Sequence[str]) -> int | None:
        ids = [t2i[s] for s in names if s in t2i]
        return min(ids) if ids else None

    def force_control(i: int | None) -> None:
        if i is not None:
            attrs[i] |= ATTR_CONTROL

    if eot_id is None:
        # llama.cpp takes the first match in hash-map order; "<|eot_id|>" first, then the lowest
        # id gives its choice for Llama 3 (128009) and SmolLM2 (0, <|endoftext|>)
        eot_id = t2i.get("<|eot_id|>", find(EOT_TEXTS))
        force_control(eot_id)
    if eom_id is None:
        eom_id = find(EOM_TEXTS)
        force_control(eom_id)
    for name, names in (("pre", FIM_PRE_TEXTS), ("suf", FIM_SUF_TEXTS), ("mid", FIM_MID_TEXTS),
                        ("pad", FIM_PAD_TEXTS), ("rep", FIM_REP_TEXTS), ("sep", FIM_SEP_TEXTS)):
        if fim.get(name) is None:
            fim[name] = find(names)
            force_control(fim[name])
    eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
    for s in EOG_TEXTS:
        i = t2i.get(s)
        if i is not None:
            eog.add(i)
            force_control(i)
    for s in ALWAYS_USER_DEFINED:
        i = t2i.get(s)
        if i is not None:
            attrs[i] = ATTR_USER_DEFINED
    eog.update(i for i in (eos_id, eot_id, eom_id) if i is not None)
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

    # special tokens matched in the text, longest first (ties: lower id first)
    special = np.flatnonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
    order = sorted(special.tolist(), key=lambda i: (-len(texts[i].encode("utf-8")), i))
    return Specials(eot_id=eot_id, eom_id=eom_id, eog_ids=frozenset(int(i) for i in eog), attrs=attrs,
                    matched=[(texts[i], i) for i in order],
                    matched_user=[(texts[i], i) for i in order if not attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)],
                    hidden=(attrs & (ATTR_CONTROL | ATTR_UNKNOWN)) != 0)


def attrs_from_types(types: np.ndarray | None, n: int) -> np.ndarray:
    """Attribute bits of GGUF token types (unknown types: no attribute, as llama.cpp)."""
    if types is None:
        return np.full(n, ATTR_NORMAL, np.uint32)
    t64 = types.astype(np.int64)
    return np.where((t64 >= 0) & (t64 < len(TYPE_TO_ATTR)), TYPE_TO_ATTR[np.clip(t64, 0, len(TYPE_TO_ATTR) - 1)],
                    ATTR_UNDEFINED).astype(np.uint32)


class ByteTable:
    """Byte strings 0..n-1 in one bytes object and an offset array: a vocabulary's 50k separate
    bytes objects cost about 5 MB, this a tenth of it."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, items: Sequence[bytes]):
        self._blob = b"".join(items)
        ends = np.zeros(len(items) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, items), np.int64, len(items)), out=ends[1:])
        self._ends = array("q")
        self._ends.frombytes(ends.tobytes())  # (an array's items index faster than numpy's)

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, i: int) -> bytes:
        return self._blob[self._ends[i]:self._ends[i + 1]]
