"""edgellama-quantize against hostile checkpoints (issue 11, items 10-17; issue 12, item 12).

Checkpoints are untrusted: every count in a config is checked against the tensors present before
anything is looped over; tensor views may not reach beyond (or repeat) their storage; the pickle
machine has capped stack, memo and operation counts; hostile values are one-line errors; files the
command writes (output, --report) follow one set of rules; SIGTERM is handled like SIGINT; the
metadata written passes the runtime's own checks; every quantized source type needs
--allow-requantize.  Memory figures are measured in child processes (peak RSS from wait4, an
address-space limit so that a regression fails instead of exhausting the machine).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile, ModelFormatError, TensorSpec, ValueType, write_gguf
from edgellama.quants import BLOCK_LAYOUT, GGMLType, tensor_nbytes
from quantize import cli, convert
from quantize.pickle_reader import TorchCheckpoint

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.fetch_models import SMOLLM2_FILE, cache_dir  # noqa: E402
from tools.make_hf_checkpoint import make_tiny_hf_checkpoint  # noqa: E402
from tools.make_meta_fixture import TorchView, save_by_hand, torch_pickle, write_torch_zip  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "meta_tiny"
SMOLLM2 = cache_dir() / SMOLLM2_FILE
MIB = 1 << 20
CHILD_ADDRESS_SPACE = 3 << 30  # a regression fails with MemoryError instead of eating the machine


# ----- helpers -----------------------------------------------------------------------------------

def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("edgellama-quantize: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def assert_one_line_error(err: str, *fragments: str) -> str:
    line = error_line(err)
    for fragment in fragments:
        assert fragment in line, line
    return line


def measured_child(argv, timeout: float = 300) -> tuple[int, str, int]:
    """Run ``python -m quantize argv`` from a fresh Python that reports its only child's peak RSS,
    so that figures of earlier children do not leak into this one."""
    script = (
        "import os, resource, subprocess, sys, json\n"
        "def limit():\n"
        f"    resource.setrlimit(resource.RLIMIT_AS, ({CHILD_ADDRESS_SPACE}, {CHILD_ADDRESS_SPACE}))\n"
        "p = subprocess.run([sys.executable, '-m', 'quantize', *sys.argv[1:]], preexec_fn=limit,\n"
        "                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "print(json.dumps([p.returncode, p.stderr,\n"
        "                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    code, err, rss = json.loads(result.stdout)
    return code, err, rss


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory) -> int:
    """Peak RSS of a dry run on a tiny valid checkpoint: the interpreter, numpy, Numba, the reader."""
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("baseline") / "hf")
    code, err, rss = measured_child([folder, folder.parent / "o.gguf", "--type", "q8_0", "--dry-run"])
    assert code == 0, err
    return rss


def fixture_arrays() -> dict[str, np.ndarray]:
    """The Meta fixture's tensors (Meta names; bfloat16 as uint16 bits)."""
    ckpt = TorchCheckpoint(FIXTURE / "consolidated.00.pth")
    try:
        return {name: np.array(t.items) for name, t in ckpt.tensors.items()}
    finally:
        ckpt.close()


def meta_folder(tmp_path: Path, tensors: dict | None = None, storages: dict | None = None,
                params: dict | None = None, name: str = "meta", pth: bytes | None = None,
                state_dict_metadata: bool = False) -> Path:
    """A Meta folder: the fixture's params.json (+ changes), tokenizer.model and a hand-written .pth."""
    folder = tmp_path / name
    folder.mkdir()
    p = json.loads((FIXTURE / "params.json").read_text())
    p.update(params or {})
    (folder / "params.json").write_text(json.dumps(p))
    shutil.copy(FIXTURE / "tokenizer.model", folder)
    target = folder / "consolidated.00.pth"
    if pth is not None:
        target.write_bytes(pth)
    else:
        save_by_hand(target, fixture_arrays() if tensors is None else tensors, storages,
                     state_dict_metadata=state_dict_metadata)
    return folder


def meta_shapes(dim: int, n_layers: int, ffn: int, vocab: int, n_heads: int, n_kv_heads: int) -> dict:
    head_dim = dim // n_heads
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (n_kv_heads * head_dim, dim),
            p + "attention.wv.weight": (n_kv_heads * head_dim, dim), p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (ffn, dim), p + "feed_forward.w2.weight": (dim, ffn),
            p + "feed_forward.w3.weight": (ffn, dim), p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,)})
    return shapes


def broadcast_meta(tmp_path: Path, dim=64, n_layers=2, ffn=128, vocab=4096, n_heads=4, n_kv_heads=4) -> Path:
    """Every tensor a stride-0 view of one float: a few KB that declare a large model."""
    shapes = meta_shapes(dim, n_layers, ffn, vocab, n_heads, n_kv_heads)
    views = {name: TorchView("one", shape, (0,) * len(shape)) for name, shape in shapes.items()}
    return meta_folder(tmp_path, views, {"one": np.array([0.01], np.float32)},
                       params={"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads})


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_hf_checkpoint(tmp_path / "hf")


def small_gguf(path: Path) -> Path:
    """Two tensors and no hyper-parameters: not a model, only something to refuse to overwrite."""
    write_gguf(path, {"general.architecture": "llama"},
               [TensorSpec("output_norm.weight", GGMLType.F32, (256,))], [np.ones(256, np.float32)])
    return path


def tiny_gguf(path: Path, *, types: dict | None = None, metadata: dict | None = None) -> Path:
    """A valid tiny llama GGUF (F32, width 64, FFN 256 so that 256-element blocks fit ffn_down's
    rows); ``types`` replaces tensors by zero blocks of another type (valid in every type),
    ``metadata`` changes keys ((ValueType, value) pairs; None deletes)."""
    from tiny_model import write_tiny_model

    base = write_tiny_model(path.with_name(path.stem + ".base.gguf"), GGMLType.F32, ffn=256)
    gguf = GGUFFile(base)
    md = {}  # copied out of the memory map before it is closed
    for key, (vtype, value) in gguf.typed_metadata().items():
        if vtype == ValueType.ARRAY:
            value = (value[0], np.array(value[1]) if isinstance(value[1], np.ndarray) else list(value[1]))
        md[key] = (vtype, value)
    specs, data = [], []
    for name, info in gguf.tensors.items():
        qtype = (types or {}).get(name, info.qtype)
        specs.append(TensorSpec(name, qtype, info.shape))
        data.append(np.zeros(tensor_nbytes(qtype, info.shape), np.uint8) if qtype != info.qtype
                    else np.array(gguf.raw(name)))
    gguf.close()
    base.unlink()
    for key, value in (metadata or {}).items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    write_gguf(path, md, specs, data)
    return path


# ===== 10: config counts are checked against the tensors present, before any loop =================

def test_hf_layer_count_far_beyond_the_weights_fails_at_once(tmp_path, baseline_rss):
    """Audit: num_hidden_layers = 10^8 on a 2-layer folder grew to 3.6 GB in 30 s, never finishing."""
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", num_hidden_layers=2)
    edit_json(folder / "config.json", num_hidden_layers=10**8)
    code, err, rss = measured_child([folder, tmp_path / "o.gguf", "--type", "q8_0"])
    assert code == 1
    assert_one_line_error(err, "config.json", "num_hidden_layers", "100000000", "2 layers")
    assert rss < baseline_rss + 64 * MIB
    assert not (tmp_path / "o.gguf").exists()


def test_meta_layer_count_far_beyond_the_weights_fails_at_once(tmp_path, baseline_rss):
    folder = meta_folder(tmp_path, params={"n_layers": 10**8})
    code, err, rss = measured_child([folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run"])
    assert code == 1
    assert_one_line_error(err, "params.json", "n_layers", "100000000", "2 layers")
    assert rss < baseline_rss + 64 * MIB


@pytest.mark.parametrize("changes, fragments", [
    ({"num_hidden_layers": 3}, ["num_hidden_layers 3", "2 layers"]),
    ({"num_hidden_layers": 1}, ["num_hidden_layers 1", "model.layers.1."]),
    ({"vocab_size": 10**9}, ["vocab_size 1000000000", "model.embed_tokens.weight"]),
    ({"hidden_size": 1 << 20}, ["hidden_size 1048576", "model.embed_tokens.weight"]),
    ({"intermediate_size": 10**9}, ["intermediate_size 1000000000", "gate_proj"]),
    ({"head_dim": 1 << 30}, ["head_dim 1073741824", "q_proj"]),
    ({"num_key_value_heads": 4}, ["num_key_value_heads 4", "k_proj"]),
    ({"num_attention_heads": 8, "num_key_value_heads": 8}, ["num_attention_heads 8", "k_proj"]),
])
def test_hf_config_counts_must_match_the_tensors(capsys, tiny, tmp_path, changes, fragments):
    edit_json(tiny / "config.json", **changes)
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "config.json", *fragments)


@pytest.mark.parametrize("params, fragments", [
    ({"n_layers": 3}, ["n_layers 3", "2 layers"]),
    ({"n_layers": 1}, ["n_layers 1", "layers.1."]),
    ({"dim": 64, "n_heads": 8}, ["dim 64", "tok_embeddings.weight"]),
    ({"n_heads": 2}, ["n_heads 2", "wk"]),
    ({"vocab_size": 10**9}, ["vocab_size 1000000000", "tok_embeddings.weight"]),
])
def test_meta_params_counts_must_match_the_tensors(capsys, tmp_path, params, fragments):
    folder = meta_folder(tmp_path, params=params)
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "params.json", *fragments)


def test_layer_numbers_with_thousands_of_digits_are_refused_cleanly(capsys, tiny, tmp_path):
    from quantize.safetensors import SafetensorsFile, write_safetensors

    st = SafetensorsFile(tiny / "model.safetensors")
    weights = {n: np.array(st.array(n)) for n in st.tensors}
    st.close()
    weights["model.layers." + "9" * 5000 + ".mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(tiny / "model.safetensors", weights)
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "model.layers.999")


# ===== 11: views may not reach beyond or repeat their storage; output bounded by the input =========

def test_stride0_views_are_refused(capsys, tmp_path):
    """Audit: a 54 KB .pth of stride-0 views wrote a 1.01 GB GGUF."""
    folder = broadcast_meta(tmp_path)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20_000
    for extra in ([], ["--dry-run"]):
        code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "f16", *extra)
        assert code == 1
        assert_one_line_error(err, "consolidated.00.pth", "tok_embeddings.weight", "stride [0, 0]",
                              "repeats storage items")
    assert only_files(tmp_path) == ["meta"]


def test_broadcast_vocabulary_in_a_dry_run_is_refused_before_padding(tmp_path, baseline_rss):
    """Audit: a 9 KB input with --dry-run used 2.78 GB padding a 20M-entry vocabulary."""
    folder = broadcast_meta(tmp_path, dim=32, n_layers=1, ffn=64, vocab=20_000_000, n_heads=4, n_kv_heads=2)
    code, err, rss = measured_child([folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run"])
    assert code == 1
    assert_one_line_error(err, "tok_embeddings.weight", "repeats storage items")
    assert rss < baseline_rss + 64 * MIB


def test_overlapping_strides_are_refused(capsys, tmp_path):
    arrays = fixture_arrays()
    storage = arrays["layers.0.attention.wq.weight"].reshape(-1)
    # (32, 32) with row stride 16: every row shares half its items with the next; extent 527 < 1024
    arrays["layers.0.attention.wq.weight"] = TorchView("wq", (32, 32), (16, 1))
    folder = meta_folder(tmp_path, arrays, {"wq": storage})
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "layers.0.attention.wq.weight", "stride [16, 1]", "repeats storage items")


def test_extent_beyond_the_storage_is_refused(capsys, tmp_path):
    arrays = fixture_arrays()
    storage = arrays["layers.0.attention.wq.weight"].reshape(-1)
    arrays["layers.0.attention.wq.weight"] = TorchView("wq", (32, 32), (32, 1), offset=1)
    folder = meta_folder(tmp_path, arrays, {"wq": storage})
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "reaches item 1024 of a 1024-item storage")


def test_tensors_sharing_storage_items_are_refused(capsys, tmp_path):
    """One storage, every layer's wq a view of it: the output would repeat the input's bytes."""
    arrays = fixture_arrays()
    storage = arrays["layers.0.attention.wq.weight"].reshape(-1)
    for i in range(2):
        arrays[f"layers.{i}.attention.wq.weight"] = TorchView("wq", (32, 32))
    arrays["layers.0.attention.wo.weight"] = TorchView("wq", (32, 32))
    folder = meta_folder(tmp_path, arrays, {"wq": storage})
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "share", "attention.wq.weight", "attention.wo.weight")
    # a partial overlap (second view half-way into the first) is refused too
    big = np.concatenate([storage, storage[:512]])
    arrays = fixture_arrays()
    arrays["layers.0.attention.wq.weight"] = TorchView("s", (32, 32))
    arrays["layers.1.attention.wq.weight"] = TorchView("s", (32, 32), offset=512)
    folder = meta_folder(tmp_path, arrays, {"s": big}, name="meta2")
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "overlap", "layers.0.attention.wq.weight", "layers.1.attention.wq.weight")


def test_tied_output_may_be_the_same_view_as_the_embedding(capsys, tmp_path):
    """Two names for one view (tied weights, as torch.save writes them) are legitimate."""
    arrays = fixture_arrays()
    embedding = arrays["tok_embeddings.weight"]
    arrays["tok_embeddings.weight"] = TorchView("emb", embedding.shape)
    arrays["output.weight"] = TorchView("emb", embedding.shape)
    folder = meta_folder(tmp_path, arrays, {"emb": embedding})
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "f32", "--quiet")
    assert code == 0, err
    gguf = GGUFFile(tmp_path / "o.gguf")
    assert np.array_equal(gguf.raw("output.weight"), gguf.raw("token_embd.weight"))


def test_zip_members_aliasing_the_same_bytes_are_refused(capsys, tmp_path):
    """Two storages whose zip entries point at the same bytes: output larger than the input."""
    arrays = fixture_arrays()
    wq = arrays["layers.0.attention.wq.weight"]
    arrays["layers.0.attention.wq.weight"] = TorchView("a", wq.shape)
    arrays["layers.1.attention.wq.weight"] = TorchView("b", wq.shape)
    folder = meta_folder(tmp_path, arrays, {"a": wq, "b": wq})
    path = folder / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        a = zf.getinfo("archive/data/a")
    # point b's central directory entry at a's local header (same size, same bytes)
    position = 0
    while True:
        position = data.find(b"PK\x01\x02", position)
        assert position >= 0
        name_len = int.from_bytes(data[position + 28:position + 30], "little")
        if bytes(data[position + 46:position + 46 + name_len]) == b"archive/data/b":
            data[position + 42:position + 46] = a.header_offset.to_bytes(4, "little")
            break
        position += 4
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "consolidated.00.pth", "archive/data/b")


def test_one_storage_key_with_two_types_is_refused(tmp_path):
    """Storage "a" read as 1024 bfloat16 items by one tensor and as 512 floats by another."""
    wq = fixture_arrays()["layers.0.attention.wq.weight"]
    first = torch_pickle({"wq": TorchView("a", (32, 32))}, {"a": ("BFloat16Storage", 1024)})
    second = torch_pickle({"wk": TorchView("a", (16, 32))}, {"a": ("FloatStorage", 512)})
    body = first[:-2] + second[4:-2] + b"u."  # both entries in one SETITEMS
    path = write_torch_zip(tmp_path / "x.pth", body, {"a": wq.tobytes()})
    with pytest.raises(ModelFormatError, match="storage 'a'.*BFloat16Storage.*FloatStorage"):
        TorchCheckpoint(path)


def test_vocabulary_padding_is_bounded(capsys, tmp_path):
    """A 264-token tokenizer next to a 70000-row embedding: 69736 [PAD] entries refused."""
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=16, vocab_size=70000, tied=True)
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 1
    assert_one_line_error(err, "tokenizer.json", "264 tokens", "vocab_size 70000", "65536")


def test_sentencepiece_far_larger_than_the_embedding_stops_early(tmp_path, baseline_rss):
    """2M one-byte pieces for a 259-row embedding: refused after piece 260, not after parsing all."""
    folder = meta_folder(tmp_path)
    piece = b"\x0a\x05\x0a\x01a\x18\x01"  # field 1 (piece) of 5 bytes: text "a", type NORMAL
    (folder / "tokenizer.model").write_bytes(piece * 2_000_000)
    code, err, rss = measured_child([folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run"])
    assert code == 1
    assert_one_line_error(err, "tokenizer.model", "more than", "pieces")
    assert rss < baseline_rss + 14 * MIB + 32 * MIB  # the file's bytes, plus a little


_VIEW_AFTER_CLOSE = """
import sys
import numpy as np
from quantize.pickle_reader import TorchCheckpoint
from quantize.safetensors import SafetensorsFile
st = SafetensorsFile(sys.argv[1])
kept = st.array("model.norm.weight")
st.close()
ckpt = TorchCheckpoint(sys.argv[2])
items = ckpt.tensors["norm.weight"].items
ckpt.close()
print(float(np.asarray(kept, np.float64).sum()), float(np.asarray(items, np.float64).sum()))
"""


def test_views_outlive_a_closed_reader(tiny):
    """Closing a reader must not unmap pages a view still points at (np.memmap's map could be
    closed under live views: reading one then crashed the process)."""
    result = subprocess.run([sys.executable, "-c", _VIEW_AFTER_CLOSE, str(tiny / "model.safetensors"),
                             str(FIXTURE / "consolidated.00.pth")], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.split()) == 2


# ===== 12: the restricted unpickler's stack, memo and work are capped =============================

def _pickle_folder(tmp_path: Path, body: bytes, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURE / "params.json", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder)
    write_torch_zip(folder / "consolidated.00.pth", body, {})
    return folder


FLOODS = {
    "dup": (b"\x80\x02}" + b"2" * 20_000_000 + b".", "stack"),          # DUP: one byte, one more reference
    "mark": (b"\x80\x02" + b"(" * 20_000_000 + b".", "stack"),          # MARK: a new list per byte
    "empty_dicts": (b"\x80\x02]" + b"}a" * 10_000_000 + b".", "operations"),  # a dict per two bytes
    "tuple_chain": (b"\x80\x02N" + b"2\x85" * 10_000_000 + b".", "stack"),    # DUP TUPLE1: tuples pile up
    "memo": (b"\x80\x02N" + b"".join(b"r" + struct.pack("<I", i) for i in range(2_000_000)) + b".", "memo"),
    "busy": (b"\x80\x02N" + b"20" * 10_000_000 + b".", "operations"),    # DUP POP: no growth, only work
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_pickle_floods_are_capped(tmp_path, baseline_rss, kind):
    """Audit: 60M DUPs peaked at 1.59 GB before the clean error."""
    body, limit = FLOODS[kind]
    folder = _pickle_folder(tmp_path, body, "meta")
    code, err, rss = measured_child([folder, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run"])
    assert code == 1
    assert_one_line_error(err, "consolidated.00.pth", limit, "limit")
    # the pickle's bytes are read once; the caps keep the rest to a few tens of MB
    assert rss < baseline_rss + 2 * len(body) + 64 * MIB


def test_compressed_pickle_is_refused(tmp_path):
    """torch.save never compresses: a deflated data.pkl is how 60 MB of DUPs fit in 138 KB."""
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}" + b"2" * 1_000_000 + b".")
    with pytest.raises(ModelFormatError, match="data.pkl is compressed"):
        TorchCheckpoint(path)


@pytest.mark.parametrize("body, name", [
    (b"\x80\x04\x8f.", "EMPTY_SET"),
    (b"\x80\x04(\x91.", "FROZENSET"),
    (b"\x80\x05\x96" + struct.pack("<Q", 1 << 34) + b".", "BYTEARRAY8"),
    (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "NEWOBJ"),
    (b"\x80\x02(ccollections\nOrderedDict\no.", "OBJ"),
    (b"\x80\x02(icollections\nOrderedDict\n.", "INST"),
    (b"\x80\x02\x82\x01.", "EXT1"),
    (b"\x80\x02P0\n.", "PERSID"),
    (b"\x80\x05\x97.", "NEXT_BUFFER"),
])
def test_opcodes_a_state_dict_never_uses_are_refused(tmp_path, body, name):
    path = write_torch_zip(tmp_path / "x.pth", body, {})
    with pytest.raises(ModelFormatError, match=f"opcode {name}"):
        TorchCheckpoint(path)


def test_state_dict_with_metadata_attribute_is_read(tmp_path):
    """model.state_dict() carries ``_metadata`` (set through BUILD): real checkpoints look like this."""
    arrays = fixture_arrays()
    folder = meta_folder(tmp_path, arrays, state_dict_metadata=True)
    ckpt = TorchCheckpoint(folder / "consolidated.00.pth")
    assert set(ckpt.tensors) == set(arrays)
    assert np.array_equal(ckpt.tensors["norm.weight"].items, arrays["norm.weight"])
    ckpt.close()


def test_build_that_replaces_a_tensor_is_refused(capsys, tmp_path):
    """Audit: a BUILD setting a tensor's ``items`` to a string gave an AttributeError traceback."""
    arrays = fixture_arrays()
    folder = meta_folder(tmp_path, arrays)
    path = folder / "consolidated.00.pth"
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    body = members["archive/data.pkl"]
    cut = body.index(b"tR") + 2  # right after the first tensor is rebuilt
    op = lambda v: pickle.dumps(v, protocol=2)[2:-1]
    members["archive/data.pkl"] = body[:cut] + b"}" + op("items") + op("junk") + b"sb" + body[cut:]
    with zipfile.ZipFile(path, "w") as zf:
        for n, v in members.items():
            zf.writestr(n, v)
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "consolidated.00.pth", "BUILD", "StoredTensor")


# ===== 13: hostile config values are one-line errors naming the key ===============================

HOSTILE = [2**40, 2**64, 10**400, -5, 0, -1, 1.5, "x", "", None, [], {}, True, False,
           float("nan"), float("inf"), -float("inf"), 1e308, 1e-320, "12", [2**70], {"a": 1}]
MISSING = object()
HF_KEYS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "tie_word_embeddings", "rope_scaling", "architectures", "model_type", "bos_token_id", "eos_token_id",
           "pad_token_id", "_name_or_path"]
ALIASES = {"architectures": "architecture", "model_type": "architecture", "bos_token_id": "bos",
           "eos_token_id": "eos", "pad_token_id": "pad"}


def assert_loads_in_the_runtime(path: Path) -> None:
    from edgellama.config import ModelArgs

    gguf = GGUFFile(path)
    try:
        ModelArgs.from_gguf(gguf)
    finally:
        gguf.close()


def _one_line_or_success(capsys, folder, tmp_path, key) -> None:
    """A hostile value either converts to a file that passes the runtime's checks, or is refused in
    one line that names the key; never a traceback."""
    out = tmp_path / "o.gguf"
    code, _, err = run(capsys, folder, out, "--type", "q8_0", "--dry-run")
    assert code in (0, 1), err
    if code == 1:
        line = error_line(err)
        assert key in line or ALIASES.get(key, key) in line, line
        return
    code, _, err = run(capsys, folder, out, "--type", "q8_0", "--quiet", "--force")
    assert code == 0, err
    assert_loads_in_the_runtime(out)


@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_config_fuzz(capsys, tmp_path, key):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    original = json.loads((folder / "config.json").read_text())
    for value in HOSTILE + [MISSING]:
        config = dict(original)
        if value is MISSING:
            config.pop(key, None)
        else:
            config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        _one_line_or_success(capsys, folder, tmp_path, key)


@pytest.mark.parametrize("key", ["type", "factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"])
@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_hf_rope_scaling_fuzz(capsys, tmp_path, key, kind):
    """Audit: factor "x" gave a ValueError traceback, a missing factor a KeyError."""
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    base = {"type": kind, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    for value in HOSTILE + [MISSING]:
        scaling = dict(base)
        if value is MISSING:
            scaling.pop(key)
        else:
            scaling[key] = value
        edit_json(folder / "config.json", rope_scaling=scaling)
        _one_line_or_success(capsys, folder, tmp_path, key if key != "type" else "rope_scaling")


def test_linear_rope_scaling_needs_its_factor(capsys, tiny, tmp_path):
    edit_json(tiny / "config.json", rope_scaling={"type": "linear"})
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "config.json", "rope_scaling", "factor", "missing")


def test_context_length_beyond_the_limit_is_refused(capsys, tiny, tmp_path):
    """Audit: max_position_embeddings 2^40 gave an OverflowError traceback when writing."""
    edit_json(tiny / "config.json", max_position_embeddings=2**40)
    for extra in ([], ["--dry-run"]):
        code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", *extra)
        assert code == 1
        assert_one_line_error(err, "config.json", "max_position_embeddings", "1099511627776", "limit")
    assert not (tmp_path / "o.gguf").exists()


META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "max_seq_len",
             "use_scaled_rope", "multiple_of", "ffn_dim_multiplier"]


@pytest.mark.parametrize("key", META_KEYS)
def test_meta_params_fuzz(capsys, tmp_path, key):
    """Audit: max_seq_len -5 gave an OverflowError traceback."""
    folder = meta_folder(tmp_path)
    original = json.loads((folder / "params.json").read_text())
    for value in HOSTILE + [MISSING]:
        params = dict(original)
        if value is MISSING:
            params.pop(key, None)
        else:
            params[key] = value
        (folder / "params.json").write_text(json.dumps(params))
        _one_line_or_success(capsys, folder, tmp_path, key)


TOKENIZER_CONFIG_KEYS = ["add_bos_token", "add_eos_token", "chat_template", "bos_token", "eos_token", "unk_token",
                         "pad_token", "added_tokens_decoder"]


@pytest.mark.parametrize("key", TOKENIZER_CONFIG_KEYS)
def test_tokenizer_config_fuzz(capsys, tmp_path, key):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    original = json.loads((folder / "tokenizer_config.json").read_text())
    values = HOSTILE + [MISSING, {"\u00b2": {"content": "x"}}, {"7" * 5000: {"content": "x"}},
                        {"5": {"content": 5}}, {"5": "x"}, {"-1": {"content": "x"}}, ["x", 5], "\ud800"]
    for value in values:
        config = dict(original)
        if value is MISSING:
            config.pop(key, None)
        else:
            config[key] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        _one_line_or_success(capsys, folder, tmp_path, key)


@pytest.mark.parametrize("edit", [
    lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": "x"},
                                                                            {"type": "ByteLevel"}]}),
    lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": 5}),
    lambda t: t.update(pre_tokenizer=[1, 2]),
    lambda t: t.update(post_processor={"type": "TemplateProcessing", "single": 5}),
    lambda t: t.update(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": "x"}]}),
    lambda t: t.update(post_processor={"type": "Sequence", "processors": 7}),
    lambda t: t.update(added_tokens={"a": 1}),
    lambda t: t["added_tokens"].append({"id": 10**400, "content": "x"}),
    lambda t: t["model"].update(vocab={"\ud800": 300}),
    lambda t: t["model"].update(merges=[["\ud800", "a"]]),
    lambda t: t["model"].update(merges=5),
    lambda t: t.update(model=[]),
    lambda t: t.update(model={"type": "BPE", "vocab": [], "merges": []}),
], ids=lambda f: "edit")
def test_hostile_tokenizer_json_is_one_line(capsys, tiny, tmp_path, edit):
    tok = json.loads((tiny / "tokenizer.json").read_text())
    edit(tok)
    (tiny / "tokenizer.json").write_text(json.dumps(tok))
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0")
    assert code in (0, 1), err
    if code == 1:
        assert_one_line_error(err, "tokenizer")
    else:
        assert_loads_in_the_runtime(tmp_path / "o.gguf")


# ===== 14: --report follows the output's rules ====================================================

def test_report_never_overwrites_an_input_file(capsys, tiny, tmp_path):
    """Audit: --report overwrote the input folder's config.json and model.safetensors (exit 0)."""
    for victim in ("config.json", "model.safetensors"):
        before = (tiny / victim).read_bytes()
        for extra in ([], ["--dry-run"], ["--force"], ["--force", "--dry-run"]):
            code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--report", tiny / victim,
                               *extra)
            assert code == 1
            assert_one_line_error(err, "--report", victim, "input")
            assert (tiny / victim).read_bytes() == before
            assert not (tmp_path / "o.gguf").exists()
    src = small_gguf(tmp_path / "m.gguf")
    before = src.read_bytes()
    os.link(src, tmp_path / "alias.json")
    for report in (src, tmp_path / "alias.json"):
        code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "f16", "--report", report, "--force")
        assert code == 1
        assert_one_line_error(err, "--report", "input")
    assert src.read_bytes() == before


def test_report_never_overwrites_an_existing_file_without_force(capsys, tiny, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    for extra in ([], ["--dry-run"]):
        code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--report", other, *extra)
        assert code == 1
        assert_one_line_error(err, "--report", "notes.txt", "exists", "--force")
        assert other.read_text() == "precious"
        assert not (tmp_path / "o.gguf").exists()
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--report", other, "--force",
                       "--dry-run")
    assert code == 0, err
    assert json.loads(other.read_text())["dry_run"] is True


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("which", ["o.gguf", "r.json"])
def test_a_file_made_at_the_output_or_report_name_while_converting(capsys, tiny, tmp_path, monkeypatch, which, force):
    """Adversarial pass: the existence check ran once at the start, and the file a user (or a second
    run) made at the output's (or report's) name during the conversion was replaced without
    --force.  Now it stays, and the command says why; with --force it is replaced, as an existing
    one would be."""
    out, report, made = tmp_path / "o.gguf", tmp_path / "r.json", tmp_path / which
    real = convert.convert_tensor

    def meanwhile(*a, **k):
        if not made.exists():
            made.write_text("made meanwhile")
        return real(*a, **k)

    monkeypatch.setattr(convert, "convert_tensor", meanwhile)
    args = ["--type", "q8_0", "--report", report, "--quiet"] + (["--force"] if force else [])
    code, _, err = run(capsys, tiny, out, *args)
    if force:
        assert code == 0, err
        assert GGUFFile(out).tensors and json.loads(report.read_text())["output"] == str(out)
    else:
        assert code == 1
        assert_one_line_error(err, which, "made while converting", "not replaced", "--force")
        assert made.read_text() == "made meanwhile"
        if which == "r.json":  # (the output was written before the report)
            assert GGUFFile(out).tensors
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == sorted({"o.gguf", which} if not force
                                                                                 else {"o.gguf", "r.json"})


@pytest.mark.parametrize("links", [True, False])
def test_publish_never_replaces_without_replace(tmp_path, monkeypatch, links):
    """edgellama.gguf.publish, with hard links and without (FAT, exFAT: the fallback checks last)."""
    from edgellama.gguf import publish

    if not links:
        def no_links(*_):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    tmp, dst = tmp_path / ".new.partial", tmp_path / "new"
    tmp.write_text("new")
    dst.write_text("old")
    with pytest.raises(FileExistsError):
        publish(tmp, dst, replace=False)
    assert dst.read_text() == "old" and tmp.exists()
    dst.unlink()
    publish(tmp, dst, replace=False)
    assert dst.read_text() == "new" and not tmp.exists()
    tmp.write_text("newer")
    publish(tmp, dst, replace=True)
    assert dst.read_text() == "newer" and not tmp.exists()


def test_report_and_output_must_differ(capsys, tiny, tmp_path):
    out = tmp_path / "o.gguf"
    code, _, err = run(capsys, tiny, out, "--type", "q8_0", "--report", out)
    assert code == 1
    assert_one_line_error(err, "--report", "output")
    assert only_files(tmp_path) == ["hf"]


def test_report_folder_must_exist_and_report_is_atomic(capsys, tiny, tmp_path, monkeypatch):
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--report", tmp_path / "no" / "r.json")
    assert code == 1
    assert_one_line_error(err, "--report", "does not exist")
    assert only_files(tmp_path) == ["hf"]
    report = tmp_path / "r.json"
    report.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", fail)
    monkeypatch.setattr(json, "dumps", fail)
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0", "--report", report, "--force",
                       "--dry-run")
    assert code == 1 and "Traceback" not in err
    assert report.read_text() == "old"
    assert only_files(tmp_path) == ["hf", "r.json"]


# ===== 15: SIGTERM like SIGINT; stale temp files are reported =====================================

_BLOCKING_RUN = """
import os, sys, time
from quantize import cli, convert
real = convert.convert_tensor
calls = []
def slow(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        print("READY", flush=True)   # the temp file exists and holds two tensors
        while True:
            time.sleep(0.05)         # wait here until the signal arrives
    return real(*args, **kwargs)
convert.convert_tensor = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_leaves_nothing(tiny, tmp_path, signum, code):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_RUN, str(tiny), str(out_dir / "m.gguf"), "--type",
                             "q8_0", "--report", str(out_dir / "r.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "READY"  # an observable state, not a delay
    assert [p.name for p in out_dir.iterdir()][0].endswith(".partial")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert ("terminated" if signum == signal.SIGTERM else "interrupted") in err and "Traceback" not in err
    assert only_files(out_dir) == []


@pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the SmolLM2 model")
def test_sigterm_to_a_real_run_leaves_no_half_file(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "quantize", str(SMOLLM2), str(out_dir / "m.gguf"), "--type", "f16",
                             "--allow-requantize"], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    while not any(out_dir.iterdir()) and proc.poll() is None:
        os.sched_yield()  # wait for an observable state: the temp file exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished first (a real race): then the output is complete
        assert only_files(out_dir) == ["m.gguf"]
        assert len(GGUFFile(out_dir / "m.gguf").tensors) == 272
    else:
        assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
        assert only_files(out_dir) == []


def test_a_signal_inside_numba_waits_for_the_next_tensor():
    """Raised inside llvmlite (a kernel being loaded), the exception would leave half-built LLVM
    objects complaining on stderr; there the signal is kept and raised at the next tensor boundary."""
    namespace = {"__name__": "llvmlite.binding.fake"}
    exec("import sys\ndef here():\n    return sys._getframe()", namespace)
    inside = namespace["here"]()
    cli._pending_signals.clear()
    cli._terminate(signal.SIGTERM, inside)  # no exception here
    with pytest.raises(cli.Terminated):
        cli._check_pending()
    cli._check_pending()  # raised once
    with pytest.raises(cli.Terminated):
        cli._terminate(signal.SIGTERM, sys._getframe())  # anywhere else: at once


def test_stale_partial_files_are_named_in_a_warning(capsys, tiny, tmp_path):
    out = tmp_path / "m.gguf"
    stale = [tmp_path / ".m.gguf.k2j4x9.partial", tmp_path / ".r.json.a81x0q.partial"]
    for p in stale:
        p.write_bytes(b"half")
    unrelated = tmp_path / ".other.gguf.zz.partial"
    unrelated.write_bytes(b"x")
    code, _, err = run(capsys, tiny, out, "--type", "q8_0", "--quiet", "--report", tmp_path / "r.json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("edgellama-quantize: warning:")]
    assert any(str(stale[0]) in line for line in warnings), err
    assert any(str(stale[1]) in line for line in warnings), err
    assert not any(".other.gguf" in line for line in warnings)
    assert all(p.exists() for p in stale)  # reported, not deleted: another run may own them


# ===== 17: every quantized source type needs --allow-requantize ===================================

def test_quantized_means_more_than_one_element_per_block():
    from quantize import policy

    expected = {t for t, (elements, _) in BLOCK_LAYOUT.items() if elements > 1}
    assert {t for t in GGMLType if policy.is_quantized(t)} == expected
    assert {GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ2_XXS} <= expected


@pytest.mark.parametrize("qtype", [GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q6_K,
                                   GGMLType.IQ4_NL, GGMLType.IQ2_XXS, GGMLType.TQ1_0])
def test_any_quantized_source_needs_allow_requantize(capsys, tmp_path, qtype):
    """Audit: Q5_0 / Q5_1 / K-quant sources were converted without --allow-requantize or a warning."""
    src = tiny_gguf(tmp_path / "m.gguf", types={"blk.0.ffn_down.weight": qtype})
    code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "1 tensors are already quantized", qtype.name, "--allow-requantize")
    code, out, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0", "--dry-run")
    assert code == 0, err
    assert "warning: 1 tensors are already quantized" in err and qtype.name in err and "--allow-requantize" in err
    assert not (tmp_path / "o.gguf").exists()
    code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0", "--allow-requantize", "--quiet")
    from quantize.blocks import READABLE_TYPES

    if qtype not in READABLE_TYPES:  # no decoder: refused before the temp file exists
        assert code == 1
        assert_one_line_error(err, "blk.0.ffn_down.weight", qtype.name, "cannot be decoded")
        assert only_files(tmp_path) == ["m.gguf"]
    else:
        assert code == 0, err
        assert "requantizing 1 tensors" in err
        assert GGUFFile(tmp_path / "o.gguf").tensors["blk.0.ffn_down.weight"].qtype == GGMLType.Q8_0


# ===== 16: the metadata written passes the runtime's own checks ===================================

@pytest.mark.parametrize("key, value", [
    ("llama.attention.head_count", (ValueType.UINT32, 0)),
    ("llama.attention.head_count", (ValueType.UINT32, 3)),
    ("llama.attention.head_count_kv", (ValueType.UINT32, 3)),
    ("llama.rope.dimension_count", (ValueType.INT32, -2)),
    ("llama.rope.dimension_count", (ValueType.UINT32, 0)),
    ("llama.rope.dimension_count", (ValueType.UINT32, 17)),
    ("llama.rope.scaling.factor", (ValueType.FLOAT32, float("nan"))),
    ("llama.rope.scaling.factor", (ValueType.FLOAT32, float("inf"))),
    ("llama.rope.scaling.factor", (ValueType.FLOAT32, 0.5)),
    ("llama.block_count", (ValueType.UINT32, 10**8)),
    ("llama.block_count", (ValueType.UINT32, 1)),
    ("llama.vocab_size", (ValueType.UINT32, 5)),
    ("llama.attention.layer_norm_rms_epsilon", (ValueType.FLOAT32, -1.0)),
    ("llama.rope.freq_base", (ValueType.FLOAT32, 0.0)),
    ("llama.context_length", (ValueType.UINT64, 2**40)),
    ("llama.embedding_length", (ValueType.UINT32, 0)),
    ("llama.feed_forward_length", None),
    ("general.architecture", (ValueType.STRING, "gpt2")),
    # the tokenizer's (adversarial pass: these were copied through with exit 0)
    ("tokenizer.ggml.eos_token_id", (ValueType.UINT32, 99999)),
    ("tokenizer.ggml.merges", (ValueType.ARRAY, (ValueType.STRING, ["zzz yyy"]))),
    ("tokenizer.ggml.tokens", (ValueType.ARRAY, (ValueType.STRING, ["a"] * 261))),
    ("tokenizer.ggml.token_type", (ValueType.ARRAY, (ValueType.INT32, [1] * 7))),
    ("tokenizer.ggml.model", (ValueType.STRING, "wordpiece")),
])
def test_metadata_the_runtime_refuses_is_never_written(capsys, tmp_path, key, value):
    """Audit: head_count 0 and rope dimension -2 were copied into the output."""
    src = tiny_gguf(tmp_path / "m.gguf", metadata={key: value})
    for extra in (["--dry-run"], []):
        code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0", *extra)
        assert code == 1
        assert_one_line_error(err, "m.gguf", key)
    assert only_files(tmp_path) == ["m.gguf"]


def _poke(path: Path, tensor: str, index: int, value: bytes) -> None:
    """Write ``value`` over item ``index`` (of len(value) bytes) of a tensor's stored data."""
    gguf = GGUFFile(path)
    offset = gguf.tensors[tensor].offset + index * len(value)
    gguf.close()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(value)


@pytest.mark.parametrize("stored, target, poke", [
    (None, "q8_0", np.float32(np.nan).tobytes()),                     # a norm (always copied)
    (None, "f32", np.float32(-np.inf).tobytes()),                     # F32 kept F32
    (GGMLType.F16, "f16", np.float16(np.inf).tobytes()),              # F16 kept F16
    (GGMLType.Q8_0, "q8_0", np.float16(np.nan).tobytes()),            # a block's scale, Q8_0 kept
])
def test_nan_or_inf_in_a_tensor_copied_as_stored_is_refused(capsys, tmp_path, stored, target, poke):
    """Adversarial pass: NaN / Inf in a tensor copied rather than converted (the norms; any tensor
    already of the target type) went into the output, while the same in a converted one is refused."""
    name = "output_norm.weight" if stored is None else "blk.0.attn_q.weight"
    src = tiny_gguf(tmp_path / "m.gguf", types={} if stored is None else {name: stored})
    _poke(src, name, 0, poke)  # the first value (Q8_0: the first block's scale)
    code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", target)
    assert code == 1, err
    assert_one_line_error(err, name, "NaN/Inf", "refusing")
    assert only_files(tmp_path) == ["m.gguf"]


def test_finite_values_beyond_half_precision_are_refused_for_f16(capsys, tmp_path):
    """Adversarial pass: a weight of 1e6 became an F16 inf, written without a word (Q4_0 refused it)."""
    from quantize.safetensors import SafetensorsFile, write_safetensors

    hf = make_tiny_hf_checkpoint(tmp_path / "hf", dtype="F32")
    st = hf / "model.safetensors"
    f = SafetensorsFile(st)
    arrays = {n: np.array(f.array(n)) for n in f.tensors}
    f.close()
    arrays["model.layers.0.self_attn.q_proj.weight"].reshape(-1)[5] = 1e6
    write_safetensors(st, arrays)
    code, _, err = run(capsys, hf, tmp_path / "o.gguf", "--type", "f16")
    assert code == 1
    assert_one_line_error(err, "q_proj", "1 value(s) overflow half precision in F16", "refusing")
    assert not (tmp_path / "o.gguf").exists()
    code, _, err = run(capsys, hf, tmp_path / "o.gguf", "--type", "f32", "--quiet")  # (F32 holds it)
    assert code == 0, err


@pytest.mark.parametrize("alignment", [64, 16, 32])
def test_an_input_with_another_alignment_gives_an_output_laid_out_as_its_key_says(capsys, tmp_path, alignment):
    """Adversarial pass: general.alignment = 64 was copied from the input while the data was laid
    out at 32 (llama-quantize does the same): an output neither runtime loads."""
    src = tiny_gguf(tmp_path / "m.gguf", metadata={"general.alignment": (ValueType.UINT32, alignment)})
    assert GGUFFile(src).alignment == alignment
    code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0", "--quiet")
    assert code == 0, err
    out = GGUFFile(tmp_path / "o.gguf")  # (its parser checks every offset against the alignment)
    assert out.alignment == alignment and out.metadata["general.alignment"] == alignment
    assert out.data_offset % alignment == 0
    assert all((t.offset - out.data_offset) % alignment == 0 for t in out.tensors.values())
    assert_loads_in_the_runtime(tmp_path / "o.gguf")


def test_hf_rope_factor_the_runtime_refuses_is_never_written(capsys, tiny, tmp_path):
    edit_json(tiny / "config.json", rope_scaling={"type": "linear", "factor": 0.5})
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "the metadata to be written", "llama.rope.scaling.factor", "0.5")


def test_every_output_of_the_readers_passes_the_runtime(capsys, tiny, tmp_path):
    for i, source in enumerate([tiny, FIXTURE, FIXTURE / "mp2", tiny_gguf(tmp_path / "m.gguf")]):
        out = tmp_path / f"o{i}.gguf"
        code, _, err = run(capsys, source, out, "--type", "q4_0", "--quiet")
        assert code == 0, err
        assert_loads_in_the_runtime(out)


# ===== issue 12, item 12: llama-quantize's positional type; progress only on a terminal ===========

def test_positional_type_like_llama_quantize(capsys, tiny, tmp_path):
    code, _, err = run(capsys, tiny, tmp_path / "a.gguf", "q4_0", "--quiet")
    assert code == 0, err
    assert GGUFFile(tmp_path / "a.gguf").tensors["blk.0.attn_q.weight"].qtype == GGMLType.Q4_0
    code, _, err = run(capsys, tiny, tmp_path / "b.gguf", "Q8_0", "1", "--quiet")  # type, then nthreads
    assert code == 0, err
    assert GGUFFile(tmp_path / "b.gguf").tensors["blk.0.attn_q.weight"].qtype == GGMLType.Q8_0


@pytest.mark.parametrize("argv, fragment", [
    (["q4_0", "--type", "q8_0"], "--type"),
    (["q9_9"], "unknown type 'q9_9'"),
    ([], "type"),
    (["q8_0", "zero"], "threads"),
])
def test_positional_type_errors(capsys, tiny, tmp_path, argv, fragment):
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", *argv)
    assert code == 2
    assert_one_line_error(err, fragment)


def test_piped_stderr_gets_lines_not_a_bar(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "quantize", str(tiny), str(tmp_path / "o.gguf"), "q8_0"],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "tensor/s]" not in result.stderr
    groups = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split()[:2] for line in groups] == [["[3/21]", "global"], ["[12/21]", "blk.0"],
                                                     ["[21/21]", "blk.1"]], result.stderr
    assert "wrote" in result.stderr


def test_terminal_stderr_gets_the_progress_bar(tiny, tmp_path):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "quantize", str(tiny), str(tmp_path / "o.gguf"), "q8_0"],
                            stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "tensor" in text, text


# ===== memory caps on containers and JSON: checked before the parser allocates ===================

def test_zip_with_a_flood_of_members_is_refused_before_zipfile_reads_it(tmp_path):
    """zipfile reads the whole central directory and makes an object per member: 70,000 empty
    members (past 65,535, so the count is in zip64's end record) are refused from the end records."""
    from quantize.pickle_reader import MAX_ZIP_MEMBERS

    path = tmp_path / "flood.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}.")
        for i in range(MAX_ZIP_MEMBERS + 5000):
            zf.writestr(f"archive/data/{i}", b"")
    with pytest.raises(ModelFormatError, match=r"flood.pth: the zip's central directory declares 70537 members.*"
                                               r"MAX_ZIP_MEMBERS"):
        TorchCheckpoint(path)


def test_safetensors_header_of_tiny_values_is_refused_before_parsing(tmp_path):
    """1.1 million zeros in a shape: 2.2 MB of header, tens of MB of Python objects once parsed."""
    from quantize.safetensors import MAX_HEADER_ITEMS, SafetensorsFile

    shape = ",".join(["0"] * (MAX_HEADER_ITEMS + 10))
    header = ('{"a":{"dtype":"F32","shape":[' + shape + '],"data_offsets":[0,0]}}').encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelFormatError, match=r"model.safetensors: header holds up to \d+ JSON values.*"
                                               r"MAX_HEADER_ITEMS"):
        SafetensorsFile(path)


def test_json_files_of_tiny_values_are_refused_before_parsing(tmp_path):
    from quantize.vocab import MAX_JSON_ITEMS, read_json

    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"[" + b",".join([b"0"] * (MAX_JSON_ITEMS + 1)) + b"]")
    with pytest.raises(ModelFormatError, match=r"tokenizer.json: holds up to \d+ JSON values.*MAX_JSON_ITEMS"):
        read_json(path, "tokenizer.json")
    path.write_bytes(b"[" + b",".join([b"0"] * 1000) + b"]")  # (the real ones: tests/test_quantize_hf.py)
    assert read_json(path, "tokenizer.json") == [0] * 1000
