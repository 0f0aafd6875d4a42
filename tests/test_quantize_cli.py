"""edgellama-quantize: the safety rules, the plan / report / summary, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile, TensorSpec, write_gguf
from edgellama.quants import GGMLType
from quantize import cli, convert

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.make_hf_checkpoint import make_tiny_hf_checkpoint  # noqa: E402
from tools.fetch_models import SMOLLM2_FILE, cache_dir  # noqa: E402

SMOLLM2 = cache_dir() / SMOLLM2_FILE  # fetched before collection by conftest.py


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("edgellama-quantize: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_hf_checkpoint(tmp_path / "hf")


# ----- the normal path ---------------------------------------------------------------------------

def test_convert_with_report_and_summary(capsys, tiny, tmp_path):
    out, report = tmp_path / "tiny.q4_0.gguf", tmp_path / "report.json"
    code, stdout, err = run(capsys, tiny, out, "--type", "q4_0", "--report", report, "--threads", "1")
    assert code == 0, err
    assert GGUFFile(out).tensors["blk.0.attn_q.weight"].qtype == GGMLType.Q4_0
    assert "model size" in err and "quant size" in err and "tensors/s" in err and "MB/s" in err
    assert "bits per weight" in err and "largest error" in err
    data = json.loads(report.read_text())
    assert data["type"] == "Q4_0" and data["n_tensors"] == 21 and data["output_bytes"] < data["source_bytes"]
    by_name = {t["name"]: t for t in data["tensors"]}
    q = by_name["blk.0.attn_q.weight"]
    assert q["type"] == "Q4_0" and q["shape"] == [64, 64] and 0 < q["rmse"] < q["max_abs_error"]
    assert 0.05 < q["relative_rmse"] < 0.2  # 4-bit weights: about 10% RMS error
    assert by_name["output_norm.weight"]["rmse"] == 0.0
    assert only_files(tmp_path) == ["hf", "report.json", "tiny.q4_0.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's 0600


def test_python_dash_m_quantize_works(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "quantize", str(tiny), str(tmp_path / "o.gguf"), "--type", "q8_0",
                             "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and (tmp_path / "o.gguf").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, tiny, tmp_path):
    out, report = tmp_path / "plan.gguf", tmp_path / "plan.json"
    code, stdout, err = run(capsys, tiny, out, "--type", "q4_1", "--output-type", "q8_0", "--dry-run",
                            "--report", report)
    assert code == 0, err
    assert not out.exists()
    assert "blk.1.ffn_down.weight" in stdout and "Q4_1" in stdout
    assert "output.weight" in stdout and "F32 -> Q8_0" in stdout
    assert "21 tensors" in stdout and "bits per weight" in stdout
    plan = json.loads(report.read_text())
    assert plan["dry_run"] and plan["output"] is None
    assert {t["name"]: t["type"] for t in plan["tensors"]}["output.weight"] == "Q8_0"


def test_embedding_and_output_type_options(capsys, tiny, tmp_path):
    out = tmp_path / "o.gguf"
    code, _, err = run(capsys, tiny, out, "--type", "q4_0", "--embedding-type", "f16", "--output-type", "bf16")
    assert code == 0, err
    tensors = GGUFFile(out).tensors
    assert tensors["token_embd.weight"].qtype == GGMLType.F16 and tensors["output.weight"].qtype == GGMLType.BF16


# ----- output safety -----------------------------------------------------------------------------

def small_gguf(path: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((8, 64)).astype(np.float32),
               "output_norm.weight": np.ones(64, np.float32)}
    write_gguf(path, {"general.architecture": "llama"},
               [TensorSpec(n, GGMLType.F32, a.shape) for n, a in tensors.items()], tensors.values())
    return path


def test_output_equal_to_the_input_is_refused_even_with_force(capsys, tmp_path):
    src = small_gguf(tmp_path / "m.gguf")
    before = src.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, src, src, "--type", "q8_0", *extra)
        assert code == 1
        assert_one_line_error(err, "output is the input")
    os.link(src, tmp_path / "hardlink.gguf")
    code, _, err = run(capsys, src, tmp_path / "hardlink.gguf", "--type", "q8_0", "--force")
    assert code == 1
    assert_one_line_error(err, "output is the input")
    assert src.read_bytes() == before


def test_output_inside_the_input_folder_is_never_overwritten(capsys, tiny):
    for victim in ("model.safetensors", "config.json"):
        before = (tiny / victim).read_bytes()
        code, _, err = run(capsys, tiny, tiny / victim, "--type", "q8_0", "--force")
        assert code == 1
        assert_one_line_error(err, "input folder")
        assert (tiny / victim).read_bytes() == before


def test_existing_output_needs_force(capsys, tiny, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, tiny, out, "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "output exists", "--force")
    assert out.read_bytes() == b"precious"
    code, _, err = run(capsys, tiny, out, "--type", "q8_0", "--force")
    assert code == 0, err
    assert GGUFFile(out).metadata["general.file_type"] == 7


def test_output_folder_must_exist(capsys, tiny, tmp_path):
    code, _, err = run(capsys, tiny, tmp_path / "no" / "such" / "dir.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "does not exist")


def test_failure_midway_leaves_no_file(capsys, tmp_path):
    from quantize.safetensors import SafetensorsFile, write_safetensors

    folder = make_tiny_hf_checkpoint(tmp_path / "hf")
    st = SafetensorsFile(folder / "model.safetensors")
    weights = {n: np.array(st.array(n)) for n in st.tensors}
    st.close()
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan  # a late tensor
    write_safetensors(folder / "model.safetensors", weights)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(capsys, folder, out_dir / "m.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "model.layers.1.mlp.down_proj.weight", "NaN/Inf", "row 0 column 0")
    assert only_files(out_dir) == []


def test_ctrl_c_leaves_no_half_file(capsys, tiny, tmp_path, monkeypatch):
    real = convert.convert_tensor
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "convert_tensor", interrupted)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(capsys, tiny, out_dir / "m.gguf", "--type", "q4_0")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert only_files(out_dir) == []


@pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the SmolLM2 model")
def test_sigint_to_a_real_run_leaves_no_half_file(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "quantize", str(SMOLLM2), str(out_dir / "m.gguf"), "--type", "f16",
                             "--allow-requantize"], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not any(out_dir.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # wait until the temp file exists: the run is writing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert only_files(out_dir) == []


# ----- input errors: one line, exit 1; usage errors: exit 2 ---------------------------------------

@pytest.mark.parametrize("argv, code, fragment", [
    (["{tiny}", "{out}", "--type", "q9_9"], 2, "unknown type 'q9_9'"),
    (["{tiny}", "{out}", "--type", "q8_0", "--output-type", "q3_k"], 2, "--output-type"),
    (["{tiny}", "{out}"], 2, "--type"),
    (["{tiny}", "{out}", "--type", "q8_0", "--threads", "0"], 2, "--threads"),
    (["{tiny}", "{out}", "--type", "q8_0", "--threads", "two"], 2, "--threads"),
    (["{tmp}/missing", "{out}", "--type", "q8_0"], 1, "no such file or folder"),
    (["{tmp}", "{out}", "--type", "q8_0"], 1, "config.json"),
    (["{tiny}/config.json", "{out}", "--type", "q8_0"], 1, "not a GGUF file"),
    (["{tiny}/model.safetensors", "{out}", "--type", "q8_0"], 1, "give the model folder"),
])
def test_errors_are_one_line(capsys, tiny, tmp_path, argv, code, fragment):
    argv = [a.format(tiny=tiny, out=tmp_path / "o.gguf", tmp=tmp_path) for a in argv]
    got, _, err = run(capsys, *argv)
    assert got == code
    assert_one_line_error(err, fragment)
    assert not (tmp_path / "o.gguf").exists()


def test_malformed_safetensors_is_one_line(capsys, tiny, tmp_path):
    path = tiny / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # the header's first bytes: not UTF-8 any more
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, tiny, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "model.safetensors", "not valid UTF-8")


def test_shard_outside_the_folder_is_one_line(capsys, tmp_path):
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../../secret.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "outside the model folder")


def test_corrupt_gguf_input_is_one_line(capsys, tmp_path):
    src = small_gguf(tmp_path / "m.gguf")
    src.write_bytes(src.read_bytes()[:-100])
    code, _, err = run(capsys, src, tmp_path / "o.gguf", "--type", "q8_0")
    assert code == 1
    assert_one_line_error(err, "truncated or incomplete")


@pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the SmolLM2 model")
def test_requantizing_needs_the_flag_and_warns(capsys, tmp_path):
    code, _, err = run(capsys, SMOLLM2, tmp_path / "o.gguf", "--type", "q4_0")
    assert code == 1
    assert_one_line_error(err, "--allow-requantize")
    code, _, err = run(capsys, SMOLLM2, tmp_path / "o.gguf", "--type", "q4_0", "--allow-requantize", "--quiet")
    assert code == 0
    assert "warning:" in err and "quality drops" in err


def test_width_the_runtime_cannot_run_is_refused_before_any_warning(capsys, tmp_path):
    """A width of 48 would fall back to F16 (llama-quantize's rule), but the runtime needs widths
    that are multiples of 32: the metadata to be written fails its checks, in one line."""
    folder = make_tiny_hf_checkpoint(tmp_path / "hf", hidden_size=48, num_attention_heads=3,
                                     num_key_value_heads=1)
    for extra in ([], ["--dry-run"]):
        code, _, err = run(capsys, folder, tmp_path / "o.gguf", "--type", "q8_0", "--quiet", *extra)
        assert code == 1
        assert_one_line_error(err, "the metadata to be written", "llama.embedding_length", "48", "32")
        assert "warning" not in err
    assert not (tmp_path / "o.gguf").exists()
