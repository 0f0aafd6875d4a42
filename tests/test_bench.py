"""``edgellama bench``: the JSON report's keys and types, and the option checks.  No timing assertions."""

from __future__ import annotations

import json

import pytest

from edgellama.bench import check_args, default_n_ctx
from edgellama.cli import build_parser, main
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny-q8_0.gguf", GGMLType.Q8_0)


def test_bench_json_report(tiny_q8, capsys):
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", "8", "-n", "4", "-r", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1  # exactly one JSON object on stdout
    r = json.loads(lines[0])
    for key in ("pp_tok_s", "tg_tok_s", "load_s", "first_token_s", "peak_rss_mb", "compile_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["threads"] == 1 and r["n_prompt"] == 8 and r["n_gen"] == 4 and r["repetitions"] == 1
    assert r["model"] == "tiny-q8_0.gguf"
    assert r["n_ctx"] == default_n_ctx(8, 4) >= 8 + 4 + 1 and r["n_depth"] == 0
    assert r["tensor_types"] == {"Q8_0": 15, "F32": 5}  # embeddings + 7 matrices x 2 layers; 5 norms
    assert r["numba_cache"] in ("warm", "cold", "partly cold", "unknown")
    assert len(r["pp_tok_s_all"]) == len(r["tg_tok_s_all"]) == 1
    assert r["load_s"] < r["first_token_s"]  # first token comes after loading, from the same start


def test_bench_table(tiny_q8, capsys):
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", "4", "-n", "2", "-r", "2", "-c", "16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("| model") and "pp4" in out
    assert "tg2" in out and "peak RSS" in out and "n_ctx 16" in out


@pytest.mark.parametrize("argv, message", [
    (["-p", "-1"], "-p must be >= 0, got -1"),
    (["-n", "-3"], "-n must be >= 0, got -3"),
    (["--n-gen", "-3"], "--n-gen must be >= 0, got -3"),
    (["-p", "0", "-n", "0"], "-p and -n are both 0: nothing to measure (0 skips that test, as in llama-bench)"),
    (["-r", "0"], "-r must be >= 1, got 0"),
    (["-t", "0"], "-t must be an integer in [1, 1024], got 0"),
    (["-c", "-1"], "-c must be >= 0 (0: the model's trained context), got -1"),
    (["-p", "8", "-n", "8", "-c", "16"], "-c 16 is too small for -p 8 + -n 8 + 1 = 17 tokens"),
    (["-p", "8", "-n", "8", "-d", "100", "-c", "116"], "-c 116 is too small for -d 100 + -p 8 + -n 8 + 1 = 117 tokens"),
    (["-d", "-1"], "-d must be >= 0, got -1"),
    (["--n-depth", "x"], "--n-depth expects an integer, got 'x'"),
])
def test_bench_rejects_bad_options(tiny_q8, capsys, argv, message):
    rc = main(["bench", "-m", str(tiny_q8)] + argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    # one line naming the option, then where to look: no traceback
    assert err.splitlines() == [f"edgellama bench: error: {message}", "see 'edgellama bench --help'"]


@pytest.mark.parametrize("skipped", ["-p", "-n"])
def test_bench_zero_skips_that_test(tiny_q8, capsys, skipped):
    """-p 0 or -n 0 skips prompt processing or generation, as llama-bench does: no timing, no row
    in the table, null in the JSON; the other test runs."""
    other = {"-p": "-n", "-n": "-p"}[skipped]
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", skipped, "0", other, "4", "-r", "2", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    gone, kept = ("pp", "tg") if skipped == "-p" else ("tg", "pp")
    assert r[f"{gone}_tok_s"] is None and r[f"{gone}_tok_s_all"] == []
    assert r[f"{kept}_tok_s"] > 0 and len(r[f"{kept}_tok_s_all"]) == 2
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", skipped, "0", other, "4", "-r", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    tests = [line.split("|")[5].strip() for line in out.splitlines() if line.startswith("| ") and "model" not in line
             and "---" not in line]
    assert tests == [f"{kept}4"]


def test_bench_at_a_depth_runs_after_that_many_cached_tokens(tiny_q8, capsys, monkeypatch):
    """-d D: pp and tg start with D tokens in the cache (llama-bench's -d), each repetition from
    those same D; the context's default makes room for them; the table names the depth."""
    from edgellama.model import Model

    starts = []  # (cached positions, tokens evaluated) of every evaluation
    original = Model.eval
    monkeypatch.setattr(Model, "eval", lambda self, ids, *a, **k: starts.append((self.state.n_past, len(ids)))
                        or original(self, ids, *a, **k))
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", "8", "-n", "4", "-r", "2", "-d", "40", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)
    assert r["n_depth"] == 40 and r["n_ctx"] == default_n_ctx(8, 4, 40) == 256
    timed = starts[starts.index((0, 40)) + 1:]  # after the depth's own evaluation, from an empty cache
    assert timed == [(40, 8)] * 2 + ([(40, 1)] + [(41 + i, 1) for i in range(4)]) * 2
    rc = main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", "4", "-n", "2", "-r", "1", "-d", "20"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "pp4 @ d20" in out and "tg2 @ d20" in out


def test_bench_missing_file(tmp_path, capsys):
    assert main(["bench", "-m", str(tmp_path / "absent.gguf"), "-p", "4", "-n", "2"]) == 1
    assert "absent.gguf" in capsys.readouterr().err


def test_check_args_defaults_and_exact_fit():
    assert default_n_ctx(256, 128) == 512  # 256 + 128 + 16 = 400, rounded up to 512
    assert default_n_ctx(239, 1) == 256 and default_n_ctx(240, 1) == 512  # 256 fits, 257 does not
    assert check_args(8, 8, 1, None, 17) == 17  # n_prompt + n_gen + 1 fits exactly
    args = build_parser().parse_args(["bench", "-m", "x.gguf"])
    assert (args.n_prompt, args.n_gen, args.repetitions, args.ctx, args.n_depth) == (256, 128, 3, None, 0)
    assert default_n_ctx(256, 128, 2048) == 2560  # 2048 + 256 + 128 + 16 = 2448, rounded up


def test_bench_c_0_is_the_trained_context_as_elsewhere(tiny_q8, capsys):
    """-c 0 was refused ("must be a positive integer") where every other command takes it for the
    model's trained context."""
    from edgellama.gguf import GGUFFile

    trained = GGUFFile(tiny_q8).metadata["llama.context_length"]
    assert main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", "4", "-n", "2", "-r", "1", "-c", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_ctx"] == trained
    assert main(["bench", "-m", str(tiny_q8), "-t", "1", "-p", str(trained), "-n", "2", "-c", "0"]) == 1
    assert capsys.readouterr().err.strip() == (f"edgellama bench: error: -c 0 (the trained context, {trained}) is "
                                               f"too small for -p {trained} + -n 2 + 1 = {trained + 3} tokens")
