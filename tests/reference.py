"""A plain-numpy LLaMA forward pass over a whole sequence: the runtime's independent twin.

It shares nothing with edgellama's kernels: weights are dequantized with ``gguf.quants`` (gguf-py),
attention is computed with an explicit causal mask, RoPE with explicit pair rotation.  With
``quantize_activations=True`` every matrix input is rounded to ggml's Q8 activation grid first, as
llama.cpp and our decode kernels do, so results agree to float-summation error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize


def q8_activation_grid(x: np.ndarray) -> np.ndarray:
    """Each 32-block of each row as llama.cpp's x86 Q8 activations see it: d * q with
    q = rint(x * 127 / max|x|) (ties to even) and d = max|x| / 127 rounded to float16."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(blocks * inv)
    d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
    return (d * q).reshape(x.shape).astype(np.float32)


class ReferenceModel:
    def __init__(self, path: str):
        r = GGUFReader(path)
        self.md = {k: f.contents() for k, f in r.fields.items()
                   if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")}
        self.w = {}
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = gguf_dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        g = lambda k, d=None: self.md.get(f"llama.{k}", d)
        self.dim = g("embedding_length")
        self.n_layers = g("block_count")
        self.n_heads = g("attention.head_count")
        self.n_kv = g("attention.head_count_kv", self.n_heads)
        self.eps = g("attention.layer_norm_rms_epsilon", 1e-5)
        self.theta = g("rope.freq_base", 10000.0)
        self.hd = self.dim // self.n_heads
        self.n_rot = g("rope.dimension_count", self.hd)

    def forward(self, ids, quantize_activations: bool = True, half_kv: bool | str = True) -> np.ndarray:
        """Logits (T, n_vocab).  half_kv: keys and values rounded to IEEE half, as an f16 KV cache
        (the runtime's default, and llama.cpp's) stores them; "q8_0": to Q8_0 blocks of 32, as
        gguf-py (ggml's reference quantize_row_q8_0) makes them; False: kept exact."""
        qa = q8_activation_grid if quantize_activations else (lambda v: v)
        if half_kv == "q8_0":
            cached = lambda a: gguf_dequantize(gguf_quantize(np.ascontiguousarray(a, np.float32), GGMLQuantizationType.Q8_0),
                                               GGMLQuantizationType.Q8_0).reshape(a.shape)
        elif half_kv:
            cached = lambda a: a.astype(np.float16).astype(np.float32)
        else:
            cached = lambda a: a
        lin = lambda v, name: qa(v) @ self.w[name].T
        T = len(ids)
        x = self.w["token_embd.weight"][np.asarray(ids)].astype(np.float32)
        norm = lambda v, wt: (v / np.sqrt((v.astype(np.float64) ** 2).mean(-1, keepdims=True) + self.eps)
                              ).astype(np.float32) * wt
        pos = np.arange(T, dtype=np.float64)
        inv_freq = self.theta ** (-np.arange(self.n_rot // 2) * 2.0 / self.n_rot)
        if "rope_freqs.weight" in self.w:
            inv_freq = inv_freq / self.w["rope_freqs.weight"]
        ang = np.outer(pos, inv_freq)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

        def rope(v, n_heads):  # v: (T, n_heads*hd), rotate adjacent pairs
            v = v.reshape(T, n_heads, self.hd).copy()
            a, b = v[..., 0:self.n_rot:2].copy(), v[..., 1:self.n_rot:2].copy()
            v[..., 0:self.n_rot:2] = a * cos[:, None] - b * sin[:, None]
            v[..., 1:self.n_rot:2] = a * sin[:, None] + b * cos[:, None]
            return v

        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        group = self.n_heads // self.n_kv
        for l in range(self.n_layers):
            p = f"blk.{l}."
            h = norm(x, self.w[p + "attn_norm.weight"])
            q = rope(lin(h, p + "attn_q.weight"), self.n_heads)
            k = cached(rope(lin(h, p + "attn_k.weight"), self.n_kv))
            v = cached(lin(h, p + "attn_v.weight").reshape(T, self.n_kv, self.hd))
            out = np.empty((T, self.n_heads, self.hd), np.float32)
            for hh in range(self.n_heads):
                kv = hh // group
                s = q[:, hh] @ k[:, kv].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + lin(out.reshape(T, self.dim), p + "attn_output.weight")
            h = norm(x, self.w[p + "ffn_norm.weight"])
            gate = lin(h, p + "ffn_gate.weight")
            up = lin(h, p + "ffn_up.weight")
            x = x + lin(gate / (1 + np.exp(-gate)) * up, p + "ffn_down.weight")
        out_w = self.w.get("output.weight", self.w["token_embd.weight"])
        return qa(norm(x, self.w["output_norm.weight"])) @ out_w.T
