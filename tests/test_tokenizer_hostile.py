"""Hostile text and hostile vocabularies for the tokenizer.

* Long runs of whitespace (tiktoken's regex engine, which split text here before, overflowed its
  stack between 300k and 1M spaces): the ids are the ones tiktoken gives where it still can, and a
  million spaces tokenize.
* Long pre-tokens (a million letters): the merging is n log n.
* Merges: capped at a documented multiple of the vocabulary, and read a chunk at a time.
* plain_spans: control tokens are parsed only outside them; without spans the partition is
  exactly the plain special=True one.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import edgellama.tokenizer as tokmod
from edgellama.tokenizer import MAX_MERGES_PER_TOKEN, Tokenizer, TokenizerError

LONG_SPACE_RUN = 4096  # where edgellama once split whitespace itself (tiktoken's regex overflowed beyond ~300k)
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


_TIKTOKEN: dict[int, object] = {}


def _tiktoken_ids(tok: Tokenizer, text: str) -> list[int]:
    """tiktoken's own pre-token split and BPE on the whole text, over our ranks (an independent
    engine: its Rust regex and merging; it works below ~300k spaces)."""
    tiktoken = pytest.importorskip("tiktoken")
    bpe = tok._encoder
    if id(tok) not in _TIKTOKEN:
        t = bpe.table
        keys = [t.blob[a:b].tobytes() for a, b in zip(t.ends[:-1], t.ends[1:])]
        _TIKTOKEN[id(tok)] = tiktoken.Encoding("reference", pat_str=bpe.pattern,
                                               mergeable_ranks=dict(zip(keys, t.ranks.tolist())), special_tokens={})
    ranks = _TIKTOKEN[id(tok)].encode_ordinary(text)
    return bpe.rank_to_id[np.asarray(ranks, np.int64)].tolist()


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


@needs_tokenizers
def test_long_pre_tokens_give_tiktokens_ids_and_a_million_letters_tokenize():
    """One pre-token of many letters (the regexes match any run of them whole): the merging is
    n log n here (tiktoken's scans every pair per merge), with tiktoken's ids."""
    rng = random.Random(11)
    for tok in TOKENIZERS:
        for _ in range(12):
            n = rng.choice([2, 3, 17, 1000, 5000])
            alphabet = rng.choice(["a", "ab", "abcdefgh", "éè", "\u4e00\u4e8c\u4e09", "ßq"])
            text = rng.choice(["", " ", "x"]) + "".join(rng.choice(alphabet) for _ in range(n))
            assert tok.encode(text, add_bos=False) == _tiktoken_ids(tok, text), (tok, text[:12], n)
        for unit in ("a", "ab", "\u4e00"):
            text = unit * (1_000_000 // len(unit))
            assert tok.decode(tok.encode(text, add_bos=False)) == text


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


# ----- the rank table (edgellama.tokenizer.merge) -------------------------------------------------

def _byte_ranks() -> dict[bytes, int]:
    return {bytes([b]): b for b in range(256)}


def test_a_rank_table_refuses_what_no_vocabulary_is():
    from edgellama.tokenizer.merge import RankTable

    missing = _byte_ranks()
    del missing[b"\x00"]
    with pytest.raises(TokenizerError, match="256 single bytes"):
        RankTable.from_dict(missing)
    same_rank = {**_byte_ranks(), b"ab": 5}
    with pytest.raises(TokenizerError, match="same rank"):
        RankTable.from_dict(same_rank)
    keys = list(_byte_ranks()) + [b"ab", b"ab"]
    ends = np.cumsum([0] + [len(k) for k in keys])
    with pytest.raises(TokenizerError, match="twice"):
        RankTable(b"".join(keys), ends, np.arange(len(keys)))
    with pytest.raises(TokenizerError, match="offsets"):
        RankTable(b"".join(keys), ends[:-1], np.arange(len(keys)))
    with pytest.raises(TokenizerError, match="out of range"):
        RankTable.from_dict({**_byte_ranks(), b"ab": 2 ** 31})


def test_a_rank_table_whose_probe_runs_stay_long_is_refused(monkeypatch):
    """A vocabulary crafted to collide gets new seeds, then a clear refusal (here forced: no probe
    run is short enough), not a load that takes minutes."""
    from edgellama.tokenizer import merge

    monkeypatch.setattr(merge, "_MAX_PROBE", -1)
    with pytest.raises(TokenizerError, match="collide"):
        merge.RankTable.from_dict(_byte_ranks())


def test_the_merging_follows_the_ranks_leftmost_first():
    """Hand-made ranks where the order matters: the lowest-ranked pair first, the leftmost of
    equal pairs, results of merges merging again, a whole pre-token found at once."""
    from edgellama.tokenizer.merge import RankTable

    ranks = {**_byte_ranks(), b"ab": 300, b"bc": 256, b"aa": 257, b"xyz": 999, b"aaaa": 400}
    t = RankTable.from_dict(ranks)
    got = t.encode_pieces([b"xabc", b"aaa", b"aaaa", b"aaaaa", b"xyz", b"q"]).tolist()
    # "xabc": bc (256) before ab (300) -> x|a|bc; "aaa": the leftmost aa; "aaaa" whole; "aaaaa":
    # aa|a|a|a -> aa|aa|a -> aaaa|a (a result merging again); "xyz" whole; "q" a byte.  (tiktoken
    # gives the same list.)
    assert got == [120, 97, 256, 257, 97, 400, 400, 97, 999, 113]
    assert t.rank(b"aaaa") == 400 and t.rank(b"abc") == -1 and t.rank(b"") == -1
