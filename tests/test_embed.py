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


# ----- bounds (an adversarial pass: 8 texts of a whole context each made 8 contexts' KV cache; a
# client that went away did not stop the work) --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgellama.quants import GGMLType
    from tiny_model import write_tiny_model

    return edgellama.load(write_tiny_model(tmp_path_factory.mktemp("embed") / "m.gguf", GGMLType.Q8_0), n_ctx=64,
                          threads=1)


def test_a_call_adds_at_most_one_context_of_kv_cache(tiny, monkeypatch):
    from edgellama import batch
    from edgellama.embed import EMBED_SLOTS

    made = []

    class Recording(batch.Rows):
        def __init__(self, model, n_slots, n_ctx, *args, **kwargs):
            made.append((n_slots, n_ctx))
            super().__init__(model, n_slots, n_ctx, *args, **kwargs)

    monkeypatch.setattr(batch, "Rows", Recording)
    rng = np.random.default_rng(0)
    lengths = [64, 64, 3, 3, 3, 3, 3, 3, 3, 3, 3, 40, 1, 1, 1, 20, 20, 20, 32, 32]
    texts = [rng.integers(3, 200, n).tolist() for n in lengths]
    vectors = tiny.embed(texts)
    assert made and all(slots * positions <= tiny.n_ctx and slots <= EMBED_SLOTS for slots, positions in made), made
    assert sum(slots for slots, _ in made) == len(texts)
    monkeypatch.undo()
    for i in range(len(texts)):  # each alone: the same vector as in its group
        np.testing.assert_array_equal(tiny.embed([texts[i]])[0], vectors[i])


def test_check_runs_before_every_pass_and_what_it_raises_stops_the_call(tiny):
    class Gone(Exception):
        pass

    calls = []

    def check():
        calls.append(len(calls))
        if len(calls) == 3:
            raise Gone

    with pytest.raises(Gone):
        tiny.embed([list(range(3, 63))] * 5, check=check)  # one text (60 tokens) a group, one pass each
    assert len(calls) == 3
    assert len(tiny.embed([list(range(3, 63))] * 2, check=lambda: None)) == 2


def test_the_server_stops_embedding_for_a_client_that_went_away(tiny):
    from edgellama.server import Embedding, JobStopped, run_embedding

    class Gone:
        checks = 0

        def check(self):
            self.checks += 1
            raise JobStopped()

        def respond(self, *args):
            raise AssertionError("answered a client that went away")

    class Engine:
        model, name = tiny, "tiny"

    job = Gone()
    with pytest.raises(JobStopped):
        run_embedding(Engine(), Embedding([list(range(3, 63))] * 8, False), job)
    assert job.checks == 1  # before the first pass
