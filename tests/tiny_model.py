"""Tiny random LLaMA models written as real GGUF files, for unit tests.

The vocabulary is byte-level GPT-2 style: one token per byte (in GPT-2's byte->unicode alphabet),
a handful of merges, and two control tokens, so the real tokenizer loads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from edgellama.gguf import TensorSpec, ValueType, write_gguf
from edgellama.quants import GGMLType


def _byte_alphabet() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    alphabet = _byte_alphabet()
    merges = [f"{alphabet[ord('t')]} {alphabet[ord('h')]}", f"{alphabet[ord('e')]} {alphabet[ord('r')]}",
              f"{alphabet[ord(' ')]} t"]
    tokens = ["<|endoftext|>", "<|im_end|>"] + alphabet + ["th", "er", alphabet[ord(" ")] + "t"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, types, merges


def _encode(w: np.ndarray, qtype: GGMLType) -> np.ndarray:
    if qtype == GGMLType.F32:
        return w.astype(np.float32)
    if qtype == GGMLType.F16:
        return w.astype(np.float16)
    return gguf_quantize(w.astype(np.float32), GGMLQuantizationType(int(qtype)))


def write_tiny_model(path: Path, qtype: GGMLType = GGMLType.Q8_0, *, dim: int = 64, n_layers: int = 2,
                     n_heads: int = 4, n_kv_heads: int = 2, ffn: int = 96, ctx: int = 64, seed: int = 0,
                     tied: bool = True, rope_freqs: bool = False, embd_type: GGMLType | None = None) -> Path:
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    n_vocab = len(tokens)
    head_dim = dim // n_heads
    md = {
        "general.architecture": "llama",
        "general.name": "tiny-random",
        "llama.block_count": n_layers,
        "llama.context_length": ctx,
        "llama.embedding_length": dim,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": n_vocab,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": (ValueType.ARRAY, (ValueType.INT32, np.array(types, np.int32))),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
    }
    tensors: list[tuple[str, GGMLType, np.ndarray]] = []

    def mat(name, rows, cols, t=qtype, scale=None):
        w = rng.standard_normal((rows, cols)).astype(np.float32) * (scale or 1.0 / np.sqrt(cols))
        tensors.append((name, t, w))

    def vec(name, n, around=1.0):
        tensors.append((name, GGMLType.F32, (around + 0.1 * rng.standard_normal(n)).astype(np.float32)))

    mat("token_embd.weight", n_vocab, dim, embd_type or qtype, scale=1.0)
    if not tied:
        mat("output.weight", n_vocab, dim)
    vec("output_norm.weight", dim)
    if rope_freqs:
        tensors.append(("rope_freqs.weight", GGMLType.F32,
                        np.linspace(1.0, 8.0, head_dim // 2).astype(np.float32)))
    for i in range(n_layers):
        vec(f"blk.{i}.attn_norm.weight", dim)
        vec(f"blk.{i}.ffn_norm.weight", dim)
        mat(f"blk.{i}.attn_q.weight", dim, dim)
        mat(f"blk.{i}.attn_k.weight", n_kv_heads * head_dim, dim)
        mat(f"blk.{i}.attn_v.weight", n_kv_heads * head_dim, dim)
        mat(f"blk.{i}.attn_output.weight", dim, dim)
        mat(f"blk.{i}.ffn_gate.weight", ffn, dim)
        mat(f"blk.{i}.ffn_up.weight", ffn, dim)
        mat(f"blk.{i}.ffn_down.weight", dim, ffn)
    specs = [TensorSpec(name, t, w.shape) for name, t, w in tensors]
    write_gguf(path, md, specs, (_encode(w, t) for _, t, w in tensors))
    return path
