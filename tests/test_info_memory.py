"""``edgellama info``'s memory estimate (edgellama/info.py): its parts against what a loaded model
holds, its total against the measured peak of a real run (in a child process), the largest context
and the smaller-type hint, and the refusal of run with the same figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgellama import info
from edgellama.config import ModelArgs
from edgellama.gguf import GGUFFile
from edgellama.quants import GGMLType

from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, want", [("8G", 8 << 30), ("7.5GiB", int(7.5 * (1 << 30))), ("4096M", 4 << 30),
                                        ("3500MB", 3500 << 20), ("123456", 123456), ("1t", 1 << 40)])
def test_parse_size(text, want):
    assert info.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "0G", "-1G", "8X", "G8", "1.2.3G",
                                  "1" * 400 + "G", "9" * 30 + "T", "0.0001"])  # (inf, beyond 2**63, under a byte)
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        info.parse_size(text)


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_packed_bytes_are_the_kernels_layout(lanes):
    from edgellama import kernels as K  # (no compilation)

    assert set(info.PACKED_BYTES) == {GGMLType(t) for t in K.PACKED_FORMATS}
    for qtype in info.PACKED_BYTES:
        for n_out, n_in in ((37, 512), (16, 256), (1, 2048)):
            groups = -(-n_out // lanes)
            assert info.packed_bytes(qtype, n_out, n_in, lanes) == groups * K.group_bytes(int(qtype), n_in, lanes)


@pytest.mark.parametrize("head_dim, threads", [(64, 1), (128, 2), (80, 4)])
def test_prompt_work_bytes_are_the_models_rows(head_dim, threads):
    from edgellama import kernels as K  # (no compilation)

    assert info.ATTN_SPAN == K.ATTN_SPAN
    assert info.prompt_work_bytes(head_dim, threads) == 4 * threads * K.prompt_work_size(head_dim)


@pytest.mark.parametrize("qtype, tied", [(GGMLType.Q8_0, True), (GGMLType.Q4_K, False), (GGMLType.F16, True),
                                         (GGMLType.Q4_0, False)])
def test_weights_are_what_a_loaded_model_holds(tmp_path, qtype, tied):
    """The quantized part is exactly the packed buffers a model allocates (at most 16 lanes of
    row padding more where the kernels use fewer); float matrices are their file bytes."""
    import edgellama
    from edgellama import kernels as K

    path = write_tiny_model(tmp_path / "m.gguf", qtype, dim=256, ffn=512, tied=tied)
    model = edgellama.load(path, n_ctx=64, threads=1)
    w = model.weights
    held = w.packed.nbytes + (w.output.packed.nbytes if w.output.packed is not None else 0)
    f = GGUFFile(path)
    lanes = K.packing()[0]
    quantized = {n: i for n, i in f.tensors.items() if len(i.shape) == 2 and GGMLType(i.qtype) in info.PACKED_BYTES
                 and (tied or n != "token_embd.weight")}
    assert held == sum(info.packed_bytes(i.qtype, *i.shape, lanes) for i in quantized.values())
    floats = sum(i.nbytes for n, i in f.tensors.items() if len(i.shape) == 2 and n not in quantized
                 and (tied or n != "token_embd.weight"))
    vectors = sum(4 * i.n_elements + i.nbytes for i in f.tensors.values() if len(i.shape) == 1)
    embedding = 0 if tied else min(f.tensors["token_embd.weight"].nbytes, 64 * info.PAGE)  # one row, one page
    at_16_lanes = sum(info.packed_bytes(i.qtype, *i.shape) for i in quantized.values())
    assert info.weights_held(f, 64) == at_16_lanes + floats + vectors + embedding


Q4K, Q8, F16 = GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16


@pytest.mark.parametrize("qtype, types, budget, forms, pieces", [
    (Q8, {}, None, (1, 1), False), (Q8, {}, 1, (1, 1), True), (Q4K, {}, 1, (1, 1), True), (F16, {}, 1, (0, 0), False),
    # a float down projection beside quantized matrices: one piece (its rows are read in float32)
    (Q8, {"blk.1.ffn_down.weight": F16}, 1, (1, 1), False),
    # down projections of a K-quant and a block type, gate of the other kind: both forms of each input
    (Q4K, {"blk.1.ffn_down.weight": Q8, "blk.0.ffn_gate.weight": Q8}, 1, (2, 2), True)],
    ids=["q8_0", "q8_0-pieces", "q4_k-pieces", "f16", "float-down", "both-forms"])
def test_batch_buffers_are_what_a_prompt_holds(tmp_path, monkeypatch, qtype, types, budget, forms, pieces):
    """The prompt buffers a model keeps from its first prompt on (model.PromptBuffers) take exactly
    the estimate's bytes (info.prompt_buffers): in one piece, with the feed-forward made 256 columns
    at a time (budget 1), and in files that mix types."""
    import numpy as np

    import edgellama

    if budget is not None:
        monkeypatch.setattr(info, "PROMPT_FFN_BYTES", budget)
    path = write_tiny_model(tmp_path / "m.gguf", qtype, dim=256, ffn=768, tensor_types=types)
    model = edgellama.load(path, n_ctx=64, threads=1, n_batch=32)
    model.eval(list(range(1, 21)))
    b = model._prompt
    arrays = [b.x, b.xb, b.y, b.k, b.v, b.gate, b.up, *(a for room in (b.qx, b.qh, b.qc) if room is not None
                                                         for form in room for a in form)]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert b.cols == (256 if pieces else 768)
    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f)
    assert sum(a.nbytes for a in arrays) == info.prompt_buffers(f, args, 32) \
        == info.batch_buffers(args, 32, forms, down_quantized=F16 not in (qtype, *types.values()))


def test_the_largest_context_is_the_largest_that_fits(tmp_path):
    path = write_tiny_model(tmp_path / "untied.gguf", GGMLType.Q8_0, tied=False)  # a non-linear term
    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f)
    for ctx in (300, 5000, 70_000):
        available = info.memory_needed(f, args, ctx).total
        n = info.max_context(f, args, available)
        assert n == ctx // 256 * 256
        assert info.memory_needed(f, args, n).total <= available < info.memory_needed(f, args, n + 256).total
    assert info.max_context(f, args, info.memory_needed(f, args, 0).total - 1) == 0


RUN_CHILD = [sys.executable, "-m", "edgellama.cli", "bench", "-r", "1", "-t", "2", "--json"]


def test_the_estimate_is_within_10_percent_of_a_runs_peak(smollm2_path):
    """bench fills a 1024-token context (every KV position written) in a child process; its peak
    resident memory (VmHWM, see bench.peak_rss_mb) and the estimate for the same settings agree within 10%."""
    ctx, n_gen = 1024, 8
    cmd = RUN_CHILD + ["-m", str(smollm2_path), "-c", str(ctx), "-p", str(ctx - n_gen - 1), "-n", str(n_gen)]
    for _ in range(3):  # a first run may compile the kernels (LLVM's memory): measure a warm one
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads(r.stdout.strip().splitlines()[-1])
        if report["numba_cache"] == "warm":
            break
    f = GGUFFile(smollm2_path)
    needed = info.memory_needed(f, ModelArgs.from_gguf(f), ctx, "f16", threads=report["threads"])
    peak = report["peak_rss_mb"] * (1 << 20)
    if report["numba_cache"] == "warm":
        assert abs(needed.total - peak) <= 0.10 * peak, (needed.describe(), report["peak_rss_mb"])
    else:  # kernel sources changing under the run (a shared tree): some compiled, all at most
        compiling = info.memory_needed(f, ModelArgs.from_gguf(f), ctx, "f16", report["threads"], compiling=True)
        assert 0.9 * needed.total <= peak <= 1.1 * compiling.total, (compiling.describe(), report)
    # the parts that scale are the ones a run holds: a context 4x as long adds exactly its KV cache
    # and per-position buffers, which the model allocates with these shapes
    args = ModelArgs.from_gguf(f)
    longer = info.memory_needed(f, args, 4 * ctx, "f16", threads=report["threads"])
    assert longer.kv_cache == 4 * needed.kv_cache == 4 * 2 * args.n_layers * ctx * args.kv_dim * 2


def info_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama.cli", "info", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_info_says_what_fits(smollm2_files):
    path = smollm2_files["q8_0"]
    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f)
    need = info.memory_needed(f, args, 4096, "f16", threads=2)
    r = info_cmd("-m", str(path), "-c", "4096", "--ram", f"{(need.total >> 20) + 64}M")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^fits: .* given \(--ram\): yes, .* to spare; the largest context that fits is \d+", r.stdout,
                     re.M), r.stdout
    assert f"memory:        {info.size(need.total)} at n_ctx=4096" in r.stdout
    # room for the weights and a short context only
    ram = info.memory_needed(f, args, 1000, "f16", threads=2).total
    r = info_cmd("-m", str(path), "-c", "4096", "--ram", f"{ram}")
    want = info.max_context(f, args, ram, "f16", threads=2)
    assert 768 <= want < 1024
    assert f"NO at n_ctx=4096; the largest context that fits is {want} (-c {want})" in r.stdout, r.stdout
    # not even the weights: a smaller type of the same model would fit
    bits = info.FILE_TYPE_BITS["Q4_0"]
    ram = info.retyped_needed(f, args, 512, bits, "f16", threads=2).total
    r = info_cmd("-m", str(path), "-c", "512", "--ram", str(ram))
    assert "NO, not even with a small context; the " in r.stdout and " file of this model (about " in r.stdout, r.stdout
    smaller = info.smaller_type(f, args, ram, 512, "f16", threads=2)
    assert smaller is not None and smaller[2] >= 256 and f"; {info.describe_smaller(smaller)}" in r.stdout
    r = info_cmd("-m", str(path), "--ram", "8M")
    assert "no smaller type of this model would" in r.stdout, r.stdout


def test_run_refuses_up_front_with_the_same_figures(smollm2_files, monkeypatch, capsys):
    """run stops before loading anything, with info's figures and the smaller-type hint."""
    from edgellama import cli

    path = smollm2_files["q8_0"]
    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f)
    ram = info.retyped_needed(f, args, 512, info.FILE_TYPE_BITS["Q4_0"], "f16", threads=1).total
    monkeypatch.setattr(info, "available_memory", lambda: ram)
    assert cli.main(["run", "-m", str(path), "-p", "hi", "-c", "512", "-t", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the kernels' compilation counts when the cache is cold for what run needs (a short prompt:
    # the one-token path), as load_model decides it
    from edgellama.kernel_cache import cache_status, expected_kernels, matrix_types

    status = cache_status(expected_kernels(matrix_types(f), prompt_path=False))
    need = info.memory_needed(f, args, 512, "f16", threads=1, compiling=bool(status and status.cold))
    assert err[-1].startswith(f"edgellama run: error: -c 512 needs {need.describe()} but {info.size(ram)} of memory "
                              "is available: it does not fit even with a small context; the "), err
    assert info.describe_smaller(info.smaller_type(f, args, ram, 512, "f16", threads=1)) in err[-1]
