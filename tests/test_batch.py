"""Batches of sequences (edgellama/batch.py): the batched pass computes the model, and a sequence's
tokens and log-probabilities are bit for bit the same alone or alongside others, in any slot, with
any batch size, however its prompt is cut into steps (exact equality, never tolerances)."""

from __future__ import annotations

import numpy as np
import pytest

import edgellama
from edgellama.batch import Batch, Rows, SlotsBusyError, generate_many
from edgellama.generate import GenerationError
from edgellama.model import ContextOverflowError
from edgellama.quants import GGMLType
import error_bounds as eb
from reference import ReferenceModel
from tiny_model import write_tiny_model

K_QUANTS = {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
         GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
IDS = [5, 17, 200, 3, 99, 42, 42, 7, 130, 250, 11, 64, 2]
# prompts of 1 to 90 tokens: one crosses the 64-position attention span while it is evaluated
PROMPTS = [[7], [3, 3, 9, 120, 44], [(i * 37 + 11) % 250 + 2 for i in range(90)], IDS]
SAMPLING = dict(temperature=0.9, top_k=40, logprobs=3)  # seeded draws: a token's identity depends on every logit


def _tiny(tmp_path_factory, qtype, cache_type="f16", **extra):
    size = dict(dim=256, ffn=512) if qtype in K_QUANTS else {}
    if cache_type == "q8_0":
        size["n_heads"] = 2  # head size 32: whole Q8_0 blocks
    path = write_tiny_model(tmp_path_factory.mktemp("batch") / f"{qtype.name}.gguf", qtype, ctx=256, **size, **extra)
    return edgellama.load(path, n_ctx=256, threads=2, cache_type=cache_type)


def _record(seq) -> tuple:
    """Everything a sequence produced: token ids, texts, logprobs, top logprobs, finish reason."""
    return ([c.token for c in seq.chunks], [str(c) for c in seq.chunks], [c.logprob for c in seq.chunks],
            [c.top_logprobs for c in seq.chunks], seq.finish_reason)


def _alone(model, prompt, seed, max_tokens=12, **kw):
    batch = Batch(model, n_slots=1)
    seq = batch.add(prompt, max_tokens, seed=seed, **SAMPLING, **kw)
    list(batch.stream())
    return _record(seq)


def _together(model, prompts, seeds, *, n_slots, n_batch, order, slots=None, stagger=0, max_tokens=12, **kw):
    """prompts added in ``order`` (into ``slots`` if given), the i-th of them after i * stagger steps."""
    batch = Batch(model, n_slots=n_slots, n_batch=n_batch)
    seqs, waiting, steps = {}, list(order), 0
    while waiting or batch.active:
        while waiting and len(seqs) * stagger <= steps and batch.free_slots():
            i = waiting.pop(0)
            seqs[i] = batch.add(prompts[i], max_tokens, seed=seeds[i], slot=None if slots is None else slots[i],
                                **SAMPLING, **kw)
        batch.step()
        steps += 1
    return [_record(seqs[i]) for i in range(len(prompts))]


def _assert_invariant(model, prompts=PROMPTS, **kw):
    seeds = [11 * i + 1 for i in range(len(prompts))]
    alone = [_alone(model, p, s, **kw) for p, s in zip(prompts, seeds)]
    n = len(prompts)
    mixes = [dict(n_slots=n, n_batch=64, order=range(n)),                       # all at once, big steps
             dict(n_slots=n, n_batch=n, order=range(n)[::-1],                  # prompts cut into small pieces
                  slots=list(range(n))[::-1]),
             dict(n_slots=n + 1, n_batch=n + 3, order=list(range(1, n)) + [0], stagger=3,  # joining mid-way,
                  slots=[n - i for i in range(n)]),                                              # a spare slot
             dict(n_slots=2, n_batch=7, order=range(n))]                       # more prompts than slots
    for mix in mixes:
        assert _together(model, prompts, seeds, **mix, **kw) == alone, mix


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_results_do_not_depend_on_the_batch(tmp_path_factory, qtype):
    _assert_invariant(_tiny(tmp_path_factory, qtype))


@pytest.mark.parametrize("cache_type", ["f32", "q8_0"])
def test_results_do_not_depend_on_the_batch_whatever_the_cache_type(tmp_path_factory, cache_type):
    _assert_invariant(_tiny(tmp_path_factory, GGMLType.Q4_1, cache_type))


def test_untied_output_and_rope_freqs(tmp_path_factory):
    _assert_invariant(_tiny(tmp_path_factory, GGMLType.Q8_0, tied=False, rope_freqs=True), prompts=PROMPTS[:2])


@pytest.mark.parametrize("qtype", [GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_the_batched_pass_computes_the_model(tmp_path_factory, qtype):
    """Every row's logits, prompt rows of two sequences in one pass, within the rounding tolerance of
    the exact model (the batch is another implementation of it, as prefill and decode are)."""
    model = _tiny(tmp_path_factory, qtype)
    env = ReferenceModel(str(model.path)).envelope(IDS, "f16", True)
    n = len(IDS)
    rows = Rows(model, n_slots=2, n_ctx=32, n_rows=64, n_logits=n + 5)
    logits = rows.forward(IDS + IDS[:5], list(range(n)) + list(range(5)), [1] * n + [0] * 5, list(range(n + 5))).copy()
    eb.check(logits[:n], env.value, eb.tolerance(env, 1), f"{qtype.name} batch vs model")
    np.testing.assert_array_equal(logits[n:], logits[:5])  # the other slot's rows: the same numbers


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
def test_generated_tokens_are_model_generates(tmp_path_factory, qtype):
    """Generated tokens go through the same arithmetic as Model.generate's decode: for prompts that
    it evaluates token by token too (at most Model.decode_max_prompt tokens: 8 on this model), the
    results are Model.generate's exactly."""
    model = _tiny(tmp_path_factory, qtype)
    for prompt, seed in ((PROMPTS[0], 1), (PROMPTS[1], 2)):
        want = list(model.generate(prompt, 12, seed=seed, **SAMPLING))
        got = generate_many(model, [prompt], 12, seed=seed, **SAMPLING)[0]
        assert [(c.token, str(c), c.logprob, c.top_logprobs) for c in want] == \
            [(c.token, str(c), c.logprob, c.top_logprobs) for c in got.chunks]
        assert got.finish_reason == want[-1].finish_reason == "length"


def test_a_slot_reuses_its_prefix_with_the_same_results(tmp_path_factory):
    """A prompt that extends what a slot holds (a chat's next turn) evaluates only the rest, and gets
    what it gets from an empty slot; the free slot holding the prefix is chosen."""
    model = _tiny(tmp_path_factory, GGMLType.Q4_0)
    first, second = PROMPTS[2][:40], PROMPTS[2]
    fresh = _alone(model, second, 5)
    batch = Batch(model, n_slots=3)
    batch.add(PROMPTS[1], 4, slot=0, seed=1, **SAMPLING)
    a = batch.add(first, 6, slot=2, seed=2, **SAMPLING)
    list(batch.stream())
    turn = first + a.tokens[:-1]  # what slot 2 holds now: the prompt and all generated tokens but the last
    assert batch.slots[2].tokens == turn
    b = batch.add(second, 12, seed=5, **SAMPLING)
    assert b.slot == 2 and b.cached == 40
    list(batch.stream())
    assert _record(b) == fresh and b.chunks[-1].usage.cached_tokens == 40
    held = second + b.tokens[:-1]
    assert batch.slots[2].tokens == held
    c = batch.add(held + [9, 9], 12, seed=5, **SAMPLING)
    assert c.slot == 2 and c.cached == len(held)


def test_context_shift_in_a_slot_is_batch_invariant(tmp_path_factory):
    """A sequence that fills its slot shifts its context (as Model.chat's do) and goes on, with the
    same results alone or not; afterwards only the kept tokens are offered for reuse."""
    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    prompts, seeds = [PROMPTS[1], PROMPTS[3], PROMPTS[0]], [3, 4, 5]

    def run(order, n_slots):
        batch = Batch(model, n_slots=n_slots, n_ctx=24, n_batch=5)
        seqs = {i: batch.add(prompts[i], 40, context_shift=True, n_keep=4, seed=seeds[i],
                             logit_bias={0: -100, 1: -100}, **SAMPLING) for i in order}
        list(batch.stream())
        assert all(s.rules.produced == 40 for s in seqs.values())
        return {i: _record(seqs[i]) for i in order}, batch

    alone = {i: run([i], 1)[0][i] for i in range(3)}
    together, batch = run([2, 0, 1], 3)
    assert together == alone
    slot = batch.slots[0]
    assert slot.shifted and slot.reusable() == 4 and len(slot.tokens) > 4
    seq = batch.add(slot.tokens, 1, slot=0)
    assert seq.cached == 4


def test_slots_and_errors(tmp_path_factory):
    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    batch = Batch(model, n_slots=2, n_ctx=32)
    a = batch.add("hello", 50, temperature=0.0)
    b = batch.add("world", 2, temperature=0.0)
    with pytest.raises(SlotsBusyError):
        batch.add("again", 2)
    with pytest.raises(ContextOverflowError):
        Batch(model, n_slots=1, n_ctx=16).add(list(range(2, 20)), 2)
    with pytest.raises(GenerationError) as e:
        Batch(model, n_slots=1).add("x", -1)
    assert e.value.param == "max_tokens"
    with pytest.raises(GenerationError):
        batch.add("x", 1, slot=7)
    batch.step()
    batch.remove(a)  # frees its slot at once
    assert a.done and batch.free_slots() == 1 and [s.state for s in batch.active] == ["generating"]
    c = batch.add("again", 2, temperature=0.0)
    assert c.slot == a.slot
    list(batch.stream())
    assert b.finish_reason == "length" and len(b.tokens) == 2 and not batch.active
    with pytest.raises(ValueError):
        Batch(model, n_slots=3, n_batch=2)


def test_batch_sizes_are_checked_before_anything_is_allocated(tmp_path_factory, monkeypatch):
    """Batch(n_slots=10**9) was numpy's MemoryError from inside the buffers; counts are bounded and the
    eager buffers compared with the available memory first."""
    import edgellama.info

    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    with pytest.raises(ValueError, match=r"n_slots must be in \[1, 256\], got 1000000000"):
        Batch(model, n_slots=10 ** 9)
    assert Batch(model, n_slots=2, n_ctx=32, n_batch=10 ** 12).n_batch == 64  # (no more rows than the slots hold)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="n_slots must be an integer"):
            Batch(model, n_slots=bad)
    # the estimate covers what the buffers really take, and not by much more
    rows = Rows(model, 3, 200, 48)

    def nbytes(value):  # arrays, and the tuples (quantized activations) that hold them
        if isinstance(value, np.ndarray):
            return value.nbytes
        return sum(nbytes(v) for v in value) if isinstance(value, tuple) else 0

    actual = sum(nbytes(v) for name, v in vars(rows).items() if name not in ("cache", "_scratch"))  # (per thread)
    estimate = Rows.eager_bytes(model.args, 3, 200, 48)
    assert actual <= estimate <= 1.5 * actual, (actual, estimate)
    monkeypatch.setattr(edgellama.info, "available_memory", lambda: estimate - 1)
    with pytest.raises(MemoryError, match="a batch of 48 rows needs about"):
        Batch(model, n_slots=3, n_ctx=200, n_batch=48)
    monkeypatch.setattr(edgellama.info, "available_memory", lambda: estimate)
    assert Batch(model, n_slots=3, n_ctx=200, n_batch=48).n_batch == 48


def test_a_full_slot_ends_with_length(tmp_path_factory):
    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    batch = Batch(model, n_slots=1, n_ctx=8)
    seq = batch.add([5, 6, 7], None, temperature=0.0, logit_bias={0: -100, 1: -100})
    list(batch.stream())
    assert seq.finish_reason == "length" and len(seq.tokens) == 6  # positions 0..7: 3 prompt + 5 evaluated + 1


def test_generate_many_keeps_the_order_and_solo_results(tmp_path_factory):
    model = _tiny(tmp_path_factory, GGMLType.Q5_1)
    texts = ["hello", "the theremin", "a", "once upon a time"]
    solo = [generate_many(model, [t], 10, seed=3, **SAMPLING)[0] for t in texts]
    both = model.generate_many(texts, 10, parallel=3, seed=3, **SAMPLING)
    assert [(str(g), g.tokens, g.logprobs, g.finish_reason) for g in both] == \
        [(str(g), g.tokens, g.logprobs, g.finish_reason) for g in solo]
    assert both[0].usage.completion_tokens == 10
    with pytest.raises(GenerationError):
        model.generate_many(texts, 2, sampler=lambda logits: 0)


def test_real_model_is_batch_invariant(smollm2_path):
    """SmolLM2 (Q4_1): four chats alone and together, greedy, with logprobs: identical; and the
    greedy reply to llama.cpp's golden chat prompt is llama.cpp's."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden" / "smollm2_q4_1.json").read_text())
    case = next(p for p in golden["prompts"] if p["name"] == "chatml")
    model = edgellama.load(smollm2_path, n_ctx=1024, threads=2)
    chats = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten.")]
    options = dict(temperature=0.0, logprobs=2)

    def run(order, n_slots, n_batch):
        batch = Batch(model, n_slots=n_slots, n_ctx=256, n_batch=n_batch)
        seqs = {}
        for i in order:
            seqs[i] = (batch.add(case["ids"], 32, **options) if i == 3 else batch.add_chat(chats[i], 24, **options))
        list(batch.stream())
        return {i: _record(seqs[i]) for i in order}

    alone = {i: run([i], 1, 64)[i] for i in range(4)}
    assert run([0, 1, 2, 3], 4, 64) == alone
    assert run([3, 1, 0, 2], 4, 6) == alone
    assert "".join(alone[3][1]) == case["greedy_text"]


def test_a_short_shared_prefix_does_not_take_a_conversations_slot(tmp_path_factory):
    """A server test failed now and then: a new chat sharing only the template's first tokens with a
    conversation was put in that conversation's slot (the longest prefix, however short), whose next
    turn then found its context gone.  A slot is chosen for its prefix only when that is at least
    half of the prompt or of what the slot holds; else the slot unused the longest."""
    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    batch = Batch(model, n_slots=3)
    head = [7, 8, 9, 10]  # (a template's first tokens)
    conversation = head + [(i * 13 + 5) % 240 + 2 for i in range(30)]
    for slot, prompt in ((0, [100, 101]), (1, [110, 111]), (2, conversation)):
        batch.add(prompt, 1, slot=slot, temperature=0.0)
        list(batch.stream())
    new_chat = head + [50, 51, 52, 53, 54, 55]  # 4 of 10 tokens shared with slot 2, 0 with the others
    assert batch.add(new_chat, 1, temperature=0.0).slot == 0  # the slot unused the longest
    list(batch.stream())
    held = list(batch.slots[2].tokens)
    assert held[:len(conversation)] == conversation
    seq = batch.add(held + [60, 61] * 40, 1, temperature=0.0)  # its next turn: a long new message
    assert seq.slot == 2 and seq.cached == len(held)


def test_generate_many_runs_more_prompts_than_a_batch_holds_at_once(tmp_path_factory):
    """A review: parallel=300 with 300 prompts asked for 300 slots, beyond MAX_SLOTS (256), and failed
    naming n_slots, a parameter the caller never passed; at most MAX_SLOTS run at once."""
    from edgellama.batch import MAX_SLOTS

    model = _tiny(tmp_path_factory, GGMLType.Q8_0)
    prompts = [[3 + i % 200, 7] for i in range(MAX_SLOTS + 44)]
    results = generate_many(model, prompts, 2, parallel=MAX_SLOTS + 44, temperature=0.0)
    assert len(results) == len(prompts) and all(len(r.tokens) == 2 for r in results)
    for i in (0, 1, MAX_SLOTS, len(prompts) - 1):  # each as the prompt alone gives it (the order kept)
        assert results[i].tokens == generate_many(model, [prompts[i]], 2, temperature=0.0)[0].tokens
