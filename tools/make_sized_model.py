"""Random-weight GGUF files with the exact shapes of real models, for measuring speed and memory at
real sizes (they do not depend on the values): Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B (GQA, Llama
3.1-style ``rope_freqs``), with Llama 3's real vocabulary and tokenizer (128,256 tokens, from the
``tokenizer.model`` tools/fetch_models.py fetches) and llama.cpp's chat template for it.

Quantized types are written block by block (no float copy of the model is ever made): every
block's scales are a small valid half-precision value and its quants random bytes.  Tensor types
follow llama-quantize's choices for the file type: ``q8_0`` and ``q4_0`` (output Q6_K and, tied,
the embedding Q6_K too, as llama.cpp does), ``q4_k_m`` (Q4_K, with Q6_K for the output, and for
attn_v / ffn_down in the layers llama-quantize gives more bits), ``f16``.

Usage:  python tools/make_sized_model.py --shape llama-3.2-1b --type q4_0 [-o FILE] [--seed 0]
        (default output: $EDGELLAMA_MODELS/sized/<shape>.<type>.gguf; an existing file is kept)
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgellama.gguf import TensorSpec, ValueType, write_gguf  # noqa: E402
from edgellama.quants import BLOCK_LAYOUT, GGMLType  # noqa: E402
from quantize.policy import FILE_TYPES_BY_NAME  # noqa: E402  (llama.cpp's file types: number, base type)
from tools.fetch_models import cache_dir, llama3_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    tied: bool
    rope_factor: float      # Llama 3.1 scaling (the rope_freqs tensor)
    ctx: int
    n_vocab: int = 128256


SHAPES = {
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, tied=True, rope_factor=32.0, ctx=131072),
    "llama-3.2-3b": Shape(3072, 28, 24, 8, 8192, tied=True, rope_factor=32.0, ctx=131072),
    "llama-3-8b": Shape(4096, 32, 32, 8, 14336, tied=False, rope_factor=8.0, ctx=131072),
}
FILE_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")  # the file types written here (quantize.policy's names)
# the generator's version, kept in the file: a cached file of an older one is written again
GENERATOR_KEY, GENERATOR = "edgellama.sized.generator", 2
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama31_rope_freqs(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                       original_ctx: int = 8192) -> np.ndarray:
    """The per-frequency divisors of Llama 3.1's RoPE scaling (what convert_hf_to_gguf writes)."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = original_ctx / low, original_ctx / high
    smooth = (original_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < high_wavelen, 1.0,
                   np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's use_more_bits: the first and last eighth of the layers, and every third."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_types(shape: Shape, ftype: str) -> dict[str, GGMLType]:
    """Each 2-D tensor's type, as llama-quantize chooses for this file type."""
    names = ["token_embd.weight"] + ([] if shape.tied else ["output.weight"])
    names += [f"blk.{i}.{m}.weight" for i in range(shape.n_layers)
              for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    base = FILE_TYPES_BY_NAME[ftype].base
    out = {}
    for name in names:
        t = base
        output_like = name == "output.weight" or (shape.tied and name == "token_embd.weight")
        if ftype in ("q4_0", "q4_k_m") and output_like:
            t = GGMLType.Q6_K
        elif ftype == "q4_k_m" and (".attn_v." in name or ".ffn_down." in name):
            if _more_bits(int(name.split(".")[1]), shape.n_layers):
                t = GGMLType.Q6_K
        out[name] = t
    return out


_SCALE_FIELDS = {  # (byte offset of an f16 scale in the block) for every block layout we write
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(rng: np.random.Generator, qtype: GGMLType, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, row bytes) of random blocks of qtype whose half-precision scales are 2^-8..2^-6."""
    if qtype == GGMLType.F16:
        return (rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.02).astype(np.float16)
    elems, nbytes = BLOCK_LAYOUT[qtype]
    n_blocks = n_rows * (n_cols // elems)
    data = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for at in _SCALE_FIELDS[qtype]:
        scales = rng.uniform(2.0 ** -8, 2.0 ** -6, n_blocks).astype(np.float16)
        data[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if qtype == GGMLType.Q4_K:
        # zero-mean values, as a real model's: each sub-block's minimum factor equals its scale
        # factor and dmin = 7.5 d, so value = d * sc * (q - 7.5).  (Uniform quants with unrelated
        # minimums add a large bias to every row: activations overflow within a few layers, and a
        # model computing infinities and NaNs measures other code than a real one.)
        sc = rng.integers(0, 64, (n_blocks, 4), dtype=np.uint8)        # sub-blocks 0-3: 6 bits
        packed = rng.integers(0, 16, (n_blocks, 4), dtype=np.uint8)    # sub-blocks 4-7: 4 bits
        data[:, 4:8], data[:, 8:12], data[:, 12:16] = sc, sc, packed | (packed << 4)
        data[:, 2:4] = (data[:, 0:2].copy().view(np.float16) * np.float16(7.5)).view(np.uint8)
    return data.reshape(n_rows, -1)


def write_model(path: Path, shape: Shape, ftype: str, seed: int = 0) -> Path:
    from tools.make_llama3_tokenizer_fixture import llama3_gguf_metadata

    head_dim = shape.dim // shape.n_heads
    kv_dim = shape.n_kv_heads * head_dim
    theta = 500000.0
    meta: dict = {
        "general.architecture": "llama",
        "general.name": f"random {path.stem}",
        GENERATOR_KEY: (ValueType.UINT32, GENERATOR),
        "general.file_type": (ValueType.UINT32, FILE_TYPES_BY_NAME[ftype].number),
        "llama.context_length": (ValueType.UINT32, shape.ctx),
        "llama.embedding_length": (ValueType.UINT32, shape.dim),
        "llama.block_count": (ValueType.UINT32, shape.n_layers),
        "llama.feed_forward_length": (ValueType.UINT32, shape.ffn),
        "llama.attention.head_count": (ValueType.UINT32, shape.n_heads),
        "llama.attention.head_count_kv": (ValueType.UINT32, shape.n_kv_heads),
        "llama.attention.layer_norm_rms_epsilon": (ValueType.FLOAT32, 1e-5),
        "llama.rope.freq_base": (ValueType.FLOAT32, theta),
        "llama.rope.dimension_count": (ValueType.UINT32, head_dim),
        "llama.vocab_size": (ValueType.UINT32, shape.n_vocab),
        "tokenizer.chat_template": LLAMA3_TEMPLATE,
    }
    tok = llama3_gguf_metadata(llama3_tokenizer())
    for key, value in tok.items():
        if isinstance(value, list):
            meta[key] = (ValueType.ARRAY, (ValueType.STRING, value))
        elif isinstance(value, np.ndarray):
            meta[key] = (ValueType.ARRAY, (ValueType.INT32, value.astype(np.int32)))
        elif isinstance(value, bool):
            meta[key] = (ValueType.BOOL, value)
        elif isinstance(value, int):
            meta[key] = (ValueType.UINT32, value)
        else:
            meta[key] = value
    types = tensor_types(shape, ftype)
    mats = {"token_embd.weight": (shape.n_vocab, shape.dim), "output.weight": (shape.n_vocab, shape.dim)}
    layer_shapes = {"attn_q": (shape.dim, shape.dim), "attn_k": (kv_dim, shape.dim), "attn_v": (kv_dim, shape.dim),
                    "attn_output": (shape.dim, shape.dim), "ffn_gate": (shape.ffn, shape.dim),
                    "ffn_up": (shape.ffn, shape.dim), "ffn_down": (shape.dim, shape.ffn)}
    specs: list[TensorSpec] = []
    makers = []
    rng = np.random.default_rng(seed)

    def add(name, tshape, qtype, make):
        specs.append(TensorSpec(name, qtype, tuple(tshape)))
        makers.append(make)

    for name in ["token_embd.weight", "output.weight"]:
        if name in types:
            add(name, mats[name], types[name], lambda n=name: random_blocks(rng, types[n], *mats[n]))
    add("output_norm.weight", (shape.dim,), GGMLType.F32, lambda: np.ones(shape.dim, np.float32))
    add("rope_freqs.weight", (head_dim // 2,), GGMLType.F32,
        lambda: llama31_rope_freqs(head_dim, theta, shape.rope_factor))
    for i in range(shape.n_layers):
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", (shape.dim,), GGMLType.F32, lambda: np.ones(shape.dim, np.float32))
        for m, s in layer_shapes.items():
            name = f"blk.{i}.{m}.weight"
            add(name, s, types[name], lambda n=name, s=s: random_blocks(rng, types[n], *s))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, meta, specs, (make() for make in makers))
    return path


def parse_sized(name: str) -> tuple[str, str]:
    """"SHAPE.TYPE" (e.g. llama-3.2-1b.q8_0: the shape's name has dots of its own) -> (shape, type);
    ValueError naming the choices."""
    shape, _, ftype = name.rpartition(".")
    if shape not in SHAPES or ftype not in FILE_TYPES:
        raise ValueError(f"{name!r} is not SHAPE.TYPE: shapes {', '.join(sorted(SHAPES))}; "
                         f"types {', '.join(sorted(FILE_TYPES))}")
    return shape, ftype


def sized_model(shape: str, ftype: str, seed: int = 0) -> Path:
    """The cached file of this shape and type, written on first use."""
    if shape not in SHAPES or ftype not in FILE_TYPES:
        raise ValueError(f"no sized model {shape}.{ftype}: shapes {', '.join(sorted(SHAPES))}; "
                         f"types {', '.join(sorted(FILE_TYPES))}")
    path = cache_dir() / "sized" / f"{shape}.{ftype}.gguf"
    if not path.exists() or _generator(path) != GENERATOR:
        write_model(path, SHAPES[shape], ftype, seed)
    return path


def _generator(path: Path) -> int | None:
    from edgellama.gguf import GGUFFile

    f = GGUFFile(path)
    try:
        return f.metadata.get(GENERATOR_KEY)
    finally:
        f.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--type", choices=sorted(FILE_TYPES), required=True)
    p.add_argument("-o", "--output", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    if args.output is None:
        path = cache_dir() / "sized" / f"{args.shape}.{args.type}.gguf"
    else:
        path = args.output
    if path.exists() and not args.force:
        print(path)
        return 0
    print(write_model(path, SHAPES[args.shape], args.type, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
