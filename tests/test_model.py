"""Tiny random models written as GGUF: the runtime against the plain-numpy reference forward."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import edgellama
from edgellama.batch import Rows
from edgellama import kernel_thread, kernels as K
from edgellama.gguf import ModelFormatError
from edgellama.model import ContextOverflowError
from edgellama.quants import GGMLType
import error_bounds as eb
from reference import ReferenceModel
from test_adaptive_threads import Machine
from tiny_model import write_tiny_model

K_QUANTS = {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
QUANTIZED = {GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1} | K_QUANTS
ALL_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
             GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
IDS = [5, 17, 200, 3, 99, 42, 42, 7, 130, 250, 11, 64, 2]


def _envelope(path, cache_type="f16", ids=IDS, quantize_activations=True) -> eb.Envelope:
    """The exact model's logits and the rounding spread that sets the tolerances (error_bounds)."""
    return ReferenceModel(str(path)).envelope(ids, cache_type, quantize_activations)


@pytest.fixture(scope="module", params=ALL_TYPES, ids=lambda t: t.name)
def tiny(request, tmp_path_factory):
    # K-quant rows are 256-element super-blocks: a wider model for them
    size = dict(dim=256, ffn=512) if request.param in K_QUANTS else {}
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / f"tiny-{request.param.name}.gguf", request.param,
                            **size)
    return request.param, path


# Tolerances: every comparison of logits below is error_bounds.check against a tolerance derived
# from the arithmetic (tests/error_bounds.py): tolerance(env, 1) between the runtime and the exact
# model's value, tolerance(env, 2) between two runtime paths (each within the first of the model).
# Both are multiples of how far float32 executions of the model stray under the rounding model
# (every step moved within its worst-case bound gamma(n) sum |w x|, KV cache and int8 activation
# roundings applied to the moved values).  Float weights: ~1e-2 on logits of ~60 (prefill runs BLAS,
# decode our kernels); quantized weights ~1: there one flipped int8 activation (a value within float
# noise of a rounding boundary) moves logits by ~0.3.  A wrong position, mask, cache slot or weight
# moves them by 5-30: test_the_tolerances_catch_real_bugs.


def test_prefill_logits_match_numpy_reference(tiny):
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    env = _envelope(path)
    got = model.logits(IDS)
    assert got.shape == (len(IDS), model.args.n_vocab) and got.dtype == np.float32
    eb.check(got, env.value, eb.tolerance(env, 1), f"{qtype.name} prefill vs model")


def _decode_each(model, ids):
    model.reset()
    return np.stack([model.eval([token]).copy() for token in ids])


@pytest.mark.parametrize("layers, embd", [(GGMLType.Q4_K, GGMLType.Q8_0), (GGMLType.Q4_0, GGMLType.Q6_K)],
                         ids=["q4_k-layers-q8_0-output", "q4_0-layers-q6_k-output"])
def test_k_quants_beside_block_types_match_the_reference(tmp_path, layers, embd):
    """A file mixing K-quants (activations per 256 values) and block types (per 32): each matrix
    gets its input in its own form (an input shared by both kinds is quantized both ways, one that
    only feeds one kind only that way), in prefill, in decode and in the batch step: all three
    within the derived tolerance of the reference, whose products take each type's own grid."""
    path = write_tiny_model(tmp_path / "mixed.gguf", layers, dim=256, ffn=512, embd_type=embd)
    env = _envelope(path)
    model = edgellama.load(path, n_ctx=32, threads=2)
    eb.check(model.logits(IDS), env.value, eb.tolerance(env, 1), "prefill vs model")
    eb.check(_decode_each(model, IDS), env.value, eb.tolerance(env, 1), "decode vs model")
    rows = Rows(model, n_slots=1, n_ctx=32, n_rows=len(IDS), n_logits=len(IDS))  # the prompt in one step
    eb.check(rows.forward(IDS, range(len(IDS)), [0] * len(IDS), range(len(IDS))), env.value, eb.tolerance(env, 1),
             "batch step vs model")
    rows = Rows(model, n_slots=1, n_ctx=32, n_rows=1)
    got = np.stack([rows.forward([t], [i], [0], [0])[0].copy() for i, t in enumerate(IDS)])
    eb.check(got, env.value, eb.tolerance(env, 1), "batch rows one at a time vs model")


def test_prefill_equals_token_by_token_decode(tiny):
    """Prompt products (tiles of many tokens, BLAS for float weights) and decode products (one
    token, our kernels) of the same computation: within twice the rounding spread of one."""
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    full = model.logits(IDS)
    eb.check(_decode_each(model, IDS), full, eb.tolerance(_envelope(path), 2), f"{qtype.name} decode vs prefill")


def test_cached_decode_matches_full_sequence_reference(tiny):
    """Token-by-token decode through the KV cache == one full-sequence evaluation."""
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    env = _envelope(path)
    eb.check(_decode_each(model, IDS), env.value, eb.tolerance(env, 1), f"{qtype.name} decode vs model")
    assert model.state.n_past == len(IDS)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.Q4_1])
def test_prefill_in_chunks_equals_one_chunk(tmp_path, qtype):
    path = write_tiny_model(tmp_path / "m.gguf", qtype)
    whole = edgellama.load(path, n_ctx=32).logits(IDS)
    chunked = edgellama.load(path, n_ctx=32, n_batch=4).logits(IDS)
    eb.check(chunked, whole, eb.tolerance(_envelope(path), 2), "chunks of 4 vs one chunk")


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K,
                                   GGMLType.F16])
def test_prompt_feed_forward_in_pieces_is_exactly_one_piece(tmp_path, monkeypatch, qtype):
    """A prompt's gate and up rows made 256 columns at a time (model.PromptBuffers: whole row
    groups of the packed matrices, whole 256-value blocks of the down projection's quantized
    input) give the logits of one piece bit for bit: every product and every quantized value is
    the same number.  A float down projection reads the float rows: one piece, whatever the budget."""
    from edgellama import info

    path = write_tiny_model(tmp_path / "m.gguf", qtype, dim=256, ffn=768)
    one = edgellama.load(path, n_ctx=32, threads=2)
    whole = one.logits(IDS)
    assert one._prompt.cols == 768
    monkeypatch.setattr(info, "PROMPT_FFN_BYTES", 1)  # the least: one 256-column block at a time
    model = edgellama.load(path, n_ctx=32, threads=2)
    pieces = model.logits(IDS)
    assert model._prompt.cols == (768 if qtype == GGMLType.F16 else 256)
    np.testing.assert_array_equal(pieces, whole)
    # a later prompt after a cached context (position 4 on) reuses the buffers, with the same numbers
    buffers = model._prompt
    for m in (one, model):
        m.reset()
        m.eval(IDS[:4])
    np.testing.assert_array_equal(model.eval(IDS[4:]), one.eval(IDS[4:]))
    assert model._prompt is buffers


def test_warm_up_with_a_batch_shorter_than_its_prompt(tmp_path, monkeypatch):
    """A first run's warm-up evaluates a 9-token prompt on the prompt path (in a compile child when
    the cache is cold); with n_batch below that it takes one chunk, as eval does: the prompt
    buffers hold n_batch rows, and a longer chunk is refused, never written past them."""
    import edgellama.model as model_module
    from edgellama.kernel_cache import WarmUpPlan

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32, threads=1, n_batch=4)
    ran = []

    def in_process(work, deferred=()):  # the compile child's work, run here
        ran.append(work())
        return None

    monkeypatch.setattr(model_module, "plan_warm_up", lambda *a: WarmUpPlan(None, [], prompt_child=True))
    monkeypatch.setattr(model_module.CompileChild, "start", staticmethod(in_process))
    model.warm_up()
    assert ran == [None] and model._prompt.x.shape[0] == 4 and model.n_cached == 0
    np.testing.assert_array_equal(model.logits(IDS), edgellama.load(path, n_ctx=32, threads=1, n_batch=4).logits(IDS))
    with pytest.raises(ValueError, match="longer than n_batch"):
        model._prefill(np.array(IDS[:5]), False)
    model.n_batch = 16  # set after the first prompt: the buffers follow
    np.testing.assert_array_equal(model.logits(IDS), edgellama.load(path, n_ctx=32, threads=1).logits(IDS))
    assert model._prompt.x.shape[0] == 16


def test_short_prompts_of_large_models_take_the_prompt_path(tmp_path, monkeypatch):
    """Prompts of up to 8 tokens go token by token on small models (each token reads every weight,
    which costs less than loading the prompt kernels), and through the prompt kernels from 4 tokens
    on a 1B model at Q4_0, from 3 at Q8_0 and on larger ones (model.decode_max_prompt, from the
    weight bytes a token reads).  The choice is the model's, fixed at load: the same prompt always
    takes the same path."""
    import edgellama.model as model_module
    from edgellama import info

    gb = 10 ** 9
    assert [model_module.decode_max_prompt(b) for b in (0.1 * gb, 0.14 * gb, 0.76 * gb, 1.31 * gb, 2.5 * gb, 4.4 * gb)] \
        == [8, 8, 3, 2, 2, 2]
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0, tied=False)
    f = edgellama.gguf.GGUFFile(path)
    embd = f.tensors["token_embd.weight"]  # untied: one row of it a token
    assert info.weight_bytes_per_token(f) == sum(i.nbytes for i in f.tensors.values()) - embd.nbytes \
        + embd.nbytes // embd.shape[0]
    small = edgellama.load(path, n_ctx=32, threads=1)
    assert small.decode_max_prompt == 8
    got_small = small.eval(IDS[:5]).copy()
    assert small._prompt is None  # token by token: the prompt kernels were not needed
    # the same file taken for a large model (as if each token read 2.5 GB): the prompt path
    monkeypatch.setattr(info, "weight_bytes_per_token", lambda f: int(2.5 * gb))
    large = edgellama.load(path, n_ctx=32, threads=1)
    assert large.decode_max_prompt == 2
    got_large = large.eval(IDS[:5]).copy()
    assert large._prompt is not None and large._prompt.x.shape[0] >= 5
    eb.check(got_large, got_small, eb.tolerance(_envelope(path, ids=IDS[:5]), 2), "prompt path vs token by token")
    large.reset()
    np.testing.assert_array_equal(large.eval(IDS[:5]), got_large)  # the same path again, the same bits


def test_prefill_with_small_weight_tiles_equals_one_tile(tmp_path, monkeypatch):
    """16-bit float weights are widened in tiles of rows for BLAS: many small tiles give the same
    products as one tile per matrix (to summation order)."""
    import edgellama.model as model_module

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F16)
    whole = edgellama.load(path, n_ctx=32).logits(IDS)
    monkeypatch.setattr(model_module, "TILE_ELEMENTS", 64 * 5)  # 5 rows of 64
    eb.check(edgellama.load(path, n_ctx=32).logits(IDS), whole, eb.tolerance(_envelope(path), 2), "tiles")


def _prefill_with(monkeypatch, model, name, wrap):
    """Logits of a prefill whose kernel ``name`` is wrapped by ``wrap`` (a deliberate bug)."""
    with monkeypatch.context() as patch:
        patch.setattr(K, name, wrap(getattr(K, name)))
        return model.logits(IDS)


def _swapped_gate_up_decode(model):
    table = model.weights.mat_table
    saved = table.copy()
    table[[4, 5]] = table[[5, 4]]
    try:
        return _decode_each(model, IDS)
    finally:
        table[:] = saved


BUGS = {
    # prefill attention lets each token see the next slot too
    "mask": lambda mp, m: _prefill_with(mp, m, "attention", lambda f: lambda q, k, v, first, sc, out:
                                        f(q, k, v, first + 1, sc, out)),
    # prefill writes keys and values one cache slot late
    "cache slot": lambda mp, m: _prefill_with(mp, m, "store_kv", lambda f: lambda c, start, x: f(c, start + 1, x)),
    # keys rotated one position later than their queries (the tiny models have 2 KV heads, 4 heads)
    "key position": lambda mp, m: _prefill_with(mp, m, "rope_rows", lambda f: lambda x, pos, nh, hd, c, s:
                                                f(x, pos + (nh == 2), nh, hd, c, s)),
    # decode multiplies by the wrong matrix: layer 0's ffn_gate and ffn_up swapped
    "weight": lambda mp, m: _swapped_gate_up_decode(m),
}


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    """qtype -> a tiny model file, written once per module (its envelope is then computed once)."""
    paths = {}

    def get(qtype):
        if qtype not in paths:
            size = dict(dim=256, ffn=512) if qtype in K_QUANTS else {}
            paths[qtype] = write_tiny_model(tmp_path_factory.mktemp("bugs") / f"{qtype.name}.gguf", qtype, **size)
        return paths[qtype]
    return get


@pytest.mark.parametrize("bug", list(BUGS))
@pytest.mark.parametrize("qtype", [GGMLType.F16, GGMLType.Q4_1, GGMLType.Q4_K], ids=lambda t: t.name)
def test_the_tolerances_catch_real_bugs(tiny_paths, monkeypatch, qtype, bug):
    """The derived tolerances are far below what a real bug does: each broken variant misses the
    same checks as above (runtime vs model, and prefill vs decode) by a wide factor: 2, and 1.5 for
    the K-quants, whose activations are quantized per 256 values as llama.cpp's Q8_K (a rounding
    that flips moves a product by a step set by the largest of 256 values, not of 32: a wider
    tolerance; the weakest bug here, keys one position late, moves this model's logits by 1.9
    times it)."""
    path = tiny_paths(qtype)
    env = _envelope(path)
    model = edgellama.load(path, n_ctx=32, threads=2)
    good = model.logits(IDS)
    broken = BUGS[bug](monkeypatch, model)
    factor = 1.5 if qtype in K_QUANTS else 2
    for want, n_impl in ((env.value, 1), (good, 2)):
        with pytest.raises(AssertionError, match="beyond the derived tolerance"):
            eb.check(broken, want, eb.tolerance(env, n_impl), bug)
        assert np.abs(broken - want).max() > factor * eb.tolerance(env, n_impl)
    eb.check(_decode_each(model, IDS), good, eb.tolerance(env, 2), "unbroken again")


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_thread_count(tmp_path, threads):
    """Exact: the same integer products and the same fixed reduction orders whatever the threads."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    base = edgellama.load(path, n_ctx=32, threads=1).logits(IDS)
    np.testing.assert_array_equal(edgellama.load(path, n_ctx=32, threads=threads).logits(IDS), base)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")
def test_a_model_on_a_busy_machine_runs_with_fewer_threads_and_the_same_results(tmp_path):
    """edgellama.adaptive_threads on a simulated machine where another program keeps one CPU busy."""
    path = write_tiny_model(tmp_path / "m.gguf")
    model = edgellama.load(path, n_ctx=64, threads=2)
    quiet = kernel_thread.set_governor(None)
    try:
        want_logits = model.logits([5, 60, 70, 80, 90, 100, 7, 8, 9, 10])
        want = list(model.generate("the other", max_tokens=12))
    finally:
        kernel_thread.set_governor(quiet)
    m = Machine()
    g = m.governor(2)
    previous = kernel_thread.set_governor(g)
    m.run(1.0, ours=1.0, others=1.0)
    try:
        asked, reduced = g.asked, g.reduced
        np.testing.assert_array_equal(model.logits([5, 60, 70, 80, 90, 100, 7, 8, 9, 10]), want_logits)
        assert list(model.generate("the other", max_tokens=12)) == want
        assert g.limit == 1 and g.reduced - reduced == g.asked - asked > 0
    finally:
        kernel_thread.set_governor(previous)


def test_untied_output_and_rope_freqs(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0, tied=False, rope_freqs=True, n_heads=8,
                            n_kv_heads=2)
    env = _envelope(path)
    model = edgellama.load(path, n_ctx=32)
    assert model.weights.output is not model.weights.token_embd
    assert model.weights.rope_freqs is not None
    eb.check(model.logits(IDS), env.value, eb.tolerance(env, 1), "untied output, rope_freqs")


@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_kv_cache_type_matches_the_reference_rounding(tmp_path, cache_type):
    """An f32 cache equals the exact model, an f16 cache the model whose keys and values are rounded
    to half; the two models are further apart than the f32 tolerance (the f32 check would catch a
    cache that rounds to half; on this tiny model the f16 rounding is within its own spread)."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32)
    envs = {t: _envelope(path, t, quantize_activations=False) for t in ("f32", "f16")}
    env = envs[cache_type]
    model = edgellama.load(path, n_ctx=32, cache_type=cache_type)
    assert model.state.k_cache.dtype == (np.uint16 if cache_type == "f16" else np.float32)
    got = model.logits(IDS)
    eb.check(got, env.value, eb.tolerance(env, 1), f"{cache_type} cache vs model")
    assert np.abs(envs["f16"].value - envs["f32"].value).max() > 2 * eb.tolerance(envs["f32"], 1)
    # decode writes and reads the cache the same way as prefill
    eb.check(_decode_each(model, IDS), got, eb.tolerance(env, 2), f"{cache_type} cache: decode vs prefill")


def test_q8_0_kv_cache_matches_the_reference_rounding(tmp_path):
    """A q8_0 cache (head size 32) equals the model whose keys and values are rounded to Q8_0
    blocks as gguf-py makes them, is outside the tolerance of the exact (f32 cache) model, and
    costs 34/32 bytes per value."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32, n_heads=2, n_kv_heads=1)
    q8 = _envelope(path, "q8_0", quantize_activations=False)
    full = _envelope(path, "f32", quantize_activations=False)
    model = edgellama.load(path, n_ctx=32, cache_type="q8_0")
    assert model.state.k_cache.dtype == np.uint8 and model.state.k_cache.shape[-1] == 34
    got = model.logits(IDS)
    eb.check(got, q8.value, eb.tolerance(q8, 1), "q8_0 cache vs model")
    assert np.abs(got - full.value).max() > eb.tolerance(q8, 1)
    eb.check(_decode_each(model, IDS), got, eb.tolerance(q8, 2), "q8_0 cache: decode vs prefill")


def test_q8_0_kv_cache_needs_a_head_size_of_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="q8_0 KV cache needs a head size that is a multiple of 32"):
        edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8, cache_type="q8_0")  # head size 16


def test_f16_kv_cache_needs_a_head_size_of_whole_vector_steps(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32, dim=96, n_heads=8, n_kv_heads=2)  # head size 12
    with pytest.raises(ValueError, match="f16 KV cache needs a head size that is a multiple of 8.*f32"):
        edgellama.load(path, n_ctx=8)
    env = _envelope(path, "f32", quantize_activations=False)
    eb.check(edgellama.load(path, n_ctx=32, cache_type="f32").logits(IDS), env.value, eb.tolerance(env, 1),
             "head size 12, f32 cache")  # f32 works


def test_bad_kv_cache_type(tmp_path):
    with pytest.raises(ValueError, match="cache_type"):
        edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8, cache_type="q3")


def test_mixed_types_dispatch_per_tensor(tmp_path):
    """A Q4_0 file whose embedding is Q8_0 (what llama-quantize writes for tied embeddings)."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0, embd_type=GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    w = model.weights
    assert w.token_embd.qtype == GGMLType.Q8_0 and w.output.qtype == GGMLType.Q8_0  # tied: the Q8_0 table
    assert {layer[m].qtype for layer in w.layers for m in layer} == {GGMLType.Q4_0}
    env = _envelope(path)
    eb.check(model.logits(IDS), env.value, eb.tolerance(env, 1), "mixed types")


def test_prompt_cache_evaluates_only_the_new_suffix(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32)
    model = edgellama.load(path, n_ctx=32)
    model.eval_prompt(IDS[:8])
    before = model.n_evaluated
    logits, reused = model.eval_prompt(IDS)
    assert reused == 8 and model.n_evaluated - before == len(IDS) - 8
    fresh = edgellama.load(path, n_ctx=32).logits(IDS)[-1]
    eb.check(logits, fresh, eb.tolerance(_envelope(path), 2), "reused prefix vs fresh")
    # the same prompt again: only its last token is re-evaluated (its logits are needed)
    before = model.n_evaluated
    model.eval_prompt(IDS)
    assert model.n_evaluated - before == 1


def test_truncate_rewinds_the_cached_context(tmp_path):
    """truncate(n) keeps the first n cached tokens: evaluating after it gives what a fresh model
    gives for those n tokens followed by the new ones (bit for bit: the same kernels on the same
    cached keys and values), and its bad arguments are refused without changing anything."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    model.eval(IDS[:10])
    model.truncate(6)
    assert model.n_cached == 6 and model.state.tokens == [int(t) for t in IDS[:6]]
    rewound = model.eval(IDS[6:9]).copy()
    fresh = edgellama.load(path, n_ctx=32)
    fresh.eval(IDS[:6])
    np.testing.assert_array_equal(rewound, fresh.eval(IDS[6:9]))
    for bad in (-1, 10, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="truncate: n must be an integer from 0 to the 9 cached tokens"):
            model.truncate(bad)
    assert model.n_cached == 9
    model.truncate(0)
    assert model.n_cached == 0 and model.state.tokens == []


def test_warm_up_loads_the_one_token_step_without_running_it(tmp_path):
    """warm_up(prompt_path=False) readies the decode kernel and evaluates nothing (a step would
    cost a first token's time); the first real token then needs no compilation and gives what a
    fresh model gives."""
    from edgellama import kernels as K

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    model.warm_up(prompt_path=False)
    assert model.n_evaluated == 0 and model.state.n_past == 0
    assert not model.state.k_cache.any()  # nothing written
    assert K.decode_token.signatures  # compiled or loaded
    compiled = dict(K.decode_token.overloads)
    logits = model.eval(IDS[:1]).copy()
    assert dict(K.decode_token.overloads) == compiled  # the step it readied is the one that ran
    np.testing.assert_array_equal(logits, edgellama.load(path, n_ctx=32).eval(IDS[:1]))


def test_generate_streams_text_and_reports_finish(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    chunks = list(model.generate("the water", max_tokens=5, temperature=0.0))
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.usage.prompt_tokens == len(model.tokenize("the water"))
    tokens = [c.token for c in chunks if c.token is not None]
    assert len(tokens) == last.usage.completion_tokens <= 5
    assert "".join(chunks) == model.detokenize(tokens)
    # greedy is deterministic and picks the best token of a fresh evaluation (another path: up to
    # the derived tolerance between two paths, should two candidates be that close)
    ids = model.tokenize("the water")
    fresh = edgellama.load(path, n_ctx=32).logits(ids)[-1]
    assert fresh[tokens[0]] >= fresh.max() - eb.tolerance(_envelope(path, ids=ids), 2)


def test_seeded_sampling_reproduces(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    runs = ["".join(model.generate("the", max_tokens=8, temperature=1.5, seed=7)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_generation_stops_at_context_end(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=12)
    ids = model.tokenize("the water")
    banned = {t: float("-inf") for t in model.tokenizer.eog_ids}  # so that only the context can end it
    chunks = list(model.generate(ids, max_tokens=None, temperature=1.0, seed=1, stop_ids=(), logit_bias=banned))
    assert chunks[-1].finish_reason == "length" and model.state.n_past == 12


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    model = edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8)
    with pytest.raises(ContextOverflowError, match="context holds 8"):
        list(model.generate(list(range(3, 20)), max_tokens=1))
    with pytest.raises(ContextOverflowError):
        model.logits(list(range(3, 20)))


@pytest.mark.parametrize("bad", [[-1], [10**6], []])
def test_bad_token_ids_are_rejected(tmp_path, bad):
    model = edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8)
    with pytest.raises(ValueError):
        model.logits(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=5, n_kv_heads=5), "does not divide the width"),
    (dict(n_heads=4, n_kv_heads=3), "does not divide the head count"),
])
def test_inconsistent_hyperparameters_are_rejected(tmp_path, kwargs, message):
    path = tmp_path / "m.gguf"
    try:
        write_tiny_model(path, GGMLType.F32, **kwargs)
    except ValueError:
        pytest.skip("shape not writable")
    with pytest.raises(ModelFormatError, match=message):
        edgellama.load(path)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0, dim=256, ffn=512, embd_type=GGMLType.Q2_K)
    with pytest.raises(ModelFormatError, match=r"'token_embd.weight' has type Q2_K.*supported: .*Q6_K"):
        edgellama.load(path)


def test_weights_are_read_only_views_of_the_map(tmp_path):
    model = edgellama.load(write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0), n_ctx=8)
    rows = model.weights.layers[0]["attn_q"].rows
    assert not rows.flags.writeable
    assert np.shares_memory(rows, model.file.buf)
