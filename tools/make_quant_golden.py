"""Golden hashes of llama-quantize's Q4_K_M / Q4_K_S / Q5_K_M / Q5_K_S / Q6_K / Q5_0 / Q5_1 files
(``tests/golden/kquant_llamacpp_hashes.json``), so that CI proves edgellama-quantize byte-identical
to llama-quantize without llama.cpp.

The sources are rebuilt deterministically by the tests (the same bytes on every machine; their
sha256 is recorded so a test can tell a changed source from a changed quantizer):
  * ``smollm2_f32`` / ``smollm2_f16``: SmolLM2-135M-Instruct (width 576, 2.25 x 256: llama-quantize's
    fallbacks) as an F32 / F16 GGUF, converted by edgellama-quantize from the Hugging Face folder
    ``tools/make_hf_checkpoint.smollm2_hf()`` makes from the shipped Q4_1 file;
  * ``smollm2_q4_1``: that Q4_1 file itself (requantized, ``--allow-requantize``);
  * ``tiny256_f16``: ``tiny_kquant_model()``, 8 layers of width 256 and FFN 512 (every row a
    multiple of 256: the K-quants themselves and the layer rules), untied output, F16 weights from
    an integer-only generator, with edge-case rows (zeros, constants, tiny values in half
    subnormals, outliers, sparse rows, exact ties, large values, single-sign rows);
  * ``tiny256_q4_k_m``: that model as Q4_K_M (written by edgellama-quantize: the bytes of
    llama-quantize's, see above), requantized: K-quant sources decoded as ggml decodes them;
  * ``llama70b_shape``: ``tiny_kquant_model(n_layers=80, ...)`` with grouped-query attention, the
    shape llama.cpp calls a 70B (its attn_v rule), zero weights: only the tensor types are recorded.
For each source and type: ``llama-quantize SOURCE OUT TYPE 2``, and the whole file's size and
sha256, ``general.file_type``, per-type counts and, in file order, each tensor's name, type and the
first 16 hex digits of the sha256 of its data.  Also llama-perplexity's perplexity of the SmolLM2
Q4_K_M file on the golden passage (tests/golden/smollm2_passage.json) with chunks of 240.

Usage:  python tools/make_quant_golden.py    (needs llama.cpp's tools: python tools/llamacpp.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgellama.gguf import GGUFFile, TensorSpec, ValueType, write_gguf  # noqa: E402
from edgellama.quants import GGMLType  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "kquant_llamacpp_hashes.json"
TYPES = ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q5_0", "q5_1"]
# which types each source is quantized to (every quantizer on both kinds of width; the F16 and
# requantized SmolLM2 sources only need their own paths covered once per quantizer)
SOURCE_TYPES = {
    "smollm2_f32": TYPES,
    "smollm2_f16": ["q4_k_m", "q5_k_s", "q6_k"],
    "smollm2_q4_1": ["q4_k_m", "q5_k_m"],
    "tiny256_f16": TYPES + ["q8_0", "q4_0", "q4_1"],
    "tiny256_q4_k_m": ["q6_k", "q5_k_s", "q5_1"],
}
REQUANTIZED = {"smollm2_q4_1", "tiny256_q4_k_m"}  # quantized sources: --allow-requantize
TYPES_ONLY = {"llama70b_shape": ["q4_k_m", "q4_k_s", "q5_k_m"]}
PERPLEXITY_CTX = 240  # llama-perplexity needs 2 chunks: the passage's 482 tokens give 2 of 240


# ----- a deterministic tiny model ---------------------------------------------------------------

_GOLDEN_RATIO = np.uint64(0x9E3779B97F4A7C15)


def uniform(seed: int, n: int) -> np.ndarray:
    """n float64 numbers in [0, 1): splitmix64 of seed * 2^32 + i (integer arithmetic only, so the
    same on every machine and numpy version), top 53 bits."""
    z = (np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 32)) * _GOLDEN_RATIO
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def gaussian_like(seed: int, n: int) -> np.ndarray:
    """Sums of four uniforms, centred and scaled to unit variance (exact dyadic sums; no libm)."""
    u = uniform(seed, 4 * n).reshape(4, n)
    return (u[0] + u[1] + u[2] + u[3] - 2.0) * 1.7320508075688772


def edge_rows(seed: int, rows: int, cols: int, edge: bool = True) -> np.ndarray:
    """(rows, cols) float32 weights around 0.02 with (``edge``) one edge case every 16 rows (by
    row % 16): such a model overflows half-precision activations, so it is for quantizing only."""
    g = gaussian_like(seed, rows * cols).reshape(rows, cols)
    scale = 0.02 * (0.25 + 1.75 * uniform(seed + 10_000, rows))[:, None]   # per-row magnitude
    w = g * scale
    if not edge:
        return w.astype(np.float32)
    kind = np.arange(rows) % 16
    col = np.arange(cols)
    w[kind == 1] = 0.0                                                      # all zero
    w[kind == 2] = 0.03125                                                  # positive constant
    w[kind == 3] = np.abs(w[kind == 3]) + 0.01                              # positive only
    w[kind == 4] = -np.abs(w[kind == 4]) - 0.005                            # negative only
    w[kind == 5] = g[kind == 5] * 2.0 ** -20                                # half subnormals
    w[kind == 6] = np.where(col % 32 == 5, 40.0 * np.abs(w[kind == 6]) + 1.0, w[kind == 6])  # outliers
    w[kind == 7] = np.where(uniform(seed + 20_000, cols) < 0.9, 0.0, w[kind == 7])          # sparse
    w[kind == 8] = np.round(g[kind == 8] * 8.0) / 2.0 * 2.0 ** -7           # exact ties (multiples)
    w[kind == 9] = g[kind == 9] * 100.0                                     # large
    w[kind == 10] = -0.0625                                                 # negative constant
    w[kind == 11] = np.where((col // 32) % 2 == 0, 0.0, w[kind == 11])      # zero sub-blocks
    w[kind == 12] = np.where(g[kind == 12] > 0, 0.015625, -0.015625)        # two levels
    return w.astype(np.float32)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (a byte-level vocabulary llama.cpp loads)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra, chars = 0, []
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_kquant_model(path: Path, *, n_layers: int = 8, dim: int = 256, ffn: int = 512, n_heads: int = 4,
                      n_kv_heads: int = 1, tied: bool = False, zeros: bool = False, edge: bool = True,
                      seed: int = 1) -> Path:
    """A small llama GGUF in F16 (norms F32) whose rows are multiples of 256, deterministic; with
    ``edge`` its matrices have edge-case rows (see edge_rows), with ``zeros`` they are zero."""
    alphabet = _byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_end|>"] + alphabet + ["th", "er", alphabet[ord(" ")] + "t"]
    merges = [f"{alphabet[ord('t')]} {alphabet[ord('h')]}", f"{alphabet[ord('e')]} {alphabet[ord('r')]}",
              f"{alphabet[ord(' ')]} t"]
    n_vocab = len(tokens)
    head_dim = dim // n_heads
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny-kquant-golden",
        "general.file_type": (ValueType.UINT32, 1),
        "llama.block_count": (ValueType.UINT32, n_layers),
        "llama.context_length": (ValueType.UINT32, 256),
        "llama.embedding_length": (ValueType.UINT32, dim),
        "llama.feed_forward_length": (ValueType.UINT32, ffn),
        "llama.attention.head_count": (ValueType.UINT32, n_heads),
        "llama.attention.head_count_kv": (ValueType.UINT32, n_kv_heads),
        "llama.rope.freq_base": (ValueType.FLOAT32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (ValueType.FLOAT32, 1e-5),
        "llama.rope.dimension_count": (ValueType.UINT32, head_dim),
        "llama.vocab_size": (ValueType.UINT32, n_vocab),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": (ValueType.ARRAY, (ValueType.STRING, tokens)),
        "tokenizer.ggml.token_type": (ValueType.ARRAY, (ValueType.INT32, np.array([3, 3] + [1] * (n_vocab - 2),
                                                                                  np.int32))),
        "tokenizer.ggml.merges": (ValueType.ARRAY, (ValueType.STRING, merges)),
        "tokenizer.ggml.bos_token_id": (ValueType.UINT32, 0),
        "tokenizer.ggml.eos_token_id": (ValueType.UINT32, 1),
        "tokenizer.ggml.add_bos_token": (ValueType.BOOL, False),
    }
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, dim))]
    if not tied:
        shapes.append(("output.weight", (n_vocab, dim)))
    shapes.append(("output_norm.weight", (dim,)))
    kv = n_kv_heads * head_dim
    for i in range(n_layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.ffn_norm.weight", (dim,)),
                   (f"blk.{i}.attn_q.weight", (dim, dim)), (f"blk.{i}.attn_k.weight", (kv, dim)),
                   (f"blk.{i}.attn_v.weight", (kv, dim)), (f"blk.{i}.attn_output.weight", (dim, dim)),
                   (f"blk.{i}.ffn_gate.weight", (ffn, dim)), (f"blk.{i}.ffn_up.weight", (ffn, dim)),
                   (f"blk.{i}.ffn_down.weight", (dim, ffn))]
    specs = [TensorSpec(name, GGMLType.F32 if len(shape) == 1 else GGMLType.F16, shape) for name, shape in shapes]

    def data():
        for index, (name, shape) in enumerate(shapes):
            if len(shape) == 1:
                yield (1.0 + 0.0625 * gaussian_like(seed * 1000 + index, shape[0])).astype(np.float32)
            elif zeros:
                yield np.zeros(shape, np.float16)
            else:
                yield edge_rows(seed * 1000 + index, *shape, edge=edge).astype(np.float16)

    write_gguf(path, metadata, specs, data())
    return path


# ----- sources ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_source(name: str, folder: Path) -> Path:
    """The source file ``name`` (see the module docstring), written into ``folder``."""
    from quantize.convert import convert_file

    path = folder / f"{name}.gguf"
    if path.exists():
        return path
    if name in ("smollm2_f32", "smollm2_f16"):
        from tools.make_hf_checkpoint import smollm2_hf

        convert_file(smollm2_hf(), path, name.split("_")[1], quiet=True)
    elif name == "smollm2_q4_1":
        from tools.fetch_models import smollm2_q4_1

        return smollm2_q4_1()
    elif name == "tiny256_f16":
        tiny_kquant_model(path)
    elif name == "tiny256_q4_k_m":
        convert_file(make_source("tiny256_f16", folder), path, "q4_k_m", quiet=True)
    elif name == "tiny256_plain_f16":  # the same shapes without edge rows: a model that runs
        tiny_kquant_model(path, edge=False)
    elif name == "llama70b_shape":
        tiny_kquant_model(path, n_layers=80, ffn=256, zeros=True)
    else:
        raise ValueError(name)
    return path


def describe(path: Path, with_hashes: bool = True) -> tuple[list[str], dict]:
    """What the golden file records of one quantized file: its tensor names in file order, and a
    record whose "tensors" are "TYPE:hash" (or "TYPE") in that order."""
    gguf = GGUFFile(path)
    try:
        names, tensors = [], []
        for name, info in gguf.tensors.items():
            names.append(name)
            digest = hashlib.sha256(gguf.raw(name)).hexdigest()[:16] if with_hashes else ""
            tensors.append(f"{info.qtype.name}:{digest}" if with_hashes else info.qtype.name)
        record = {"general.file_type": int(gguf.metadata["general.file_type"]),
                  "type_counts": dict(sorted(Counter(t.split(":")[0] for t in tensors).items()))}
        if with_hashes:
            record["file_size"] = path.stat().st_size
            record["file_sha256"] = sha256_file(path)
        record["tensors"] = tensors
        return names, record
    finally:
        gguf.close()


# ----- llama.cpp -------------------------------------------------------------------------------

def llama_quantize(source: Path, target: Path, qtype: str, threads: int = 2, requantize: bool = False) -> None:
    from tools.llamacpp import tool

    argv = [str(tool("llama-quantize"))] + (["--allow-requantize"] if requantize else [])
    argv += [str(source), str(target), qtype.upper(), str(threads)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-quantize failed: {result.stderr[-2000:]}")


def llama_version() -> str:
    from tools.llamacpp import VERSION, tool

    result = subprocess.run([str(tool("llama-bench")), "--version"], capture_output=True, text=True)  # same build
    line = next((l for l in (result.stdout + result.stderr).splitlines() if l.startswith("version:")), "")
    return f"llama.cpp {line.removeprefix('version: ').strip()} (llama-cpp-python {VERSION} sdist)"


def llama_perplexity(model: Path, text: str, n_ctx: int, threads: int = 2) -> float:
    from tools.llamacpp import tool

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        result = subprocess.run([str(tool("llama-perplexity")), "-m", str(model), "-f", f.name, "-c", str(n_ctx),
                                 "-b", str(n_ctx), "-t", str(threads)], capture_output=True, text=True)
    finally:
        Path(f.name).unlink()
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"llama-perplexity failed: {(result.stdout + result.stderr)[-2000:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=GOLDEN)
    args = p.parse_args(argv)
    golden: dict = {
        "about": "llama-quantize's output for each source and type (see tools/make_quant_golden.py); "
                 "files.SOURCE.TYPE.tensors[i]: 'GGML_TYPE:first 16 hex digits of the sha256 of its data' "
                 "of the tensor named sources.SOURCE.tensor_names[i] (file order)",
        "llama_cpp": llama_version(),
        "command": "llama-quantize [--allow-requantize] SOURCE OUT TYPE 2",
        "sources": {}, "files": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for source_name, qtypes in {**SOURCE_TYPES, **TYPES_ONLY}.items():
            source = make_source(source_name, folder)
            hashes = source_name not in TYPES_ONLY
            golden["sources"][source_name] = {"sha256": sha256_file(source), "size": source.stat().st_size}
            golden["files"][source_name] = {}
            for qtype in qtypes:
                out = folder / f"{source_name}.{qtype}.gguf"
                llama_quantize(source, out, qtype, requantize=source_name in REQUANTIZED)
                names, golden["files"][source_name][qtype] = describe(out, with_hashes=hashes)
                known = golden["sources"][source_name].setdefault("tensor_names", names)
                if known != names:
                    raise RuntimeError(f"{source_name} {qtype}: llama-quantize wrote another tensor order")
                print(source_name, qtype, golden["files"][source_name][qtype]["type_counts"], flush=True)
                if source_name == "smollm2_f32" and qtype == "q4_k_m":
                    passage = json.loads((ROOT / "tests" / "golden" / "smollm2_passage.json").read_text())
                    ppl = llama_perplexity(out, passage["text"], PERPLEXITY_CTX)
                    golden["perplexity"] = {"source": source_name, "type": qtype, "n_ctx": PERPLEXITY_CTX,
                                            "threads": 2, "llama_perplexity_ppl": ppl}
                    print("perplexity", ppl, flush=True)
                if not hashes or source_name != "smollm2_f32":
                    out.unlink()
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
