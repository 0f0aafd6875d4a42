"""The generation loop: stop strings never leak, logprobs on chunks, max_tokens, usage.

Most tests drive ``generate_tokens`` with a scripted model (the real byte-level tokenizer of the tiny
GGUF model, and logits that make greedy sampling follow a script), so the token boundaries are
chosen by the test.  A few run the real tiny model.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

import edgellama
from edgellama.generate import (MAX_STOP_CHARS, MAX_STOP_STRINGS, GenerationError, StopStrings, check_stop,
                                 generate_tokens)
from edgellama.gguf import GGUFFile
from edgellama.quants import GGMLType
from edgellama.sampling import Sampler, SamplingError
from edgellama.tokenizer import Tokenizer
from tiny_model import write_tiny_model

EOS = 1          # "<|im_end|>" in the tiny vocabulary (an end-of-generation token)
BYTE0 = 2        # the tiny vocabulary's byte tokens: id = 2 + byte value


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("gen") / "tiny.gguf", GGMLType.Q8_0)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    tok = Tokenizer.from_gguf_metadata(GGUFFile(tiny_path).metadata, source=str(tiny_path))
    assert tok.token_bytes(BYTE0 + ord("A")) == b"A" and EOS in tok.eog_ids
    return tok


def byte_tokens(data: bytes) -> list[int]:
    return [BYTE0 + b for b in data]


class ScriptedModel:
    """What generate_tokens uses of a model: greedy sampling of its logits yields ``script``, then
    end-of-sequence.  Counts evaluations; ``n_ctx`` bounds ``state.n_past`` like the real cache."""

    def __init__(self, tokenizer, script, n_ctx=512, fixed_logits=None):
        self.tokenizer = tokenizer
        self.script = list(script)
        self.n_ctx = n_ctx
        self.n_vocab = tokenizer.n_vocab
        self.fixed_logits = fixed_logits
        self.state = SimpleNamespace(n_past=0, tokens=[])
        self.n_prompt = 0
        self.evaluated: list[int] = []

    def logits_for(self, step):
        if self.fixed_logits is not None:
            return self.fixed_logits.copy()
        target = self.script[step] if step < len(self.script) else EOS
        logits = np.full(self.n_vocab, -5.0, dtype=np.float32)
        logits[target] = 5.0
        return logits

    def eval_prompt(self, ids):
        self.evaluated = list(ids)
        self.n_prompt = len(ids)
        self.state.n_past = len(ids)
        self.state.tokens = list(ids)
        return self.logits_for(0), 0

    def eval(self, ids):
        assert self.state.n_past + len(ids) <= self.n_ctx
        self.evaluated += list(ids)
        self.state.n_past += len(ids)
        self.state.tokens += list(ids)
        return self.logits_for(self.state.n_past - self.n_prompt)


def run(tokenizer, script, stop=(), max_tokens=None, sampler=None, **model_kw):
    model = ScriptedModel(tokenizer, script, **model_kw)
    chunks = list(generate_tokens(model, [BYTE0 + 32], max_tokens, sampler or Sampler(), stop=stop))
    return chunks, model


def reference_stop(text: str, stops) -> tuple[str, bool]:
    """The text as it should come out: cut at the first point where it contains a stop string."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[:end - max(map(len, hits))], True
    return text, False


def assert_never_leaks(chunks, final_text):
    emitted = ""
    for c in chunks:
        emitted += c
        assert final_text.startswith(emitted), f"{emitted!r} leaked past {final_text!r}"
    assert emitted == final_text


# ----- stop strings ---------------------------------------------------------------------------------

def test_stop_string_split_across_tokens_never_leaks(tokenizer):
    text = b"Hello there\n\nUser: hi"
    chunks, model = run(tokenizer, byte_tokens(text), stop=["\n\n", "User:"])
    assert_never_leaks(chunks, "Hello there")
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.token is None
    # generation stopped at the token that completed the stop string
    assert last.usage.completion_tokens == len(b"Hello there\n\n")
    assert [c.token for c in chunks[:-1]] == byte_tokens(b"Hello there\n\n")
    # the first "\n" was held back, not streamed
    assert [str(c) for c in chunks[-3:-1]] == ["", ""]


def test_held_back_text_is_released_when_the_match_fails(tokenizer):
    chunks, _ = run(tokenizer, byte_tokens(b"Use it"), stop=["User:"])
    pieces = [str(c) for c in chunks]
    # "U", "s", "e" are held while they could start "User:"; the space ends the match
    assert pieces[:4] == ["", "", "", "Use "]
    assert "".join(pieces) == "Use it" and chunks[-1].finish_reason == "stop"  # ended by EOS


def test_partial_match_at_max_tokens_is_emitted_as_text(tokenizer):
    chunks, _ = run(tokenizer, byte_tokens(b"abc Us"), stop=["User:"], max_tokens=6)
    assert "".join(chunks) == "abc Us" and chunks[-1].finish_reason == "length"
    assert chunks[-1] == "Us"  # released by the last chunk


def test_multibyte_stop_string_split_inside_a_character(tokenizer):
    # "é" is two byte tokens: the decoder holds the first byte, the matcher holds "é"
    text = "café! more".encode()
    chunks, _ = run(tokenizer, byte_tokens(text), stop=["é!"])
    assert_never_leaks(chunks, "caf")
    assert chunks[-1].finish_reason == "stop"


def test_stop_string_made_of_special_looking_text_and_merged_tokens(tokenizer):
    ids = tokenizer.encode("the other weather")  # uses the "th", "er", " t" merges
    assert any(len(tokenizer.token_bytes(i)) == 2 for i in ids)
    chunks, _ = run(tokenizer, ids, stop=["r w", "xyz"])
    assert_never_leaks(chunks, "the othe")


def test_earliest_completed_stop_wins(tokenizer):
    # "bc" completes before "abcd" does, whatever the token boundaries
    chunks, _ = run(tokenizer, byte_tokens(b"xabcd"), stop=["abcd", "bc"])
    assert "".join(chunks) == "xa"
    assert StopStrings(["abcd", "bc"]).push("xabcd") == ("xa", True)
    # two stops ending at the same place: the text is cut before the longer one
    assert StopStrings(["bc", "abc"]).push("xabc") == ("x", True)


def test_stop_string_completed_by_the_final_flush(tokenizer):
    """An unfinished UTF-8 character at the end becomes U+FFFD; a stop string can match it."""
    chunks, _ = run(tokenizer, byte_tokens(b"ok\xc3"), stop=["\ufffd"], max_tokens=3)
    assert "".join(chunks) == "ok" and chunks[-1].finish_reason == "stop"
    chunks, _ = run(tokenizer, byte_tokens(b"ok\xc3"), max_tokens=3)
    assert "".join(chunks) == "ok\ufffd" and chunks[-1].finish_reason == "length"


ALPHABET = ["a", "b", "U", ":", "\n", "é", "€", " ", "th", "😀"]


@pytest.mark.parametrize("seed", range(40))
def test_random_texts_and_stops_never_leak(tokenizer, seed):
    """Random texts over a small alphabet (multi-byte characters, merges), random stop strings:
    the stream equals the reference cut, and no prefix of the stream ever goes past it."""
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(5, 40)))
    stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:  # make a match likely: a piece of the text itself
        i = rng.randrange(len(text))
        stops.append(text[i:i + rng.randint(1, 4)])
    if rng.random() < 0.5:
        ids = byte_tokens(text.encode())
    else:
        ids = tokenizer.encode(text)
    want, matched = reference_stop(text, stops)
    chunks, _ = run(tokenizer, ids, stop=stops)
    assert_never_leaks(chunks, want)
    assert chunks[-1].finish_reason == "stop"  # a stop string or the scripted EOS
    if not matched:
        assert chunks[-1].usage.completion_tokens == len(ids)


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_does_not_depend_on_how_text_is_split(seed):
    rng = random.Random(1000 + seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
    stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    want, matched = reference_stop(text, stops)
    m = StopStrings(stops)
    out, hit, i = "", False, 0
    while i < len(text) and not hit:
        j = min(len(text), i + rng.randint(1, 5))
        piece, hit = m.push(text[i:j])
        out += piece
        assert want.startswith(out)
        i = j
    if not hit:
        out += m.flush()
    assert (out, hit) == (want, matched)


@pytest.mark.parametrize("length", [10, 100, 1000])
def test_stop_matching_work_is_linear_in_the_text_whatever_the_stop_length(length):
    """A long stop string whose prefix keeps nearly matching: the held text is almost the whole
    stop string, then fails at its last character, over and over.  The automaton's transitions
    (StopStrings.steps, a deterministic count) stay within 2 per character and stop string
    whatever the length (the previous matcher compared up to L prefixes of up to L characters per
    token); the output still equals the reference cut."""
    stop = "a" * (length - 1) + "b"
    text = ("a" * (length - 1) + "c") * 5 + "a" * (length - 1) + "b" + "tail"
    m = StopStrings([stop, "zz"])
    out, hit = "", False
    for ch in text:
        piece, hit = m.push(ch)
        out += piece
        if hit:
            break
    assert (out, hit) == reference_stop(text, [stop, "zz"]) == (("a" * (length - 1) + "c") * 5, True)
    consumed = 6 * length
    assert m.steps <= 2 * 2 * consumed  # two stop strings, at most 2 transitions each per character (amortized)


def test_stop_ids_end_without_emitting(tokenizer):
    model = ScriptedModel(tokenizer, byte_tokens(b"ab") + [BYTE0 + ord("!")] + byte_tokens(b"cd"))
    chunks = list(generate_tokens(model, [BYTE0], None, Sampler(), stop_ids=[BYTE0 + ord("!")]))
    assert "".join(chunks) == "ab" and chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 2


# ----- max_tokens, context end, usage ----------------------------------------------------------------

def test_max_tokens_none_runs_to_the_end_of_the_context(tokenizer):
    chunks, model = run(tokenizer, byte_tokens(b"x" * 100), n_ctx=10)
    assert chunks[-1].finish_reason == "length" and model.state.n_past == 10
    # the prompt (1) + 9 evaluated tokens fill the cache; the 10th sampled token needs no evaluation
    assert chunks[-1].usage.completion_tokens == 10 and "".join(chunks) == "x" * 10


def test_max_tokens_counts_and_zero(tokenizer):
    chunks, model = run(tokenizer, byte_tokens(b"abcdef"), max_tokens=4)
    assert "".join(chunks) == "abcd" and chunks[-1].finish_reason == "length"
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens) == (1, 0, 4)
    assert u.prompt_seconds >= 0 and u.generation_seconds >= 0
    chunks, _ = run(tokenizer, byte_tokens(b"abc"), max_tokens=0)
    assert len(chunks) == 1 and chunks[0] == "" and chunks[0].usage.completion_tokens == 0


@pytest.mark.parametrize("bad", [-1, 2.0, "5", True])
def test_bad_max_tokens_is_an_error_before_any_evaluation(tokenizer, bad):
    """A generation option, not a sampler setting: GenerationError naming it (issue 13 item 4)."""
    model = ScriptedModel(tokenizer, [])
    with pytest.raises(GenerationError, match="max_tokens") as e:
        generate_tokens(model, [BYTE0], bad, Sampler())
    assert e.value.param == "max_tokens" and not isinstance(e.value, SamplingError)
    assert isinstance(e.value, ValueError)
    assert model.evaluated == []


@pytest.mark.parametrize("bad", ["", [""], ["ok", 3], 5, ["s"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_CHARS + 1)]])
def test_bad_stop_strings_are_an_error(tokenizer, bad):
    with pytest.raises(GenerationError, match="stop") as e:
        generate_tokens(ScriptedModel(tokenizer, []), [BYTE0], 4, Sampler(), stop=bad)
    assert e.value.param == "stop" and not isinstance(e.value, SamplingError)


def test_stop_string_caps_are_inclusive():
    assert len(check_stop(["s"] * MAX_STOP_STRINGS)) == MAX_STOP_STRINGS
    assert check_stop("x" * MAX_STOP_CHARS) == ("x" * MAX_STOP_CHARS,)


def test_a_sampler_returning_a_bad_id_is_an_error(tokenizer):
    with pytest.raises(GenerationError, match="not a token id") as e:
        list(generate_tokens(ScriptedModel(tokenizer, []), [BYTE0], 4, lambda logits: 10**6))
    assert e.value.param == "sampler"
    with pytest.raises(GenerationError, match="callable") as e:
        generate_tokens(ScriptedModel(tokenizer, []), [BYTE0], 4, 0.7)
    assert e.value.param == "sampler"
    with pytest.raises(GenerationError) as e:
        generate_tokens(ScriptedModel(tokenizer, []), [BYTE0], 4, Sampler(), stop_ids=["x"])
    assert e.value.param == "stop_ids"


# ----- the sampler inside the loop ------------------------------------------------------------------

def test_plain_callable_sampler_still_works(tokenizer):
    model = ScriptedModel(tokenizer, byte_tokens(b"hey"))
    chunks = list(generate_tokens(model, [BYTE0], None, lambda logits: int(np.argmax(logits))))
    assert "".join(chunks) == "hey" and all(c.logprob is None for c in chunks)


def test_chunks_carry_logprobs(tokenizer):
    chunks, _ = run(tokenizer, byte_tokens(b"hi"), sampler=Sampler(logprobs=3))
    logits = ScriptedModel(tokenizer, byte_tokens(b"hi")).logits_for(0).astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum())
    first = chunks[0]
    assert first.token == BYTE0 + ord("h")
    # the same float32 logits through two float64 log-softmaxes: they differ by ~n_vocab 2^-53 |z|
    assert first.logprob == pytest.approx(log_softmax[first.token], abs=1e-9)
    assert first.top_logprobs[0].token == first.token and len(first.top_logprobs) == 3
    assert chunks[-1].logprob is None  # the final bookkeeping chunk has no token


def test_penalty_window_starts_with_the_prompt(tokenizer):
    """The prompt's tokens are penalized from the first draw, generated ones after they are accepted."""
    a, b, c = BYTE0 + ord("a"), BYTE0 + ord("b"), BYTE0 + ord("c")
    logits = np.full(tokenizer.n_vocab, -10.0, dtype=np.float32)
    logits[[a, b, c]] = [5.0, 4.0, 1.0]
    model = ScriptedModel(tokenizer, [], fixed_logits=logits)
    sampler = Sampler(repeat_penalty=2.0, penalty_last_n=8)
    chunks = list(generate_tokens(model, [a], 3, sampler))
    # step 1: a 2.5 (in the prompt), b 4.0 -> b; step 2: a 2.5, b 2.0 -> a; step 3: a 2.5, b 2.0 -> a
    assert "".join(chunks) == "baa"
    model = ScriptedModel(tokenizer, [], fixed_logits=logits)
    assert "".join(generate_tokens(model, [c], 3, Sampler(repeat_penalty=2.0))) == "aba"


def test_logit_bias_ban_inside_generation(tokenizer):
    script = byte_tokens(b"aaaa")
    sampler = Sampler(logit_bias={BYTE0 + ord("a"): float("-inf")}, n_vocab=tokenizer.n_vocab)
    chunks, _ = run(tokenizer, script, max_tokens=3, sampler=sampler)
    assert "a" not in "".join(chunks)


# ----- the real tiny model ---------------------------------------------------------------------------

def test_real_model_seeded_generation_reproduces_and_logprobs_match(tiny_path):
    model = edgellama.load(tiny_path, n_ctx=48)
    ids = model.tokenize("the water")
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.99, repeat_penalty=1.2,
              presence_penalty=0.1, frequency_penalty=0.1, seed=11, logprobs=2, n_vocab=model.args.n_vocab)
    runs = [list(generate_tokens(model, ids, 12, Sampler(**kw), stop_ids=())) for _ in range(2)]
    # exact: a 7-token prompt goes through the decode kernel token by token in both runs (the second
    # re-evaluates only its last token, on the same cache), so the logits are the same bits
    assert len(ids) <= model.decode_max_prompt
    assert [(c.token, str(c)) for c in runs[0]] == [(c.token, str(c)) for c in runs[1]]
    tokens = [c.token for c in runs[0] if c.token is not None]
    assert runs[0][-1].usage.completion_tokens == len(tokens)
    # each chunk's logprob is log_softmax of the logits at its position, replayed through the same
    # evaluation path (prompt, then one token at a time): the same arithmetic, bit for bit, so only
    # the two float64 log-softmaxes differ (~n_vocab 2^-53 |z|).  (Other paths: test_model.)
    if tokens:
        replay = edgellama.load(tiny_path, n_ctx=48)
        rows = np.stack([replay.eval(ids).copy()] + [replay.eval([t]).copy() for t in tokens[:-1]]).astype(np.float64)
        top = rows.max(1, keepdims=True)
        ref = rows - top - np.log(np.exp(rows - top).sum(1, keepdims=True))
        got = [c.logprob for c in runs[0] if c.token is not None]
        np.testing.assert_allclose(got, [ref[i, t] for i, t in enumerate(tokens)], rtol=0, atol=1e-9)
        for i, c in enumerate(c for c in runs[0] if c.token is not None):
            alt = c.top_logprobs
            assert len(alt) == 2 and alt[0].logprob >= alt[1].logprob
            np.testing.assert_allclose([a.logprob for a in alt], ref[i, [a.token for a in alt]], rtol=0, atol=1e-9)


def test_real_model_stop_string_cuts_the_greedy_text(tiny_path):
    model = edgellama.load(tiny_path, n_ctx=48)
    ids = model.tokenize("the water")
    free = "".join(generate_tokens(model, ids, 20, Sampler(), stop_ids=()))
    if len(free) < 4:
        pytest.skip("the tiny model's greedy text is too short to pick a stop string from")
    stop = free[len(free) // 2:len(free) // 2 + 2]
    want, _ = reference_stop(free, [stop])
    chunks = list(generate_tokens(model, ids, 20, Sampler(), stop_ids=(), stop=[stop]))
    assert_never_leaks(chunks, want)
    assert chunks[-1].finish_reason == "stop"


def test_model_generate_passes_sampler_options(tiny_path):
    """Model.generate forwards the sampler options to Sampler / generate_tokens."""
    model = edgellama.load(tiny_path, n_ctx=48)
    chunks = list(model.generate("the water", max_tokens=6, temperature=0.7, seed=3, repeat_penalty=1.1,
                                 logprobs=1, stop=["\n\n"]))
    assert all(c.logprob is not None for c in chunks if c.token is not None)
    with pytest.raises(SamplingError) as e:
        model.generate("x", logit_bias={10**6: 1.0})
    assert e.value.param == "logit_bias"
    with pytest.raises(SamplingError) as e:
        model.generate("x", temperature=-1.0)
    assert e.value.param == "temperature" and e.value.expected.startswith("a finite number >= 0")
    with pytest.raises(GenerationError) as e:
        model.generate("x", max_tokens=-2)
    assert e.value.param == "max_tokens"
    for bad in (24, True, -1):  # n_keep must be below n_ctx/2 = 24 with a context shift
        with pytest.raises(GenerationError) as e:
            model.generate("x", context_shift=True, n_keep=bad)
        assert e.value.param == "n_keep"
    with pytest.raises(TypeError, match="tempreature"):
        model.generate("x", tempreature=0.5)  # a misspelt setting is not silently ignored


def test_model_generate_takes_a_sampler_or_its_settings_not_both(tiny_path):
    """The README's call and the sampler= call give the same tokens; a sampler plus settings is an error."""
    model = edgellama.load(tiny_path, n_ctx=48)
    readme = [c.token for c in model.generate("the water", max_tokens=6, temperature=0.0, seed=None)]
    settings = dict(temperature=0.8, seed=5, top_k=20, repeat_penalty=1.1)
    by_keywords = [c.token for c in model.generate("the water", max_tokens=6, **settings)]
    by_sampler = [c.token for c in model.generate("the water", 6, Sampler(**settings))]
    assert by_keywords == by_sampler
    assert readme == [c.token for c in model.generate("the water", max_tokens=6, sampler=Sampler())]
    with pytest.raises(SamplingError, match="either sampler= or sampling options") as e:
        model.generate("x", sampler=Sampler(), temperature=0.5)
    assert e.value.param == "temperature"


@pytest.mark.parametrize("n, n_keep, room, want_len", [(10, 2, 4, 10), (30, 2, 4, 28), (30, 0, 8, 24), (30, 20, 4, 28)])
def test_truncate_prompt_keeps_the_start_and_the_end(n, n_keep, room, want_len):
    from edgellama.generate import truncate_prompt

    ids = list(range(100, 100 + n))
    got = truncate_prompt(ids, n_ctx=32, n_keep=n_keep, room=room)
    assert len(got) == want_len
    if n <= 32 - room:
        assert got == ids                                        # a prompt that fits stays whole
        return
    kept = min(n_keep, (32 - room) // 2)
    assert got[:kept] == ids[:kept]                              # the first tokens (BOS, system prompt)
    assert got[kept:] == ids[len(ids) - (len(got) - kept):]      # and the end, in order


def test_model_generate_truncates_an_overlong_prompt_only_when_asked(tiny_path):
    from edgellama.model import ContextOverflowError

    model = edgellama.load(tiny_path, n_ctx=32)
    prompt = byte_tokens(b"the water is cold and the sea is deep and wide")  # 46 tokens
    with pytest.raises(ContextOverflowError):
        list(model.generate(prompt, max_tokens=4))
    chunks = list(model.generate(prompt, max_tokens=4, truncate=True, n_keep=3))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == 32 - 4 and usage.completion_tokens == 4
    assert model.state.tokens[:3] == prompt[:3] and model.state.tokens[3:28] == prompt[-25:]
    # the same truncated prompt, given directly, yields the same text
    again = list(edgellama.load(tiny_path, n_ctx=32).generate(prompt[:3] + prompt[-25:], max_tokens=4))
    assert "".join(chunks) == "".join(again)


# ----- token ids and options of the Python API (an adversarial pass: floats and strings were
# truncated or parsed into ids, stop_ids were never checked, errors did not say what was wrong) -----

@pytest.fixture(scope="module")
def api_model(tiny_path):
    return edgellama.load(tiny_path, n_ctx=64, threads=1)


@pytest.mark.parametrize("ids", [[1, 1.7], [1.0], ["1", "2"], [True], np.array([1.5]),
                                 b"hi", bytearray(b"hi"), {3: 1, 4: 2}, {3, 4}])  # (bytes: their values; a set: no order)
def test_token_ids_must_be_integers(api_model, ids):
    before = api_model.n_evaluated
    with pytest.raises(TypeError, match="token ids must be"):
        api_model.eval(ids)
    with pytest.raises(TypeError, match="token ids must be"):
        api_model.embed([ids])
    with pytest.raises(TypeError, match="token ids must be"):
        api_model.generate(ids, 2, sampler=lambda logits: 1)  # a custom sampler: nothing checks the ids later
    with pytest.raises(TypeError, match="token ids must be"):
        api_model.batch(2).add(ids, 2)
    assert api_model.n_evaluated == before  # nothing was evaluated


def test_a_string_is_not_token_ids(api_model):
    """(generate and embed take a string as text; eval takes ids only)"""
    with pytest.raises(TypeError, match="token ids must be a sequence of integers, got str"):
        api_model.eval("12")


@pytest.mark.parametrize("ids", [[2 ** 70], [-1], [1, 10 ** 6], np.array([2 ** 40], np.int64), np.array([2 ** 63], np.uint64)])
def test_token_ids_outside_the_vocabulary_are_named(api_model, ids):
    with pytest.raises(ValueError, match=r"token id -?\d+ is outside the vocabulary \[0, \d+\)"):
        api_model.eval(ids)


def test_integer_ids_of_every_kind_are_taken(api_model):
    api_model.reset()
    want = api_model.eval([5, 6, 7]).copy()
    for ids in (np.array([5, 6, 7], np.int32), np.array([[5, 6, 7]], np.uint16), (np.int64(5), 6, 7), range(5, 8)):
        api_model.reset()
        np.testing.assert_array_equal(api_model.eval(ids), want)


@pytest.mark.parametrize("stop_ids", ["12", [1.5], [-1], [2 ** 70], 7, [None]])
def test_stop_ids_must_be_token_ids(api_model, stop_ids):
    with pytest.raises(GenerationError, match=r"stop_ids must be token ids in \[0, \d+\)") as e:
        api_model.generate([1, 2], 2, stop_ids=stop_ids)
    assert e.value.param == "stop_ids"


def test_stop_ids_may_be_any_iterable_of_ids(api_model):
    from edgellama.generate import check_generation

    _, ids, _ = check_generation(api_model.tokenizer, 2, lambda logits: 1, (i for i in (3, 4)))
    assert {3, 4} <= ids  # (a generator is read once: both kept)


def test_max_tokens_is_checked_before_it_sizes_a_truncation(api_model):
    with pytest.raises(GenerationError, match="max_tokens must be a non-negative integer") as e:
        api_model.generate(list(range(1, 200)), 1.5, truncate=True)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("template", [5, "", "   ", b"chatml"])
def test_a_chat_template_that_is_not_text_is_an_error(api_model, template):
    """(it fell back to the built-in template without a word)"""
    with pytest.raises(TypeError, match="template must be a template text or a built-in name"):
        api_model.chat([{"role": "user", "content": "hi"}], 1, template=template)


def test_generate_many_takes_a_list_not_a_string(api_model):
    """(a string ran as one prompt per character)"""
    with pytest.raises(TypeError, match="list of prompts"):
        api_model.generate_many("abc", 1)


def test_a_paused_generation_refuses_a_context_another_call_changed(api_model):
    """A second review: two generate() iterators advanced in turn on one model each extended the
    other's context (both texts wrong, no error); so did eval / reset between two chunks."""
    def paused(prompt):
        g = api_model.generate(prompt, 8, temperature=0)
        next(g)
        return g

    a, b = paused([5, 6, 7]), paused([9, 10, 11])
    with pytest.raises(GenerationError, match="context changed while this generation was paused"):
        next(a)
    assert next(b)  # the one that ran last goes on
    for meddle in (lambda: api_model.eval([3]), api_model.reset, lambda: api_model.truncate(1)):
        g = paused([5, 6, 7])
        meddle()
        with pytest.raises(GenerationError, match="context changed"):
            next(g)
    # alone, and one after the other: as before
    want = [str(c) for c in api_model.generate([5, 6, 7], 8, temperature=0)]
    assert [str(c) for c in api_model.generate([5, 6, 7], 8, temperature=0)] == want


def test_counts_of_the_api_are_integers_in_range(api_model, tiny_path):
    """A second review: shift_context took bools and failed in a slice on floats, generate_many took
    parallel 0, -1 and 1.5, a thread count of 10**23 was reported as a context too large for memory."""
    with pytest.raises(TypeError, match="n_keep and n_discard must be integers"):
        api_model.shift_context(1.5, 2)
    with pytest.raises(TypeError, match="n_keep and n_discard must be integers"):
        api_model.shift_context(True, 2)
    for parallel in (0, -1, 1.5):
        with pytest.raises(GenerationError, match="parallel must be an integer >= 1"):
            api_model.generate_many(["a"], 1, parallel=parallel)
    for threads in (10 ** 23, -1, 2.0):
        with pytest.raises(ValueError, match=r"threads must be an integer in \[1, 1024\]"):
            edgellama.load(tiny_path, n_ctx=32, threads=threads)
