"""Malformed safetensors files and shard indexes get one clear ModelFormatError (BAD-INPUTS.md)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import ModelFormatError
from quantize.convert import convert_file
from quantize.safetensors import SafetensorsFile, to_float32, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.make_hf_checkpoint import make_tiny_hf_checkpoint  # noqa: E402


def raw_file(path: Path, header: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def header_file(path: Path, tensors: dict, data: bytes) -> Path:
    return raw_file(path, json.dumps(tensors), data)


def test_valid_file_round_trips(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.5, -2.0], dtype=np.float16)
    bf = (np.array([3.0, -0.5], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    write_safetensors(tmp_path / "m.safetensors", {"a": a, "b": b, "c": bf}, metadata={"format": "pt"},
                      dtypes={"c": "BF16"})
    st = SafetensorsFile(tmp_path / "m.safetensors")
    assert st.metadata == {"format": "pt"} and list(st.tensors) == ["a", "b", "c"]
    np.testing.assert_array_equal(st.array("a"), a)
    np.testing.assert_array_equal(to_float32(st.array("b"), "F16"), [1.5, -2.0])
    np.testing.assert_array_equal(to_float32(st.array("c"), "BF16"), [3.0, -0.5])
    assert not st.array("a").flags.writeable


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
    (lambda p: raw_file(p, b"{}", length=200 * 1024 * 1024), "exceeds the 104857600-byte limit"),
    (lambda p: raw_file(p, b"{}", length=4096), "past the end"),
    (lambda p: raw_file(p, b'{"a\xff": 1}'), "not valid UTF-8"),
    (lambda p: raw_file(p, "{not json"), "not valid JSON"),
    (lambda p: raw_file(p, "[1, 2]"), "not a JSON object"),
    (lambda p: raw_file(p, '{"a": ' + '[' * 100000 + ']' * 100000 + '}'), "not valid JSON"),
    (lambda p: raw_file(p, json.dumps({"x": entry()})[:-1] + ', "x": ' + json.dumps(entry()) + "}", b"\0" * 8),
     "duplicate key 'x'"),
    (lambda p: header_file(p, {"x": entry(dtype="F4")}, b"\0" * 8), "unknown dtype 'F4'"),
    (lambda p: header_file(p, {"x": entry(shape=(3,))}, b"\0" * 8), "8 bytes in data_offsets, but F32 \\[3\\] needs 12"),
    (lambda p: header_file(p, {"x": entry(shape=(-2,))}, b"\0" * 8), "not a list of non-negative integers"),
    (lambda p: header_file(p, {"x": entry(shape=(True, 2))}, b"\0" * 8), "not a list of non-negative integers"),
    (lambda p: header_file(p, {"x": entry(offsets=(8, 0))}, b"\0" * 8), "begin 8 > end 0"),
    (lambda p: header_file(p, {"x": entry(offsets=(0, 8, 9))}, b"\0" * 8), "are not two non-negative integers"),
    (lambda p: header_file(p, {"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly dtype, shape and data_offsets"),
    (lambda p: header_file(p, {"x": entry(), "y": entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    (lambda p: header_file(p, {"x": entry(), "y": entry(offsets=(12, 20))}, b"\0" * 20), "gap of 4 bytes"),
    (lambda p: header_file(p, {"x": entry()}, b"\0" * 12), "4 bytes after the last tensor"),
    (lambda p: header_file(p, {"x": entry(offsets=(0, 8))}, b"\0" * 4), "truncated or incomplete"),
    (lambda p: header_file(p, {"x": entry(offsets=(8, 16))}, b"\0" * 16), "gap of 8 bytes"),
    (lambda p: header_file(p, {"__metadata__": {"a": 1}}, b""), "__metadata__ must map strings to strings"),
    (lambda p: header_file(p, {"x": entry(shape=(1 << 62, 1 << 62))}, b"\0" * 8), "needs"),
])
def test_malformed_safetensors_are_refused(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ModelFormatError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_malformed_safetensors_in_a_model_folder_fail_the_conversion_cleanly(tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    blob = bytearray((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").write_bytes(bytes(blob[:-100]))  # a truncated download
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()


# ----- shard indexes -----------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    return make_tiny_hf_checkpoint(tmp_path / "hf", shards=2)


def edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                    "..\\x.safetensors", "C:x.safetensors"])
def test_shard_paths_outside_the_folder_are_refused(sharded, tmp_path, target):
    (tmp_path / "outside.safetensors").write_bytes((sharded / "model-00001-of-00002.safetensors").read_bytes())
    edit_index(sharded, lambda m: m.update({"model.norm.weight": target}))
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        convert_file(sharded, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_a_shard_linked_from_elsewhere_is_read(sharded, tmp_path):
    """A shard the folder links to (`huggingface-cli download --local-dir` links into the Hugging
    Face cache) is read as the file it stands for: it must parse as a shard of this index (names in
    the index itself may not leave the folder, above)."""
    convert_file(sharded, tmp_path / "plain.gguf", "q8_0", quiet=True)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(sharded / "model-00002-of-00002.safetensors", outside)
    (sharded / "model-00002-of-00002.safetensors").symlink_to(outside)
    convert_file(sharded, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update({"model.norm.weight": "missing.safetensors"}), "does not exist"),
    (lambda m: m.update({"model.norm.weight": 7}), "not a file name"),
    (lambda m: m.update({"model.ghost.weight": "model-00001-of-00002.safetensors"}), "no shard holds"),
    (lambda m: m.pop("model.norm.weight"), "not listed for this shard"),
    (lambda m: m.update({"model.norm.weight": next(f for f in m.values() if f.endswith("1-of-00002.safetensors"))
                         if m["model.norm.weight"].endswith("2-of-00002.safetensors")
                         else m["model.norm.weight"].replace("00001-of", "00002-of")}), "not listed for this shard"),
    (lambda m: m.clear(), "non-empty object"),
])
def test_inconsistent_shard_index_is_refused(sharded, tmp_path, edit, message):
    edit_index(sharded, edit)
    with pytest.raises(ModelFormatError, match=message):
        convert_file(sharded, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_tensor_in_two_shards_is_refused(sharded, tmp_path):
    first, second = sharded / "model-00001-of-00002.safetensors", sharded / "model-00002-of-00002.safetensors"
    st = SafetensorsFile(first)
    name = next(iter(st.tensors))
    dup = np.array(st.array(name))
    st.close()
    st2 = SafetensorsFile(second)
    weights = {n: np.array(st2.array(n)) for n in st2.tensors}
    st2.close()
    weights[name] = dup
    write_safetensors(second, weights)
    with pytest.raises(ModelFormatError, match="is in both"):
        convert_file(sharded, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_index_that_is_not_json_is_refused(sharded, tmp_path):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"a": "b", "a": "c"}}')
    with pytest.raises(ModelFormatError, match="duplicate key 'a'"):
        convert_file(sharded, tmp_path / "out.gguf", "q8_0", quiet=True)
