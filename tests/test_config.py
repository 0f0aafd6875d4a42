"""ModelArgs (edgellama/config.py): every llama.* key the runtime reads is validated at load.

Each hostile (key, value) pair is written into an otherwise valid tiny model and must be refused with
exactly ``ModelFormatError`` naming the file, the key and the value, by ``ModelArgs.from_gguf``, by
``edgellama.load`` and by ``edgellama info`` (one line on stderr, exit 1, never a traceback).  The
config module imports neither Numba nor the kernels.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgellama
from edgellama.cli import main
from edgellama.config import (DEFAULT_MAX_CTX, F16_LOAD_WIDTH, MAX_CONTEXT_LENGTH, QK, ModelArgs)
from edgellama.gguf import GGUFFile, ModelFormatError, TensorSpec, ValueType, write_gguf
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
DELETE = object()
U32, I32, U64, I64 = ValueType.UINT32, ValueType.INT32, ValueType.UINT64, ValueType.INT64
F32, F64, STR, BOOL = ValueType.FLOAT32, ValueType.FLOAT64, ValueType.STRING, ValueType.BOOL
NAN, INF = float("nan"), float("inf")

# the tiny model: width 64, 4 heads of 16, 2 KV heads, 2 layers, ffn 96, 261 tokens, context 64
DIM, N_HEADS, N_KV_HEADS, HEAD_DIM, N_LAYERS, FFN, N_VOCAB = 64, 4, 2, 16, 2, 96, 261


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("config") / "base.gguf", GGMLType.F32, ffn=FFN)


@pytest.fixture(scope="module")
def base_rope_freqs(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("config") / "rf.gguf", GGMLType.F32, ffn=FFN, rope_freqs=True,
                            tied=False)


def rewrite(base: Path, path: Path, changes: dict | None = None, tensors: dict | None = None) -> Path:
    """``base`` with metadata ``changes`` (a (ValueType, value) pair, or DELETE) and tensor
    replacements (name -> (GGMLType, array) or (GGMLType, shape, raw bytes), or DELETE)."""
    g = GGUFFile(base)
    metadata = g.typed_metadata()
    for key, value in (changes or {}).items():
        if value is DELETE:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    specs, data = [], []
    for name, info in g.tensors.items():
        replacement = (tensors or {}).get(name)
        if replacement is DELETE:
            continue
        if replacement is None:
            specs.append(TensorSpec(name, info.qtype, info.shape))
            data.append(g.raw(name))
        else:
            specs.append(TensorSpec(name, replacement[0], replacement[-1].shape if len(replacement) == 2
                                    else replacement[1]))
            data.append(replacement[-1])
    write_gguf(path, metadata, specs, data)
    return path


def expect_refused(path: Path, *fragments: str) -> str:
    """ModelArgs.from_gguf, edgellama.load and `edgellama info` all refuse the file, naming it and
    every fragment."""
    with pytest.raises(Exception) as excinfo:
        ModelArgs.from_gguf(GGUFFile(path))
    assert excinfo.type is ModelFormatError, f"{excinfo.type.__name__} escaped: {excinfo.value!r}"
    message = str(excinfo.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    with pytest.raises(Exception) as loaded:
        edgellama.load(path, n_ctx=16)
    assert loaded.type is ModelFormatError and str(loaded.value) == message, repr(loaded.value)
    return message


def _tokens(base: Path, n: int) -> dict:
    """Tokenizer metadata with the vocabulary cut (or padded) to ``n`` tokens."""
    md = GGUFFile(base).metadata
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens = tokens[:n] + [f"<extra_{i}>" for i in range(n - len(tokens))]
    types = np.ones(n, np.int32)
    return {"tokenizer.ggml.tokens": (ValueType.ARRAY, (STR, tokens)),
            "tokenizer.ggml.token_type": (ValueType.ARRAY, (I32, types)),
            "tokenizer.ggml.merges": DELETE, "tokenizer.ggml.model": (STR, "llama"),
            "tokenizer.ggml.scores": (ValueType.ARRAY, (F32, np.zeros(n, np.float32)))}


# (test id, metadata changes, fragments the message must hold)
HOSTILE = [
    # --- the audit's cases (issue 11, item 9) ---
    ("head_count-0", {"llama.attention.head_count": (U32, 0)}, ["llama.attention.head_count is 0", "positive"]),
    ("rope_dim-minus-2", {"llama.rope.dimension_count": (I32, -2)}, ["llama.rope.dimension_count is -2", "positive"]),
    ("rope_dim-0", {"llama.rope.dimension_count": (U32, 0)}, ["llama.rope.dimension_count is 0"]),
    ("linear-scaling-nan", {"llama.rope.scaling.type": (STR, "linear"), "llama.rope.scaling.factor": (F32, NAN)},
     ["llama.rope.scaling.factor is nan", "finite"]),
    ("linear-scaling-inf", {"llama.rope.scaling.type": (STR, "linear"), "llama.rope.scaling.factor": (F32, INF)},
     ["llama.rope.scaling.factor is inf", "finite"]),
    # --- head counts ---
    ("head_count-negative", {"llama.attention.head_count": (I32, -4)}, ["llama.attention.head_count is -4"]),
    ("head_count-2^63", {"llama.attention.head_count": (U64, 1 << 63)},
     [f"llama.attention.head_count is {1 << 63}", "at most"]),
    ("head_count-string", {"llama.attention.head_count": (STR, "4")},
     ["llama.attention.head_count is '4'", "must be an integer"]),
    ("head_count-float", {"llama.attention.head_count": (F32, 4.0)},
     ["llama.attention.head_count is 4.0", "must be an integer"]),
    ("head_count-bool", {"llama.attention.head_count": (BOOL, True)},
     ["llama.attention.head_count is True", "must be an integer"]),
    ("head_count-array", {"llama.attention.head_count": (ValueType.ARRAY, (U32, np.array([4, 4], np.uint32)))},
     ["llama.attention.head_count is an array of 2 items", "must be an integer"]),
    ("head_count-missing", {"llama.attention.head_count": DELETE}, ["missing metadata 'llama.attention.head_count'"]),
    ("head_count-3-does-not-divide-64", {"llama.attention.head_count": (U32, 3)},
     ["llama.attention.head_count 3 does not divide the width", "64"]),
    ("head_count-8-mismatches-tensors",
     {"llama.attention.head_count": (U32, 8), "llama.rope.dimension_count": (U32, 8)},
     ["'blk.0.attn_k.weight'", "expected (16, 64)"]),
    ("head_count_kv-0", {"llama.attention.head_count_kv": (U32, 0)}, ["llama.attention.head_count_kv is 0"]),
    ("head_count_kv-3-does-not-divide-4", {"llama.attention.head_count_kv": (U32, 3)},
     ["llama.attention.head_count_kv 3 does not divide the head count", "4"]),
    ("head_count_kv-8-more-than-heads", {"llama.attention.head_count_kv": (U32, 8)},
     ["llama.attention.head_count_kv 8 does not divide"]),
    ("head_count_kv-float-nan", {"llama.attention.head_count_kv": (F32, NAN)},
     ["llama.attention.head_count_kv is nan", "must be an integer"]),
    # --- widths ---
    ("embedding_length-0", {"llama.embedding_length": (U32, 0)}, ["llama.embedding_length is 0"]),
    ("embedding_length-missing", {"llama.embedding_length": DELETE}, ["missing metadata 'llama.embedding_length'"]),
    ("embedding_length-62-indivisible", {"llama.embedding_length": (U32, 62)}, ["does not divide the width", "62"]),
    ("embedding_length-48-not-multiple-of-32",
     {"llama.embedding_length": (U32, 48), "llama.rope.dimension_count": (U32, 12)},
     ["48", "multiples of 32"]),
    ("embedding_length-128-mismatches-tensors", {"llama.embedding_length": (U32, 128)},
     ["'token_embd.weight'", "expected (261, 128)"]),
    ("feed_forward_length-0", {"llama.feed_forward_length": (U32, 0)}, ["llama.feed_forward_length is 0"]),
    ("feed_forward_length-100", {"llama.feed_forward_length": (U32, 100)}, ["100", "multiples of 32"]),
    ("feed_forward_length-128-mismatches-tensors", {"llama.feed_forward_length": (U32, 128)},
     ["'blk.0.ffn_gate.weight'", "expected (128, 64)"]),
    ("key_length-32", {"llama.attention.key_length": (U32, 32)}, ["llama.attention.key_length is 32", "16"]),
    ("value_length-string", {"llama.attention.value_length": (STR, "16")},
     ["llama.attention.value_length is '16'", "integer"]),
    # --- layers ---
    ("block_count-0", {"llama.block_count": (U32, 0)}, ["llama.block_count is 0"]),
    ("block_count-3-more-than-present", {"llama.block_count": (U32, 3)},
     ["llama.block_count is 3", "20 tensors"]),
    ("block_count-10^8", {"llama.block_count": (U32, 10**8)}, ["llama.block_count is 100000000", "20 tensors"]),
    ("block_count-1-fewer-than-present", {"llama.block_count": (U32, 1)}, ["'blk.1.", "beyond the 1 layers"]),
    ("expert_count-8", {"llama.expert_count": (U32, 8)}, ["llama.expert_count is 8", "mixture-of-experts"]),
    # --- context ---
    ("context_length-0", {"llama.context_length": (U32, 0)}, ["llama.context_length is 0"]),
    ("context_length-negative", {"llama.context_length": (I32, -1)}, ["llama.context_length is -1"]),
    ("context_length-2^40", {"llama.context_length": (U64, 1 << 40)},
     [f"llama.context_length is {1 << 40}", f"at most {MAX_CONTEXT_LENGTH}"]),
    ("context_length-float", {"llama.context_length": (F64, 4096.0)}, ["llama.context_length is 4096.0", "integer"]),
    # --- vocabulary: keys, embedding rows, output rows, tokenizer ---
    ("vocab_size-0", {"llama.vocab_size": (U32, 0)}, ["llama.vocab_size is 0 but token_embd.weight has 261 rows"]),
    ("vocab_size-1000", {"llama.vocab_size": (U32, 1000)},
     ["llama.vocab_size is 1000 but token_embd.weight has 261 rows"]),
    ("vocab_size-string", {"llama.vocab_size": (STR, "261")}, ["llama.vocab_size is '261'", "integer"]),
    # --- norm epsilon ---
    ("eps-0", {"llama.attention.layer_norm_rms_epsilon": (F32, 0.0)},
     ["llama.attention.layer_norm_rms_epsilon is 0.0"]),
    ("eps-negative", {"llama.attention.layer_norm_rms_epsilon": (F32, -1e-5)},
     ["llama.attention.layer_norm_rms_epsilon is -9.99"]),
    ("eps-nan", {"llama.attention.layer_norm_rms_epsilon": (F32, NAN)},
     ["llama.attention.layer_norm_rms_epsilon is nan", "finite"]),
    ("eps-inf", {"llama.attention.layer_norm_rms_epsilon": (F64, INF)},
     ["llama.attention.layer_norm_rms_epsilon is inf", "finite"]),
    ("eps-1", {"llama.attention.layer_norm_rms_epsilon": (F32, 1.0)},
     ["llama.attention.layer_norm_rms_epsilon is 1.0", "(0, 1)"]),
    ("eps-string", {"llama.attention.layer_norm_rms_epsilon": (STR, "1e-5")},
     ["llama.attention.layer_norm_rms_epsilon is '1e-5'", "number"]),
    # --- rope ---
    ("freq_base-0", {"llama.rope.freq_base": (F32, 0.0)}, ["llama.rope.freq_base is 0.0", "positive"]),
    ("freq_base-negative", {"llama.rope.freq_base": (F32, -10000.0)}, ["llama.rope.freq_base is -10000.0"]),
    ("freq_base-nan", {"llama.rope.freq_base": (F32, NAN)}, ["llama.rope.freq_base is nan", "finite"]),
    ("freq_base-inf", {"llama.rope.freq_base": (F32, INF)}, ["llama.rope.freq_base is inf", "finite"]),
    ("freq_base-bool", {"llama.rope.freq_base": (BOOL, True)}, ["llama.rope.freq_base is True", "number"]),
    ("rope_dim-odd", {"llama.rope.dimension_count": (U32, 15)}, ["llama.rope.dimension_count is 15", "even"]),
    ("rope_dim-beyond-head", {"llama.rope.dimension_count": (U32, 32)},
     ["llama.rope.dimension_count is 32", "head size 16"]),
    ("rope_dim-2^32", {"llama.rope.dimension_count": (U64, 1 << 32)}, [f"llama.rope.dimension_count is {1 << 32}"]),
    ("rope_dim-float", {"llama.rope.dimension_count": (F32, 16.0)}, ["llama.rope.dimension_count is 16.0", "integer"]),
    ("scaling-factor-negative", {"llama.rope.scaling.factor": (F32, -2.0)}, ["llama.rope.scaling.factor is -2.0"]),
    ("scaling-factor-half", {"llama.rope.scaling.factor": (F32, 0.5)},
     ["llama.rope.scaling.factor is 0.5", "at least 1"]),
    ("scaling-factor-nan-type-none",
     {"llama.rope.scaling.type": (STR, "none"), "llama.rope.scaling.factor": (F32, NAN)},
     ["llama.rope.scaling.factor is nan"]),
    ("scaling-factor-string", {"llama.rope.scaling.factor": (STR, "2")},
     ["llama.rope.scaling.factor is '2'", "number"]),
    ("scale_linear-inf", {"llama.rope.scale_linear": (F32, INF)}, ["llama.rope.scale_linear is inf"]),
    ("scaling-type-yarn-4", {"llama.rope.scaling.type": (STR, "yarn"), "llama.rope.scaling.factor": (F32, 4.0)},
     ["llama.rope.scaling.type 'yarn'", "not supported"]),
    ("scaling-type-unknown", {"llama.rope.scaling.type": (STR, "cubic")},
     ["llama.rope.scaling.type is 'cubic'", "none, linear"]),
    ("scaling-type-number", {"llama.rope.scaling.type": (U32, 1)}, ["llama.rope.scaling.type is 1", "string"]),
    # --- architecture ---
    ("architecture-gpt2", {"general.architecture": (STR, "gpt2")}, ["general.architecture is 'gpt2'", "only 'llama'"]),
    ("architecture-missing", {"general.architecture": DELETE}, ["general.architecture is None"]),
]


@pytest.mark.parametrize("changes, fragments", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_llama_keys_are_refused_at_load(base, tmp_path, changes, fragments):
    expect_refused(rewrite(base, tmp_path / "bad.gguf", changes), *fragments)


@pytest.mark.parametrize("n_tokens", [200, 1000])
def test_a_tokenizer_of_another_size_than_the_embedding_is_refused_at_load(base, tmp_path, n_tokens):
    """The audit's case: 1000 tokens next to an embedding of 49152 rows loaded, then failed with a 400
    blamed on the prompt."""
    path = rewrite(base, tmp_path / "bad.gguf", {"llama.vocab_size": DELETE, **_tokens(base, n_tokens)})
    expect_refused(path, f"tokenizer.ggml.tokens has {n_tokens} tokens", f"{N_VOCAB} (rows of token_embd.weight)")


def test_output_rows_must_be_the_vocabulary(base_rope_freqs, tmp_path):
    rows = np.zeros((N_VOCAB - 1, DIM), np.float32)
    path = rewrite(base_rope_freqs, tmp_path / "bad.gguf", tensors={"output.weight": (GGMLType.F32, rows)})
    expect_refused(path, "'output.weight'", f"({N_VOCAB - 1}, {DIM})", f"expected ({N_VOCAB}, {DIM})")


def test_missing_embedding_is_refused(base, tmp_path):
    expect_refused(rewrite(base, tmp_path / "bad.gguf", tensors={"token_embd.weight": DELETE}),
                   "missing tensor 'token_embd.weight'")


@pytest.mark.parametrize("values, fragment", [
    (np.full(HEAD_DIM // 2, NAN, np.float32), "holds nan at index 0"),
    (np.array([1, 2, 3, INF, 5, 6, 7, 8], np.float32), "holds inf at index 3"),
    (np.array([1, 2, 3, 4, 0, 6, 7, 8], np.float32), "holds 0.0 at index 4"),
    (np.array([1, 2, 3, 4, 5, 6, 7, -8], np.float32), "holds -8.0 at index 7"),
    (np.ones(HEAD_DIM, np.float32), f"has shape ({HEAD_DIM},), expected ({HEAD_DIM // 2},)"),
    (np.ones(HEAD_DIM // 2, np.float16), None),  # F16 factors are fine
])
def test_rope_freqs_hold_rope_dim_over_2_finite_positive_factors(base_rope_freqs, tmp_path, values, fragment):
    qtype = GGMLType.F16 if values.dtype == np.float16 else GGMLType.F32
    path = rewrite(base_rope_freqs, tmp_path / "rf.gguf", tensors={"rope_freqs.weight": (qtype, values)})
    if fragment is None:
        assert ModelArgs.from_gguf(GGUFFile(path)).rope_dim == HEAD_DIM
    else:
        expect_refused(path, "'rope_freqs.weight'", fragment)


def test_rope_freqs_of_a_quantized_type_are_refused(tmp_path):
    base = write_tiny_model(tmp_path / "wide.gguf", GGMLType.F32, dim=128, n_heads=2, n_kv_heads=2, rope_freqs=True)
    assert GGUFFile(base).tensors["rope_freqs.weight"].shape == (32,)  # head size 64
    block = np.zeros(34, np.uint8)  # one Q8_0 block of 32 factors
    path = rewrite(base, tmp_path / "rf.gguf", tensors={"rope_freqs.weight": (GGMLType.Q8_0, (32,), block)})
    expect_refused(path, "'rope_freqs.weight' must be F32/F16/BF16, got Q8_0")


# ----- edgellama info: a one-line error, never a traceback, and no Numba -------------------------

@pytest.mark.parametrize("changes, fragment", [
    ({"llama.attention.head_count": (U32, 0)}, "llama.attention.head_count is 0"),
    ({"llama.rope.dimension_count": (I32, -2)}, "llama.rope.dimension_count is -2"),
    ({"llama.rope.scaling.type": (STR, "linear"), "llama.rope.scaling.factor": (F32, NAN)},
     "llama.rope.scaling.factor is nan"),
    ({"llama.attention.head_count_kv": (U32, 0)}, "llama.attention.head_count_kv is 0"),
])
def test_info_prints_one_line_for_a_hostile_file(base, tmp_path, capsys, changes, fragment):
    path = rewrite(base, tmp_path / "bad.gguf", changes)
    assert main(["info", "-m", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and fragment in err and str(path) in err, err


INFO_CHILD = r"""
import contextlib, io, json, sys
from edgellama.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
    status = main(["info", "-m", sys.argv[1]])
print(json.dumps({"status": status, "err": err.getvalue(), "out": out.getvalue(),
                  "numba": "numba" in sys.modules, "kernels": "edgellama.kernels" in sys.modules}))
"""


def _info_child(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", INFO_CHILD, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_info_imports_no_numba_for_a_good_file_or_a_hostile_one(base, tmp_path):
    good = _info_child(base)
    assert good["status"] == 0 and "heads:         4 query, 2 key/value, head size 16" in good["out"]
    assert not good["numba"] and not good["kernels"], "edgellama info imported Numba"
    bad = _info_child(rewrite(base, tmp_path / "bad.gguf", {"llama.attention.head_count": (U32, 0)}))
    assert bad["status"] == 1 and bad["err"].count("\n") == 1 and "llama.attention.head_count is 0" in bad["err"]
    assert "Traceback" not in bad["err"] and not bad["numba"]


def test_importing_config_imports_no_numba():
    code = ("import sys, edgellama.config; print('numba' in sys.modules or 'edgellama.kernels' in sys.modules "
            "or 'edgellama.model' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# ----- the API ------------------------------------------------------------------------------------

def test_model_args_is_re_exported_by_the_model_module():
    from edgellama import model

    assert model.ModelArgs is ModelArgs and model.DEFAULT_MAX_CTX == DEFAULT_MAX_CTX


def test_constants_agree_with_the_kernels():
    from edgellama import kernels

    assert QK == kernels.QK and F16_LOAD_WIDTH == kernels.F16_LOAD_WIDTH


def test_from_metadata_reads_what_a_converter_is_about_to_write(base):
    """Writer-style values ((ValueType, value) pairs, plain values, numpy arrays) and tensor shapes
    in numpy order give the same ModelArgs as the file once written."""
    g = GGUFFile(base)
    written = ModelArgs.from_gguf(g)
    shapes = {name: info.shape for name, info in g.tensors.items()}
    typed = ModelArgs.from_metadata(g.typed_metadata(), shapes, "out.gguf")
    plain = ModelArgs.from_metadata(dict(g.metadata), shapes, "out.gguf")
    assert typed == plain == written
    assert (written.dim, written.n_layers, written.n_heads, written.n_kv_heads, written.ffn_dim, written.n_vocab,
            written.max_ctx, written.head_dim, written.kv_dim, written.rope_dim) == \
        (DIM, N_LAYERS, N_HEADS, N_KV_HEADS, FFN, N_VOCAB, 64, HEAD_DIM, N_KV_HEADS * HEAD_DIM, HEAD_DIM)
    # without tensors: the vocabulary from llama.vocab_size, else from the token list
    assert ModelArgs.from_metadata(g.typed_metadata(), None, "x").n_vocab == N_VOCAB
    no_size = {k: v for k, v in g.metadata.items() if k != "llama.vocab_size"}
    assert ModelArgs.from_metadata(no_size, None, "x").n_vocab == N_VOCAB
    with pytest.raises(ModelFormatError, match=r"^out\.gguf: llama\.attention\.head_count is 0"):
        ModelArgs.from_metadata({**g.typed_metadata(), "llama.attention.head_count": (U32, 0)}, shapes, "out.gguf")
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens has 3 tokens but the model has 261"):
        ModelArgs.from_metadata({**g.metadata, "tokenizer.ggml.tokens": ["a", "b", "c"]}, None, "x")


def test_huge_python_values_from_a_converter_are_one_line_errors():
    md = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
          "llama.block_count": 1, "llama.feed_forward_length": 64, "llama.vocab_size": 10}
    for key, value, fragment in [("llama.context_length", 1 << 40, "at most"),
                                 ("llama.rope.freq_base", 10 ** 400, "finite"),
                                 ("llama.attention.head_count", list(range(10**6)), "an array of 1000000 items")]:
        with pytest.raises(ModelFormatError, match=fragment):
            ModelArgs.from_metadata({**md, key: value}, None, "src")


@pytest.mark.parametrize("changes, scale", [
    ({}, 1.0),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, 4.0),
    ({"llama.rope.scaling.factor": 2.0}, 2.0),  # llama.cpp: the type defaults to linear
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 2.0}, 1.0),  # llama.cpp: none never scales
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.0}, 1.0),  # 0: not set
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 1.0}, 1.0),
    ({"llama.rope.scale_linear": 8.0}, 8.0),                                     # the older key name
])
def test_rope_scale_is_read_as_llama_cpp_reads_it(base, changes, scale):
    g = GGUFFile(base)
    shapes = {name: info.shape for name, info in g.tensors.items()}
    assert ModelArgs.from_metadata({**g.metadata, **changes}, shapes, "x").rope_scale == scale


@pytest.mark.parametrize("field_name, value, fragment", [
    ("n_heads", 0, "llama.attention.head_count is 0"),
    ("n_kv_heads", 0, "llama.attention.head_count_kv is 0"),
    ("dim", -64, "llama.embedding_length is -64"),
    ("norm_eps", math.nan, "llama.attention.layer_norm_rms_epsilon is nan"),
    ("rope_scale", math.inf, "llama.rope.scaling.factor is inf"),
    ("rope_dim", 0, "llama.rope.dimension_count is 0"),
])
def test_constructing_model_args_validates_before_deriving(field_name, value, fragment):
    """No ZeroDivisionError: the head size is derived only after the values are checked."""
    kwargs = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, n_vocab=10, max_ctx=16, source="here")
    kwargs[field_name] = value
    with pytest.raises(ModelFormatError, match=f"^here: {fragment}"):
        ModelArgs(**kwargs)


def test_real_models_pass(smollm2_path):
    args = ModelArgs.from_gguf(GGUFFile(smollm2_path))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_dim, args.n_vocab, args.max_ctx,
            args.rope_dim, args.rope_theta, args.rope_scale) == (576, 30, 9, 3, 1536, 49152, 8192, 64, 100000.0, 1.0)
