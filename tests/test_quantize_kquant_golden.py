"""edgellama-quantize's K-quant / Q5_x files are byte-identical to llama-quantize's.

tests/golden/kquant_llamacpp_hashes.json (tools/make_quant_golden.py, llama.cpp's own llama-quantize)
holds, per source and type, llama-quantize's tensor order, types and data hashes and the whole file's
sha256.  The sources are rebuilt here from the SmolLM2 Q4_1 file and by an integer-only generator,
so no llama.cpp is needed; a changed source is reported by its own test.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile
from quantize import cli
from quantize.convert import convert_file, make_plan, open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.fetch_models import SMOLLM2_FILE, cache_dir  # noqa: E402
from tools.make_quant_golden import GOLDEN, REQUANTIZED, make_source, sha256_file  # noqa: E402

SMOLLM2 = cache_dir() / SMOLLM2_FILE  # fetched before collection by conftest.py
G = json.loads(GOLDEN.read_text())
HASHED = [(source, qtype) for source, files in G["files"].items() for qtype, record in files.items()
          if "file_sha256" in record]


def needs(source: str):
    if source.startswith("smollm2") and not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing: run python tools/fetch_models.py")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kquant_sources")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        needs(name)
        if name not in made:
            made[name] = make_source(name, folder)
        return made[name]
    return get


def tensor_records(path: Path) -> tuple[list[str], list[str]]:
    """(names, "TYPE:hash16") of a GGUF file, in file order, as the golden file records them."""
    gguf = GGUFFile(path)
    try:
        return (list(gguf.tensors),
                [f"{info.qtype.name}:{hashlib.sha256(gguf.raw(name)).hexdigest()[:16]}"
                 for name, info in gguf.tensors.items()])
    finally:
        gguf.close()


def assert_same_as_llama_quantize(path: Path, source: str, qtype: str, whole_file: bool = True) -> None:
    golden = G["files"][source][qtype]
    names, records = tensor_records(path)
    assert names == G["sources"][source]["tensor_names"]
    different = [f"{n}: ours {r}, llama-quantize {g}" for n, r, g in zip(names, records, golden["tensors"]) if r != g]
    assert not different, f"{len(different)} tensors differ, first: {different[:3]}"
    gguf = GGUFFile(path)
    file_type = gguf.metadata["general.file_type"]
    gguf.close()
    assert file_type == golden["general.file_type"]
    if whole_file:
        assert path.stat().st_size == golden["file_size"]
        assert sha256_file(path) == golden["file_sha256"]


@pytest.mark.parametrize("source", list(G["sources"]))
def test_sources_are_the_ones_the_golden_file_was_made_from(sources, source):
    """If this fails the source changed (e.g. the HF converter's metadata), not the quantizer:
    rerun tools/make_quant_golden.py."""
    path = sources(source)
    assert sha256_file(path) == G["sources"][source]["sha256"]


@pytest.mark.parametrize("source, qtype", HASHED, ids=[f"{s}-{t}" for s, t in HASHED])
def test_file_equals_llama_quantize(sources, tmp_path, source, qtype):
    src = sources(source)
    out = tmp_path / f"{qtype}.gguf"
    convert_file(src, out, qtype, allow_requantize=source in REQUANTIZED, quiet=True)
    same_source = sha256_file(src) == G["sources"][source]["sha256"]
    assert_same_as_llama_quantize(out, source, qtype, whole_file=same_source)


@pytest.mark.parametrize("qtype", ["q4_k_m", "q6_k"])
def test_hf_folder_gives_llama_quantizes_file_of_its_f32_conversion(sources, tmp_path, qtype):
    """HF folder -> Q4_K_M directly is the file llama-quantize makes from the folder's F32 GGUF."""
    needs("smollm2_f32")
    from tools.make_hf_checkpoint import smollm2_hf

    out = tmp_path / "hf.gguf"
    convert_file(smollm2_hf(), out, qtype, quiet=True)
    same_source = sha256_file(sources("smollm2_f32")) == G["sources"]["smollm2_f32"]["sha256"]
    assert_same_as_llama_quantize(out, "smollm2_f32", qtype, whole_file=same_source)


def test_meta_checkpoint_quantizes_like_its_gguf(tmp_path):
    """Meta folder -> Q4_K_M equals Meta -> F32 GGUF -> Q4_K_M (the GGUF path is the golden one);
    the fixture's width 32 takes llama-quantize's fallbacks (Q5_0, Q8_0)."""
    meta = ROOT / "tests" / "fixtures" / "meta_tiny"
    convert_file(meta, tmp_path / "direct.gguf", "q4_k_m", quiet=True)
    convert_file(meta, tmp_path / "f32.gguf", "f32", quiet=True)
    convert_file(tmp_path / "f32.gguf", tmp_path / "via.gguf", "q4_k_m", quiet=True)
    assert tensor_records(tmp_path / "direct.gguf") == tensor_records(tmp_path / "via.gguf")
    types = {r.split(":")[0] for r in tensor_records(tmp_path / "direct.gguf")[1]}
    assert types == {"F32", "Q5_0", "Q8_0"}


@pytest.mark.parametrize("threads", [1, 2])
def test_bytes_do_not_depend_on_the_thread_count(sources, tmp_path, threads):
    out = tmp_path / "t.gguf"
    convert_file(sources("tiny256_f16"), out, "q4_k_m", quiet=True, threads=threads)
    assert_same_as_llama_quantize(out, "tiny256_f16", "q4_k_m")


@pytest.mark.parametrize("qtype", list(G["files"]["llama70b_shape"]))
def test_llama_70b_shape_types(sources, qtype):
    """80 layers with grouped-query attention: llama.cpp's 70B rule gives attn_v Q5_K for Q4_K."""
    checkpoint = open_checkpoint(sources("llama70b_shape"))
    try:
        plan = make_plan(checkpoint, qtype)
    finally:
        checkpoint.close()
    golden = G["files"]["llama70b_shape"][qtype]
    assert [p.tensor.name for p in plan.tensors] == G["sources"]["llama70b_shape"]["tensor_names"]
    assert [p.choice.qtype.name for p in plan.tensors] == golden["tensors"]
    assert plan.metadata["general.file_type"][1] == golden["general.file_type"]


def test_positional_type_and_aliases(sources, tmp_path, capsys):
    """llama-quantize's way: IN OUT TYPE NTHREADS, its upper-case names, Q4_K = Q4_K_M, and the
    file type numbers (15 = Q4_K_M)."""
    src = sources("tiny256_f16")
    for i, spelling in enumerate(["Q4_K_M", "Q4_K", "15", "q4_k_m"]):
        out = tmp_path / f"{i}.gguf"
        assert cli.main([str(src), str(out), spelling, "2", "--quiet"]) == 0, capsys.readouterr().err
        assert_same_as_llama_quantize(out, "tiny256_f16", "q4_k_m")


def test_dry_run_plan_shows_each_tensors_type(sources, capsys):
    src = sources("tiny256_f16")
    assert cli.main([str(src), "unused.gguf", "--type", "q4_k_m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    golden = G["files"]["tiny256_f16"]["q4_k_m"]
    planned = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].endswith(".weight"):  # name, shape, "copy" TYPE | "F16 ->" TYPE, ...
            planned[parts[0]] = parts[3] if parts[2] == "copy" else parts[4]
    want = {n: r.split(":")[0] for n, r in zip(G["sources"]["tiny256_f16"]["tensor_names"], golden["tensors"])}
    assert planned == want
    assert "F16 -> Q6_K" in out and "F16 -> Q4_K" in out


def test_fallback_warnings_are_grouped(sources, capsys):
    """SmolLM2's 576 takes llama-quantize's fallback in 180 tensors: one warning per kind."""
    src = sources("smollm2_f32")
    assert cli.main([str(src), "unused.gguf", "--type", "q4_k_m", "--dry-run"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "166 tensors" in err[0] and "Q4_K block size 256: using Q5_0 instead" in err[0]
    assert "14 tensors" in err[1] and "Q6_K block size 256: using Q8_0 instead" in err[1]


@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_s", "q6_k", "q5_0", "q5_1"])
def test_report_errors_match_an_independent_dequantization(sources, tmp_path, qtype):
    """--report's RMSE and max errors of K-quant tensors, against gguf-py's dequantization of the
    written bytes and the F16 source values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    src, out, report = sources("tiny256_f16"), tmp_path / "o.gguf", tmp_path / "r.json"
    assert cli.main([str(src), str(out), "--type", qtype, "--report", str(report), "--quiet"]) == 0
    by_name = {t["name"]: t for t in json.loads(report.read_text())["tensors"]}
    source, written = GGUFFile(src), GGUFFile(out)
    for name in ("blk.0.attn_v.weight", "blk.3.ffn_down.weight", "output.weight"):
        info = written.tensors[name]
        x = np.asarray(source.raw(name)).view(np.float16).astype(np.float64).reshape(info.shape)
        y = gguf_dequantize(np.array(written.raw(name)), GGMLQuantizationType(int(info.qtype)))
        err = y.reshape(info.shape).astype(np.float64) - x
        t = by_name[name]
        assert t["type"] == info.qtype.name and not t["copied"]
        assert math.isclose(t["rmse"], math.sqrt(np.mean(err ** 2)), rel_tol=1e-9)
        assert math.isclose(t["max_abs_error"], np.abs(err).max(), rel_tol=1e-12)
        assert math.isclose(t["relative_rmse"], t["rmse"] / math.sqrt(np.mean(x ** 2)), rel_tol=1e-9)
        assert math.isclose(t["max_relative_error"], np.abs(err).max() / np.abs(x).max(), rel_tol=1e-12)
        assert 0 < t["relative_rmse"] < 0.1


@pytest.mark.parametrize("qtype", list(G["files"]["tiny256_f16"]))
def test_every_type_runs_in_edgellama(sources, tmp_path, qtype):
    """Each type, written from the tiny model without edge-case rows (those overflow half-precision
    activations, in llama.cpp as here), loads in the runtime and its logits follow the F16 model's."""
    import edgellama

    src = sources("tiny256_plain_f16")
    out = tmp_path / f"{qtype}.gguf"
    convert_file(src, out, qtype, quiet=True)
    ids = list(range(10, 40))
    reference = edgellama.load(src, n_ctx=64, threads=2).logits(ids)
    logits = edgellama.load(out, n_ctx=64, threads=2).logits(ids)
    assert logits.shape == reference.shape and np.isfinite(logits).all()
    correlation = np.corrcoef(logits.ravel(), reference.ravel())[0, 1]
    print(f"{qtype}: correlation of the logits with the F16 model's {correlation:.4f}")
    assert correlation > 0.9, correlation


def test_q4_k_m_perplexity_matches_llama_cpp_on_the_passage(sources, tmp_path):
    """Our Q4_K_M SmolLM2 (the same bytes as llama-quantize's) through our runtime: perplexity of
    the golden passage in chunks of 240 within 1% of llama-perplexity's on llama-quantize's file
    (its per-token log-likelihoods differ from ours by ~0.06 nats, README Accuracy)."""
    import edgellama
    from edgellama.perplexity import perplexity

    out = tmp_path / "q4_k_m.gguf"
    convert_file(sources("smollm2_f32"), out, "q4_k_m", quiet=True)
    passage = json.loads((ROOT / "tests" / "golden" / "smollm2_passage.json").read_text())
    golden = G["perplexity"]
    model = edgellama.load(out, n_ctx=golden["n_ctx"], threads=2)
    ids = model.tokenize(passage["text"])
    assert ids == passage["ids"]
    result = perplexity(model, ids, golden["n_ctx"])
    assert result.n_chunks == 2
    assert abs(result.ppl / golden["llama_perplexity_ppl"] - 1) < 0.01, (result.ppl, golden)


def _llama_cpp_tools():
    from tools import llamacpp

    if not llamacpp.available():
        pytest.skip("llama.cpp's tools are not built (python tools/llamacpp.py)")
    return llamacpp


@pytest.mark.parametrize("qtype", list(G["files"]["tiny256_f16"]))
def test_every_type_runs_in_llama_cpp(sources, tmp_path, qtype):
    """Where llama.cpp is built: llama-bench loads each file we write and evaluates it."""
    llamacpp = _llama_cpp_tools()
    out = tmp_path / f"{qtype}.gguf"
    convert_file(sources("tiny256_plain_f16"), out, qtype, quiet=True)
    result = subprocess.run([str(llamacpp.tool("llama-bench")), "-m", str(out), "-p", "16", "-n", "4", "-r", "1",
                             "-t", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(result.stdout)
    assert len(runs) == 2 and all(r["avg_ts"] > 0 for r in runs)
