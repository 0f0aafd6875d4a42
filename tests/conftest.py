"""Shared fixtures: the real SmolLM2 model (fetched once through tools/fetch_models.py) and the
Q8_0 / Q4_0 files requantized from it by our quantizer (byte-identical to llama.cpp's, which
tests/test_golden.py checks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))           # `tools` is importable from the tests
sys.path.insert(0, str(ROOT / "tests"))  # `reference`, `tiny_model`


def pytest_configure(config):
    """Fetch the real test assets once, before collection (test modules check for them at import)."""
    from tools.fetch_models import llama3_tokenizer, smollm2_q4_1

    for fetch in (smollm2_q4_1, llama3_tokenizer):
        try:
            fetch()
        except Exception as e:  # offline: the tests that need the asset skip and say why
            print(f"warning: {fetch.__name__}() failed: {e}", file=sys.stderr)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tools.fetch_models import smollm2_q4_1

    return smollm2_q4_1()


@pytest.fixture(scope="session")
def smollm2_files(smollm2_path) -> dict[str, Path]:
    """{"q4_1": shipped file, "q8_0": ..., "q4_0": ...} requantized by edgellama-quantize."""
    from tools.fetch_models import smollm2_requantized

    return {"q4_1": smollm2_path, "q8_0": smollm2_requantized("q8_0"), "q4_0": smollm2_requantized("q4_0")}
