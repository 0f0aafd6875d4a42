"""Human-readable description of a GGUF model (``edgellama info``); compiles no kernel."""

from __future__ import annotations

import os
from collections import defaultdict

from .gguf import GGUFFile
from .model import DEFAULT_MAX_CTX, ModelArgs
from .quants import type_name


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_cache_bytes(args: ModelArgs, n_ctx: int, bytes_per_value: float = 4) -> int:
    return int(2 * args.n_layers * n_ctx * args.kv_dim * bytes_per_value)


def describe(f: GGUFFile, n_ctx: int | None = None, cache_type: str = "f16") -> str:
    a = ModelArgs.from_gguf(f)
    n_ctx = n_ctx or min(a.max_ctx, DEFAULT_MAX_CTX)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # tensors, elements, bytes
    for info in f.tensors.values():
        entry = by_type[type_name(info.qtype)]
        entry[0] += 1
        entry[1] += info.n_elements
        entry[2] += info.nbytes
    n_params = sum(e[1] for e in by_type.values())
    n_bytes = sum(e[2] for e in by_type.values())
    tied = "output.weight" not in f.tensors
    lines = [
        f"file:          {f.path} ({_size(os.path.getsize(f.path))}, GGUF v{f.version})",
        f"model:         {f.get('general.name', '?')} ({f.get('general.architecture')})",
        f"layers:        {a.n_layers}",
        f"width:         {a.dim} (feed-forward {a.ffn_dim})",
        f"heads:         {a.n_heads} query, {a.n_kv_heads} key/value, head size {a.head_dim}",
        f"vocabulary:    {a.n_vocab} ({f.get('tokenizer.ggml.model', '?')}, pre-tokenizer "
        f"{f.get('tokenizer.ggml.pre', 'default')})",
        f"context:       {a.max_ctx} trained",
        f"rope:          theta {a.rope_theta:g}, {a.rope_dim} dims"
        + (", rope_freqs factors" if "rope_freqs.weight" in f.tensors else "")
        + (f", linear scale {a.rope_scale:g}" if a.rope_scale != 1.0 else ""),
        f"norm eps:      {a.norm_eps:g}",
        f"embeddings:    {'tied (output = token_embd)' if tied else 'separate output matrix'}",
        f"parameters:    {n_params / 1e6:.1f} M, {_size(n_bytes)} of tensors, "
        f"{8 * n_bytes / max(n_params, 1):.2f} bits per weight",
        "tensor types:",
    ]
    for name, (count, elements, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"  {name:6s} {count:4d} tensors  {elements / 1e6:8.1f} M weights  {_size(nbytes):>10s}")
    width = {"f16": 2, "f32": 4, "q8_0": 34 / 32}[cache_type]
    lines.append(f"KV cache:      {_size(kv_cache_bytes(a, n_ctx, width))} at n_ctx={n_ctx} ({cache_type})")
    lines.append(f"chat template: {'yes' if f.get('tokenizer.chat_template') else 'none'}")
    return "\n".join(lines)
