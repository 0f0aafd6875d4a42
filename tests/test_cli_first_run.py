"""The first run on a machine says what it is doing (issue 12, item 6): with no compiled kernels for
this CPU in Numba's cache, run, chat, bench and perplexity say so on stderr before anything else,
show the compilation kernel by kernel, and report it apart from their own timings.

The commands run in subprocesses with their own Numba cache (NUMBA_CACHE_DIR).  A cold cache that
must be compiled in full would cost half a minute per test, so these copy the warm cache of this
process and remove two small kernels from the copy: the commands then compile exactly those two.
One test starts from an empty cache and stops the command after its first two lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import edgellama
from edgellama import kernels as K
from edgellama.kernel_cache import DECODE_PIECES_CHILD, DECODE_PIECES_HERE, cache_status, child_possible, \
    expected_kernels, matrix_types
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
COLD = ["rope_rows", "swiglu"]  # removed from the copied cache: about a second to compile together
ANNOUNCE = re.compile(r"edgellama: compiling the kernels for this CPU, first run only \(cpu (\S+)\); "
                      r"they are cached in (.+)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = write_tiny_model(tmp_path_factory.mktemp("first_run") / "tiny.gguf", GGMLType.Q8_0, ctx=64)
    edgellama.load(path, n_ctx=64, threads=1).warm_up()  # this process's cache now holds every kernel
    return path


def _kernels(path) -> list[str]:
    return expected_kernels(matrix_types(edgellama.gguf.GGUFFile(path)))


def _child_cache_dirs(numba_dir: Path, names: list[str]) -> dict[str, str]:
    """Where a process with NUMBA_CACHE_DIR=numba_dir caches each kernel (names of edgellama.kernels,
    or "merge.<name>" for the tokenizer's functions)."""
    code = ("import json, sys, edgellama.kernels as K, edgellama.tokenizer.merge as M; "
            "print(json.dumps({n: str(getattr(M if n.startswith('merge.') else K, n.split('.')[-1])._cache._cache_path)"
            " for n in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, NUMBA_CACHE_DIR=str(numba_dir)), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _cache_with_cold_kernels(tmp_path: Path, cold: list[str], tokenizer: bool = True) -> Path:
    """A Numba cache directory holding every kernel this process has in its cache, but ``cold``; and
    (``tokenizer``) the tokenizer's BPE functions (compiled here first if they are not cached yet),
    which every command loading a byte-level vocabulary runs."""
    from numba.core.registry import CPUDispatcher

    from edgellama.tokenizer import merge

    merge.RankTable.from_dict({bytes([b]): b for b in range(256)})  # (compiles them, or loads them)
    dispatchers = {name: value for name, value in vars(K).items()
                   if isinstance(value, CPUDispatcher) and name not in cold}
    if tokenizer:
        dispatchers.update({f"merge.{name}": value for name, value in vars(merge).items()
                            if isinstance(value, CPUDispatcher)})
    numba_dir = tmp_path / "numba"
    targets = _child_cache_dirs(numba_dir, list(dispatchers))
    for name, dispatcher in dispatchers.items():
        cache = dispatcher._cache
        index = cache._cache_file._load_index()
        if not index:
            continue
        files = [cache._cache_file._index_name, *index.values()]
        Path(targets[name]).mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(Path(cache._cache_path) / file, Path(targets[name]) / file)
    return numba_dir


def _env(numba_dir: Path) -> dict:
    """A first run's: this Numba cache, and no packed weights kept from an earlier load (which would
    leave the packer uncompiled)."""
    return dict(os.environ, NUMBA_CACHE_DIR=str(numba_dir), EDGELLAMA_PACKED_CACHE="off")


def _command(argv: list[str], numba_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, env=_env(numba_dir), timeout=600)


def test_the_status_of_the_cache_is_known_before_loading(tiny, tmp_path):
    names = _kernels(tiny)
    assert names[:2] == ["pack_rows_moved", "decode_token"] and "matmul_packed" in names
    assert cache_status(names).cold == []  # the fixture warmed them all, for this CPU
    # a model without quantized matrices needs neither the packer nor the int8 products
    assert not any(n.startswith("pack_rows") for n in expected_kernels({int(GGMLType.F32)}))
    assert expected_kernels({int(GGMLType.Q4_0), int(GGMLType.Q6_K)})[:2] == ["pack_rows_moved", "decode_token"]
    assert "dequantize_rows" in expected_kernels({int(GGMLType.F16)})


def test_run_announces_compilation_then_reports_it_apart(tiny, tmp_path):
    numba_dir = _cache_with_cold_kernels(tmp_path, COLD)
    # a prompt longer than the one-token path takes: the prompt kernels are needed
    argv = ["run", "-m", str(tiny), "-p", "the water of the sea is cold and deep and dark", "-n", "3", "-t", "1"]
    r = _command(argv, numba_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    # first of all, what is happening and where the result goes
    m = ANNOUNCE.fullmatch(lines[0])
    assert m and Path(m.group(2)).is_relative_to(numba_dir), lines[0]
    # then a line per kernel (stderr is not a terminal here), then the time it took
    assert lines[1:3] == [f"edgellama: compiling kernel 1/2: {COLD[0]}", f"edgellama: compiling kernel 2/2: {COLD[1]}"]
    assert re.fullmatch(r"edgellama: 2 kernels compiled in [\d.]+ s \(cached for the next runs\)", lines[3])
    # the timings leave the compilation out and say how long it took
    assert re.fullmatch(r"load [\d.]+ s \(\+ [\d.]+ s compiling kernels\) \| prompt \d+ tokens, [\d.]+ tok/s \| "
                        r"generated 3 tokens, [\d.]+ tok/s \| finish: length", lines[-1]), lines[-1]

    # the next run finds them in the cache: nothing to say
    again = _command(argv, numba_dir)
    assert again.returncode == 0 and again.stdout == r.stdout
    assert "compil" not in again.stderr
    assert re.fullmatch(r"\nload [\d.]+ s \| prompt .* \| finish: length\n", again.stderr)


def _first_run(argv: list[str], numba_dir: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The command on this cache: it succeeds and announces the compilation first; its stderr lines."""
    r = _command(argv, numba_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert ANNOUNCE.fullmatch(lines[0]), lines[0]
    return r, lines


def _then_warm(argv: list[str], numba_dir: Path, first: subprocess.CompletedProcess) -> None:
    """Everything is in the cache after the first run, and the text is a warm run's."""
    again = _command(argv, numba_dir)
    assert again.returncode == 0 and "compil" not in again.stderr
    assert again.stdout == first.stdout


def test_a_first_run_compiles_the_prompt_path_in_a_second_process(tiny, tmp_path):
    """With the decode step and prompt kernels cold, the prompt path's compile in a forked child
    (kernel_cache.CompileChild) while the decode step compiles here; reported as such, and the
    text is the one a warm run gives.  Without a second CPU (or turned off) all compile here."""
    cold = ["decode_token", *COLD]
    numba_dir = _cache_with_cold_kernels(tmp_path, cold)
    argv = ["run", "-m", str(tiny), "-p", "the water of the sea is cold and deep and dark", "-n", "3", "-t", "1"]
    r, lines = _first_run(argv, numba_dir)
    if child_possible():
        assert lines[1:4] == ["edgellama: compiling kernel 1/3: decode_token",
                              f"edgellama: compiled kernel 2/3 in a second process: {COLD[0]}",
                              f"edgellama: compiled kernel 3/3 in a second process: {COLD[1]}"]
    else:
        assert lines[1:4] == [f"edgellama: compiling kernel {i}/3: {name}" for i, name in enumerate(cold, 1)]
    assert re.fullmatch(r"edgellama: 3 kernels compiled in [\d.]+ s \(cached for the next runs\)", lines[4])
    _then_warm(argv, numba_dir, r)


def test_a_first_short_run_compiles_the_decode_step_in_pieces_in_two_processes(tiny, tmp_path):
    """Only the decode step needed (a short prompt) and cold: its helper functions compile apart,
    some in a forked child (kernel_cache.DECODE_PIECES_CHILD) while the others compile here, then
    the step itself links them from the cache; the text is a warm run's."""
    here, there = list(DECODE_PIECES_HERE), list(DECODE_PIECES_CHILD)
    numba_dir = _cache_with_cold_kernels(tmp_path, ["decode_token", *here, *there])
    argv = ["run", "-m", str(tiny), "-p", "the", "-n", "3", "-t", "1"]
    r, lines = _first_run(argv, numba_dir)
    if child_possible():
        n = len(here) + len(there) + 1
        want = ([f"edgellama: compiling kernel {i}/{n}: {name}" for i, name in enumerate(here, 1)]
                + [f"edgellama: compiled kernel {i}/{n} in a second process: {name}"
                   for i, name in enumerate(there, len(here) + 1)]
                + [f"edgellama: compiling kernel {n}/{n}: decode_token"])
    else:  # all inside the step's own compilation
        n, want = 1, ["edgellama: compiling kernel 1/1: decode_token"]
    assert lines[1:1 + len(want)] == want
    assert re.fullmatch(rf"edgellama: {n} kernels? compiled in [\d.]+ s \(cached for the next runs\)",
                        lines[1 + len(want)])
    _then_warm(argv, numba_dir, r)


def test_a_run_after_a_split_first_run_maps_the_weights_and_loads_the_step_alone(tiny, tmp_path):
    """As a new user's runs go, the packed weights kept: the first run compiles the decode step
    from pieces a child compiled (and packs the weights), the next ones map the weights (so no
    packing kernel runs) and load the step alone from the cache; they must give the same text.
    The step once came out of the cache without the hook that registers the parallel launch with
    LLVM (kernels.cache._keep_reload_hooks) and such a run crashed at its first token."""
    numba_dir = _cache_with_cold_kernels(tmp_path, ["decode_token", *DECODE_PIECES_HERE, *DECODE_PIECES_CHILD])
    env = dict(_env(numba_dir), EDGELLAMA_PACKED_CACHE=str(tmp_path / "packed"))
    argv = [sys.executable, "-m", "edgellama.cli", "run", "-m", str(tiny), "-p", "the", "-n", "3", "-t", "1"]
    runs = [subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600) for _ in range(3)]
    assert [r.returncode for r in runs] == [0, 0, 0], runs[-1].stderr
    assert "keeping the packed weights" in runs[0].stderr and "compil" in runs[0].stderr
    assert all("compil" not in r.stderr and "keeping" not in r.stderr for r in runs[1:])
    assert runs[1].stdout == runs[2].stdout == runs[0].stdout


@pytest.mark.parametrize("command", ["chat", "bench", "perplexity"])
def test_every_command_announces_a_cold_cache(tiny, tmp_path, command):
    numba_dir = _cache_with_cold_kernels(tmp_path, COLD[1:])
    stdin = None
    if command == "chat":
        argv, stdin = ["chat", "-m", str(tiny), "-t", "1"], "/exit\n"
    elif command == "bench":
        argv = ["bench", "-m", str(tiny), "-t", "1", "-p", "8", "-n", "2", "-r", "1", "--json"]
    else:
        text = tmp_path / "text.txt"
        text.write_text("the water is cold and the sea is deep " * 8, encoding="utf-8")
        argv = ["perplexity", "-m", str(tiny), "-f", str(text), "-c", "32", "-t", "1"]
    r = _command(argv, numba_dir, stdin)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert ANNOUNCE.fullmatch(lines[0]), lines[0]
    assert lines[1] == f"edgellama: compiling kernel 1/1: {COLD[1]}"
    assert re.fullmatch(r"edgellama: 1 kernel compiled in [\d.]+ s \(cached for the next runs\)", lines[2])
    if command == "bench":
        report = json.loads(r.stdout)
        assert report["numba_cache"] == "partly cold" and report["compile_s"] > 0
    if command == "perplexity":
        assert re.search(r"\d+ scored \(\d+ tok/s; [\d.]+ s compiling kernels not counted\)", r.stderr)


def test_an_empty_cache_is_announced_before_anything_compiles(tiny, tmp_path):
    """From an empty cache: the announcement is the first line, before the first kernel (the
    tokenizer's, then the load's); the command is stopped there."""
    env = _env(tmp_path / "empty")
    proc = subprocess.Popen([sys.executable, "-m", "edgellama.cli", "run", "-m", str(tiny), "-p", "the", "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if len(lines) == 4:
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reader.join(timeout=300)
        assert len(lines) == 4, lines
        assert ANNOUNCE.fullmatch(lines[0]), lines
        # the tokenizer's functions first (a byte-level vocabulary: compiled with its table)
        assert lines[1:3] == ["edgellama: compiling kernel 1/2: _build_slots", "edgellama: compiling kernel 2/2: _encode"]
        # a one-token prompt: the one-token path's kernels only (the prompt path's load when needed)
        types = matrix_types(edgellama.gguf.GGUFFile(tiny))
        one_token = expected_kernels(types, prompt_path=False)
        assert one_token == ["pack_rows_moved", "decode_token"]
        # with a compile child, the decode step in pieces (all cold here), else in one compilation
        ahead = one_token if not child_possible() else \
            ["pack_rows_moved", *DECODE_PIECES_HERE, *DECODE_PIECES_CHILD, "decode_token"]
        assert lines[3] == f"edgellama: compiling kernel 3/{2 + len(ahead)}: pack_rows_moved"
    finally:
        proc.kill()
        proc.wait()


def test_a_first_run_reports_the_tokenizers_compilation_with_the_kernels(tiny, tmp_path):
    """The tokenizer's BPE functions compile with its table, before the command knows which kernels
    it needs: the same report counts them, announced with the CPU and the cache, then the kernels."""
    numba_dir = _cache_with_cold_kernels(tmp_path, ["swiglu"], tokenizer=False)
    argv = ["run", "-m", str(tiny), "-p", "the sea is deep", "-n", "3", "-t", "1"]  # a prompt: swiglu needed
    r, lines = _first_run(argv, numba_dir)
    assert ANNOUNCE.fullmatch(lines[0]), lines[0]
    assert lines[1:4] == ["edgellama: compiling kernel 1/2: _build_slots", "edgellama: compiling kernel 2/2: _encode",
                          "edgellama: compiling kernel 3/3: swiglu"], lines
    assert re.fullmatch(r"edgellama: 3 kernels compiled in [\d.]+ s \(cached for the next runs\)", lines[4])
    _then_warm(argv, numba_dir, r)
