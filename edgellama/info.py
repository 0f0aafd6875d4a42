"""What a GGUF model is and what it needs: ``edgellama info``, and the memory check every load makes.

``memory_needed`` adds up what a loaded model keeps in memory at a context size: the weights (the
packed quantized copy and the mapped float tensors: the file's tensor bytes), the KV cache
(preallocated for every position, as llama.cpp does), the buffers that grow with the context
(attention scratch, RoPE tables while they are built) and a fixed part (a prompt batch's
activations, Numba's and the tokenizer's own memory).  ``check_memory`` compares it with the memory
available (``available_memory``) before anything is allocated and raises ``MemoryLimitError``,
naming the figures and the largest context that fits, instead of letting the allocation fail (or the
system start swapping) half a minute later.  Importing this module imports neither Numba nor the
model code.
"""

from __future__ import annotations

import numbers
import os
from collections import defaultdict
from dataclasses import dataclass

from .config import DEFAULT_MAX_CTX, ModelArgs
from .gguf import GGUFFile
from .quants import type_name

DEFAULT_N_BATCH = 256          # Model's prompt batch
RUNTIME_BYTES = 128 << 20      # Python, NumPy, Numba and LLVM, the tokenizer (measured: ~120 MiB beyond the weights)
TILE_BYTES = 16 << 20          # the prompt path's widened float tile (model.TILE_ELEMENTS float32)
ATTN_SPAN = 64                 # kernels.ATTN_SPAN: cached positions per one-token attention job
KV_BYTES_PER_VALUE = {"f16": 2, "f32": 4, "q8_0": 34 / 32}  # Q8_0: 32 int8 values + an f16 scale


class MemoryLimitError(ValueError):
    """The model at this context size needs more memory than is available.

    ``n_ctx``, ``needed`` (a ``MemoryNeeded``), ``available`` (bytes) and ``max_n_ctx`` (the
    largest context that fits, a multiple of 256 when
    it is at least 256; 0 when even the weights do not fit).
    """

    def __init__(self, n_ctx: int, needed: "MemoryNeeded", available: int, max_n_ctx: int):
        self.n_ctx, self.needed, self.available, self.max_n_ctx = n_ctx, needed, available, max_n_ctx
        fits = (f"the largest context that fits is n_ctx={max_n_ctx}" if max_n_ctx
                else "not even a small context fits")
        super().__init__(f"n_ctx={n_ctx} needs {needed.describe()} but {size(available)} of memory is "
                         f"available: {fits}")


class ContextLengthWarning(UserWarning):
    """A context longer than the one the model was trained on (quality degrades beyond it)."""


def resolve_n_ctx(n_ctx, max_ctx: int, default_max: int) -> int:
    """The context size a load uses: ``n_ctx`` None = min(the trained context ``max_ctx``,
    ``default_max``), 0 = the trained context (llama.cpp's -c 0), else itself."""
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, numbers.Integral) or n_ctx < 0):
        raise ValueError(f"n_ctx must be a non-negative integer (0: the model's trained context), got {n_ctx!r}")
    return min(max_ctx, default_max) if n_ctx is None else int(n_ctx or max_ctx)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_cache_bytes(args, n_ctx: int, bytes_per_value: float = 4) -> int:
    return int(2 * args.n_layers * n_ctx * args.kv_dim * bytes_per_value)


@dataclass
class MemoryNeeded:
    weights: int
    kv_cache: int
    buffers: int
    cache_type: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers

    def describe(self) -> str:
        return (f"{size(self.total)} (weights {size(self.weights)}, KV cache {size(self.kv_cache)} "
                f"{self.cache_type}, buffers {size(self.buffers)})")


def _per_token_buffers(args, threads: int) -> float:
    """Bytes of buffers per context position besides the KV cache: the prompt attention's score
    rows (one per thread), the one-token attention's per-span scratch and partials, and the RoPE
    tables at their peak while built (float64 angles and temporaries, then two float32 tables)."""
    group = args.n_heads // args.n_kv_heads
    scratch = args.n_kv_heads * (args.head_dim + group * ATTN_SPAN) + args.n_heads * (args.head_dim + 2)
    return 4 * threads + 4 * scratch / ATTN_SPAN + 24 * (args.rope_dim // 2)


def memory_needed(f: GGUFFile, args, n_ctx: int, cache_type: str = "f16", threads: int = 1,
                  n_batch: int = DEFAULT_N_BATCH) -> MemoryNeeded:
    """What a model loaded from ``f`` with these settings keeps in memory, in bytes."""
    weights = sum(info.nbytes for info in f.tensors.values())
    kv = kv_cache_bytes(args, n_ctx, KV_BYTES_PER_VALUE[cache_type])
    # a prompt batch's activations: residual, norm, attention, q/k/v, gate/up/down, logits (float32)
    batch = 4 * n_batch * (4 * args.dim + 2 * args.kv_dim + 3 * args.ffn_dim + args.n_vocab)
    buffers = int(n_ctx * _per_token_buffers(args, threads)) + batch + TILE_BYTES + RUNTIME_BYTES
    return MemoryNeeded(weights, kv, buffers, cache_type)


def available_memory() -> int | None:
    """Bytes this process can still get without swapping: Linux's MemAvailable, within the cgroup's
    limit if there is one; elsewhere what the OS reports as free (or None: not known)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_room()
    if limit is not None:
        found.append(limit)
    if not found:
        found.append(_os_free_memory())
    known = [n for n in found if n is not None]
    return min(known) if known else None


def _cgroup_room() -> int | None:
    """limit - usage + inactive file cache of this process's memory cgroup (v2, else v1); None without a
    limit."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":   # v2
            mount = "/sys/fs/cgroup"
            files = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):      # v1
            mount = "/sys/fs/cgroup/memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # the cgroup's own directory, or the mount itself (in a container, usually the cgroup's own)
        for root in dict.fromkeys((mount + path.rstrip("/"), mount)):
            try:
                with open(os.path.join(root, files[0])) as fh:
                    raw = fh.read().strip()
                with open(os.path.join(root, files[1])) as fh:
                    used = int(fh.read().strip())
            except (OSError, ValueError):
                continue
            if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
                return None
            return max(0, int(raw) - used + _reclaimable(root))
    return None


def _reclaimable(root: str) -> int:
    """The cgroup's inactive file cache (counted in its usage, but given back on demand)."""
    try:
        with open(os.path.join(root, "memory.stat")) as fh:
            stat = dict(line.split() for line in fh if line.count(" ") == 1)
        return int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
    except (OSError, ValueError):
        return 0


def _os_free_memory() -> int | None:
    if os.name == "nt":
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = _Status()
        status.dwLength = ctypes.sizeof(_Status)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.ullAvailPhys)
        return None
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the total
        try:
            return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            continue
    return None


def max_context(f: GGUFFile, args, available: int, cache_type: str = "f16", threads: int = 1,
                n_batch: int = DEFAULT_N_BATCH) -> int:
    """The largest context (a multiple of 256 from 256 on) whose memory_needed fits in ``available`` bytes; 0 if none."""
    fixed = memory_needed(f, args, 0, cache_type, threads, n_batch).total
    per_token = memory_needed(f, args, 1 << 20, cache_type, threads, n_batch).total - fixed
    if available <= fixed or per_token <= 0:
        return 0
    n = int((available - fixed) * (1 << 20) // per_token)
    while n > 0 and memory_needed(f, args, n, cache_type, threads, n_batch).total > available:
        n -= 1  # (integer rounding of the per-token figure)
    return n // 256 * 256 if n >= 256 else n


def check_memory(f: GGUFFile, args, n_ctx: int, cache_type: str = "f16", threads: int = 1,
                 n_batch: int = DEFAULT_N_BATCH, available: int | None = None) -> MemoryNeeded:
    """Raise MemoryLimitError if the model does not fit in the available memory (not checked where
    the OS does not say); the figures otherwise."""
    needed = memory_needed(f, args, n_ctx, cache_type, threads, n_batch)
    if available is None:
        available = available_memory()
    if available is not None and needed.total > available:
        raise MemoryLimitError(n_ctx, needed, available, max_context(f, args, available, cache_type, threads,
                                                                     n_batch))
    return needed


def describe(f: GGUFFile, n_ctx: int | None = None, cache_type: str = "f16") -> str:
    """``n_ctx``: None = min(trained context, 4096) as a load would use, 0 = the trained context."""
    a = ModelArgs.from_gguf(f)
    n_ctx = resolve_n_ctx(n_ctx, a.max_ctx, DEFAULT_MAX_CTX)
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
        f"file:          {f.path} ({size(os.path.getsize(f.path))}, GGUF v{f.version})",
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
        f"parameters:    {n_params / 1e6:.1f} M, {size(n_bytes)} of tensors, "
        f"{8 * n_bytes / max(n_params, 1):.2f} bits per weight",
        "tensor types:",
    ]
    for name, (count, elements, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"  {name:6s} {count:4d} tensors  {elements / 1e6:8.1f} M weights  {size(nbytes):>10s}")
    lines.append(f"KV cache:      {size(kv_cache_bytes(a, n_ctx, KV_BYTES_PER_VALUE[cache_type]))} at "
                 f"n_ctx={n_ctx} ({cache_type})")
    needed = memory_needed(f, a, n_ctx, cache_type)
    available = available_memory()
    lines.append(f"memory:        {needed.describe()} at n_ctx={n_ctx}"
                 + (f"; {size(available)} available" if available is not None else ""))
    if available is not None and needed.total > available:
        lines.append(f"               does not fit: the largest context that fits is "
                     f"{max_context(f, a, available, cache_type)}")
    lines.append(f"sampling:      {_sampling_metadata(f) or 'no recommended settings in the file'}")
    lines.append(f"chat template: {'yes' if f.get('tokenizer.chat_template') else 'none'}")
    return "\n".join(lines)


def _sampling_metadata(f: GGUFFile) -> str:
    """The model's recommended sampling (llama.cpp's general.sampling.* keys), as key=value."""
    prefix = "general.sampling."
    return ", ".join(f"{k[len(prefix):]}={v}" for k, v in f.metadata.items() if k.startswith(prefix))
