"""The ``edgellama`` command line: run and info on a tiny model; errors are one line and exit 1."""

from __future__ import annotations

import pytest

import edgellama
from edgellama.cli import main
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", GGMLType.Q4_0, ctx=64)


def test_run_streams_the_greedy_text_and_reports_on_stderr(tiny, capsys):
    assert main(["run", "-m", str(tiny), "-p", "the water", "-n", "6", "-c", "32"]) == 0
    out, err = capsys.readouterr()
    model = edgellama.load(tiny, n_ctx=32)
    assert out == "".join(model.generate("the water", max_tokens=6)) + "\n"
    assert "generated 6 tokens" in err and "finish: length" in err


@pytest.mark.parametrize("cache_type", ["f16", "f32"])
def test_run_with_each_cache_type(tiny, capsys, cache_type):
    assert main(["run", "-m", str(tiny), "-p", "the", "-n", "3", "-c", "32", "--cache-type", cache_type]) == 0
    model = edgellama.load(tiny, n_ctx=32, cache_type=cache_type)
    assert capsys.readouterr().out == "".join(model.generate("the", max_tokens=3)) + "\n"


def test_run_prompt_longer_than_the_context(tiny, capsys):
    prompt = "the water is cold and the sea is deep and wide and grey"
    assert main(["run", "-m", str(tiny), "-p", prompt, "-n", "2", "-c", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "context holds 16" in err
    assert main(["run", "-m", str(tiny), "-p", prompt, "-n", "2", "-c", "16", "--truncate"]) == 0
    assert "generated 2 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "-m", "/nonexistent/model.gguf", "-p", "x"], "no such file"),
    (["run", "-p", "x", "--cache-type", "q3", "-m", "{tiny}"], "invalid choice"),
    (["run", "-m", "{tiny}", "-p", "x", "--temp", "-1"], "--temp must be >= 0"),
])
def test_run_errors(tiny, capsys, argv, message):
    argv = [a.replace("{tiny}", str(tiny)) for a in argv]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse rejects bad choices itself
        status = e.code
    assert status not in (0, None)
    assert message in capsys.readouterr().err


def test_info_reports_the_kv_cache_of_each_type(tiny, capsys):
    assert main(["info", "-m", str(tiny), "-c", "64"]) == 0
    half = capsys.readouterr().out
    assert main(["info", "-m", str(tiny), "-c", "64", "--cache-type", "f32"]) == 0
    full = capsys.readouterr().out
    # 2 (K, V) x 2 layers x 64 positions x (2 KV heads x 16) x 2 or 4 bytes
    assert "KV cache:      16.0 KiB at n_ctx=64 (f16)" in half
    assert "KV cache:      32.0 KiB at n_ctx=64 (f32)" in full
