"""Hostile text and hostile vocabularies for the tokenizer.

* Long runs of whitespace: tiktoken's regex engine overflows its stack (a Rust panic, which Python
  sees as a BaseException) somewhere between 300k and 1M spaces; we split such runs with the same
  regex first, and the ids are the ones tiktoken gives where it still can.
* Any failure inside the BPE engine is a TokenizerError, never a BaseException.
* Merges: capped at a documented multiple of the vocabulary, and read a chunk at a time.
* plain_spans: control tokens are parsed only outside them; without spans the partition is
  exactly the plain special=True one.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import edgellama.tokenizer as tokmod
from edgellama.tokenizer import LONG_SPACE_RUN, MAX_MERGES_PER_TOKEN, Tokenizer, TokenizerError
from tools.fetch_models import SMOLLM2_FILE, cache_dir

SMOLLM2 = cache_dir() / SMOLLM2_FILE


def _tokenizers() -> list[Tokenizer]:
    toks = []
    if SMOLLM2.exists():
        toks.append(Tokenizer.from_file(SMOLLM2))
    try:
        from tools.fetch_models import llama3_tokenizer
        toks.append(Tokenizer.from_file(llama3_tokenizer()))
    except Exception:  # offline: SmolLM2 alone
        pass
    return toks


TOKENIZERS = _tokenizers()
needs_tokenizers = pytest.mark.skipif(not TOKENIZERS, reason="no real tokenizer available")


def _tiktoken_ids(tok: Tokenizer, text: str) -> list[int]:
    """tiktoken's own pre-token split and BPE on the whole text (works below ~300k spaces)."""
    bpe = tok._encoder
    return bpe.rank_to_id[np.asarray(bpe.enc.encode_ordinary(text), np.int64)].tolist()


@needs_tokenizers
def test_long_whitespace_runs_give_tiktokens_ids():
    rng = random.Random(7)
    for tok in TOKENIZERS:
        for _ in range(120):
            n = rng.choice([LONG_SPACE_RUN - 1, LONG_SPACE_RUN, LONG_SPACE_RUN + 1, 9_999, 65_537, 200_000])
            unit = rng.choice([" ", "\t", "\n", " \n", "\u3000", " \t", "\r\n", "  x", "\u00a0"])
            head = rng.choice(["", "a", "Hello ", "12", "!", "é"])
            tail = rng.choice(["", "x", " y", "1", "\n", "é", "?"])
            text = head + (unit * (n // len(unit) + 1))[:n] + tail
            assert tok.encode(text, add_bos=False) == _tiktoken_ids(tok, text), (tok, repr(text[:8]), n)


@needs_tokenizers
@pytest.mark.parametrize("unit", [" ", "\u3000", "\t", " \n"])
def test_a_million_spaces_tokenize(unit):
    text = unit * (1_000_000 // len(unit)) + "x"
    for tok in TOKENIZERS:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text


def test_any_bpe_failure_is_a_tokenizer_error():
    class Panic(BaseException):  # what pyo3's PanicException derives from
        pass

    class Exploding:
        def encode_ordinary(self, text):
            raise Panic("called `Result::unwrap()` on an `Err` value: StackOverflow")

    tok = Tokenizer.from_gguf_metadata(_tiny_meta())
    tok._encoder.enc = Exploding()
    with pytest.raises(TokenizerError, match="StackOverflow"):
        tok.encode("hello")


def _tiny_meta(n_extra_tokens: int = 0, merges: list[str] | None = None) -> dict:
    from tests.test_tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    tokens = ["<|bos|>", "<|eos|>"] + [b2u[b] for b in range(256)] + [f"t{i}" for i in range(n_extra_tokens)]
    types = np.ones(len(tokens), np.int32)
    types[:2] = 3
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges or ["h e"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}


def test_merges_beyond_the_cap_are_refused_before_building():
    meta = _tiny_meta()
    n_tokens = len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.merges"] = ["h e"] * (MAX_MERGES_PER_TOKEN * n_tokens + 1)
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.merges.*more than the"):
        Tokenizer.from_gguf_metadata(meta)
    meta["tokenizer.ggml.merges"] = ["h e"] * (MAX_MERGES_PER_TOKEN * n_tokens)
    Tokenizer.from_gguf_metadata(meta)  # at the cap: accepted


def test_tokens_beyond_the_cap_are_refused(monkeypatch):
    monkeypatch.setattr(tokmod.tokenizer, "MAX_VOCAB", 300)
    with pytest.raises(TokenizerError, match="more than the 300"):
        Tokenizer.from_gguf_metadata(_tiny_meta(n_extra_tokens=100))


@needs_tokenizers
def test_merges_read_in_chunks_give_the_same_tokenizer(monkeypatch):
    """Chunk boundaries (here every 1000 merges) change nothing, bad merges are still named by
    their index in the whole list."""
    from edgellama.gguf import GGUFFile

    gf = GGUFFile(SMOLLM2)
    meta = {k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")}
    whole = Tokenizer.from_gguf_metadata(meta)
    monkeypatch.setattr(tokmod.bpe, "MERGE_CHUNK", 1000)
    chunked = Tokenizer.from_gguf_metadata(meta)
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 1234567 \n\n  code(x) {}"
    assert chunked.encode(text) == whole.encode(text)
    assert np.array_equal(chunked._encoder.rank_to_id, whole._encoder.rank_to_id)
    bad = dict(meta)
    bad["tokenizer.ggml.merges"] = list(meta["tokenizer.ggml.merges"])
    bad["tokenizer.ggml.merges"][2500] = "nosuchtoken zzz"
    with pytest.raises(TokenizerError, match="merge 2500 "):
        Tokenizer.from_gguf_metadata(bad)


@needs_tokenizers
def test_partition_without_spans_is_the_special_partition():
    rng = random.Random(3)
    tok = TOKENIZERS[0]
    specials = [t for t, _ in tok._special_all]
    for _ in range(300):
        pieces = [rng.choice(specials + ["a", " ", "<|", "|>", "im_", "\n", "xyz"]) for _ in range(12)]
        text = "".join(pieces)
        assert tok._partition_guarded(text, [(0, 0)]) == tok._partition(text, True)


@needs_tokenizers
def test_plain_spans_decide_where_control_tokens_are():
    tok = TOKENIZERS[0]
    end = tok.encode("<|im_end|>", special=True)
    assert len(end) == 1
    text = "<|im_end|>x<|im_end|>"
    assert tok.encode(text, special=True, plain_spans=[(11, 21)]) == end + tok.encode("x<|im_end|>")
    assert tok.encode(text, special=True, plain_spans=[(0, 10)]) == tok.encode("<|im_end|>x") + end
    # a span touching a token by one character is enough to make it text
    assert tok.encode(text, special=True, plain_spans=[(20, 21)]) == end + tok.encode("x<|im_end|>")
    with pytest.raises(TokenizerError, match="overlap"):
        tok.encode(text, special=True, plain_spans=[(0, 5), (3, 8)])
    with pytest.raises(TokenizerError, match="outside"):
        tok.encode(text, special=True, plain_spans=[(0, 50)])


def test_user_defined_tokens_inside_plain_spans_are_still_matched():
    """special=False keeps matching user-defined tokens (llama.cpp); so does a plain span."""
    meta = _tiny_meta()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<tool>"]
    meta["tokenizer.ggml.token_type"] = np.append(meta["tokenizer.ggml.token_type"], np.int32(4))
    tok = Tokenizer.from_gguf_metadata(meta)
    text = "<|bos|>x<tool>"
    ids = tok.encode(text, special=True, plain_spans=[(0, len(text))])
    assert ids == tok.encode(text)
    assert tok.n_vocab - 1 in ids and 0 not in ids
