"""Meta layout (params.json + consolidated.*.pth + tokenizer.model) through the restricted unpickler.

The fixture tests/fixtures/meta_tiny/ was made once by tools/make_meta_fixture.py with torch;
these tests never import torch.  Hostile pickles (a ``__reduce__`` calling os.system, eval, ...)
must be refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile, ModelFormatError
from edgellama.quants import GGMLType, dequantize
from quantize.cli import main as cli_main
from quantize.convert import convert_file
from quantize.pickle_reader import TorchCheckpoint
from quantize.source import QuantizeError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "meta_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def test_fixture_is_small():
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 200_000


@pytest.mark.parametrize("folder", [FIXTURE, FIXTURE / "mp2"], ids=["single", "model_parallel"])
def test_meta_checkpoint_converts_to_the_exact_weights(tmp_path, folder):
    out = tmp_path / "meta.gguf"
    convert_file(folder, out, "f32", quiet=True)
    gguf = GGUFFile(out)
    assert set(gguf.tensors) == set(EXPECTED["tensors"])  # rope.freqs dropped, as llama.cpp does
    for name, expected in EXPECTED["tensors"].items():
        info = gguf.tensors[name]
        assert list(info.shape) == expected["shape"], name
        assert hashlib.sha256(gguf.raw(name).tobytes()).hexdigest() == expected["sha256"], name
    md = gguf.metadata
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.feed_forward_length"]) == (2, 32, 64)
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"]) == (4, 2)
    assert md["llama.vocab_size"] == EXPECTED["n_vocab"] == len(md["tokenizer.ggml.tokens"])
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["llama.context_length"] == 4096  # llama.cpp's guess for norm_eps 1e-5 (Llama 2)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_meta_checkpoint_quantizes(tmp_path, qtype):
    from gguf import quants as gguf_quants
    from gguf.constants import GGMLQuantizationType

    convert_file(FIXTURE, tmp_path / "f32.gguf", "f32", quiet=True)
    convert_file(FIXTURE, tmp_path / "q.gguf", qtype, quiet=True)
    f32, q = GGUFFile(tmp_path / "f32.gguf"), GGUFFile(tmp_path / "q.gguf")
    for name, info in q.tensors.items():
        values = dequantize(f32.raw(name), GGMLType.F32, info.shape)
        reference = gguf_quants.quantize(values, GGMLQuantizationType(int(info.qtype)))
        assert np.array_equal(q.raw(name), np.ascontiguousarray(reference).view(np.uint8).ravel()), name
    expected_output = GGMLType.Q8_0 if qtype in ("q4_0", "q4_1") else GGMLType[qtype.upper()]
    assert q.tensors["output.weight"].qtype == expected_output


def test_meta_tokenizer_encodes_with_byte_fallback(tmp_path):
    from edgellama.tokenizer import Tokenizer

    convert_file(FIXTURE, tmp_path / "m.gguf", "q8_0", quiet=True)
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(tmp_path / "m.gguf").metadata, "meta_tiny")
    ids = tokenizer.encode("the cat and the hat", add_bos=True)
    assert ids[0] == 1 and tokenizer.decode(ids) == "the cat and the hat"
    assert tokenizer.token_text(ids[1]) == "▁the"
    ids = tokenizer.encode("Zürich €")  # capitals and non-ASCII fall back to byte pieces
    assert tokenizer.decode(ids) == "Zürich €"


def test_meta_through_the_cli(tmp_path, capsys):
    code = cli_main([str(FIXTURE), str(tmp_path / "m.gguf"), "--type", "q4_0", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["n_tensors"] == 21


# ----- hostile and broken pickles ----------------------------------------------------------------

def torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A file laid out like torch.save's: archive/data.pkl, archive/data/<key>, archive/version."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


class _Payload:
    """Pickles into a call of ``func(*args)`` at load time: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def meta_folder_with(tmp_path: Path, pth_bytes: bytes | None = None, pth_path: Path | None = None) -> Path:
    folder = tmp_path / "meta"
    folder.mkdir()
    shutil.copy(FIXTURE / "params.json", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder)
    target = folder / "consolidated.00.pth"
    if pth_path is not None:
        shutil.copy(pth_path, target)
    else:
        target.write_bytes(pth_bytes)
    return folder


@pytest.mark.parametrize("payload, global_name", [
    (_Payload(os.system, "touch {marker}"), "system"),
    (_Payload(eval, "open('{marker}', 'w')"), "eval"),
    (_Payload(exec, "open('{marker}', 'w')"), "exec"),
    (_Payload(__import__, "shutil"), "__import__"),
    (_Payload(np.load, "{marker}"), "numpy"),
])
def test_reduce_payloads_are_refused_before_running(tmp_path, capsys, payload, global_name):
    marker = tmp_path / "pwned"
    payload.args = tuple(a.format(marker=marker) if isinstance(a, str) else a for a in payload.args)
    state = {"tok_embeddings.weight": payload}
    path = torch_zip(tmp_path / "evil.pth", pickle.dumps(state, protocol=2))
    with pytest.raises(ModelFormatError, match=f"global .*{global_name}.*refusing") as info:
        TorchCheckpoint(path)
    assert "pickles can run code" in str(info.value)
    assert not marker.exists()
    folder = meta_folder_with(tmp_path, pth_path=path)
    code = cli_main([str(folder), str(tmp_path / "out.gguf"), "--type", "q8_0"])
    err = capsys.readouterr().err
    assert code == 1 and "refusing to load it" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out.gguf").exists()


def test_a_real_fixture_with_one_global_swapped_is_refused(tmp_path):
    with zipfile.ZipFile(FIXTURE / "consolidated.00.pth") as zf:
        names = zf.namelist()
        members = {n: zf.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"torch._utils\n_rebuild_tensor_v2", b"subprocess\ncheck_output")
    assert b"subprocess" in members[pkl]
    path = tmp_path / "swapped.pth"
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, members[n])
    with pytest.raises(ModelFormatError, match="subprocess"):
        TorchCheckpoint(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x80\x02}q\x00."), "not a zip-format"),
    (lambda p: torch_zip(p, b"\x80\x02]q\x00."), "expected a dict"),
    (lambda p: torch_zip(p, b"not a pickle"), "cannot read the pickled state dict"),
    (lambda p: torch_zip(p, pickle.dumps({"x": 1})), "expected a dict of tensor names"),
    (lambda p: torch_zip(p, b"\x80\x02c__builtin__\nset\nq\x00."), "__builtin__.set"),
    (lambda p: torch_zip(p, _storage_pickle(numel=100), {"0": b"\0" * 16}), "declares 100 items"),
    (lambda p: torch_zip(p, _storage_pickle(key="9"), {"0": b"\0" * 16}), "storage '9' is missing"),
    (lambda p: torch_zip(p, _storage_pickle(size=(3, 3)), {"0": b"\0" * 16}), "reaches item 8 of a 4-item storage"),
    (lambda p: torch_zip(p, _storage_pickle(size=(-1,)), {"0": b"\0" * 16}), "bad geometry"),
])
def test_broken_checkpoints_are_refused(tmp_path, make, message):
    path = tmp_path / "broken.pth"
    make(path)
    with pytest.raises(ModelFormatError, match=message):
        TorchCheckpoint(path)


def _storage_pickle(numel: int = 4, key: str = "0", size=(2, 2)) -> bytes:
    """A pickle of {"w": tensor} as torch writes it, by hand: persistent storage id + rebuild call."""
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    op = lambda value: pickle.dumps(value, protocol=2)[2:-1]  # one value's opcodes, no header / STOP
    return (b"\x80\x02}" + op("w")                                                   # {"w":
            + b"ctorch._utils\n_rebuild_tensor_v2\n("                                  #  rebuild(
            + b"(" + op("storage") + b"ctorch\nFloatStorage\n" + op(key) + op("cpu") + op(numel)
            + b"tQ"                                                                    #   persistent id,
            + op(0) + op(size) + op(stride) + b"\x89"                                 #   0, size, stride, False,
            + b"ccollections\nOrderedDict\n)R"                                        #   OrderedDict())
            + b"tRs.")                                                                 # }


def test_hand_written_torch_pickle_is_read(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    ckpt = TorchCheckpoint(torch_zip(tmp_path / "ok.pth", _storage_pickle(), {"0": data}))
    np.testing.assert_array_equal(ckpt.tensors["w"].to_float32(), [[0, 1], [2, 3]])
    assert not ckpt.tensors["w"].items.flags.writeable
    ckpt.close()


def test_tiktoken_tokenizer_model_is_refused_clearly(tmp_path):
    folder = meta_folder_with(tmp_path, pth_path=FIXTURE / "consolidated.00.pth")
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(QuantizeError, match="tiktoken"):
        convert_file(folder, tmp_path / "o.gguf", "q8_0", quiet=True)


def test_params_that_disagree_with_the_weights_are_refused(tmp_path):
    folder = meta_folder_with(tmp_path, pth_path=FIXTURE / "consolidated.00.pth")
    params = json.loads((folder / "params.json").read_text())
    params["n_kv_heads"] = 4
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelFormatError, match=r"params.json: n_kv_heads 4 x head dimension 8 .* = 32 rows, but "
                                               r"layers\.0\.attention\.wk\.weight has shape \[16, 32\]"):
        convert_file(folder, tmp_path / "o.gguf", "q8_0", quiet=True)
