"""Pre-tokenizers: how byte-level BPE vocabularies cut text into pieces before the BPE, as llama.cpp
does for each ``tokenizer.ggml.pre`` (one regex, or a chain of regexes applied one after another),
with the ``regex`` module.
"""

from __future__ import annotations

from typing import Iterable

import regex

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


class Pre:
    """How one ``tokenizer.ggml.pre`` splits text, and the defaults llama.cpp gives it."""

    def __init__(self, split: str | tuple[str, ...], *, clean_spaces: bool = True,
                 ignore_merges: bool = False, add_bos: bool = False, no_bos: bool = False):
        self.split = split
        self.clean_spaces = clean_spaces
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos
        self.no_bos = no_bos


def _pre_table() -> dict[str, Pre]:
    table: dict[str, Pre] = {}

    def put(names: Iterable[str], pre: Pre) -> None:
        for name in names:
            table[name] = pre

    put(["default"], Pre(_CHAIN_DEFAULT))
    put(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"], Pre(_RE_LLAMA3, ignore_merges=True, add_bos=True))
    put(["dbrx", "smaug-bpe"], Pre(_RE_LLAMA3))
    put(["glm4", "chatglm-bpe"], Pre(_RE_LLAMA3, no_bos=True))
    put(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
         "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "jina-v1-en", "jina-v2-code",
         "roberta-bpe"], Pre(_RE_GPT2))
    put(["trillion", "granite-docling"], Pre(_RE_GPT2, clean_spaces=False))
    put(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
        Pre(_RE_DIGITS_GPT2))
    put(["smollm", "command-r"], Pre(_RE_DIGITS_GPT2, clean_spaces=False))
    put(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"],
        Pre(_RE_QWEN2, clean_spaces=False))
    put(["megrez", "stablelm2"], Pre(_RE_QWEN2))
    put(["falcon"], Pre(_CHAIN_FALCON))
    return table


PRE_TYPES = _pre_table()


def split_chain(patterns: list[regex.Pattern], text: str) -> list[str]:
    """Apply llama.cpp's regexes one after another; text between matches is kept as pieces."""
    pieces = [text]
    for pattern in patterns:
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
