"""The quantized kernels compiled for other CPUs than this one: portable IR paths stay correct.

Each case runs in a child process with NUMBA_CPU_NAME and NUMBA_CPU_FEATURES set (Numba then
compiles for that CPU, with its own cache entries), so the paths this machine does not take are
checked too (as far as this CPU can run them): "generic" (no AVX, 4 lanes, half-precision
conversions in integer IR, portable dot products), AVX2 without VNNI (8 lanes, signed Q8_0 weights,
portable dot products), AVX2 with AVX-VNNI (8 lanes, 256-bit vpdpbusd, unsigned Q8_0) and AVX-512
without VNNI (16 lanes, portable).  The twin is gguf-py's dequantizer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from edgellama import kernels as K

import sys
sys.path.insert(0, "tests")
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
    packed = np.zeros((-(-37 // lanes), K.group_bytes(qtype, n_in, lanes)), np.uint8)
    K.pack_rows(raw, qtype, lanes, unsigned_q8, packed)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    qx = (np.empty((9, n_in), np.int8), np.empty((9, n_in // 32), np.float32), np.empty((9, n_in // 32), np.float32),
          np.empty((9, n_in // 16), np.int32))
    K.quantize_q8_rows(x, *qx)
    grid = (qx[0].reshape(9, -1, 32).astype(np.float64) * qx[1][..., None]).reshape(9, n_in)
    want = grid @ dequantize(raw, QT[name]).reshape(37, n_in).astype(np.float64).T
    for n_tok in (1, 9):
        out = np.zeros((n_tok, 37), np.float32)
        K.matmul_packed(packed, qtype, 37, *(a[:n_tok] for a in qx), out)
        err = np.abs(out - want[:n_tok]).max() / np.abs(want).max()
        # Q4_1 / Q5_1 use ggml's half-rounded s = d * sum(q) for their minimum term
        assert err < (2e-3 if name in ("Q4_1", "Q5_1") else 1e-5), (name, n_tok, err)
# half conversions both ways (subnormals, infinities), exp
bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
values = bits.view(np.float16).astype(np.float32)
finite = np.isfinite(values)
cache = np.zeros((1, 1, 1, 1), np.uint16)
rounded = np.array([K.round_to_f16(v) for v in values[finite][::97]], np.float32)
assert np.array_equal(rounded, values[finite][::97])
q = rng.standard_normal((4, 16)).astype(np.float32)
k = rng.standard_normal((2, 80, 16)).astype(np.float16)
v = rng.standard_normal((2, 80, 16)).astype(np.float16)
out = np.zeros((4, 16), np.float32)
K.attention_one(q, k.view(np.uint16), v.view(np.uint16), 80, np.zeros((4, 16 + 2 * K.ATTN_SPAN), np.float32),
                np.zeros((2, 4, 18), np.float32), out)
kf, vf = k.astype(np.float64), v.astype(np.float64)
for h in range(4):
    s = kf[h // 2] @ q[h] / 4.0
    p = np.exp(s - s.max())
    assert np.abs(out[h] - (p / p.sum()) @ vf[h // 2]).max() < 1e-5
print("ok", K.target_summary())
"""


AVX2 = "+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2"
TARGETS = {  # name: (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, what target_summary must say, CPU flag it needs)
    "generic": ("generic", "", "4 lanes, portable", None),
    "avx2": ("haswell", AVX2, "8 lanes, portable", "avx2"),
    "avx2-vnni": ("alderlake", AVX2 + ",+avxvnni", "8 lanes, vpdpbusd", "avx_vnni"),
    "avx512": ("skylake-avx512", AVX2 + ",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd", "16 lanes, portable",
               "avx512bw"),
}


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("target", list(TARGETS))
def test_kernels_for_another_cpu(target, tmp_path):
    cpu, features, summary, needs = TARGETS[target]
    if needs and needs not in _cpu_flags():
        pytest.skip(f"this CPU cannot run {target} code (no {needs})")
    env = {**__import__("os").environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features,
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok") and summary in run.stdout, run.stdout
