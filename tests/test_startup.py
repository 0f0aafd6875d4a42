"""Start-up of a fresh process: cached kernels load without Numba's compiler registries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgellama
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import numpy as np
import pytest
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


# ----- the public API (issue 12, item 13) ------------------------------------------------------------

API_CHILD = r"""
import json, sys
import edgellama
light = "numba" not in sys.modules and "edgellama.model" not in sys.modules
from edgellama import (ModelFormatError, ModelFileNotFoundError, SamplingError, TokenizerError, ChatTemplateError,
                       MemoryLimitError, Tokenizer, Sampler, GenerationError)
still_light = "numba" not in sys.modules           # none of these needs the model code
from edgellama import ContextOverflowError, Model  # these do
print(json.dumps({"light": light, "still_light": still_light, "version": edgellama.__version__,
                  "all": sorted(edgellama.__all__), "dir": all(n in dir(edgellama) for n in edgellama.__all__)}))
"""


def test_every_public_name_is_exported_and_import_stays_light():
    out = subprocess.run([sys.executable, "-c", API_CHILD], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["light"] and r["still_light"], "importing edgellama (or its error classes) imported Numba"
    assert r["dir"]
    for name in ("load", "Model", "Tokenizer", "__version__", "ModelFormatError", "ModelFileNotFoundError",
                 "ContextOverflowError", "MemoryLimitError", "SamplingError", "GenerationError", "TokenizerError",
                 "ChatTemplateError", "Sampler"):
        assert name in r["all"]
    for name in r["all"]:
        value = getattr(edgellama, name)
        if isinstance(value, type) and name.endswith("Error"):
            assert issubclass(value, ValueError), name  # one error type per domain, all ValueErrors
    from edgellama.model import ContextOverflowError
    from edgellama.tokenizer import Tokenizer
    assert edgellama.ContextOverflowError is ContextOverflowError and edgellama.Tokenizer is Tokenizer


def test_version_is_single_sourced_from_pyproject():
    import re
    from importlib import metadata

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject).group(1)
    assert edgellama.__version__ == metadata.version("edgellama") == declared


def test_loading_a_missing_file_is_a_file_not_found_error(tmp_path):
    missing = tmp_path / "missing.gguf"
    for catch in (FileNotFoundError, edgellama.ModelFormatError, OSError, ValueError):
        with pytest.raises(catch):
            edgellama.load(missing)
    with pytest.raises(FileNotFoundError) as e:
        edgellama.load(str(missing))
    assert e.value.errno == 2 and e.value.filename == str(missing)
    assert str(e.value) == f"{missing}: no such file"
