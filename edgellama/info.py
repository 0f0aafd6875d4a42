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
import re
from collections import defaultdict
from dataclasses import dataclass

from .config import DEFAULT_MAX_CTX, ModelArgs
from .gguf import GGUFFile
from .quants import GGMLType, type_name

DEFAULT_N_BATCH = 256          # Model's prompt batch
PAGE = 4096
# Measured with tools/measure_memory.py (breakdown) on x86-64, Python 3.11, NumPy 2.4, Numba 0.68:
# the interpreter with NumPy, Numba and llvmlite imported takes 63 MiB resident, the compiled kernels
# loaded from Numba's cache 15 MiB more (LLVM's own code pages are released once they are linked).
RUNTIME_BYTES = 80 << 20
# The tokenizer built from the vocabulary: measured 22 MiB for SmolLM2 (49,152 tokens) and 50 MiB for
# Llama 3 (128,256 tokens; its 280k merges cost little): a fixed part and one per token.
TOKENIZER_BYTES = 5 << 20
TOKENIZER_BYTES_PER_TOKEN = 360
# Compiling the kernels (a cold cache: the first run on a machine) takes LLVM's memory on top of the
# loaded model until they are linked: measured +97 MiB of peak for SmolLM2 (325 MiB cold, 228 warm),
# rounded up (a partly cold Llama-3-8B run peaked 111 MiB above the warm estimate).
COMPILE_BYTES = 110 << 20
TILE_BYTES = 16 << 20          # the prompt path's widened float tile (model.TILE_ELEMENTS float32)
ATTN_SPAN = 64                 # kernels.ATTN_SPAN: cached positions per one-token attention job


def prompt_work_bytes(head_dim: int, threads: int) -> int:
    """The prompt attention's work rows, one per thread (kernels.prompt_work_size float32 each;
    a test checks the two agree): with 16 query lanes, a span's rows, the queries and outputs
    transposed, a span's scores and two per-lane rows."""
    lanes = 16
    return 4 * max(threads, 1) * ((ATTN_SPAN + 2 * lanes) * head_dim + ATTN_SPAN * lanes + 2 * lanes)


KV_BYTES_PER_VALUE = {"f16": 2, "f32": 4, "q8_0": 34 / 32}  # Q8_0: 32 int8 values + an f16 scale
# Packed layout of each quantized type (kernels.layout.PACKED_FORMATS; a test checks the two agree):
# bytes per row per 32-element block, and per 256-element super-block (K-quants' d / dmin), in
# groups of LANES rows (16 at most: 16 with AVX-512, 8 with AVX2, 4 elsewhere)
PACKED_BYTES = {GGMLType.Q4_0: (18, 0), GGMLType.Q4_1: (20, 0), GGMLType.Q5_0: (22, 0), GGMLType.Q5_1: (24, 0),
                GGMLType.Q8_0: (34, 0), GGMLType.Q4_K: (18, 4), GGMLType.Q5_K: (22, 4), GGMLType.Q6_K: (26, 2)}
MAX_LANES = 16
# Bits per weight of llama-quantize's file types over a Llama's matrices (its tensor mix: Q6_K
# output, more bits for some attn_v / ffn_down in the _M types), for "which type would fit":
# measured on tools/make_sized_model.py's files (they follow llama-quantize's choices) and llama.cpp's
# published sizes; the largest of Llama-3.2-1B/3B and Llama-3-8B
FILE_TYPE_BITS = {"Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.8, "Q4_K_M": 5.2, "Q4_0": 4.95}


class MemoryLimitError(ValueError):
    """The model at this context size needs more memory than is available.

    ``n_ctx``, ``needed`` (a ``MemoryNeeded``), ``available`` (bytes), ``max_n_ctx`` (the largest
    context that fits, a multiple of 256 when it is at least 256; 0 when even the weights do not
    fit) and ``smaller`` (when nothing fits: a file type of this model that would, as
    ``(type name, MemoryNeeded, max_n_ctx)``, or None).
    """

    def __init__(self, n_ctx: int, needed: "MemoryNeeded", available: int, max_n_ctx: int,
                 smaller: tuple | None = None):
        self.n_ctx, self.needed, self.available, self.max_n_ctx = n_ctx, needed, available, max_n_ctx
        self.smaller = smaller
        fits = (f"the largest context that fits is n_ctx={max_n_ctx}" if max_n_ctx
                else "not even a small context fits" + (f"; {describe_smaller(smaller)}" if smaller else ""))
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'8G', '7.5GiB', '4096M', '3500MB' -> bytes (K, M, G, T are powers of 1024, as free -h shows)."""
    m = _SIZE.match(text)
    value = float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()) if m else 0.0
    if not 1 <= value < 2 ** 63:  # (at least a byte; a 400-digit number is inf: not a size either)
        raise ValueError(f"expects a memory size such as 8G, 7.5G or 4096M, got {text!r}")
    return int(value)


def kv_cache_bytes(args, n_ctx: int, bytes_per_value: float = 4) -> int:
    return int(2 * args.n_layers * n_ctx * args.kv_dim * bytes_per_value)


@dataclass
class MemoryNeeded:
    weights: int     # as the runtime holds them: packed quantized matrices, mapped float ones, norms
    kv_cache: int    # every position (preallocated; its pages are resident from the first token on)
    buffers: int     # context-sized (RoPE tables, attention scratch) and a prompt batch's activations
    runtime: int     # Python, NumPy, Numba and the kernels, the GGUF metadata, the tokenizer
    cache_type: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.runtime

    def describe(self) -> str:
        return (f"{size(self.total)} (weights {size(self.weights)}, KV cache {size(self.kv_cache)} "
                f"{self.cache_type}, buffers {size(self.buffers)}, runtime {size(self.runtime)})")


def packed_bytes(qtype, n_out: int, n_in: int, lanes: int = MAX_LANES) -> int:
    """Bytes of a quantized (n_out, n_in) matrix packed for the kernels (kernels.layout.group_bytes
    times the groups of ``lanes`` rows)."""
    block, super_block = PACKED_BYTES[GGMLType(qtype)]
    nb = n_in // 32
    return -(-n_out // lanes) * lanes * (nb * block + nb // 8 * super_block)


def weights_held(f: GGUFFile, n_ctx: int) -> int:
    """Bytes of weights a loaded model keeps resident: quantized matrices as their packed copy (the
    file's pages released), float matrices as the mapped file's pages (each token reads all of
    them), norm vectors as float32 copies, and of a separate embedding table only the rows looked up
    (at most one per position, a page each at least)."""
    tied = "output.weight" not in f.tensors
    total = 0
    for name, info in f.tensors.items():
        if len(info.shape) != 2:
            total += 4 * info.n_elements + info.nbytes              # float32 copy, pages read once
        elif name == "token_embd.weight" and not tied:
            row = info.nbytes // info.shape[0]
            total += min(info.nbytes, n_ctx * -(-row // PAGE) * PAGE)
        elif GGMLType(info.qtype) in PACKED_BYTES:
            total += packed_bytes(info.qtype, *info.shape)
        else:
            total += info.nbytes
    return total


def _per_token_buffers(args, threads: int) -> float:
    """Bytes of buffers per context position besides the KV cache: the one-token attention's
    per-span scratch and partials, and the RoPE cos/sin tables (float32)."""
    group = args.n_heads // args.n_kv_heads
    scratch = args.n_kv_heads * (args.head_dim + group * ATTN_SPAN) + args.n_heads * (args.head_dim + 2)
    return 4 * scratch / ATTN_SPAN + 4 * args.rope_dim


def weight_bytes_per_token(f: GGUFFile) -> int:
    """Bytes of weights one decode step reads: every tensor once, an untied embedding table one row."""
    total = 0
    for name, i in f.tensors.items():
        if name == "token_embd.weight" and "output.weight" in f.tensors:
            total += i.nbytes // i.shape[0]
        else:
            total += i.nbytes
    return total


PROMPT_FFN_BYTES = 2 << 20  # a prompt's gate (and up) rows are made about this many bytes at a time


def prompt_ffn_columns(ffn: int, n_rows: int, down_quantized: bool = True) -> int:
    """The feed-forward columns a prompt chunk of ``n_rows`` tokens makes at a time
    (model.PromptBuffers): all of them where their gate rows take at most PROMPT_FFN_BYTES, where
    the down projection reads float rows (it needs them all), or where ffn is not a multiple of
    256; else the most whole 256-column blocks that fit, at least one (a piece's quantized values
    are then exactly the whole row's: K-quant activations are scaled per 256 values)."""
    if not down_quantized or ffn % 256 or 4 * n_rows * ffn <= PROMPT_FFN_BYTES:
        return ffn
    return max(256, PROMPT_FFN_BYTES // (4 * n_rows) // 256 * 256)


def activation_forms(qtypes, n: int) -> int:
    """How many quantized forms an input of n values is made in for matrices of these types
    (kernels.activation_room): Q8 blocks for the block types, Q8_K super-blocks for the K-quants (n
    a multiple of 256); none for float matrices."""
    scales = [PACKED_BYTES[GGMLType(t)][1] for t in qtypes if GGMLType(t) in PACKED_BYTES]
    return int(any(s == 0 for s in scales)) + int(any(s > 0 for s in scales) and n % 256 == 0)


def batch_buffers(args, n_tokens: int, forms: tuple[int, int] = (1, 1), down_quantized: bool = True) -> int:
    """The bytes of a prompt batch's buffers (model.PromptBuffers, kept from the first prompt on):
    the residual, normed and projected rows (T, dim) x3, keys and values (T, kv_dim) x2, the gate
    and up rows (T, cols) in float32 (cols: prompt_ffn_columns; every column where a down
    projection is a float matrix), and the quantized inputs of the projections (int8 values,
    float32 block scales and sums, int32 half-block sums: 1.5 bytes per value, in each of
    ``forms``: activation_forms of the matrices reading dim and of the down projections): (T, dim),
    (T, ffn) and, where the feed-forward is made in pieces, a piece (T, cols)."""
    cols = prompt_ffn_columns(args.ffn_dim, n_tokens, down_quantized)
    piece = cols if cols < args.ffn_dim else 0
    rooms = forms[0] * args.dim + forms[1] * (args.ffn_dim + piece)
    return int(n_tokens * (4 * (3 * args.dim + 2 * args.kv_dim + 2 * cols) + 1.5 * rooms))


def prompt_buffers(f: GGUFFile, args, n_tokens: int) -> int:
    """batch_buffers for the matrices of file f."""
    layers = [i for name, i in f.tensors.items() if name.startswith("blk.") and len(i.shape) == 2]
    downs = [i.qtype for i in layers if i.name.endswith(".ffn_down.weight")]
    others = [i.qtype for i in layers if not i.name.endswith(".ffn_down.weight")]
    forms = (activation_forms(others, args.dim), activation_forms(downs, args.ffn_dim))
    return batch_buffers(args, n_tokens, forms, all(GGMLType(t) in PACKED_BYTES for t in downs))


def memory_needed(f: GGUFFile, args, n_ctx: int, cache_type: str = "f16", threads: int = 1,
                  n_batch: int = DEFAULT_N_BATCH, compiling: bool = False) -> MemoryNeeded:
    """What a model loaded from ``f`` with these settings keeps in memory at its peak, in bytes: a
    context filled to ``n_ctx`` by prompts of ``n_batch`` tokens (tools/measure_memory.py compares
    this with the peak resident memory of runs); ``compiling``: the kernels are compiled first (a
    cold cache), which takes LLVM's memory for a while."""
    weights = weights_held(f, n_ctx)
    kv = kv_cache_bytes(args, n_ctx, KV_BYTES_PER_VALUE[cache_type])
    buffers = int(n_ctx * _per_token_buffers(args, threads)) + prompt_buffers(f, args, min(n_batch, max(n_ctx, 1)))
    buffers += 4 * args.n_vocab + prompt_work_bytes(args.head_dim, threads)  # the logits, prompt attention's
    if any(len(i.shape) == 2 and GGMLType(i.qtype) not in PACKED_BYTES and i.name != "token_embd.weight"
           for i in f.tensors.values()):
        buffers += TILE_BYTES      # float matrices are widened in tiles for prompts
    # the header's objects (its own account) and pages, and the tokenizer built from them
    vocabulary = (getattr(f, "header_memory", 0) + getattr(f, "data_offset", 0) + TOKENIZER_BYTES
                  + TOKENIZER_BYTES_PER_TOKEN * args.n_vocab)
    runtime = RUNTIME_BYTES + vocabulary + (COMPILE_BYTES if compiling else 0)
    return MemoryNeeded(weights, kv, buffers, runtime, cache_type)


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


MAX_SEARCH_CTX = 1 << 30  # config.MAX_CONTEXT_LENGTH: no context beyond it is searched


def _largest(fits) -> int:
    """The largest n in [0, MAX_SEARCH_CTX] with fits(n) (fits is monotonic), as a multiple of 256
    from 256 on; 0 if not even n = 1 fits."""
    if not fits(1):
        return 0
    low, high = 1, 256
    while high < MAX_SEARCH_CTX and fits(high):
        low, high = high, high * 2
    if fits(high):
        return high
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low // 256 * 256 if low >= 256 else low


def max_context(f: GGUFFile, args, available: int, cache_type: str = "f16", threads: int = 1,
                n_batch: int = DEFAULT_N_BATCH) -> int:
    """The largest context (a multiple of 256 from 256 on) whose memory_needed fits in ``available`` bytes; 0 if none."""
    return _largest(lambda n: memory_needed(f, args, n, cache_type, threads, n_batch).total <= available)


def file_type_bits(f: GGUFFile) -> float:
    """Bits per weight of the file's matrices (2-D tensors)."""
    matrices = [i for i in f.tensors.values() if len(i.shape) == 2]
    return 8 * sum(i.nbytes for i in matrices) / max(1, sum(i.n_elements for i in matrices))


def retyped_needed(f: GGUFFile, args, n_ctx: int, bits: float, cache_type: str = "f16", threads: int = 1,
                   n_batch: int = DEFAULT_N_BATCH) -> MemoryNeeded:
    """memory_needed for this model's matrices stored at ``bits`` per weight instead (another file type
    of the same model: an estimate for a file one does not have)."""
    needed = memory_needed(f, args, n_ctx, cache_type, threads, n_batch)
    tied = "output.weight" not in f.tensors
    weights = 0
    for name, info in f.tensors.items():
        if len(info.shape) != 2:
            weights += 4 * info.n_elements + info.nbytes
        elif name == "token_embd.weight" and not tied:
            row = info.n_elements // info.shape[0] * bits / 8
            weights += int(min(info.n_elements * bits / 8, n_ctx * -(-row // PAGE) * PAGE))
        else:
            weights += int(info.n_elements * bits / 8)
    needed.weights = weights
    return needed


def smaller_type(f: GGUFFile, args, available: int, n_ctx: int, cache_type: str = "f16", threads: int = 1,
                 n_batch: int = DEFAULT_N_BATCH) -> tuple | None:
    """The file type of fewest bits cut that would fit with a context of min(n_ctx, 256) at least:
    (name, MemoryNeeded at min(n_ctx, its largest context), its largest context); None if none would."""
    own = file_type_bits(f)
    for name, bits in sorted(FILE_TYPE_BITS.items(), key=lambda kv: -kv[1]):
        if bits >= own - 0.05:
            continue
        largest = _largest(lambda n: retyped_needed(f, args, n, bits, cache_type, threads, n_batch).total
                           <= available)
        if largest >= min(n_ctx, 256):
            ctx = min(n_ctx, largest)
            return name, retyped_needed(f, args, ctx, bits, cache_type, threads, n_batch), largest
    return None


def describe_smaller(smaller: tuple) -> str:
    name, needed, largest = smaller
    return (f"the {name} file of this model (about {size(needed.weights)} of weights) would fit, with a context "
            f"of up to {largest}")


def check_memory(f: GGUFFile, args, n_ctx: int, cache_type: str = "f16", threads: int = 1,
                 n_batch: int = DEFAULT_N_BATCH, available: int | None = None,
                 compiling: bool = False) -> MemoryNeeded:
    """Raise MemoryLimitError if the model does not fit in the available memory (not checked where
    the OS does not say); the figures otherwise.  ``compiling``: the kernels' cache is cold (the
    compilation's memory is counted; the largest context is the one that fits once they are cached)."""
    needed = memory_needed(f, args, n_ctx, cache_type, threads, n_batch, compiling)
    if available is None:
        available = available_memory()
    if available is not None and needed.total > available:
        largest = max_context(f, args, available, cache_type, threads, n_batch)
        smaller = None if largest else smaller_type(f, args, available, n_ctx, cache_type, threads, n_batch)
        raise MemoryLimitError(n_ctx, needed, available, largest, smaller)
    return needed


def fit_report(f: GGUFFile, args, n_ctx: int, cache_type: str = "f16", threads: int = 1,
               available: int | None = None, source: str = "available on this machine") -> list[str]:
    """``edgellama info``'s memory lines: what a run at n_ctx needs, and what fits in ``available``."""
    needed = memory_needed(f, args, n_ctx, cache_type, threads)
    lines = [f"memory:        {size(needed.total)} at n_ctx={n_ctx} ({cache_type} cache, {threads} "
             f"thread{'s' if threads != 1 else ''}; a run's peak, the context full)",
             f"                 weights  {size(needed.weights):>10s}  (quantized matrices packed, float ones mapped)",
             f"                 KV cache {size(needed.kv_cache):>10s}  ({size(needed.kv_cache / max(n_ctx, 1))} "
             f"per token)",
             f"                 buffers  {size(needed.buffers):>10s}  (attention, RoPE tables, a prompt batch)",
             f"                 runtime  {size(needed.runtime):>10s}  (Python, NumPy, Numba, kernels, "
             f"vocabulary, tokenizer)"]
    if available is None:
        lines.append("fits:          unknown (this system does not say how much memory is available; use --ram)")
        return lines
    largest = max_context(f, args, available, cache_type, threads)
    head = f"fits:          {size(available)} {source}: "
    if needed.total <= available:
        if largest >= args.max_ctx:
            tail = f"the trained context ({args.max_ctx}) fits too"
        else:
            tail = f"the largest context that fits is {largest} (-c {largest})"
        lines.append(head + f"yes, {size(available - needed.total)} to spare; " + tail)
    elif largest:
        lines.append(head + f"NO at n_ctx={n_ctx}; the largest context that fits is {largest} (-c {largest})")
    else:
        smaller = smaller_type(f, args, available, n_ctx, cache_type, threads)
        lines.append(head + "NO, not even with a small context"
                     + (f"; {describe_smaller(smaller)}" if smaller else "; no smaller type of this model would"))
    return lines


def describe(f: GGUFFile, n_ctx: int | None = None, cache_type: str = "f16", ram: int | None = None,
             threads: int | None = None) -> str:
    """``n_ctx``: None = min(trained context, 4096) as a load would use, 0 = the trained context;
    ``ram``: the memory to fit in (default: what this machine has available); ``threads``: default
    the physical cores, as a run would use."""
    from .hardware import default_threads

    a = ModelArgs.from_gguf(f)
    n_ctx = resolve_n_ctx(n_ctx, a.max_ctx, DEFAULT_MAX_CTX)
    threads = threads or default_threads()
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
    available = ram if ram is not None else available_memory()
    lines += fit_report(f, a, n_ctx, cache_type, threads, available,
                        "given (--ram)" if ram is not None else "available on this machine")
    lines.append(f"sampling:      {_sampling_metadata(f) or 'no recommended settings in the file'}")
    lines.append(f"chat template: {'yes' if f.get('tokenizer.chat_template') else 'none'}")
    return "\n".join(lines)


def _sampling_metadata(f: GGUFFile) -> str:
    """The model's recommended sampling (llama.cpp's general.sampling.* keys), as key=value."""
    prefix = "general.sampling."
    return ", ".join(f"{k[len(prefix):]}={v}" for k, v in f.metadata.items() if k.startswith(prefix))
