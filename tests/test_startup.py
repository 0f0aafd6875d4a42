"""Start-up of a fresh process: cached kernels load without Numba's compiler registries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import edgellama
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import numpy as np
import edgellama
from edgellama.bench import numba_cache_counts
model = edgellama.load(sys.argv[1], n_ctx=32, threads=2)
logits = model.logits([5, 17, 200, 3])
hits, misses = numba_cache_counts()
print(json.dumps({"logits": logits.tolist(), "misses": misses, "hits": hits,
                  "registries": "numba.np.arraymath" in sys.modules}))
"""


def _child(path):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_warm_process_loads_cached_kernels_without_the_lowering_registries(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    _child(path)                      # fills Numba's cache for these signatures if it was cold
    warm = _child(path)
    assert warm["misses"] == 0 and warm["hits"] > 0
    assert not warm["registries"], "a cache hit imported Numba's lowering registries"
    want = edgellama.load(path, n_ctx=32, threads=2).logits([5, 17, 200, 3])
    np.testing.assert_allclose(np.array(warm["logits"], np.float32), want, rtol=0, atol=1e-5 * np.abs(want).max())
