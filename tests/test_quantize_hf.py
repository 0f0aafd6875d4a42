"""Hugging Face folder -> GGUF: names, Q/K permutation, metadata, tokenizer, exact weights.

Real weights: tools/make_hf_checkpoint.py turns the SmolLM2 GGUF back into an HF folder
(dequantized, Q/K un-permuted); converting that folder must give the GGUF's tensors again.
Fast tests use a tiny random LlamaForCausalLM folder (GQA, 2 layers) made by the same tool.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

from edgellama.gguf import GGUFFile, ModelFormatError, ValueType
from edgellama.quants import GGMLType, dequantize
from quantize.convert import convert_file, open_checkpoint
from quantize.hf import qk_permutation
from quantize.source import QuantizeError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.make_hf_checkpoint import make_tiny_hf_checkpoint, smollm2_hf, tiny_llama_weights  # noqa: E402
from tools.fetch_models import SMOLLM2_FILE, cache_dir  # noqa: E402

SMOLLM2 = cache_dir() / SMOLLM2_FILE  # fetched before collection by conftest.py
HASHES = ROOT / "tests" / "golden" / "smollm2_llamacpp_quant_hashes.json"
SPM_MODEL = ROOT / "tests" / "fixtures" / "tokenizer" / "spm_bpe.model"
SPM_CASES = ROOT / "tests" / "fixtures" / "tokenizer" / "spm_bpe_cases.json"

needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(),
                                   reason=f"{SMOLLM2} missing: run python tools/fetch_models.py")


def tensor_values(gguf: GGUFFile, name: str) -> np.ndarray:
    info = gguf.tensors[name]
    return dequantize(gguf.raw(name), info.qtype, info.shape)


def plain(typed):
    """A typed metadata value as a comparable plain value."""
    vtype, value = typed
    if vtype == ValueType.ARRAY:
        item_type, items = value
        return (int(item_type), [x.item() if hasattr(x, "item") else x for x in items])
    return (int(vtype), value)


# ----- the real SmolLM2 checkpoint ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_folder():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing")
    return smollm2_hf()


@pytest.fixture(scope="module")
def smollm2_from_hf(smollm2_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("from_hf")
    out = {}
    for qtype in ("f32", "q8_0", "q4_0", "q4_1"):
        out[qtype] = folder / f"smollm2.{qtype}.gguf"
        convert_file(smollm2_folder, out[qtype], qtype, quiet=True)
    return out


@needs_smollm2
def test_hf_to_f32_gives_the_dequantized_source_tensors(smollm2_from_hf):
    source, ours = GGUFFile(SMOLLM2), GGUFFile(smollm2_from_hf["f32"])
    assert set(ours.tensors) == set(source.tensors)
    for name, info in source.tensors.items():
        assert ours.tensors[name].qtype == GGMLType.F32
        assert ours.tensors[name].shape == info.shape
        np.testing.assert_array_equal(tensor_values(ours, name), tensor_values(source, name), err_msg=name)


@needs_smollm2
def test_hf_to_gguf_runs_in_edgellama(smollm2_from_hf, tmp_path):
    """HF -> F32 gives the source model's logits (the source dequantized to F32 by edgellama-quantize);
    HF -> Q8_0 / Q4_1 / Q4_0 run, and their top-1 agreement with the F32 model is reported."""
    import edgellama

    text = ("The old lighthouse keeper climbed the spiral stairs once more, counting each step as he "
            "had done every evening for forty years. def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)")
    source_f32 = tmp_path / "source.f32.gguf"
    convert_file(SMOLLM2, source_f32, "f32", allow_requantize=True, quiet=True)
    reference = edgellama.load(source_f32, n_ctx=256, threads=2)
    ids = reference.tokenize(text)
    want = reference.logits(ids)
    f32 = edgellama.load(smollm2_from_hf["f32"], n_ctx=256, threads=2)
    assert f32.tokenize(text) == ids
    np.testing.assert_array_equal(f32.logits(ids), want)
    agreement = {}
    for qtype in ("q8_0", "q4_1", "q4_0"):
        got = edgellama.load(smollm2_from_hf[qtype], n_ctx=256, threads=2).logits(ids)
        assert np.isfinite(got).all()
        agreement[qtype] = float(np.mean(got.argmax(1) == want.argmax(1)))
    print(f"top-1 agreement with the F32 model over {len(ids)} positions: {agreement}")
    # Q8_0 is close to lossless; Q4_1 of weights that already were Q4_1 keeps their grid;
    # Q4_0 re-rounds 4-bit weights onto another 4-bit grid and loses most
    assert agreement["q8_0"] >= 0.85 and agreement["q4_1"] >= 0.85 and agreement["q4_0"] >= 0.4


@needs_smollm2
def test_hf_to_gguf_metadata_equals_the_source_model(smollm2_from_hf):
    source = GGUFFile(SMOLLM2).typed_metadata()
    ours = GGUFFile(smollm2_from_hf["f32"]).typed_metadata()
    compared = [k for k in source if not k.startswith("general.")]
    assert len(compared) == 22
    for key in compared:
        assert key in ours, key
        assert plain(ours[key]) == plain(source[key]), key
    assert plain(ours["general.file_type"]) == (int(ValueType.UINT32), 0)


@needs_smollm2
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_hf_to_quantized_is_byte_identical_to_gguf_py(smollm2_from_hf, qtype):
    source, ours = GGUFFile(SMOLLM2), GGUFFile(smollm2_from_hf[qtype])
    target = GGMLType[qtype.upper()]
    for name, info in source.tensors.items():
        expected = GGMLType.F32 if len(info.shape) == 1 else target
        if name == "token_embd.weight" and target != GGMLType.Q8_0:
            expected = GGMLType.Q8_0  # tied output tensor: llama-quantize's extra bits
        assert ours.tensors[name].qtype == expected, name
        reference = gguf_quants.quantize(tensor_values(source, name), GGMLQuantizationType(int(expected)))
        assert np.array_equal(ours.raw(name), np.ascontiguousarray(reference).view(np.uint8).ravel()), name


@needs_smollm2
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_hf_to_quantized_equals_llama_cpp_requantized_tensors(smollm2_from_hf, qtype):
    """Same weights (the dequantized Q4_1 file) in, so the same bytes as llama.cpp's files out."""
    golden = json.loads(HASHES.read_text())["files"][qtype]
    ours = GGUFFile(smollm2_from_hf[qtype])
    for expected in golden["tensors"]:
        digest = hashlib.sha256(ours.raw(expected["name"])).hexdigest()
        assert digest == expected["sha256"], expected["name"]


# ----- tiny random checkpoints -------------------------------------------------------------------

def hf_reference_logits(weights: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """transformers' LlamaForCausalLM forward in numpy, on HF-layout weights (rotate_half RoPE)."""
    dim, n_heads, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps = dim // n_heads, config["rms_norm_eps"]
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
    pos = np.arange(len(ids))
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.concatenate([np.outer(pos, inv_freq)] * 2, axis=-1)  # (T, head_dim)
    rotate_half = lambda x: np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], axis=-1)
    rope = lambda x: x * np.cos(angles)[:, None] + rotate_half(x) * np.sin(angles)[:, None]
    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((len(ids), len(ids)), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(len(ids), n_heads, head_dim))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(len(ids), n_kv, head_dim))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(len(ids), n_kv, head_dim)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), -1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


def tiny_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_rope_equivalence_of_the_qk_permutation():
    """HF rotates (x_i, x_{i+d/2}); GGUF llama rotates adjacent pairs.  Permuting the weight rows
    once makes the two give the same attention scores."""
    rng = np.random.default_rng(0)
    n_heads, head_dim, dim, pos = 2, 8, 16, 5
    wq = rng.standard_normal((n_heads * head_dim, dim))
    x = rng.standard_normal(dim)
    theta = pos / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    q_hf = (wq @ x).reshape(n_heads, head_dim)
    first, second = q_hf[:, :head_dim // 2], q_hf[:, head_dim // 2:]
    hf = np.concatenate([first * np.cos(theta) - second * np.sin(theta),
                         second * np.cos(theta) + first * np.sin(theta)], axis=1)
    q_gguf = (wq[qk_permutation(n_heads * head_dim, n_heads)] @ x).reshape(n_heads, head_dim // 2, 2)
    even, odd = q_gguf[..., 0], q_gguf[..., 1]
    gguf = np.stack([even * np.cos(theta) - odd * np.sin(theta), odd * np.cos(theta) + even * np.sin(theta)], -1)
    # same rotated values, in interleaved instead of halves order
    np.testing.assert_allclose(gguf.reshape(n_heads, head_dim)[:, qk_permutation(head_dim, 1).argsort()], hf,
                               rtol=1e-12, atol=1e-12)


def test_tiny_hf_names_shapes_and_permutation(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    weights = tiny_llama_weights(np.random.default_rng(0), tiny_config(folder))
    convert_file(folder, tmp_path / "out.gguf", "f32", quiet=True)
    out = GGUFFile(tmp_path / "out.gguf")
    assert out.tensors["blk.1.attn_k.weight"].shape == (32, 64)
    np.testing.assert_array_equal(tensor_values(out, "token_embd.weight"), weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensor_values(out, "output.weight"), weights["lm_head.weight"])
    q = weights["model.layers.1.self_attn.q_proj.weight"].reshape(4, 2, 8, 64)  # (heads, halves, d/2, dim)
    expected_q = np.stack([q[:, 0], q[:, 1]], axis=2).reshape(64, 64)           # interleave the halves
    np.testing.assert_array_equal(tensor_values(out, "blk.1.attn_q.weight"), expected_q)
    k = weights["model.layers.1.self_attn.k_proj.weight"].reshape(2, 2, 8, 64)
    np.testing.assert_array_equal(tensor_values(out, "blk.1.attn_k.weight"), np.stack([k[:, 0], k[:, 1]], 2).reshape(32, 64))
    md = out.metadata
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"], md["llama.rope.dimension_count"]) == (4, 2, 16)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.merges"][2] == "Ġt he"
    assert md["tokenizer.chat_template"].startswith("{% for m in messages %}")


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_sources_convert_exactly(tmp_path, dtype):
    f32 = make_tiny_hf_checkpoint(tmp_path / "f32")
    half = make_tiny_hf_checkpoint(tmp_path / "half", dtype=dtype)
    convert_file(half, tmp_path / "half.gguf", "f32", quiet=True)
    convert_file(half, tmp_path / "same.gguf", dtype.lower(), quiet=True)
    weights = tiny_llama_weights(np.random.default_rng(0), tiny_config(f32))
    out, same = GGUFFile(tmp_path / "half.gguf"), GGUFFile(tmp_path / "same.gguf")
    embed = weights["model.embed_tokens.weight"]
    rounded = (embed.astype(np.float16).astype(np.float32) if dtype == "F16"
               else ((embed.view(np.uint32) >> 16) << 16).view(np.float32))
    np.testing.assert_array_equal(tensor_values(out, "token_embd.weight"), rounded)
    assert same.tensors["token_embd.weight"].qtype == GGMLType[dtype]
    np.testing.assert_array_equal(tensor_values(same, "token_embd.weight"), rounded)
    assert same.tensors["output_norm.weight"].qtype == GGMLType.F32


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single = make_tiny_hf_checkpoint(tmp_path / "single" / "tiny")  # same folder name: same general.name
    sharded = make_tiny_hf_checkpoint(tmp_path / "sharded" / "tiny", shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    convert_file(single, tmp_path / "a.gguf", "q4_1", quiet=True)
    convert_file(sharded, tmp_path / "b.gguf", "q4_1", quiet=True)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# llama.cpp runs in a child process: some builds crash inside their AMX kernels on CPUs that have
# AMX (ggml-org/llama.cpp#20824), which must not take the test run down with it
LLAMA_CPP_LOGITS = r"""
import json, sys
import llama_cpp
model = llama_cpp.Llama(sys.argv[1], n_ctx=32, n_threads=2, logits_all=True, verbose=False)
ids = json.loads(sys.argv[2])
model.eval(ids)
print(json.dumps([list(map(float, row)) for row in model.scores[:len(ids)]]))
model.close()
"""


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_converted_file_with_the_hf_logits(tmp_path, qtype):
    pytest.importorskip("llama_cpp")
    import subprocess

    folder = make_tiny_hf_checkpoint(tmp_path / "hf", seed=5)
    config = tiny_config(folder)
    convert_file(folder, tmp_path / "out.gguf", qtype, quiet=True)
    ids = [1, 60, 70, 80, 90, 100, 260, 262]
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(tmp_path / "out.gguf"), json.dumps(ids)],
                         capture_output=True, text=True, timeout=300)
    if run.returncode < 0:
        pytest.skip(f"llama.cpp crashed (signal {-run.returncode}); builds with AMX kernels are known to crash "
                    "on some AMX CPUs: rebuild llama-cpp-python without AMX (see BENCHMARKS.md)")
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.array(json.loads(run.stdout.strip().splitlines()[-1]), dtype=np.float64)
    expected = hf_reference_logits(tiny_llama_weights(np.random.default_rng(5), config), config, ids)
    # llama.cpp keeps the KV cache in F16 (and Q8_0 matmuls quantize activations): small differences;
    # a wrong Q/K permutation or name would give errors of the size of the logits themselves
    if qtype == "f32":
        assert np.abs(got - expected).max() < 1e-2
        assert (got.argmax(-1) == expected.argmax(-1)).all()
    else:
        assert np.abs(got - expected).max() < 0.3
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", tied=True)
    convert_file(folder, tmp_path / "out.gguf", "q4_0", quiet=True)
    out = GGUFFile(tmp_path / "out.gguf")
    assert "output.weight" not in out.tensors
    assert out.tensors["token_embd.weight"].qtype == GGMLType.Q8_0


def test_llama3_rope_scaling_adds_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", rope_scaling=scaling, rope_theta=500000.0)
    convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    out = GGUFFile(tmp_path / "out.gguf")
    factors = tensor_values(out, "rope_freqs.weight")
    assert out.tensors["rope_freqs.weight"].qtype == GGMLType.F32 and factors.shape == (8,)
    # high frequencies are untouched, the lowest ones divided by `factor`, a smooth ramp between
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.all(np.diff(factors) >= 0)
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 16, 2) / 16)
    smooth = (64 / wavelen - 1) / 3
    expected = np.where(wavelen < 16, 1.0, np.where(wavelen > 64, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    np.testing.assert_allclose(factors, expected, rtol=1e-5)


def test_linear_rope_scaling_and_head_dim_metadata(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", rope_scaling={"type": "linear", "factor": 2.0}, head_dim=16)
    convert_file(folder, tmp_path / "out.gguf", "f16", quiet=True)
    md = GGUFFile(tmp_path / "out.gguf").metadata
    assert md["llama.rope.scaling.type"] == "linear" and md["llama.rope.scaling.factor"] == 2.0
    assert md["llama.attention.key_length"] == md["llama.attention.value_length"] == 16


def test_merges_as_pairs_and_named_chat_templates(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["merges"] = [m.split(" ") for m in tok["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    checkpoint = open_checkpoint(folder)
    md = checkpoint.metadata
    checkpoint.close()
    assert md["tokenizer.ggml.merges"][1][1][:3] == ["Ġ t", "h e", "Ġt he"]
    assert md["tokenizer.chat_template"] == "A" and md["tokenizer.chat_template.tool_use"] == "B"
    assert md["tokenizer.chat_templates"][1][1] == ["tool_use"]


def test_sentencepiece_tokenizer_model_becomes_a_llama_vocab(tmp_path):
    from edgellama.tokenizer import Tokenizer

    folder = make_tiny_hf_checkpoint(tmp_path / "hf", vocab_size=2000)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    (folder / "tokenizer.model").write_bytes(SPM_MODEL.read_bytes())
    checkpoint = open_checkpoint(folder)
    metadata = {k: (v[1][1] if isinstance(v, tuple) and v[0] == ValueType.ARRAY else
                    v[1] if isinstance(v, tuple) else v) for k, v in checkpoint.metadata.items()}
    checkpoint.close()
    assert metadata["tokenizer.ggml.model"] == "llama" and len(metadata["tokenizer.ggml.tokens"]) == 2000
    assert (metadata["tokenizer.ggml.bos_token_id"], metadata["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert metadata["tokenizer.ggml.add_bos_token"] is True and metadata["tokenizer.ggml.add_space_prefix"] is True
    tokenizer = Tokenizer.from_gguf_metadata(metadata, "converted")
    for case in json.loads(SPM_CASES.read_text(encoding="utf-8"))["cases"]:
        assert tokenizer.encode(case["text"], add_bos=False) == case["ids"], case["text"]


# ----- refusals ----------------------------------------------------------------------------------

def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "not supported"),
    ({"num_attention_heads": 0}, "positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 66}, "not a multiple of num_attention_heads"),
    ({"rms_norm_eps": "tiny"}, "positive number"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "not supported"),
    ({"vocab_size": 100}, "has shape"),
    ({"intermediate_size": 128}, "has shape"),
])
def test_bad_config_is_refused_with_the_field(tmp_path, changes, message):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    edit_json(folder / "config.json", **changes)
    with pytest.raises((QuantizeError, ModelFormatError), match=message):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_and_missing_tensors_are_refused(tmp_path):
    from quantize.safetensors import SafetensorsFile, write_safetensors

    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    st = SafetensorsFile(folder / "model.safetensors")
    weights = {n: np.array(st.array(n)) for n in st.tensors}
    st.close()
    extra = dict(weights, **{"model.vision_tower.weight": np.zeros((2, 2), np.float32)})
    write_safetensors(folder / "model.safetensors", extra)
    with pytest.raises(QuantizeError, match="vision_tower"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(folder / "model.safetensors", weights)
    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_up\.weight.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(QuantizeError, match="pickle"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_nan_in_hf_weights_is_reported_by_tensor_name(tmp_path):
    from quantize.safetensors import SafetensorsFile, write_safetensors

    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    st = SafetensorsFile(folder / "model.safetensors")
    weights = {n: np.array(st.array(n)) for n in st.tensors}
    st.close()
    weights["model.layers.0.mlp.gate_proj.weight"][3, 9] = np.inf
    write_safetensors(folder / "model.safetensors", weights)
    with pytest.raises(QuantizeError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: 1 NaN/Inf"):
        convert_file(folder, tmp_path / "out.gguf", "q4_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()


# ----- tokenizer files ---------------------------------------------------------------------------

def edit_tokenizer(folder: Path, edit) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    edit(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("edit, error, message", [
    (lambda t: t["model"]["vocab"].update({"Ġzz": 5}), ModelFormatError, "id 5 is used by both"),
    (lambda t: t["model"]["vocab"].update({"Ġzz": 9999}), ModelFormatError, "outside the vocabulary"),
    (lambda t: t["model"]["vocab"].update({"Ġzz": "7"}), ModelFormatError, "integer ids"),
    (lambda t: t["added_tokens"].append({"id": 40, "content": "<|new|>"}), ModelFormatError, "reuses id 40"),
    (lambda t: t["model"].update({"merges": ["abc"]}), ModelFormatError, "merge #0"),
    (lambda t: t["model"].update({"type": "Unigram"}), QuantizeError, "'Unigram' is not supported"),
    (lambda t: t["model"].update({"byte_fallback": True}), QuantizeError, "tokenizer.model is needed"),
])
def test_bad_tokenizer_json_is_refused(tmp_path, edit, error, message):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    edit_tokenizer(folder, edit)
    with pytest.raises(error, match=message):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_pre_tokenizer_families_are_recognised(tmp_path):
    from quantize.vocab import _pre_tokenizer_name

    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "use_regex": False}]}
    cases = [(llama3, {}, "llama-bpe"), (qwen2, {}, "qwen2"),
             ({"type": "ByteLevel", "add_prefix_space": False}, {}, "gpt-2"),
             ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel"}]}, {"clean_up_tokenization_spaces": False}, "smollm")]
    for pre, config, expected in cases:
        assert _pre_tokenizer_name({"pre_tokenizer": pre}, config, tmp_path) == expected
    with pytest.warns(UserWarning, match="unrecognised pre-tokenizer"):
        assert _pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, {}, tmp_path) == "default"


@pytest.mark.parametrize("data, message", [
    (b"\x0a\x05\x0a\x09abc", "piece #0: field 1 of 9 bytes runs past the end"),  # text claims 9 bytes
    (b"\x0a", "truncated varint"),
    (b"\x0b\x00", "unsupported protobuf wire type 3"),
    (b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "varint longer"),
    (b"\x0a\x02\x18\x01", "has no text"),
    (b"\x0a\x05\x0a\x01a\x18\x09", "unknown type 9"),
    (b"\x0a\x08\x0a\x01a\x15\x00\x00\xc0\x7f", "has score nan"),      # a NaN score (float32 0x7fc00000)
    (b"\x0a\x08\x0a\x01a\x15\x00\x00\x80\x7f", "has score inf"),
    (b"", "no pieces"),
])
def test_malformed_sentencepiece_model_is_refused(tmp_path, data, message):
    """The runtime's reader (edgellama.tokenizer.read_sentencepiece) reads the quantizer's
    tokenizer.model too: its TokenizerErrors arrive as ModelFormatErrors naming the file, and the
    runtime refuses the same files (unknown piece types and non-finite scores in both)."""
    from edgellama.tokenizer import TokenizerError, Tokenizer
    from quantize.vocab import parse_sentencepiece

    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match=message) as e:
        parse_sentencepiece(path)
    assert str(e.value).startswith(str(path))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


def test_sentencepiece_pieces_beyond_max_pieces_stop_the_reading(tmp_path):
    from quantize.vocab import parse_sentencepiece

    piece = b"\x0a\x03\x0a\x01a"
    path = tmp_path / "tokenizer.model"
    path.write_bytes(piece * 5)
    assert len(parse_sentencepiece(path, max_pieces=5).pieces) == 5
    with pytest.raises(ModelFormatError, match="more than max_pieces = 4 pieces"):
        parse_sentencepiece(path, max_pieces=4)


def test_sentencepiece_file_above_the_size_cap_is_refused_before_reading(tmp_path, monkeypatch):
    import quantize.vocab

    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\x03\x0a\x01a" * 100)
    monkeypatch.setattr(quantize.vocab, "MAX_TOKENIZER_FILE_BYTES", 499)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read past the size cap"))
    with pytest.raises(ModelFormatError, match="500 bytes is too large"):
        quantize.vocab.parse_sentencepiece(path)
