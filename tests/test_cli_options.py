"""The ``edgellama`` command line as a newcomer from llama.cpp meets it (issue 12, items 7-10), run
as real commands in subprocesses: -n, -c and memory, errors in the user's terms, --version and help."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import edgellama
from edgellama.info import MemoryLimitError, max_context, memory_needed
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def edgellama_cmd(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", GGMLType.Q8_0, ctx=64)


def _usage_error(r: subprocess.CompletedProcess, command: str = "run") -> str:
    """A usage error: exit 2, nothing on stdout, one line then the pointer to --help."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"edgellama {command}: error: ") and lines[1] == f"see 'edgellama {command} --help'"
    return lines[0]


# ----- item 7: -n as in llama.cpp ----------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-n", "--n-predict"])
def test_a_negative_n_other_than_minus_one_is_refused_at_once(tiny, flag):
    """`run -n -5` generated 4096 tokens for 325 s; now it is a usage error naming the flag as typed."""
    line = _usage_error(edgellama_cmd("run", "-m", str(tiny), "-p", "the", flag, "-5"))
    assert f"{flag} must be -1 (until the end of the text or of the context) or a number of tokens >= 0, got -5" in line


def test_n_minus_one_generates_until_the_end_of_the_text_or_the_context(tiny):
    r = edgellama_cmd("run", "-m", str(tiny), "-p", "the", "-n", "-1", "-c", "16", "-t", "1")
    assert r.returncode == 0, r.stderr
    m = re.search(r"prompt (\d+) tokens.*generated (\d+) tokens.*finish: (\w+)", r.stderr)
    prompt, generated, finish = int(m.group(1)), int(m.group(2)), m.group(3)
    # an end-of-text token ("stop") or a full context ("length"): never more than the context holds
    assert prompt + generated <= 16 + 1
    assert finish == "stop" or prompt + generated >= 16


def test_chat_refuses_a_negative_n_too(tiny):
    line = _usage_error(edgellama_cmd("chat", "-m", str(tiny), "-n", "-2"), "chat")
    assert "-n must be -1 (until the end of the turn)" in line


# ----- item 8: -c, memory ------------------------------------------------------------------------

def test_a_context_that_cannot_fit_is_refused_before_allocating(tiny):
    """--ctx 10000000 printed a 24-line traceback after 36 s and 7.7 GB; now one line with the figures
    and the largest context that fits, before anything is allocated."""
    r = edgellama_cmd("run", "-m", str(tiny), "-p", "the", "--ctx", "2000000000")
    assert r.returncode == 1 and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    m = re.fullmatch(r"edgellama run: error: --ctx 2000000000 needs ([\d.]+) GiB \(weights .*, KV cache .* f16, "
                     r"buffers .*\) but ([\d.]+) (GiB|MiB) of memory is available: "
                     r"the largest context that fits is --ctx (\d+)", errors[0])
    assert m, errors[0]
    assert int(m.group(4)) > 0 and int(m.group(4)) % 256 == 0
    # a context beyond the trained one is said to be (64 tokens here)
    assert "warning: --ctx 2000000000 is beyond the 64 tokens this model was trained on" in r.stderr


def test_the_memory_check_names_the_largest_context_that_fits(tiny, monkeypatch):
    """With a known amount of memory: the largest context it names loads, 256 more does not."""
    from edgellama import info
    from edgellama.gguf import GGUFFile
    from edgellama.model import ModelArgs

    f = GGUFFile(tiny)
    args = ModelArgs.from_gguf(f)
    available = memory_needed(f, args, 10_000, threads=1).total  # room for 10000 positions
    monkeypatch.setattr(info, "available_memory", lambda: available)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", info.ContextLengthWarning)  # (all beyond the trained 64)
        with pytest.raises(MemoryLimitError) as e:
            edgellama.load(tiny, n_ctx=20_000, threads=1)
        assert isinstance(e.value, ValueError) and e.value.available == available
        assert e.value.max_n_ctx == max_context(f, args, available, threads=1) == 9984  # 10000, to 256s
        assert "the largest context that fits is n_ctx=9984" in str(e.value)
        assert edgellama.load(tiny, n_ctx=9984, threads=1).n_ctx == 9984
        with pytest.raises(MemoryLimitError):
            edgellama.load(tiny, n_ctx=9984 + 256, threads=1)
        assert edgellama.load(tiny, n_ctx=20_000, threads=1, check_memory=False).n_ctx == 20_000


def test_ctx_zero_is_the_trained_context(tiny):
    assert edgellama.load(tiny, n_ctx=0, threads=1).n_ctx == 64       # llama.cpp's -c 0
    assert edgellama.load(tiny, threads=1).n_ctx == 64                # default: min(trained, 4096)
    with pytest.warns(edgellama.info.ContextLengthWarning, match="beyond the 64 tokens"):
        edgellama.load(tiny, n_ctx=128, threads=1)
    r = edgellama_cmd("info", "-m", str(tiny), "-c", "0")
    assert r.returncode == 0 and "at n_ctx=64 (f16)" in r.stdout
    r = edgellama_cmd("run", "-m", str(tiny), "-p", "the", "-n", "2", "-c", "128", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "edgellama run: warning: -c 128 is beyond the 64 tokens this model was trained on" in r.stderr


# ----- item 9: errors in the user's terms --------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--temp", "-1"], "--temp must be >= 0 (0: greedy), got -1"),
    (["--keep", "-3"], "--keep must be >= 0, got -3"),
    (["--top-p", "1.5"], "--top-p must be in [0, 1], got 1.5"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be in [0.001, 1000] (1: off), got 0"),
    (["--repeat-penalty", "1e308"], "--repeat-penalty must be in [0.001, 1000] (1: off), got 1e308"),
    (["--presence-penalty", "2000"], "--presence-penalty must be in [0, 1000], got 2000"),
    (["--repeat-last-n", "2000000000"], "--repeat-last-n must be -1 (the whole context) or in [0, 1073741824], "
                                        "got 2000000000"),
    (["--typical", "0"], "--typical must be in (0, 1], got 0"),
    (["-t", "0"], "-t must be an integer in [1, 1024], got 0"),
    (["-t", "1025"], "-t must be an integer in [1, 1024], got 1025"),
    (["--threads", "zero"], "--threads expects an integer, got 'zero'"),
    (["--temperature", "0.5"], "unknown option --temperature (did you mean --temp?)"),
    (["--top_k", "4"], "unknown option --top_k (did you mean --top-k?)"),
    (["-ngl", "99"], "unknown option -ngl"),
])
def test_option_errors_name_the_option_as_typed(tiny, argv, message):
    line = _usage_error(edgellama_cmd("run", "-m", str(tiny), "-p", "the", *argv))
    assert line == f"edgellama run: error: {message}"


def test_a_generation_error_names_its_flag_through_its_param(tiny):
    """A ParameterError raised past option parsing (here: more stop strings than generation takes)
    is a usage error naming the flag that set the parameter, found from its ``param``."""
    from edgellama.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS

    stops = [a for i in range(MAX_STOP_STRINGS + 1) for a in ("--stop", f"s{i}")]
    line = _usage_error(edgellama_cmd("run", "-m", str(tiny), "-p", "the", "-n", "1", "-t", "1", *stops))
    assert line == (f"edgellama run: error: --stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                    f"{MAX_STOP_CHARS} characters, got {MAX_STOP_STRINGS + 1}")


def test_an_unknown_command_suggests_the_close_one():
    r = edgellama_cmd("rnu", "-m", "x.gguf")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["edgellama: error: unknown command 'rnu' (did you mean 'run'?)",
                                     "see 'edgellama --help'"]


def test_keep_with_context_shift_is_checked_against_the_context(tiny):
    line = _usage_error(edgellama_cmd("run", "-m", str(tiny), "-p", "the", "-c", "32", "--context-shift",
                                      "--keep", "16"))
    assert "--keep 16 must be less than half the context (-c 32) with --context-shift" in line


def test_a_prompt_longer_than_the_context_names_the_options_that_help(tiny):
    prompt = "the water is cold and the sea is deep and wide and grey"
    r = edgellama_cmd("run", "-m", str(tiny), "-p", prompt, "-n", "2", "-c", "16", "-t", "1")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("edgellama run: error: the prompt is ") and "the context holds 16" in line
    assert "use a larger -c (the model was trained on 64), --truncate, or a shorter prompt" in line
    assert "n_ctx" not in line


def test_a_missing_model_is_one_line():
    r = edgellama_cmd("run", "-m", "/nonexistent/model.gguf", "-p", "x")
    assert r.returncode == 1 and r.stderr == "edgellama run: error: /nonexistent/model.gguf: no such file\n"


# ----- item 10: --version and help ------------------------------------------------------------------

def test_version():
    r = edgellama_cmd("--version")
    assert r.returncode == 0 and r.stdout == f"edgellama {edgellama.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "quantize", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"edgellama-quantize {edgellama.__version__}\n"


def test_help_shows_the_real_defaults():
    run = edgellama_cmd("run", "--help").stdout
    assert re.search(r"-n N, --n-predict N.*\(default: 64\)", " ".join(run.split()))
    assert "(default: 0.0)" in run and "(default: 40" not in run        # --temp: run is greedy
    chat = " ".join(edgellama_cmd("chat", "--help").stdout.split())
    assert "(default: 0.8, or the model's general.sampling.temp)" in chat
    ppl = " ".join(edgellama_cmd("perplexity", "--help").stdout.split())
    assert "(default: 512, as llama-perplexity" in ppl and "4096" not in ppl
    bench = " ".join(edgellama_cmd("bench", "--help").stdout.split())
    assert "(default: -d + -p + -n + 16, rounded up to 256; 0: the model's trained context)" in bench and "(default: 256)" in bench
    info = edgellama_cmd("info", "--help").stdout
    assert "--threads" not in info and "--ctx" in info



def test_output_piped_into_a_reader_that_goes_away_ends_quietly(tiny):
    """`edgellama run ... | head -1`: the reader is gone before the first token is written (its end
    of the pipe closed before the model is even loaded, so this does not depend on timing); the
    command stops at its first write with the shell's code for SIGPIPE and no error or traceback,
    as cat does."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "edgellama.cli", "run", "-m", str(tiny), "-p", "the", "-n", "4",
                            "-t", "1"], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr


def test_out_of_memory_is_one_line(tiny, monkeypatch, capsys):
    """A MemoryError (a batch's buffers checked before allocating, numpy's own refusal) was a traceback."""
    import edgellama.cli as cli

    def exhausted(args):
        raise MemoryError("a batch of 4096 rows needs about 9.0 GiB of buffers; 3.0 GiB is available")

    monkeypatch.setattr(cli, "cmd_info", exhausted)
    assert cli.main(["info", "-m", str(tiny)]) == 1
    assert capsys.readouterr().err == ("edgellama info: error: out of memory: a batch of 4096 rows needs about "
                                       "9.0 GiB of buffers; 3.0 GiB is available\n")
