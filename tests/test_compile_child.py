"""A first run compiles in two processes at once (edgellama.kernel_cache.CompileChild): a forked
child compiles kernels without ever running them, this process loads what it compiled from Numba's
cache, and a child that fails, hangs or is turned off costs nothing but its time.

Each case runs in a subprocess with an empty Numba cache of its own (NUMBA_CACHE_DIR), so that the
kernels really are cold there: two small ones (swiglu, rmsnorm_rows), about a second to compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import error_bounds as eb
from edgellama import kernel_cache
from edgellama.kernel_cache import CompileChild, child_possible

ROOT = Path(__file__).resolve().parent.parent

needs_child = pytest.mark.skipif(not child_possible(), reason="a compile child needs Linux, 2+ CPUs and memory to spare")

# the subprocess: kernels given to a child, then what this process compiled itself, as JSON
SCRIPT = r"""
import json, sys, time
import numpy as np
from numba.core import event
from edgellama import kernels as K
from edgellama.kernel_cache import CompileChild

mode = sys.argv[1]
gate = np.linspace(-6, 6, 96, dtype=np.float32).reshape(3, 32)
up = np.linspace(2, -1, 96, dtype=np.float32).reshape(3, 32)
x = np.linspace(-1, 3, 64, dtype=np.float32).reshape(2, 32)
w = np.linspace(0.5, 1.5, 32, dtype=np.float32)
normed = np.zeros_like(x)
gate0, normed0 = gate.copy(), normed.copy()

def work():
    K.swiglu(gate, up)
    K.rmsnorm_rows(x, w, np.float32(1e-5), normed)
    if not (np.array_equal(gate, gate0) and np.array_equal(normed, normed0)):
        raise SystemExit(3)  # a kernel ran: the child must only compile
    if mode == "fail":
        raise RuntimeError("the child fails")
    if mode == "hang":
        time.sleep(3600)

here = []

class Listener(event.Listener):
    depth = 0
    def on_start(self, ev):
        Listener.depth += 1
    def on_end(self, ev):
        Listener.depth -= 1
        if Listener.depth == 0:
            here.append(ev.data["dispatcher"].py_func.__name__)

child = CompileChild.start(work, deferred=("swiglu",))
names = child.finish(timeout=1 if mode == "hang" else 600)
event.register("numba:compile", Listener())
K.swiglu(gate, up)
K.rmsnorm_rows(x, w, np.float32(1e-5), normed)
print(json.dumps({"names": names, "status": child.status, "here": here, "gate": gate.tolist(),
                  "normed": normed.tolist()}))
"""


def _run(mode: str, tmp_path: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _check_results(r: dict) -> None:
    """The kernels' results in the parent, against numpy twins (the bounds of tests/test_kernels.py)."""
    gate = np.linspace(-6, 6, 96).astype(np.float32).astype(np.float64)
    up = np.linspace(2, -1, 96).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(np.ravel(r["gate"]), gate / (1 + np.exp(-gate)) * up, rtol=float(eb.gamma(7)),
                               atol=1e-30)
    x = np.linspace(-1, 3, 64).astype(np.float32).astype(np.float64).reshape(2, 32)
    w = np.linspace(0.5, 1.5, 32).astype(np.float32).astype(np.float64)
    want = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + np.float64(np.float32(1e-5))) * w
    # a sum of 32 squares, the mean, the square root and two products in float32
    np.testing.assert_allclose(np.array(r["normed"]), want, rtol=float(eb.gamma(32 + 6)))


@needs_child
def test_the_child_compiles_without_running_and_this_process_loads_its_work(tmp_path):
    r = _run("ok", tmp_path)
    assert r["status"] == 0  # exit 3 would mean a kernel ran in the child
    # the deferred kernel comes in the second pass, after the others
    assert r["names"] == ["rmsnorm_rows", "swiglu"]
    assert r["here"] == []  # this process compiled nothing: both came from the cache
    _check_results(r)


@needs_child
def test_a_failing_child_leaves_the_work_to_this_process(tmp_path):
    r = _run("fail", tmp_path)
    assert os.WIFEXITED(r["status"]) and os.WEXITSTATUS(r["status"]) == 1
    # it failed in its first pass, after compiling rmsnorm_rows (kept); swiglu is compiled here
    assert r["names"] == ["rmsnorm_rows"] and r["here"] == ["swiglu"]
    _check_results(r)


@needs_child
def test_a_child_that_outlasts_its_time_is_killed_and_its_work_done_here(tmp_path):
    r = _run("hang", tmp_path)
    assert os.WIFSIGNALED(r["status"])
    # killed in its first pass, before swiglu (deferred to the second); rmsnorm_rows reported if its
    # code reached the cache in the time given, and then found there, not compiled again: never both
    assert "swiglu" in r["here"] and "swiglu" not in r["names"] and r["names"] in ([], ["rmsnorm_rows"])
    assert not set(r["names"]) & set(r["here"])
    _check_results(r)


def test_no_child_when_turned_off_or_without_a_second_cpu(monkeypatch):
    monkeypatch.setenv(kernel_cache.PROCESSES_ENV, "1")
    assert not child_possible() and CompileChild.start(lambda: None) is None
    monkeypatch.delenv(kernel_cache.PROCESSES_ENV)
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert not child_possible() and CompileChild.start(lambda: None) is None
    monkeypatch.setattr(sys, "platform", "darwin")  # fork is unsafe on macOS
    assert not child_possible()
