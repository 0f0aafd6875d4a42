"""Tokenizer files other than GGUF: Llama 3's tiktoken ``tokenizer.model`` and SentencePiece
``.model`` protobufs (the one reader of them, shared with ``edgellama-quantize``)."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass

import numpy as np

from .vocab import (MAX_VOCAB, TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN,
                    TOKEN_TYPE_UNUSED, TOKEN_TYPE_USER_DEFINED, TokenizerError)

MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024


# ----- Llama 3 tiktoken file ------------------------------------------------------------------------

def looks_like_tiktoken(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def read_tiktoken(data: bytes, source: str) -> dict[bytes, int]:
    """The ranks of a tiktoken file (one "base64-token rank" line per token): 0..n-1, each once,
    every single byte a token."""
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
        if len(ranks) > MAX_VOCAB:
            raise TokenizerError(f"{source}: more than the {MAX_VOCAB} tokens we accept")
    n_base = len(ranks)
    if n_base == 0 or sorted(ranks.values()) != list(range(n_base)):
        raise TokenizerError(f"{source}: ranks must be 0..{n_base - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{source}: not every single byte is a token")
    return ranks


def llama3_special_tokens(n_base: int = 128000, n_special: int = 256) -> list[str]:
    """Llama 3's special tokens, in id order from ``n_base``, as Meta's llama-models package (0.3)
    defines them for its ``tokenizer.model``: 12 named ones, then reserved tokens numbered from 2."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
             "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_special - len(named))]


# ----- SentencePiece .model (protobuf) --------------------------------------------------------------

# sentencepiece ModelProto.SentencePiece.Type -> GGUF token type (the same numbers, 1..6)
_SPM_TYPE_TO_GGUF = {1: TOKEN_TYPE_NORMAL, 2: TOKEN_TYPE_UNKNOWN, 3: TOKEN_TYPE_CONTROL,
                     4: TOKEN_TYPE_USER_DEFINED, 5: TOKEN_TYPE_UNUSED, 6: TOKEN_TYPE_BYTE}


def _read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise TokenizerError(f"{what}: truncated varint at byte {pos}")
        if shift > 63:
            raise TokenizerError(f"{what}: varint longer than 10 bytes at byte {pos}")
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
                raise TokenizerError(f"{what}: truncated fixed-size field {field} at byte {pos}")
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos, end, what)
            if pos + length > end:
                raise TokenizerError(f"{what}: field {field} of {length} bytes runs past the end at byte {pos}")
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise TokenizerError(f"{what}: truncated fixed-size field {field} at byte {pos}")
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise TokenizerError(f"{what}: unsupported protobuf wire type {wire} (field {field}) at byte {pos}")
        yield field, wire, value


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]   # (text, score, GGUF token type), in id order
    trainer: dict[int, int]                # TrainerSpec's integer fields (int32 -1 as -1)
    normalizer: dict[int, int]             # NormalizerSpec's integer fields


def read_sentencepiece(data: bytes, source: str = "<spm>", max_pieces: int | None = None) -> SentencePieceModel:
    """The pieces and the integer settings of a SentencePiece ModelProto.

    Read: ModelProto.pieces (1: piece, 2: score, 3: type), trainer_spec (2) and normalizer_spec
    (3) integer fields.  A piece without text, of an unknown type or with a non-finite score, and
    malformed protobuf, are TokenizerErrors naming the piece and the byte.  Reading stops with an
    error at the first piece beyond MAX_VOCAB, or beyond ``max_pieces`` (a caller's own limit: the
    quantizer's is the embedding's rows), and data beyond MAX_TOKENIZER_FILE_BYTES is refused."""
    if len(data) > MAX_TOKENIZER_FILE_BYTES:
        raise TokenizerError(f"{source}: {len(data)} bytes is too large for a SentencePiece model")
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, int] = {}
    normalizer: dict[int, int] = {}
    for field, wire, value in _proto_fields(data, 0, len(data), f"{source}: ModelProto"):
        if field == 1 and wire == 2:
            index = len(pieces)
            if max_pieces is not None and index >= max_pieces:
                raise TokenizerError(f"{source}: more than max_pieces = {max_pieces} pieces")
            if index >= MAX_VOCAB:
                raise TokenizerError(f"{source}: more than the {MAX_VOCAB} pieces we accept")
            text, score, kind = None, 0.0, 1
            for f2, w2, v2 in _proto_fields(data, value[0], value[1], f"{source}: piece #{index}"):
                if f2 == 1 and w2 == 2:
                    try:
                        text = data[v2[0]:v2[1]].decode("utf-8")
                    except UnicodeDecodeError:
                        raise TokenizerError(f"{source}: piece #{index} is not valid UTF-8") from None
                elif f2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif f2 == 3 and w2 == 0:
                    kind = v2
            if text is None:
                raise TokenizerError(f"{source}: piece #{index} has no text")
            if kind not in _SPM_TYPE_TO_GGUF:
                raise TokenizerError(f"{source}: piece #{index} {text[:40]!r} has unknown type {kind}")
            if not math.isfinite(score):
                raise TokenizerError(f"{source}: piece #{index} {text[:40]!r} has score {score}")
            pieces.append((text, float(score), _SPM_TYPE_TO_GGUF[kind]))
        elif field in (2, 3) and wire == 2:
            target = trainer if field == 2 else normalizer
            for f2, w2, v2 in _proto_fields(data, value[0], value[1], f"{source}: spec"):
                if w2 == 0:
                    target[f2] = v2 - (1 << 64) if v2 >= 1 << 63 else v2  # int32 -1 arrives as 2^64 - 1
    if not pieces:
        raise TokenizerError(f"{source}: no pieces: not a SentencePiece model")
    return SentencePieceModel(pieces, trainer, normalizer)


def spm_model_to_metadata(data: bytes, source: str = "<spm>") -> dict:
    """Turn a SentencePiece BPE ``.model`` (protobuf bytes) into GGUF-style tokenizer metadata, the
    way llama.cpp's converter does: tokens, scores, token types, bos/eos/unk/pad ids, add_space_prefix."""
    model = read_sentencepiece(data, source)
    model_type = model.trainer.get(3, 1)
    if model_type != 2:
        raise TokenizerError(f"{source}: SentencePiece model type {model_type} is not BPE (2)")
    n = len(model.pieces)

    def sid(field: int, default: int) -> int | None:
        v = model.trainer.get(field, default)
        return v if 0 <= v < n else None

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p[0] for p in model.pieces],
        "tokenizer.ggml.scores": np.array([p[1] for p in model.pieces], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([p[2] for p in model.pieces], dtype=np.int32),
        "tokenizer.ggml.add_space_prefix": bool(model.normalizer.get(3, 1)),
    }
    for key, field, default in (("unknown", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("padding", 43, -1)):
        v = sid(field, default)
        if v is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = v
    return meta
