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


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float16).view(np.uint8).reshape(*np.shape(v), 2)


def encode_kquant(w: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """A simple (not llama.cpp's) K-quant encoder, for test models: valid Q4_K / Q5_K / Q6_K
    blocks close to w, in ggml's bit layout (gguf-py has only K-quant decoders).  Rows of w must
    be multiples of 256; returns (rows, bytes per row) uint8."""
    rows, cols = w.shape
    x = w.astype(np.float64).reshape(rows, cols // 256, 256)
    if qtype == GGMLType.Q6_K:
        sub = x.reshape(*x.shape[:2], 16, 16)
        s = np.abs(sub).max(-1) / 31.0 + 1e-30                              # per-16 scales
        d = (s.max(-1) / 127.0).astype(np.float16).astype(np.float64)       # super-block scale
        sc = np.clip(np.rint(s / np.where(d > 0, d, 1)[..., None]), -128, 127)
        step = (d[..., None] * sc)[..., None]
        q = (np.clip(np.rint(sub / np.where(step != 0, step, 1)), -32, 31) + 32).astype(np.int64)
        q = q.reshape(*x.shape[:2], 2, 4, 32)                               # (half, quarter, 32)
        ql = np.zeros((*x.shape[:2], 2, 64), np.int64)
        qh = np.zeros((*x.shape[:2], 2, 32), np.int64)
        for quarter in range(4):
            part = (slice(None), slice(None), slice(None), slice(32 * (quarter % 2), 32 * (quarter % 2) + 32))
            ql[part] |= (q[:, :, :, quarter] & 15) << (4 * (quarter // 2))
            qh |= (q[:, :, :, quarter] >> 4) << (2 * quarter)
        out = np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64),
                              sc.astype(np.int8).view(np.uint8).reshape(rows, -1, 16),
                              _half_bytes(d)], axis=-1)
        return out.astype(np.uint8).reshape(rows, -1)
    bits = 4 if qtype == GGMLType.Q4_K else 5
    top = (1 << bits) - 1
    sub = x.reshape(*x.shape[:2], 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)                                       # x = scale * q - minimum
    scale = (sub.max(-1) - lo) / top + 1e-30
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float64)
    dmin = (-lo.min(-1) / 63.0).astype(np.float16).astype(np.float64)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[..., None]), 1, 63).astype(np.int64)
    mn = np.clip(np.rint(-lo / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.int64)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(np.rint((sub + (dmin[..., None] * mn)[..., None]) / step), 0, top).astype(np.int64)
    packed_scales = np.zeros((*x.shape[:2], 12), np.int64)                  # 6-bit factors, ggml order
    for j in range(8):
        if j < 4:
            packed_scales[..., j] |= sc[..., j]
            packed_scales[..., j + 4] |= mn[..., j]
        else:
            packed_scales[..., j + 4] |= (sc[..., j] & 15) | ((mn[..., j] & 15) << 4)
            packed_scales[..., j - 4] |= (sc[..., j] >> 4) << 6
            packed_scales[..., j] |= (mn[..., j] >> 4) << 6
    nibbles = np.zeros((*x.shape[:2], 4, 32), np.int64)
    for j in range(8):
        nibbles[:, :, j // 2] |= (q[:, :, j] & 15) << (4 * (j % 2))
    parts = [_half_bytes(d), _half_bytes(dmin), packed_scales]
    if bits == 5:
        high = np.zeros((*x.shape[:2], 32), np.int64)
        for j in range(8):
            high |= (q[:, :, j] >> 4) << j
        parts.append(high)
    parts.append(nibbles.reshape(rows, -1, 128))
    return np.concatenate(parts, axis=-1).astype(np.uint8).reshape(rows, -1)


def _encode(w: np.ndarray, qtype: GGMLType) -> np.ndarray:
    if qtype == GGMLType.F32:
        return w.astype(np.float32)
    if qtype == GGMLType.F16:
        return w.astype(np.float16)
    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        return encode_kquant(w, qtype)
    if qtype == GGMLType.Q2_K:  # a type the runtime refuses: zero bytes, only loading is tried
        return np.zeros((w.shape[0], w.shape[1] // 256 * 84), np.uint8)
    return gguf_quantize(w.astype(np.float32), GGMLQuantizationType(int(qtype)))


def write_tiny_model(path: Path, qtype: GGMLType = GGMLType.Q8_0, *, dim: int = 64, n_layers: int = 2,
                     n_heads: int = 4, n_kv_heads: int = 2, ffn: int = 96, ctx: int = 64, seed: int = 0,
                     tied: bool = True, rope_freqs: bool = False, embd_type: GGMLType | None = None,
                     tensor_types: dict[str, GGMLType] | None = None) -> Path:
    """``tensor_types``: the types of named tensors (``{"blk.1.ffn_down.weight": GGMLType.F16}``),
    the others' being ``qtype`` (``embd_type`` for the embedding table)."""
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
        tensors.append((name, (tensor_types or {}).get(name, t), w))

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
