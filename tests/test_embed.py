"""Embeddings of the real model against llama.cpp's (tests/golden/smollm2_embeddings.json, made by
tools/make_embedding_fixture.py with llama-server --embedding --pooling mean): same token ids,
cosine similarity >= 0.99 for every text, through Model.embed and POST /v1/embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgellama
from test_server import Running

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_embeddings.json").read_text())
CASES = GOLDEN["cases"]


def _cosines(vectors, cases=CASES) -> np.ndarray:
    ref = np.array([c["embedding"] for c in cases], np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    return np.sum(np.asarray(vectors, np.float64) * ref, axis=1)


@pytest.fixture(scope="module")
def smollm2_q8_0(smollm2_files):
    return edgellama.load(smollm2_files["q8_0"], n_ctx=512, threads=2)


def test_embeddings_agree_with_llama_cpp(smollm2_q8_0):
    model = smollm2_q8_0
    texts = [c["text"] for c in CASES]
    assert [model.tokenize(t) for t in texts] == [c["ids"] for c in CASES]
    vectors = model.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    cosines = _cosines(vectors)
    assert cosines.min() >= 0.99, dict(zip(texts, cosines.round(5)))
    # each alone: the same vector as among the others, exactly
    np.testing.assert_array_equal(model.embed([texts[2]])[0], vectors[2])


@pytest.mark.parametrize("parallel", [1, 2])
def test_embeddings_endpoint_agrees_with_llama_cpp(smollm2_q8_0, parallel):
    s = Running(smollm2_q8_0, parallel=parallel)
    try:
        status, _, body = s.post("/v1/embeddings", {"model": "text-embedding-3-small",
                                                    "input": [c["text"] for c in CASES]})
        assert status == 200
        vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
        assert _cosines(vectors).min() >= 0.99
        assert body["usage"]["prompt_tokens"] == sum(len(c["ids"]) for c in CASES)
    finally:
        s.close()
