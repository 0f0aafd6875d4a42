"""The kernels compiled for other CPUs than this one: every code path stays correct, not only the host's.

Each case runs in a child process with NUMBA_CPU_NAME and NUMBA_CPU_FEATURES set (Numba then
compiles for that CPU, with its own entries in the kernel cache), so the paths this machine does
not take are checked too (as far as this CPU can run them): "generic" (no AVX, 4 lanes,
half-precision conversions in integer IR, portable dot products), AVX2 without VNNI (8 lanes,
signed Q8_0 weights, vpmaddubsw + vpmaddwd), AVX2 with AVX-VNNI (8 lanes, 256-bit vpdpbusd, unsigned
Q8_0), AVX-512 without VNNI (16 lanes, vpmaddubsw + vpmaddwd) and AVX-512 VNNI (16 lanes, vpdpbusd).

* test_model_for_another_cpu: the model-level equivalence tests (MODEL_TESTS) under the first two
  targets (MODEL_TARGETS) this CPU can run whose code path differs from the host's: the kernel
  twins below, prefill vs decode and the reference forward for every tensor type and KV cache type,
  the context shift's re-rotation per cache type, one golden fixture and one perplexity fixture of
  the real model.  Tolerances are the derived ones of those tests (tests/error_bounds.py), not
  this CPU's results.  The children start as soon as the run's tests are known and run beside
  the rest of it (start_children), each with its own kernel cache kept between runs (_child_env).
  Cost on 2 cores: about 30 s with warm kernel caches, about 100 s with cold ones (Numba first
  compiles every kernel for each target).
* test_kernels_for_another_cpu: the product, packing, half-conversion and one-token attention
  kernels against their numpy twins (CHILD), for the other targets this CPU can run (not the one
  whose code path is the host's own: the rest of the run tests that one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from edgellama import kernels as K

import sys
sys.path.insert(0, "tests")
import error_bounds as eb
from tiny_model import encode_kquant
from edgellama.quants import GGMLType

lanes, unsigned_q8 = K.packing()
rng = np.random.default_rng(0)
n_in = 256
for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"):
    qtype = int(GGMLType[name])
    w = rng.standard_normal((37, n_in)).astype(np.float32)
    raw = (encode_kquant(w, GGMLType[name]) if name.endswith("_K")
           else np.ascontiguousarray(quantize(w, QT[name])).reshape(37, -1))
    raw.setflags(write=False)  # read-only weights, as the model passes them (one compilation)
    packed = np.zeros((-(-37 // lanes), K.group_bytes(qtype, n_in, lanes)), np.uint8)
    K.pack_rows(raw, qtype, lanes, unsigned_q8, packed)
    packed.setflags(write=False)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    forms = K.activation_room(n_in, 9)
    K.quantize_activation_rows(x, forms)
    qx = forms.supers if K.is_k_quant(qtype) else forms.blocks
    # the twin: ggml's product of the exact weights with the kernels' own int8 blocks (the
    # K-quants': one scale per 256 values, repeated per block; Q4_1 / Q5_1 take the minimum times
    # the block term s), and the kernels' worst-case rounding of it
    m = eb.matrix(raw, qtype, (37, n_in))
    grid = (qx[0].reshape(9, -1, 32).astype(np.float64) * qx[1][..., None]).reshape(9, n_in)
    s = qx[2].astype(np.float64)
    if m.block_min is not None:
        want, bound = grid @ m.S.T + s @ m.block_min.T, eb.product_bound(m, grid, s)
    else:
        want, bound = grid @ m.WT, eb.product_bound(m, grid)
    for n_tok in (1, 9):
        out = np.zeros((n_tok, 37), np.float32)
        K.matmul_packed(packed, qtype, 37, *(a[:n_tok] for a in qx), out)
        assert np.all(np.abs(out - want[:n_tok]) <= bound[:n_tok]), (name, n_tok)
# half conversions both ways (subnormals, infinities), exp
bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
values = bits.view(np.float16).astype(np.float32)
finite = np.isfinite(values)
rounded = np.array([K.round_to_f16(v) for v in values[finite][::97]], np.float32)
assert np.array_equal(rounded, values[finite][::97])
q = rng.standard_normal((4, 16)).astype(np.float32)
k = rng.standard_normal((2, 80, 16)).astype(np.float16)
v = rng.standard_normal((2, 80, 16)).astype(np.float16)
out = np.zeros((4, 16), np.float32)
K.attention_one(q, k.view(np.uint16), v.view(np.uint16), 80, np.zeros((4, 16 + 2 * K.ATTN_SPAN), np.float32),
                np.zeros((2, 4, 18), np.float32), out)
kf, vf = k.astype(np.float64), v.astype(np.float64)
want = np.zeros((4, 16))
for h in range(4):
    s = kf[h // 2] @ q[h] * 0.25
    p = np.exp(s - s.max())
    want[h] = (p / p.sum()) @ vf[h // 2]
bound = eb.attention_bound(q[None], kf.transpose(1, 0, 2), vf.transpose(1, 0, 2), 79, 0.25)[0]
assert np.all(np.abs(out - want) <= bound)
print("ok", K.target_summary())
"""


AVX2 = "+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2"
AVX512 = AVX2 + ",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd"
TARGETS = {  # name: (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, what target_summary must say, CPU flags it needs)
    "generic": ("generic", "", "4 lanes, portable", ()),
    "avx512-vnni": ("icelake-server", AVX512 + ",+avx512vnni", "16 lanes, vpdpbusd", ("avx512bw", "avx512_vnni")),
    "avx2": ("haswell", AVX2, "8 lanes, vpmaddubsw", ("avx2",)),
    "avx512": ("skylake-avx512", AVX512, "16 lanes, vpmaddubsw", ("avx512bw",)),
    "avx2-vnni": ("alderlake", AVX2 + ",+avxvnni", "8 lanes, vpdpbusd", ("avx_vnni",)),
}

# The model-level equivalence tests run again for other targets: together they take every kernel
# path of a target (int8 tiles of all eight quantized formats for one token and for prompt tiles,
# F32 / F16 / BF16 products, quantize_activation, prompt and one-token attention over f32, f16 and q8_0
# caches, the KV row helpers of each cache type, the context shift's re-rotation, embeddings from
# packed and file rows), on the tiny models and on the real one (its shipped file, Q4_1 and Q8_0
# tensors: no requantized copy to make first).
MODEL_TESTS = [
    "tests/test_targets.py::test_kernels_in_a_child",
    "tests/test_model.py::test_prefill_logits_match_numpy_reference",
    "tests/test_model.py::test_prefill_equals_token_by_token_decode",
    "tests/test_model.py::test_cached_decode_matches_full_sequence_reference",
    "tests/test_model.py::test_kv_cache_type_matches_the_reference_rounding",
    "tests/test_model.py::test_q8_0_kv_cache_matches_the_reference_rounding",
    "tests/test_context_shift.py::test_shifted_cache_equals_evaluating_the_kept_tokens_at_their_new_positions",
    "tests/test_golden.py::test_matches_llama_cpp[q4_1]",
    "tests/test_perplexity.py::test_matches_llama_cpp_on_the_passage[q4_1]",
]
MODEL_TARGETS = 2  # targets besides the host's that run MODEL_TESTS


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runnable(target: str) -> bool:
    return set(TARGETS[target][3]) <= _cpu_flags()


def _child_env(target: str) -> dict[str, str]:
    """A child's environment: the target's CPU name and features, and its own kernel cache
    (NUMBA_CACHE_DIR/targets/<target> when the tests run with one, else <model cache>/numba-targets/
    <target>, about 8 MB each), kept between runs so that a warm run compiles nothing.  Own
    directories because the model children run at the same time, and Numba's cache index is not
    safe against two processes adding entries to it at once."""
    cpu, features, summary, _ = TARGETS[target]
    base = os.environ.get("NUMBA_CACHE_DIR")
    if base:
        folder = Path(base) / "targets" / target
    else:
        from tools.fetch_models import cache_dir

        folder = cache_dir() / "numba-targets" / target
    return {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(folder),
            "EDGELLAMA_EXPECT_TARGET": summary}


def _hosts_path(target: str) -> bool:
    """Whether the target's code path is this process's own (which the rest of the run tests)."""
    from edgellama import kernels as K  # choosing the layout compiles nothing

    return TARGETS[target][2] in K.target_summary()


def _model_targets() -> list[str]:
    """The first MODEL_TARGETS targets this CPU can run whose code path is not the host's."""
    if "NUMBA_CPU_NAME" in os.environ:  # already a child: no grandchildren
        return []
    other = [t for t in TARGETS if _runnable(t) and not _hosts_path(t)]
    return other[:MODEL_TARGETS]


# The children start when the run's tests are known (start_children, from conftest.py's
# pytest_collection_finish), not when their tests come, at the lowest CPU priority: each compiles
# every kernel for its target, on one core, for a minute or two when cold, in the time the rest of
# the run leaves a core idle (it mostly compiles on one core too when cold) instead of after it.
# The tests below then collect their results.
_CHILDREN: dict[tuple[str, str], tuple[subprocess.Popen, Path, Path]] = {}  # (kind, target) -> child, stdout, stderr
_FOLDER: list[Path] = []


def _start(kind: str, target: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start (once) the child of ``kind`` "model" (MODEL_TESTS) or "kernels" (CHILD) for a target."""
    key = (kind, target)
    if key not in _CHILDREN:
        if not _FOLDER:
            _FOLDER.append(Path(tempfile.mkdtemp(prefix="edgellama-targets-")))
        out, err = _FOLDER[0] / f"{kind}-{target}.out", _FOLDER[0] / f"{kind}-{target}.err"
        cmd = ([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *MODEL_TESTS] if kind == "model"
               else [sys.executable, "-c", CHILD])
        with open(out, "w") as sink, open(err, "w") as errors:
            child = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(target), stdout=sink,
                                     stderr=subprocess.STDOUT if kind == "model" else errors, text=True,
                                     preexec_fn=_lowest_priority)
        _CHILDREN[key] = (child, out, err)
    return _CHILDREN[key]


def _lowest_priority() -> None:
    """In a child before it runs: the lowest CPU priority, so that it takes the cores the rest of
    the run leaves idle (much of a cold run compiles on one core) and hardly slows the rest, whose
    multi-threaded kernels wait for their slowest thread.

    Nice 19 alone is not enough where Linux groups processes by session (sched_autogroup, on by
    default): nice weighs a process only against its own session's, and the sessions share the CPU
    equally.  The chat tests start ``edgellama chat`` in a session of its own (a pseudo-terminal);
    against a nice-19 child of another session its two threads' loops waited for each other, and a
    reply of 24 tokens took 18 s instead of 0.2 s.  So the child gets a session of its own, whose
    group is given the lowest priority too."""
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w") as f:  # Linux with autogroup; elsewhere nice alone
            f.write("19")
    except OSError:
        pass
    try:
        os.nice(19)
    except OSError:
        pass


def start_children(items) -> None:
    """Start the children of the selected tests of this file (their targets that this CPU runs)."""
    kinds = {"test_model_for_another_cpu": "model", "test_kernels_for_another_cpu": "kernels"}
    for item in items:
        kind = kinds.get(getattr(item, "originalname", None))
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("target") if callspec else None
        if kind and target in TARGETS and _runnable(target) and not (kind == "kernels" and _hosts_path(target)):
            _start(kind, target)


def stop_children() -> None:
    """End the run's children still running (a run stopped early) and remove their output."""
    for child, _, _ in _CHILDREN.values():
        if child.poll() is None:
            child.kill()
            child.wait()
    _CHILDREN.clear()
    if _FOLDER:
        shutil.rmtree(_FOLDER.pop(), ignore_errors=True)


def _result(kind: str, target: str, timeout: float) -> tuple[int, str, str]:
    """Wait for a child: its exit code, stdout and stderr."""
    child, out, err = _start(kind, target)
    try:
        returncode = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    return returncode, out.read_text(), err.read_text()


@pytest.mark.parametrize("target", [t for t in TARGETS if t not in _model_targets()])
def test_kernels_for_another_cpu(target):
    """The kernel twins (CHILD) for the targets that do not run MODEL_TESTS (which include them)."""
    if not _runnable(target):
        pytest.skip(f"this CPU cannot run {target} code (no {', '.join(TARGETS[target][3])})")
    if _hosts_path(target):
        pytest.skip(f"{target} takes this CPU's own code path, which the rest of the run tests")
    returncode, stdout, stderr = _result("kernels", target, timeout=900)
    assert returncode == 0, stderr[-3000:]
    assert stdout.startswith("ok") and TARGETS[target][2] in stdout, stdout


@pytest.mark.parametrize("target", _model_targets() or ["none"])
def test_model_for_another_cpu(target):
    if target == "none":
        pytest.skip("NUMBA_CPU_NAME is set: this process is already another target's" if "NUMBA_CPU_NAME" in os.environ
                    else "no other target this CPU can run")
    returncode, output, _ = _result("model", target, timeout=1800)
    lines = output.splitlines()
    tail = "\n".join(lines[-60:])
    assert returncode == 0, f"{target}:\n{tail}"
    assert lines and " passed" in lines[-1] and "skipped" not in lines[-1], tail


def test_kernels_in_a_child():
    """In a child of test_model_for_another_cpu: the kernels are the requested target's, and their
    twins (CHILD) hold."""
    want = os.environ.get("EDGELLAMA_EXPECT_TARGET")
    if want is None:
        pytest.skip("only in a child process of test_model_for_another_cpu")
    from edgellama import kernels as K

    assert want in K.target_summary()
    exec(compile(CHILD, "CHILD", "exec"), {"__name__": "child"})
