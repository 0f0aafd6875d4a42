"""A plain-numpy LLaMA forward pass over a whole sequence: the runtime's independent twin.

It shares nothing with edgellama's kernels: weights are dequantized with ``gguf.quants`` (gguf-py),
attention is computed with an explicit causal mask, RoPE with explicit pair rotation.  With
``quantize_activations=True`` every matrix input is rounded to ggml's Q8 activation grid first, as
llama.cpp and our kernels do.

The forward itself is ``error_bounds.forward`` in float64 (exact weights, every rounding the runtime
defines); ``envelope`` adds how far float32 executions of it may stray: the tolerances of the model
tests (see tests/error_bounds.py).  ``forward`` returns its value as float32.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from gguf import GGUFReader

import error_bounds as eb


class ReferenceModel:
    def __init__(self, path: str):
        self.path = str(path)
        r = GGUFReader(path)
        self.md = {k: f.contents() for k, f in r.fields.items()
                   if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")}
        self.matrices = {}  # name -> error_bounds.Matrix: the exact weights as the kernels use them
        self.w = {}         # name -> float64 exact weights
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            m = eb.matrix(t.data, int(t.tensor_type), shape if len(shape) == 2 else (1, shape[0]))
            self.matrices[t.name] = m
            self.w[t.name] = m.W if len(shape) == 2 else m.W[0]
        g = lambda k, d=None: self.md.get(f"llama.{k}", d)
        self.dim = g("embedding_length")
        self.n_layers = g("block_count")
        self.n_heads = g("attention.head_count")
        self.n_kv = g("attention.head_count_kv", self.n_heads)
        self.eps = g("attention.layer_norm_rms_epsilon", 1e-5)
        self.theta = g("rope.freq_base", 10000.0)
        self.hd = self.dim // self.n_heads
        self.n_rot = g("rope.dimension_count", self.hd)

    def spec(self, n_ctx: int) -> eb.Spec:
        inv_freq = self.theta ** (-np.arange(self.n_rot // 2) * 2.0 / self.n_rot)
        if "rope_freqs.weight" in self.w:
            inv_freq = inv_freq / self.w["rope_freqs.weight"]
        ang = np.outer(np.arange(n_ctx, dtype=np.float64), inv_freq)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        mats = self.matrices
        layers = [{m: mats[f"blk.{l}.{m}.weight"] for m in
                   ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
                  for l in range(self.n_layers)]
        norms = np.stack([np.stack([self.w[f"blk.{l}.attn_norm.weight"], self.w[f"blk.{l}.ffn_norm.weight"]])
                          for l in range(self.n_layers)])
        return eb.Spec(mats["token_embd.weight"], mats.get("output.weight", mats["token_embd.weight"]), layers,
                       norms, self.w["output_norm.weight"], cos, sin, self.n_heads, self.n_kv, float(self.eps))

    def envelope(self, ids, cache_type: str = "f16", quantize_activations: bool = True) -> eb.Envelope:
        """The model's logits (T, n_vocab) and their tolerance scale (error_bounds.envelope).
        quantize_activations: as the runtime does, for quantized weights only; False: never."""
        stat = os.stat(self.path)
        return _envelope(self.path, stat.st_mtime_ns, stat.st_size, tuple(int(i) for i in ids), cache_type,
                         quantize_activations)

    def cache(self, ids, cache_type: str = "f16") -> eb.Forward:
        """The exact model's logits and per-layer cached keys and values (T, n_kv, hd)."""
        return eb.forward(self.spec(len(ids)), list(ids), cache_type)

    def forward(self, ids, quantize_activations: bool = True, half_kv: bool | str = True) -> np.ndarray:
        """Logits (T, n_vocab) as float32.  half_kv: keys and values rounded to IEEE half, as an f16
        KV cache (the runtime's default, and llama.cpp's) stores them; "q8_0": to Q8_0 blocks of 32, as
        gguf-py (ggml's reference quantize_row_q8_0) makes them; False: kept exact."""
        cache_type = "q8_0" if half_kv == "q8_0" else "f16" if half_kv else "f32"
        return eb.forward(self.spec(len(ids)), list(ids), cache_type,
                          quantize_activations=quantize_activations).logits.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _envelope(path: str, mtime_ns: int, size: int, ids: tuple, cache_type: str,
              quantize_activations: bool) -> eb.Envelope:
    model = ReferenceModel(path)
    return eb.envelope(model.spec(len(ids)), ids, cache_type, quantize_activations)
