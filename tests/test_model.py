"""Tiny random models written as GGUF: the runtime against the plain-numpy reference forward."""

from __future__ import annotations

import numpy as np
import pytest

import edgellama
from edgellama.gguf import ModelFormatError
from edgellama.model import ContextOverflowError
from edgellama.quants import GGMLType
from reference import ReferenceModel
from tiny_model import write_tiny_model

K_QUANTS = {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
QUANTIZED = {GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1} | K_QUANTS
ALL_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
             GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
IDS = [5, 17, 200, 3, 99, 42, 42, 7, 130, 250, 11, 64, 2]


def _close(got, want, rel=2e-3):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale)


@pytest.fixture(scope="module", params=ALL_TYPES, ids=lambda t: t.name)
def tiny(request, tmp_path_factory):
    # K-quant rows are 256-element super-blocks: a wider model for them
    size = dict(dim=256, ffn=512) if request.param in K_QUANTS else {}
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / f"tiny-{request.param.name}.gguf", request.param,
                            **size)
    return request.param, path


# The int8 kernels and the float reference round a few activations differently (a value within
# float error of a rounding boundary), and Q4_1 products use ggml's half-rounded s = d * sum(q) for
# the minimum term; each such difference moves logits by ~1/127 of a block scale, hence the wider
# tolerance for quantized weights.  A wrong position, mask or cache slot moves them by O(1).
def _tolerance(qtype):
    return 1.5e-2 if qtype in QUANTIZED else 2e-3


def test_prefill_logits_match_numpy_reference(tiny):
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    want = ReferenceModel(str(path)).forward(IDS, quantize_activations=qtype in QUANTIZED)
    got = model.logits(IDS)
    assert got.shape == (len(IDS), model.args.n_vocab) and got.dtype == np.float32
    _close(got, want, _tolerance(qtype))


def test_prefill_equals_token_by_token_decode(tiny):
    """Prompt products (tiles of many tokens) and decode products (one token) are the same kernels
    on the same quantized activations: the logits agree to float summation order."""
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    full = model.logits(IDS)
    model.reset()
    for t, token in enumerate(IDS):
        _close(model.eval([token]), full[t], 1e-5)


def test_cached_decode_matches_full_sequence_reference(tiny):
    """Token-by-token decode through the KV cache == one full-sequence evaluation."""
    qtype, path = tiny
    model = edgellama.load(path, n_ctx=32, threads=2)
    want = ReferenceModel(str(path)).forward(IDS, quantize_activations=qtype in QUANTIZED)
    rel = _tolerance(qtype)
    model.reset()
    for t, token in enumerate(IDS):
        _close(model.eval([token]), want[t], rel)
    assert model.state.n_past == len(IDS)


@pytest.mark.parametrize("qtype, rel", [(GGMLType.F32, 1e-4), (GGMLType.Q4_1, 1.5e-2)])
def test_prefill_in_chunks_equals_one_chunk(tmp_path, qtype, rel):
    path = write_tiny_model(tmp_path / "m.gguf", qtype)
    whole = edgellama.load(path, n_ctx=32).logits(IDS)
    chunked = edgellama.load(path, n_ctx=32, n_batch=4).logits(IDS)
    _close(chunked, whole, rel)


def test_prefill_with_small_weight_tiles_equals_one_tile(tmp_path, monkeypatch):
    """16-bit float weights are widened in tiles of rows for BLAS: many small tiles give the same
    products as one tile per matrix."""
    import edgellama.model as model_module

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F16)
    whole = edgellama.load(path, n_ctx=32).logits(IDS)
    monkeypatch.setattr(model_module, "TILE_ELEMENTS", 64 * 5)  # 5 rows of 64
    _close(edgellama.load(path, n_ctx=32).logits(IDS), whole, rel=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_thread_count(tmp_path, threads):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    base = edgellama.load(path, n_ctx=32, threads=1).logits(IDS)
    np.testing.assert_array_equal(edgellama.load(path, n_ctx=32, threads=threads).logits(IDS), base)


def test_untied_output_and_rope_freqs(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0, tied=False, rope_freqs=True, n_heads=8,
                            n_kv_heads=2)
    want = ReferenceModel(str(path)).forward(IDS)
    model = edgellama.load(path, n_ctx=32)
    assert model.weights.output is not model.weights.token_embd
    assert model.weights.rope_freqs is not None
    _close(model.logits(IDS), want, _tolerance(GGMLType.Q8_0))


@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_kv_cache_type_matches_the_reference_rounding(tmp_path, cache_type):
    """An f32 cache equals the float reference; an f16 cache equals the reference whose keys and
    values are rounded to half (and differs from the f32 one by more than the tolerance)."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32)
    ref = ReferenceModel(str(path))
    half, full = ref.forward(IDS, quantize_activations=False), ref.forward(IDS, False, half_kv=False)
    model = edgellama.load(path, n_ctx=32, cache_type=cache_type)
    assert model.state.k_cache.dtype == (np.uint16 if cache_type == "f16" else np.float32)
    got = model.logits(IDS)
    _close(got, half if cache_type == "f16" else full, 1e-4)
    assert np.abs(half - full).max() > 1e-4 * np.abs(full).max()
    model.reset()
    for t, token in enumerate(IDS):  # decode writes and reads the cache the same way as prefill
        _close(model.eval([token]), got[t], 1e-4)


def test_q8_0_kv_cache_matches_the_reference_rounding(tmp_path):
    """A q8_0 cache (head size 32) equals the reference whose keys and values are rounded to Q8_0
    blocks as gguf-py makes them (up to a value that lands on the other side of a rounding
    boundary), is nearer to it than to the exact reference, and costs 34/32 bytes per value."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32, n_heads=2, n_kv_heads=1)
    ref = ReferenceModel(str(path))
    q8, full = ref.forward(IDS, False, half_kv="q8_0"), ref.forward(IDS, False, half_kv=False)
    model = edgellama.load(path, n_ctx=32, cache_type="q8_0")
    assert model.state.k_cache.dtype == np.uint8 and model.state.k_cache.shape[-1] == 34
    got = model.logits(IDS)
    _close(got, q8, 2e-3)
    assert np.abs(got - q8).max() < 0.5 * np.abs(got - full).max()
    model.reset()
    for t, token in enumerate(IDS):  # decode writes and reads the cache the same way as prefill
        _close(model.eval([token]), got[t], 1e-4)


def test_q8_0_kv_cache_needs_a_head_size_of_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="q8_0 KV cache needs a head size that is a multiple of 32"):
        edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8, cache_type="q8_0")  # head size 16


def test_f16_kv_cache_needs_a_head_size_of_whole_vector_steps(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32, dim=96, n_heads=8, n_kv_heads=2)  # head size 12
    with pytest.raises(ValueError, match="f16 KV cache needs a head size that is a multiple of 8.*f32"):
        edgellama.load(path, n_ctx=8)
    ref = ReferenceModel(str(path)).forward(IDS, quantize_activations=False, half_kv=False)
    _close(edgellama.load(path, n_ctx=32, cache_type="f32").logits(IDS), ref, 1e-4)  # f32 works


def test_bad_kv_cache_type(tmp_path):
    with pytest.raises(ValueError, match="cache_type"):
        edgellama.load(write_tiny_model(tmp_path / "m.gguf"), n_ctx=8, cache_type="q3")


def test_mixed_types_dispatch_per_tensor(tmp_path):
    """A Q4_0 file whose embedding is Q8_0 (what llama-quantize writes for tied embeddings)."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0, embd_type=GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    assert model.weights.types() == {"Q8_0": 1, "Q4_0": 14}
    _close(model.logits(IDS), ReferenceModel(str(path)).forward(IDS), _tolerance(GGMLType.Q4_0))


def test_prompt_cache_evaluates_only_the_new_suffix(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F32)
    model = edgellama.load(path, n_ctx=32)
    model.eval_prompt(IDS[:8])
    before = model.n_evaluated
    logits, reused = model.eval_prompt(IDS)
    assert reused == 8 and model.n_evaluated - before == len(IDS) - 8
    _close(logits, edgellama.load(path, n_ctx=32).logits(IDS)[-1], rel=1e-4)
    # the same prompt again: only its last token is re-evaluated (its logits are needed)
    before = model.n_evaluated
    model.eval_prompt(IDS)
    assert model.n_evaluated - before == 1


def test_generate_streams_text_and_reports_finish(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    chunks = list(model.generate("the water", max_tokens=5, temperature=0.0))
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.usage.prompt_tokens == len(model.tokenize("the water"))
    tokens = [c.token for c in chunks if c.token is not None]
    assert len(tokens) == last.usage.completion_tokens <= 5
    assert "".join(chunks) == model.detokenize(tokens)
    # greedy is deterministic and equals argmax over a fresh evaluation
    ids = model.tokenize("the water")
    assert tokens[0] == int(np.argmax(edgellama.load(path, n_ctx=32).logits(ids)[-1]))


def test_seeded_sampling_reproduces(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=32)
    runs = ["".join(model.generate("the", max_tokens=8, temperature=1.5, seed=7)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_generation_stops_at_context_end(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    model = edgellama.load(path, n_ctx=12)
    ids = model.tokenize("the water")
    chunks = list(model.generate(ids, max_tokens=None, temperature=1.0, seed=1, stop_ids=()))
    if chunks[-1].finish_reason == "length":
        assert model.state.n_past == 12


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
