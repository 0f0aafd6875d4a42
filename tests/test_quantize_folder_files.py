"""The files of a model folder from a stranger (quantize/files.py), and what the quantizer copies
from them: a fifth review found /dev/zero symlinks read without end, a FIFO blocking the run, a
symlinked chat_template.jinja copying ~/.ssh/id_rsa into the output, one checkpoint joined as six
parts through links, a traceback on a Unicode digit, errors that named no file, finite float64
values reported as Inf, templates the runtime refuses written silently, a truncated .pth called
"not a zip"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile, ModelFormatError, TensorSpec, write_gguf
from quantize.convert import convert_file
from quantize.pickle_reader import TorchCheckpoint
from quantize.safetensors import SafetensorsFile, write_safetensors
from quantize.source import QuantizeError

ROOT = Path(__file__).resolve().parent.parent
META = ROOT / "tests" / "fixtures" / "meta_tiny"
sys.path.insert(0, str(ROOT))
from tools.make_hf_checkpoint import make_tiny_hf_checkpoint  # noqa: E402
from tools.make_meta_fixture import save_by_hand, write_torch_zip  # noqa: E402


@pytest.fixture
def hf(tmp_path):
    return make_tiny_hf_checkpoint(tmp_path / "hf")


def meta_folder(root: Path) -> Path:
    folder = root / "meta"
    folder.mkdir()
    for name in ("params.json", "tokenizer.model", "consolidated.00.pth"):
        shutil.copy(META / name, folder)
    return folder


def _weights(folder: Path) -> dict[str, np.ndarray]:
    """The tensors of a folder's model.safetensors, copied out of its map."""
    st = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: np.array(st.array(n)) for n in st.tensors}
    st.close()
    return tensors


def _replace_with_link(path: Path, target: Path | str) -> None:
    if path.exists():
        path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"])
def test_a_device_under_a_folder_name_is_refused_before_reading(hf, tmp_path, name):
    original = (hf / name).read_bytes()
    _replace_with_link(hf / name, "/dev/zero")
    with pytest.raises(ModelFormatError, match=f"{name}: not a regular file"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()
    (hf / name).unlink()
    (hf / name).write_bytes(original)
    _replace_with_link(hf / "chat_template.jinja", "/dev/zero")  # (a text copied as it is: not even a link out)
    with pytest.raises(ModelFormatError, match="chat_template.jinja: resolves to /dev/zero, outside the model folder"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_meta_files_that_are_devices_are_refused(tmp_path):
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        folder = meta_folder(tmp_path)
        _replace_with_link(folder / name, "/dev/zero")
        with pytest.raises(ModelFormatError, match=f"{name}: not a regular file"):
            convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
        shutil.rmtree(folder)


def test_links_out_of_the_folder_are_followed_for_parsed_files(tmp_path):
    """A review: Meta's download keeps one tokenizer.model beside the size folders (users link
    ../tokenizer.model in), and `huggingface-cli download --local-dir` linked the weights into the
    Hugging Face cache: both were refused by a rule meant for texts copied as they are."""
    folder = meta_folder(tmp_path)
    convert_file(folder, tmp_path / "plain.gguf", "q8_0", quiet=True)
    os.replace(folder / "tokenizer.model", tmp_path / "tokenizer.model")
    (folder / "tokenizer.model").symlink_to(Path("..") / "tokenizer.model")
    blobs = tmp_path / "hf-cache" / "blobs"
    blobs.mkdir(parents=True)
    os.replace(folder / "consolidated.00.pth", blobs / "abc123")
    (folder / "consolidated.00.pth").symlink_to(blobs / "abc123")
    convert_file(folder, tmp_path / "linked.gguf", "q8_0", quiet=True)
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "linked.gguf").read_bytes()


def test_a_fifo_in_the_folder_does_not_block_the_run(hf, tmp_path):
    """In a child with a time limit: the defect blocked forever in open()."""
    (hf / "config.json").unlink()
    os.mkfifo(hf / "config.json")
    r = subprocess.run([sys.executable, "-m", "quantize", str(hf), str(tmp_path / "o.gguf"), "q8_0", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("config.json: not a regular file (a device, FIFO or socket)")


def test_a_file_from_outside_the_folder_never_reaches_the_output(hf, tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    _replace_with_link(hf / "chat_template.jinja", secret)
    with pytest.raises(ModelFormatError, match=r"chat_template.jinja: resolves to .*id_rsa, outside the model folder"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()
    # a link that stays inside the folder is a file of the folder
    (hf / "templates").mkdir()
    (hf / "templates" / "t.jinja").write_text("{{ messages[0]['content'] }}")
    _replace_with_link(hf / "chat_template.jinja", "templates/t.jinja")
    convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    g = GGUFFile(tmp_path / "out.gguf")
    assert g.metadata["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    g.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_hugging_face_cache_snapshot_converts_as_its_plain_folder(tmp_path, shards):
    """The cache's snapshot files are symlinks into the repository's blobs/: the same output bytes."""
    plain = make_tiny_hf_checkpoint(tmp_path / "tiny", shards=shards)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(plain.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    convert_file(plain, tmp_path / "plain.gguf", "q8_0", quiet=True)
    convert_file(snapshot, tmp_path / "cached.gguf", "q8_0", quiet=True)
    plain_out, cached_out = GGUFFile(tmp_path / "plain.gguf"), GGUFFile(tmp_path / "cached.gguf")
    assert plain_out.metadata.keys() == cached_out.metadata.keys()
    assert cached_out.metadata["general.name"] == "tiny"  # the repository's, not the snapshot's commit
    for key in plain_out.metadata.keys():
        a, b = plain_out.metadata[key], cached_out.metadata[key]
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), key
    assert list(plain_out.tensors) == list(cached_out.tensors)
    assert all(np.array_equal(plain_out.raw(n), cached_out.raw(n)) for n in plain_out.tensors)
    plain_out.close()
    cached_out.close()
    # a template is read from the repository folder only
    outside = tmp_path / "hub" / "elsewhere.jinja"
    outside.write_text("{{ messages[0]['content'] }}")
    _replace_with_link(snapshot / "chat_template.jinja", outside)
    with pytest.raises(ModelFormatError, match="chat_template.jinja: resolves to .*, outside the model folder"):
        convert_file(snapshot, tmp_path / "x.gguf", "q8_0", quiet=True)


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_one_checkpoint_under_two_part_names_is_refused(tmp_path, how):
    folder = meta_folder(tmp_path)
    alias = folder / "consolidated.01.pth"
    if how == "hardlink":
        os.link(folder / "consolidated.00.pth", alias)
    else:
        alias.symlink_to("consolidated.00.pth")
    with pytest.raises(ModelFormatError, match=r"consolidated.01.pth: the same file as .*consolidated.00.pth"):
        convert_file(folder, tmp_path / "out.gguf", "f32", quiet=True)


def test_a_tensor_name_with_a_unicode_digit_is_a_clean_error(hf, tmp_path):
    convert_file(hf, tmp_path / "f32.gguf", "f32", quiet=True)
    g = GGUFFile(tmp_path / "f32.gguf")  # (written while it is open: the values are views of its map)
    specs = [TensorSpec("blk.\u00b2.attn_q.weight" if name == "blk.1.attn_q.weight" else name, info.qtype, info.shape)
             for name, info in g.tensors.items()]
    write_gguf(tmp_path / "odd.gguf", g.typed_metadata(), specs, [g.raw(name) for name in g.tensors])
    g.close()
    with pytest.raises((ModelFormatError, QuantizeError), match="missing tensor 'blk.1.attn_q.weight'"):
        convert_file(tmp_path / "odd.gguf", tmp_path / "out.gguf", "q8_0", quiet=True)


def test_errors_inside_a_checkpoint_name_its_file(tmp_path, hf):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(META / name, folder)
    write_torch_zip(folder / "consolidated.00.pth", b"\x80\x02ccollections\nOrderedDict\n]\x85R.", {"0": b"\0" * 16})
    with pytest.raises(ModelFormatError, match=r"consolidated.00.pth: OrderedDict with constructor arguments"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    ck = TorchCheckpoint(META / "consolidated.00.pth")
    arrays = {n: np.array(t.items) for n, t in ck.tensors.items()}
    ck.close()
    save_by_hand(folder / "consolidated.00.pth", dict(arrays, extra=np.zeros(4, np.float32)))
    with pytest.raises(QuantizeError, match=r"consolidated.00.pth: tensor 'extra' is not part of a Meta Llama"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    tensors = _weights(hf)
    write_safetensors(hf / "model.safetensors", dict(tensors, **{"model.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(QuantizeError, match=r"model.safetensors: tensor 'model.extra.weight' is not part"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)


def test_finite_float64_beyond_float32_is_named_as_such(hf, tmp_path):
    tensors = _weights(hf)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = np.full(tensors[name].shape, 1e300, np.float64)
    write_safetensors(hf / "model.safetensors", tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no anonymous numpy overflow warning either)
        with pytest.raises(ModelFormatError, match=rf"{name}: {tensors[name].size} float64 value\(s\) beyond "
                                                   r"float32's range \(the first 1e\+300\)"):
            convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    # within range, float64 converts as its float32 rounding
    tensors[name] = np.full(tensors[name].shape, 0.25, np.float64)
    write_safetensors(hf / "model.safetensors", tensors)
    convert_file(hf, tmp_path / "out.gguf", "f32", quiet=True)
    g = GGUFFile(tmp_path / "out.gguf")
    assert np.all(np.asarray(g.raw("blk.0.attn_q.weight")).view(np.float32) == 0.25)
    g.close()


def test_chat_templates_are_checked_as_the_runtime_will(hf, tmp_path):
    from edgellama.chat import MAX_TEMPLATE_CHARS

    config_path = hf / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "x" * (MAX_TEMPLATE_CHARS + 1)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=f"the chat template is {MAX_TEMPLATE_CHARS + 1} characters, more "
                                               f"than the {MAX_TEMPLATE_CHARS} the runtime accepts"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert not (tmp_path / "out.gguf").exists()
    # one that does not compile is copied as llama.cpp copies it, with a warning
    config["chat_template"] = "{% for m in messages %}{{ m.content }"
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="written as it is, but the runtime will refuse it"):
        convert_file(hf, tmp_path / "out.gguf", "q8_0", quiet=True)
    g = GGUFFile(tmp_path / "out.gguf")
    assert g.metadata["tokenizer.chat_template"] == config["chat_template"]
    g.close()
    for names in (["a", "a"], ["", "b"], ["default", "default"]):
        config["chat_template"] = [{"name": n, "template": "{{ 1 }}"} for n in names]
        config_path.write_text(json.dumps(config))
        with pytest.raises(ModelFormatError, match="is empty or given twice"):
            convert_file(hf, tmp_path / "out2.gguf", "q8_0", quiet=True)


def test_a_truncated_pth_is_called_truncated(tmp_path):
    folder = meta_folder(tmp_path)
    whole = (folder / "consolidated.00.pth").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10):
        (folder / "consolidated.00.pth").write_bytes(whole[:cut])
        with pytest.raises(ModelFormatError, match="consolidated.00.pth: file is truncated or incomplete"):
            convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
    (folder / "consolidated.00.pth").write_bytes(b"\x80\x02}q\x00.")  # a pre-1.6 pickle: not a zip at all
    with pytest.raises(ModelFormatError, match="not a zip-format PyTorch checkpoint"):
        convert_file(folder, tmp_path / "out.gguf", "q8_0", quiet=True)
