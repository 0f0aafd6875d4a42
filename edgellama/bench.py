"""``edgellama bench``: llama-bench style speed test on random token ids.

One process measures, in order:

- ``load_s``: from the start of ``run_bench`` (before Numba and the model code are imported) until
  the model is loaded (file mapped, weights viewed, KV cache allocated);
- ``compile_s``: the warm-up: a 2-token prompt plus one decoded token, then a prompt of
  min(n_prompt, 32) tokens from an empty cache, then ``Model.warm_up`` (both paths), so that every
  kernel is ready.  It is the Numba compile time when the on-disk cache is
  cold and the cache-load time when it is warm; ``numba_cache`` says which (from Numba's own
  per-dispatcher cache hit/miss counters, which cover the load and the warm-up);
- ``first_token_s``: from the start of ``run_bench`` until the warm-up prompt's logits give the first
  generated token (load + compile/cache load + a 2-token prefill; a cold cache is filled first by
  ``Model.warm_up``, which compiles both paths at once where cores allow); ``process_first_token_s`` is the
  same moment measured from the start of the process (interpreter start-up and imports included;
  Linux only, 10 ms resolution);
- ``pp_tok_s``: ``n_prompt`` tokens evaluated from an empty cache (or after ``n_depth`` cached
  tokens: llama-bench's ``-d``), median over the repetitions;
- ``tg_tok_s``: ``n_gen`` single-token evaluations after a 1-token prompt (after the ``n_depth``
  cached tokens), median;
- ``peak_rss_mb``: the process's peak resident set size (VmHWM on Linux, else ``ru_maxrss``);
- ``packed_weights``: ``mapped`` (from the packed cache of an earlier load: edgellama.packed_cache),
  ``saving`` (packed at this load, and written to that cache for the next) or ``memory``.

The token ids are random (fixed seed) in [0, n_vocab): speed does not depend on what they say.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import warnings

import numpy as np

from ._validate import is_int
from .gguf import GGUFFile
from .quants import type_name

SEED = 1234
WARMUP_PROMPT = 2   # tokens in the first warm-up prompt (then one decoded token)
WARMUP_PP = 32      # at most this many tokens in the second warm-up prompt (the pp path)


def default_n_ctx(n_prompt: int, n_gen: int, n_depth: int = 0) -> int:
    """n_depth + n_prompt + n_gen + 16, rounded up to a multiple of 256."""
    need = n_depth + n_prompt + n_gen + 16
    return -(-need // 256) * 256


def check_args(n_prompt: int, n_gen: int, repetitions: int, threads: int | None,
               n_ctx: int | None, n_depth: int = 0) -> int:
    """Validate the bench options; the context size to use.  Raises ValueError naming the option
    by its flag (-p, -n, -r, -t, -c, -d)."""
    for flag, value, low in (("-p", n_prompt, 0), ("-n", n_gen, 0), ("-r", repetitions, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    if n_prompt == 0 and n_gen == 0:
        raise ValueError("-p and -n are both 0: nothing to measure (0 skips that test, as in llama-bench)")
    if not is_int(n_depth) or n_depth < 0:
        raise ValueError(f"-d must be a non-negative integer, got {n_depth!r}")
    if threads is not None and (not is_int(threads) or threads <= 0):
        raise ValueError(f"-t must be a positive integer, got {threads!r}")
    if n_ctx is None:
        return default_n_ctx(n_prompt, n_gen, n_depth)
    if not is_int(n_ctx) or n_ctx < 0:
        raise ValueError(f"-c must be an integer >= 0 (0: the model's trained context), got {n_ctx!r}")
    if n_ctx == 0:
        return 0  # (the trained context, as for the other commands: checked against the run once loaded)
    check_room(n_ctx, n_prompt, n_gen, n_depth)
    return n_ctx


def check_room(n_ctx: int, n_prompt: int, n_gen: int, n_depth: int = 0, what: str | None = None) -> None:
    need = n_depth + n_prompt + n_gen + 1
    if need > n_ctx:
        depth = f"-d {n_depth} + " if n_depth else ""
        raise ValueError(f"{what or f'-c {n_ctx}'} is too small for {depth}-p {n_prompt} + -n {n_gen} + 1 = "
                         f"{need} tokens")


def random_ids(n_vocab: int, n: int, seed: int = SEED) -> np.ndarray:
    """n token ids drawn uniformly from [0, n_vocab); tools/bench_vs_llamacpp.py draws the same ones."""
    return np.random.default_rng(seed).integers(0, n_vocab, size=n, dtype=np.int64)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: Linux's VmHWM, the high-water mark of this
    program's own address space.  Not ru_maxrss there: a process started by vfork + exec (Python's
    subprocess does so) inherits its parent's peak in ru_maxrss, so a child of a 2 GB test runner
    would report 2 GB.  Elsewhere ru_maxrss (KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc, 1/CLK_TCK resolution); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # the command name (field 2) may hold spaces: fields after the closing parenthesis
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def numba_cache_counts() -> tuple[int, int]:
    """(cache hits, cache misses) summed over every kernel dispatcher used so far in this process."""
    from numba.core.registry import CPUDispatcher

    from . import kernels

    hits = misses = 0
    rooms = [m for name, m in list(sys.modules.items()) if name.startswith(kernels.__name__ + ".")]
    seen = set()
    for obj in (o for room in rooms for o in vars(room).values()):
        if isinstance(obj, CPUDispatcher) and id(obj) not in seen:
            seen.add(id(obj))
            stats = obj.stats
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    return hits, misses


def _cache_state(hits: int, misses: int) -> str:
    if misses and hits:
        return "partly cold"
    if misses:
        return "cold"
    return "warm" if hits else "unknown"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _stdev(values: list[float]) -> float:
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def model_summary(f: GGUFFile) -> dict:
    """File name, size, parameter count and tensor types (count per ggml type) of a GGUF file."""
    types: dict[str, int] = {}
    bytes_by_type: dict[str, int] = {}
    for info in f.tensors.values():
        name = type_name(info.qtype)
        types[name] = types.get(name, 0) + 1
        bytes_by_type[name] = bytes_by_type.get(name, 0) + info.nbytes
    return {
        "model": os.path.basename(f.path),
        "model_name": f.get("general.name", "?"),
        "model_type": max(bytes_by_type, key=bytes_by_type.get) if bytes_by_type else "?",
        "size_mib": sum(info.nbytes for info in f.tensors.values()) / 2**20,
        "n_params": int(sum(info.n_elements for info in f.tensors.values())),
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -bytes_by_type[kv[0]])),
    }


def run_bench(args) -> int:
    """Run the benchmark described by the parsed ``edgellama bench`` options; print; return 0."""
    t_start = time.perf_counter()
    n_prompt, n_gen = args.n_prompt, args.n_gen
    repetitions = getattr(args, "repetitions", 3)
    n_depth = getattr(args, "n_depth", 0)
    n_ctx = check_args(n_prompt, n_gen, repetitions, args.threads, args.ctx, n_depth)

    # the model code and Numba are imported inside the timed load; a cold kernel cache is announced
    # on stderr at once and its compilation shown (kernel_cache.CompileProgress)
    from .cli import open_model_file
    from .kernel_cache import CompileProgress, matrix_types, plan_warm_up

    f = open_model_file(args.model)
    status = plan_warm_up(matrix_types(f)).status
    with CompileProgress(status), warnings.catch_warnings():
        from .info import ContextLengthWarning
        from .model import Model

        warnings.simplefilter("ignore", ContextLengthWarning)  # random tokens: a speed test may go beyond it

        model = Model(f, n_ctx=n_ctx, threads=args.threads, cache_type=getattr(args, "cache_type", "f16"))
        load_s = time.perf_counter() - t_start
        if n_ctx == 0:  # -c 0: the trained context
            check_room(model.n_ctx, n_prompt, n_gen, n_depth, f"-c 0 (the trained context, {model.n_ctx})")
        n_vocab = model.args.n_vocab

        # warm-up: a 2-token prompt (its logits give the first token) and one decoded token, then a
        # short prompt down the pp path: every kernel is compiled or loaded from the cache before timing
        warm = random_ids(n_vocab, WARMUP_PROMPT + 1, seed=SEED + 1)
        prompt = random_ids(n_vocab, n_prompt)
        t0 = time.perf_counter()
        if status is not None and status.cold:
            model.warm_up()  # compiled first (both paths at once where cores allow): the first token times the model
        model.reset()
        first = int(np.argmax(model.eval(warm[:WARMUP_PROMPT])))
        first_token_s = time.perf_counter() - t_start
        process_first = process_age_s()
        model.eval([first])
        model.reset()
        model.eval(prompt[:WARMUP_PP] if n_prompt else warm)
        model.warm_up()  # both paths whatever -p is: the first run compiles every kernel, as announced
        compile_s = time.perf_counter() - t0
    hits, misses = numba_cache_counts()

    from . import kernel_thread

    governor = kernel_thread.governor()
    counts = (governor.asked, governor.reduced) if governor is not None else None

    # the cached context the tests start from (-d: llama-bench's depth), evaluated once, untimed;
    # each repetition goes back to it
    depth = random_ids(n_vocab, n_depth, seed=SEED + 3)
    model.reset()
    if n_depth:
        model.eval(depth)

    # pp: the whole prompt after the depth
    pp_rates = []
    for _ in range(repetitions if n_prompt else 0):
        model.truncate(n_depth)
        t0 = time.perf_counter()
        model.eval(prompt)
        pp_rates.append(n_prompt / (time.perf_counter() - t0))

    # tg: one token at a time after a 1-token prompt
    gen = random_ids(n_vocab, n_gen + 1, seed=SEED + 2)
    tg_rates = []
    for _ in range(repetitions if n_gen else 0):
        model.truncate(n_depth)
        model.eval(gen[:1])
        t0 = time.perf_counter()
        for token in gen[1:]:
            model.eval(token[None])
        tg_rates.append(n_gen / (time.perf_counter() - t0))

    import numba

    from . import kernels

    result = {
        **model_summary(model.file),
        "threads": model.threads,
        "numba_threads": min(model.threads, numba.config.NUMBA_NUM_THREADS),
        "kernels": kernels.target_summary(),
        "cache_type": model.cache_type,
        "n_ctx": model.n_ctx,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": n_depth,
        "repetitions": repetitions,
        "pp_tok_s": _median(pp_rates) if pp_rates else None,  # (None: -p 0 or -n 0 skipped the test)
        "tg_tok_s": _median(tg_rates) if tg_rates else None,
        "pp_tok_s_all": pp_rates,
        "tg_tok_s_all": tg_rates,
        "load_s": load_s,
        "compile_s": compile_s,
        "numba_cache": _cache_state(hits, misses),
        "packed_weights": model.weights.pack_source,
        "numba_cache_hits": hits,
        "numba_cache_misses": misses,
        "first_token_s": first_token_s,
        "process_first_token_s": process_first,
        "peak_rss_mb": peak_rss_mb(),
        "adaptive_threads": None if governor is None else {
            "evaluations": governor.asked - counts[0],   # timed evaluations that asked for >1 thread
            "reduced": governor.reduced - counts[1],     # ... that ran with fewer (other programs busy)
            "other_cpus": round(governor.busiest, 2),    # the most CPUs other programs used (measured)
        },
    }
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(format_report(result))
    return 0


def format_report(r: dict) -> str:
    """A llama-bench-like markdown table, then the start-up and memory figures."""
    model = f"{r['model_name']} {r['model_type']}"
    size = f"{r['size_mib']:.2f} MiB"
    params = f"{r['n_params'] / 1e6:.2f} M"
    rows = [("model", "size", "params", "threads", "test", "t/s")]
    at = f" @ d{r['n_depth']}" if r.get("n_depth") else ""
    for test, rates in ((f"pp{r['n_prompt']}{at}", r["pp_tok_s_all"]), (f"tg{r['n_gen']}{at}", r["tg_tok_s_all"])):
        if rates:
            rows.append((model, size, params, str(r["threads"]), test, f"{_median(rates):.2f} ± {_stdev(rates):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 2, 3, 4, 5}

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    out = [line(rows[0]), sep] + [line(row) for row in rows[1:]]
    proc = r["process_first_token_s"]
    types = ", ".join(f"{k} x{v}" for k, v in r["tensor_types"].items())
    out += [
        "",
        f"file {r['model']} ({types}); n_ctx {r['n_ctx']}, KV cache {r['cache_type']}; median of "
        f"{r['repetitions']} runs; kernels: {r['kernels']}",
        f"load {r['load_s']:.2f} s (packed weights: {r.get('packed_weights', '?')}) | warm-up (Numba cache {r['numba_cache']}) {r['compile_s']:.2f} s | "
        f"first token {r['first_token_s']:.2f} s"
        + (f" ({proc:.2f} s from process start)" if proc is not None else "")
        + f" | peak RSS {r['peak_rss_mb']:.1f} MiB",
    ]
    adaptive = r.get("adaptive_threads")
    if adaptive and adaptive["reduced"]:
        out.append(f"busy machine: other programs used about {adaptive['other_cpus']:.1f} CPUs; {adaptive['reduced']} "
                   f"of {adaptive['evaluations']} timed evaluations ran with fewer threads than {r['threads']} "
                   "(EDGELLAMA_ADAPTIVE_THREADS=0 keeps them all)")
    return "\n".join(out)
