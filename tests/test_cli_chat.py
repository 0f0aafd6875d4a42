"""`edgellama chat` samples by default (issue 12, item 11): llama.cpp's defaults, or the model file's
own general.sampling.* recommendation, with --repeat-penalty, --top-k/--top-p/--min-p, --seed and
--stop as `run` has them.  Real commands in subprocesses, stdin a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_model
from edgellama.chat_repl import CHAT_DEFAULTS, chat_sampling
from edgellama.gguf import write_gguf
from edgellama.quants import GGMLType

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful AI assistant. Answer in one sentence."


def chat(*args: str, stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _sampling_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("sampling: ")]
    return line


@pytest.fixture(scope="module")
def recommending(tmp_path_factory, request) -> Path:
    """A tiny model whose file recommends its sampling, as llama.cpp's converter writes it."""
    extra = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.9,
             "general.sampling.min_p": 0.0, "general.sampling.penalty_repeat": 1.05}
    mp = pytest.MonkeyPatch()
    mp.setattr(tiny_model, "write_gguf", lambda path, md, specs, data: write_gguf(path, {**md, **extra}, specs, data))
    try:
        return tiny_model.write_tiny_model(tmp_path_factory.mktemp("chat") / "recommends.gguf", GGMLType.Q8_0)
    finally:
        mp.undo()


def test_chat_defaults_are_llama_cpps(tmp_path):
    plain = tiny_model.write_tiny_model(tmp_path / "plain.gguf", GGMLType.Q8_0)
    r = chat("-m", str(plain), "-t", "1", stdin="/exit\n")
    assert r.returncode == 0, r.stderr
    assert CHAT_DEFAULTS == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
                             "penalty_last_n": 64}
    line = _sampling_line(r.stderr)
    assert line.startswith("sampling: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1 over "
                           "64 tokens, seed ")
    assert "recommends" not in line


def test_chat_takes_the_models_recommended_sampling_unless_told(recommending):
    r = chat("-m", str(recommending), "-t", "1", stdin="/exit\n")
    assert r.returncode == 0, r.stderr
    line = _sampling_line(r.stderr)
    # a recommended 0 (min_p) is a choice too
    assert line.startswith("sampling: temperature 0.6, top-k 20, top-p 0.9, min-p 0, repeat penalty 1.05 over 64 "
                           "tokens, seed ")
    assert line.endswith("(temperature, top_k, top_p, min_p, repeat_penalty as the model file recommends)")
    r = chat("-m", str(recommending), "-t", "1", "--temp", "0.2", "--top-k", "5", "-s", "42", "--repeat-penalty",
             "1.1", "--repeat-last-n", "-1", "-c", "32", stdin="/exit\n")
    assert r.returncode == 0, r.stderr
    assert _sampling_line(r.stderr) == ("sampling: temperature 0.2, top-k 5, top-p 0.9, min-p 0, repeat penalty "
                                        "1.1 over 32 tokens, seed 42 (top_p, min_p as the model file recommends)")


def test_chat_sampling_ignores_what_it_cannot_use():
    settings, from_model = chat_sampling({"general.sampling.temp": -1.0, "general.sampling.top_k": 2.5,
                                          "general.sampling.top_p": "0.9", "general.sampling.min_p": True,
                                          "general.sampling.penalty_last_n": 32},
                                         top_k=None, min_p=0.1)
    assert settings == {**CHAT_DEFAULTS, "min_p": 0.1, "penalty_last_n": 32} and from_model == ["penalty_last_n"]
    # the Sampler's own ranges decide: an in-range count written as a float is taken, a penalty
    # beyond MAX_PENALTY (which would make logits infinite) is not
    settings, from_model = chat_sampling({"general.sampling.penalty_repeat": 1e308,
                                          "general.sampling.top_k": 20.0, "general.sampling.temp": 5e-324})
    assert settings == {**CHAT_DEFAULTS, "top_k": 20, "temperature": 5e-324}
    assert isinstance(settings["top_k"], int) and from_model == ["temperature", "top_k"]


def test_chat_with_defaults_ends_its_replies(smollm2_path):
    """On the README's model, greedy chat looped for ever ("la femme au roi, la femme au roi, ...");
    sampled as llama.cpp does, the reply ends at the end of its turn and the session at end of input."""
    r = chat("-m", str(smollm2_path), "-t", "2", "-c", "1024", "-s", "1",
             stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    reply = r.stdout.split("> ", 1)[1]
    assert reply.strip() and reply.rstrip().endswith(">")  # the reply, then the next prompt


def test_chat_stop_strings(smollm2_path):
    r = chat("-m", str(smollm2_path), "-t", "2", "-c", "1024", "--temp", "0", "--system", SYSTEM, "--stop", "Paris",
             stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    reply = r.stdout.split("> ", 1)[1]
    assert "capital of France is" in reply and "Paris" not in reply
