"""A model's kernels compile the int8 tiles of its own packed types only (kernels.Formats, a
compile-time set: edgellama.model.kernel_formats), and give the numbers the tiles of every type
give: the tiles of one type are the same IR whichever other types are compiled beside them.

The rest of the suite runs with EDGELLAMA_KERNEL_FORMATS=all (tests/conftest.py: one compilation
for the many sets of its models); these tests take a model's own set.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgellama
from edgellama import kernels as K
from edgellama.kernels.layout import group_bytes
from edgellama.model import FORMATS_ENV, kernel_formats
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

Q8_0, Q4_0, Q4_K, Q6_K = (int(t) for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Layers in Q4_K, embeddings (tied: also the output projection) in Q8_0: two packed types."""
    return write_tiny_model(tmp_path_factory.mktemp("formats") / "mixed.gguf", GGMLType.Q4_K, dim=256, ffn=256,
                            embd_type=GGMLType.Q8_0, ctx=64)


def test_the_formats_are_the_models_packed_types_or_all(monkeypatch):
    monkeypatch.delenv(FORMATS_ENV, raising=False)
    assert kernel_formats([Q4_0, Q6_K, Q4_0, int(GGMLType.F32)]) == K.Formats([Q4_0, Q6_K])
    assert kernel_formats([Q4_0]).codes == (Q4_0,)
    monkeypatch.setenv(FORMATS_ENV, "all")
    assert kernel_formats([Q4_0]) == K.ALL_FORMATS and len(K.ALL_FORMATS.codes) == 8


def test_a_models_own_formats_give_the_numbers_of_all_formats(mixed, monkeypatch):
    monkeypatch.delenv(FORMATS_ENV, raising=False)
    own = edgellama.load(mixed, n_ctx=64, threads=2)
    assert own.weights.formats == K.Formats([Q8_0, Q4_K])
    own.warm_up()  # a first run's compilation of this set (in two processes where it can)
    monkeypatch.setenv(FORMATS_ENV, "all")
    full = edgellama.load(mixed, n_ctx=64, threads=2)
    assert full.weights.formats == K.ALL_FORMATS
    ids = own.tokenize("the water of the sea is cold and deep")
    assert len(ids) > 8  # the prompt path, not the one-token path
    # the prompt path: every position's logits
    np.testing.assert_array_equal(own.logits(ids), full.logits(ids))
    # the decode step, token by token
    for m in (own, full):
        m.reset()
    for t in ids:
        np.testing.assert_array_equal(own.eval([t]), full.eval([t]))
    # batched steps (the server's path): tokens and logprobs
    prompts = ["the sea", "cold water is deep and dark"]
    a = own.generate_many(prompts, max_tokens=4, temperature=0)
    b = full.generate_many(prompts, max_tokens=4, temperature=0)
    assert [x.tokens for x in a] == [x.tokens for x in b] and all(len(x.tokens) == 4 for x in a)
    assert [x.logprobs for x in a] == [x.logprobs for x in b]


@pytest.mark.parametrize("kernel", ["matvec_packed", "matmul_packed", "matmul_rows"])
def test_a_weight_type_outside_the_formats_is_refused(kernel):
    lanes, _ = K.packing()
    wp = np.zeros((1, group_bytes(Q8_0, 32, lanes)), np.uint8)
    rows = 1 if kernel == "matvec_packed" else 2
    shape = (lambda *s: s[1:]) if kernel == "matvec_packed" else (lambda *s: s)
    xq, xd, xs = np.zeros(shape(rows, 32), np.int8), np.zeros(shape(rows, 1), np.float32), np.zeros(shape(rows, 1), np.float32)
    xsum, out = np.zeros(shape(rows, 2), np.int32), np.full(shape(rows, lanes), 7.0, np.float32)
    with pytest.raises(ValueError, match="not among the formats"):
        getattr(K, kernel)(wp, Q8_0, lanes, xq, xd, xs, xsum, out, K.Formats([Q4_0]))
    assert (out == 7.0).all()  # nothing written
    getattr(K, kernel)(wp, Q8_0, lanes, xq, xd, xs, xsum, out, K.Formats([Q8_0]))
    assert (out == 0.0).all()  # zero weights, zero activations
