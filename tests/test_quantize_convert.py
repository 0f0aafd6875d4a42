"""quantize.convert on GGUF input: requantized SmolLM2 equals llama.cpp's llama-quantize output.

tests/golden/smollm2_llamacpp_quant_hashes.json holds, per tensor of the files llama.cpp wrote when
requantizing the SmolLM2 Q4_1 file to Q8_0 and Q4_0, the type, shape and sha256 of the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile, TensorSpec, ValueType, write_gguf
from edgellama.quants import GGMLType, dequantize
from quantize.convert import RequantizeWarning, convert_file, make_plan, open_checkpoint
from quantize.source import QuantizeError
from tools.fetch_models import SMOLLM2_FILE, cache_dir, sha256_file

ROOT = Path(__file__).resolve().parent.parent
HASHES = ROOT / "tests" / "golden" / "smollm2_llamacpp_quant_hashes.json"
SMOLLM2 = cache_dir() / SMOLLM2_FILE  # fetched before collection by conftest.py

needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(),
                                   reason=f"{SMOLLM2} missing: run python tools/fetch_models.py")



@pytest.fixture(scope="module")
def requantized(tmp_path_factory):
    """Our Q8_0 and Q4_0 files requantized from the SmolLM2 Q4_1 file, made once per module."""
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing")
    folder = tmp_path_factory.mktemp("requantized")
    out = {}
    for qtype in ("q8_0", "q4_0"):
        out[qtype] = folder / f"smollm2.{qtype}.gguf"
        convert_file(SMOLLM2, out[qtype], qtype, allow_requantize=True, quiet=True)
    return out


@needs_smollm2
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_requantized_tensors_equal_llama_cpp(requantized, qtype):
    golden = json.loads(HASHES.read_text())["files"][qtype]
    ours = GGUFFile(requantized[qtype])
    assert ours.metadata["general.file_type"] == golden["general.file_type"]
    assert [t["name"] for t in golden["tensors"]] == list(ours.tensors)
    for expected in golden["tensors"]:
        info = ours.tensors[expected["name"]]
        assert info.qtype.name == expected["type"], expected["name"]
        assert list(reversed(info.shape)) == expected["shape"], expected["name"]
        assert hashlib.sha256(ours.raw(info.name)).hexdigest() == expected["sha256"], expected["name"]


@needs_smollm2
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_requantized_file_is_byte_identical_to_llama_cpp(requantized, qtype):
    golden = json.loads(HASHES.read_text())["files"][qtype]
    assert requantized[qtype].stat().st_size == golden["file_size"]
    assert sha256_file(requantized[qtype]) == golden["file_sha256"]


@needs_smollm2
def test_requantized_metadata_is_copied_with_its_types(requantized):
    source, ours = GGUFFile(SMOLLM2), GGUFFile(requantized["q4_0"])
    src_meta, our_meta = source.typed_metadata(), ours.typed_metadata()
    assert set(src_meta) == set(our_meta)
    for key, (vtype, value) in src_meta.items():
        if key == "general.file_type":
            continue
        assert our_meta[key][0] == vtype, key
        if vtype == ValueType.ARRAY:
            (item_type, items), (our_item_type, our_items) = value, our_meta[key][1]
            assert our_item_type == item_type, key
            assert np.array_equal(np.asarray(our_items), np.asarray(items)), key
        else:
            assert our_meta[key][1] == value, key
    assert our_meta["general.file_type"][1] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0


@needs_smollm2
def test_requantizing_needs_permission_and_warns(tmp_path):
    with pytest.raises(QuantizeError, match="allow-requantize"):
        convert_file(SMOLLM2, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()
    checkpoint = open_checkpoint(SMOLLM2)
    try:
        plan = make_plan(checkpoint, GGMLType.Q8_0)
    finally:
        checkpoint.close()
    assert len(plan.requantized) == 210  # every Q4_1 matrix; the Q8_0 embedding is copied
    from quantize.convert import check_requantize
    with pytest.warns(RequantizeWarning, match="quality drops"):
        check_requantize(plan, allow_requantize=True, quiet=False)


@needs_smollm2
def test_same_type_is_copied_and_f32_is_the_exact_dequantization(tmp_path):
    convert_file(SMOLLM2, tmp_path / "same.gguf", "q4_1", quiet=True)
    convert_file(SMOLLM2, tmp_path / "f32.gguf", "f32", allow_requantize=True, quiet=True)
    source, same, f32 = GGUFFile(SMOLLM2), GGUFFile(tmp_path / "same.gguf"), GGUFFile(tmp_path / "f32.gguf")
    for name, info in source.tensors.items():
        assert same.tensors[name].qtype == info.qtype
        np.testing.assert_array_equal(same.raw(name), source.raw(name))
        assert f32.tensors[name].qtype == GGMLType.F32
        expected = dequantize(source.raw(name), info.qtype, info.shape)
        np.testing.assert_array_equal(f32.raw(name).view(np.float32).reshape(info.shape), expected)


@pytest.mark.parametrize("source_type", ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_llama_cpp_only_types_are_read_through_gguf_py(tmp_path, source_type):
    """A llama-quantize file whose tensors we cannot write (K-quants, Q5_x) converts: its F32
    output is exactly gguf-py's dequantization of every tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from tiny_model import write_tiny_model

    qtype = GGMLType[source_type]
    k_quant = source_type.endswith("_K")
    path = write_tiny_model(tmp_path / "in.gguf", qtype, dim=256 if k_quant else 64, ffn=512 if k_quant else 96)
    convert_file(path, tmp_path / "f32.gguf", "f32", allow_requantize=True, quiet=True)
    source, f32 = GGUFFile(path), GGUFFile(tmp_path / "f32.gguf")
    for name, info in source.tensors.items():
        want = (gguf_dequantize(np.array(source.raw(name)), GGMLQuantizationType(int(info.qtype)))
                .reshape(info.shape).astype(np.float32))
        np.testing.assert_array_equal(f32.raw(name).view(np.float32).reshape(info.shape), want)


# ----- policy on small GGUF files --------------------------------------------------------------

def write_synthetic_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Tensors only, no hyper-parameters: enough for planning, refused by the runtime's checks."""
    metadata = {"general.architecture": "llama", "general.file_type": 0}
    specs = [TensorSpec(name, GGMLType.F32, a.shape) for name, a in tensors.items()]
    write_gguf(path, metadata, specs, [a.astype(np.float32) for a in tensors.values()])
    return path


def write_small_gguf(path: Path, *, seed: int = 0, tied: bool = True, edit=None) -> tuple[Path, dict]:
    """A valid tiny llama GGUF in F32 (2 layers, width 64, FFN 96); ``edit`` may change the weights.
    Returns the path and the weights by name."""
    from tiny_model import write_tiny_model

    base = write_tiny_model(path.with_name(path.stem + ".base.gguf"), GGMLType.F32, seed=seed, tied=tied)
    gguf = GGUFFile(base)
    metadata = {}  # copied out of the memory map before it is closed
    for key, (vtype, value) in gguf.typed_metadata().items():
        if vtype == ValueType.ARRAY:
            item_type, items = value
            value = (item_type, np.array(items) if isinstance(items, np.ndarray) else list(items))
        metadata[key] = (vtype, value)
    weights = {name: np.array(dequantize(gguf.raw(name), info.qtype, info.shape))
               for name, info in gguf.tensors.items()}
    gguf.close()
    base.unlink()
    if edit is not None:
        edit(weights)
    write_gguf(path, metadata, [TensorSpec(n, GGMLType.F32, a.shape) for n, a in weights.items()],
               list(weights.values()))
    return path, weights


def small_model(rng, n_cols=64, tied=True) -> dict[str, np.ndarray]:
    t = {
        "token_embd.weight": rng.standard_normal((40, n_cols)),
        "blk.0.attn_norm.weight": rng.standard_normal(n_cols),
        "blk.0.attn_q.weight": rng.standard_normal((n_cols, n_cols)),
        "blk.0.ffn_down.weight": rng.standard_normal((n_cols, 96)),
        "output_norm.weight": rng.standard_normal(n_cols),
    }
    if not tied:
        t["output.weight"] = rng.standard_normal((40, n_cols))
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "f16", "bf16", "f32"])
@pytest.mark.parametrize("tied", [True, False])
def test_policy_and_bytes_on_a_small_model(tmp_path, qtype, tied):
    from gguf import quants as gguf_quants
    from gguf.constants import GGMLQuantizationType

    src, weights = write_small_gguf(tmp_path / "src.gguf", tied=tied)
    convert_file(src, tmp_path / "out.gguf", qtype, quiet=True)
    out = GGUFFile(tmp_path / "out.gguf")
    target = GGMLType[qtype.upper()]
    output_name = "token_embd.weight" if tied else "output.weight"
    for name, values in weights.items():
        expected_type = target
        if values.ndim == 1:
            expected_type = GGMLType.F32
        elif name == output_name and target in (GGMLType.Q4_0, GGMLType.Q4_1):
            expected_type = GGMLType.Q8_0  # llama-quantize's extra bits for the output tensor
        assert out.tensors[name].qtype == expected_type, name
        reference = gguf_quants.quantize(values, GGMLQuantizationType(int(expected_type)))
        np.testing.assert_array_equal(out.raw(name), np.ascontiguousarray(reference).view(np.uint8).ravel())


def test_output_and_embedding_type_overrides(tmp_path):
    src, _ = write_small_gguf(tmp_path / "src.gguf", seed=1, tied=False)
    convert_file(src, tmp_path / "out.gguf", "q4_0", output_type="f16", embedding_type="q4_1", quiet=True)
    out = GGUFFile(tmp_path / "out.gguf")
    assert out.tensors["output.weight"].qtype == GGMLType.F16
    assert out.tensors["token_embd.weight"].qtype == GGMLType.Q4_1
    assert out.tensors["blk.0.attn_q.weight"].qtype == GGMLType.Q4_0


def test_rows_not_a_block_multiple_fall_back_to_f16_and_say_so(tmp_path):
    """The plan falls back to F16 (llama-quantize's rule).  Such a width cannot be written for a
    llama model any more: the runtime needs widths that are multiples of 32 (validate_plan refuses
    them; tests/test_quantize_cli.py checks that), so this is the planner's rule alone."""
    rng = np.random.default_rng(2)
    weights = small_model(rng, n_cols=48)
    src = write_synthetic_gguf(tmp_path / "src.gguf", weights)
    checkpoint = open_checkpoint(src)
    try:
        plan = make_plan(checkpoint, GGMLType.Q8_0)
    finally:
        checkpoint.close()
    by_name = {p.tensor.name: p.choice for p in plan.tensors}
    assert by_name["blk.0.attn_q.weight"].qtype == GGMLType.F16
    assert "not a multiple" in by_name["blk.0.attn_q.weight"].note
    assert by_name["blk.0.ffn_down.weight"].qtype == GGMLType.Q8_0  # 96 columns divide into blocks


def test_nan_in_a_tensor_is_reported_by_name_and_nothing_is_written(tmp_path):
    def poison(weights):
        weights["blk.0.ffn_down.weight"][7, 3] = np.nan

    src, _ = write_small_gguf(tmp_path / "src.gguf", seed=3, edit=poison)
    with pytest.raises(QuantizeError, match=r"blk\.0\.ffn_down\.weight.*row 7 column 3"):
        convert_file(src, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_error_statistics_are_reported(tmp_path):
    src, _ = write_small_gguf(tmp_path / "src.gguf", seed=4)
    results = {r.name: r for r in convert_file(src, tmp_path / "out.gguf", "q4_0")}
    q = results["blk.0.attn_q.weight"]
    assert not q.copied and 0 < q.rmse < q.max_abs_error < 1.0
    assert results["output_norm.weight"].rmse == 0.0
