"""edgellama vs llama.cpp (llama-cpp-python) on the same GGUF file, thread count and context size.

Every run is a fresh process, so load time, time to first token and peak RSS are what a user sees.
Our side is ``python -m edgellama.cli bench --json``; llama.cpp's is a small inline script doing the
same steps through llama-cpp-python: load; warm-up: a 2-token prompt (its logits give the first token)
+ 1 decoded token, then a 32-token prompt; pp (the same random ids from an empty cache) and tg
(single-token evals after a 1-token prompt), each repeated ``-r`` times inside the process (median).
The two sides alternate (ours first on even runs, llama.cpp first on odd ones) and each figure is the
median over ``--runs`` processes.

Usage:  python tools/bench_vs_llamacpp.py [--models F.gguf ...] [-t 2] [-p 256] [-n 128] [--runs 3]
                                          [--markdown BENCHMARKS.md]
Exit status: 0 done, 1 a run failed, 2 llama_cpp is not installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgellama.bench import SEED, WARMUP_PP, check_args  # noqa: E402  (light: imports numpy and the GGUF reader only)

# The llama.cpp side, run as ``python -c LLAMA_SCRIPT CONFIG_JSON``; prints one JSON object.
# It mirrors edgellama/bench.py step by step (same ids: same seed, same generator, same n_vocab).
LLAMA_SCRIPT = r'''
import json, os, resource, statistics, sys, time
import numpy as np

cfg = json.loads(sys.argv[1])

def process_age_s():
    try:
        stat = open("/proc/self/stat").read()
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None

def ids(n_vocab, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, size=n, dtype=np.int64)]

t_start = time.perf_counter()
import llama_cpp
from llama_cpp import Llama
T = cfg["threads"]
llm = Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_threads=T, n_threads_batch=T, n_batch=512, verbose=False)
load_s = time.perf_counter() - t_start
n_vocab = llm.n_vocab()
seed = cfg["seed"]

warm = ids(n_vocab, 3, seed + 1)
t0 = time.perf_counter()
llm.reset()
llm.eval(warm[:2])
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
first = int(np.argmax(logits))
first_token_s = time.perf_counter() - t_start
process_first = process_age_s()
llm.eval([first])
prompt = ids(n_vocab, cfg["n_prompt"], seed)
llm.reset()
llm.eval(prompt[:min(len(prompt), cfg["warmup_pp"])])
warmup_s = time.perf_counter() - t0

pp = []
for _ in range(cfg["repetitions"]):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp.append(len(prompt) / (time.perf_counter() - t0))

gen = ids(n_vocab, cfg["n_gen"] + 1, seed + 2)
tg = []
for _ in range(cfg["repetitions"]):
    llm.reset()
    llm.eval(gen[:1])
    t0 = time.perf_counter()
    for tok in gen[1:]:
        llm.eval([tok])
    tg.append(cfg["n_gen"] / (time.perf_counter() - t0))

print(json.dumps({
    "model": os.path.basename(cfg["model"]), "threads": T, "n_ctx": llm.n_ctx(),
    "n_prompt": cfg["n_prompt"], "n_gen": cfg["n_gen"],
    "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
    "pp_tok_s_all": pp, "tg_tok_s_all": tg,
    "load_s": load_s, "compile_s": warmup_s, "first_token_s": first_token_s,
    "process_first_token_s": process_first,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
}))
'''

# (key, label, unit, higher is better)
FIGURES = [
    ("pp_tok_s", "pp{p}", "tok/s", True),
    ("tg_tok_s", "tg{n}", "tok/s", True),
    ("load_s", "load", "s", False),
    ("compile_s", "warm-up: 2-token prompt + 1 token + 32-token prompt (ours: Numba cache load)", "s", False),
    ("first_token_s", "first token, from the start of loading", "s", False),
    ("process_first_token_s", "first token, from process start", "s", False),
    ("peak_rss_mb", "peak RSS", "MiB", False),
]


def default_models() -> list[Path]:
    from tools.fetch_models import smollm2_q4_1, smollm2_requantized

    return [smollm2_q4_1(), smollm2_requantized("q8_0"), smollm2_requantized("q4_0")]


def _run_json(cmd: list[str], what: str, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        hint = ""
        if proc.returncode < 0 and "llama.cpp" in what:
            hint = ("\n(llama.cpp died of signal %d.  llama-cpp-python builds with AMX kernels segfault on some "
                    "AMX CPUs, ggml-org/llama.cpp#20824: rebuild it without AMX, see BENCHMARKS.md)" % -proc.returncode)
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}{hint}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{what} printed nothing; stderr:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def run_ours(model: Path, threads: int, n_prompt: int, n_gen: int, n_ctx: int, reps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "edgellama.cli", "bench", "-m", str(model), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-c", str(n_ctx), "-r", str(reps), "--json"]
    return _run_json(cmd, f"edgellama bench on {model.name}", timeout)


def run_llamacpp(model: Path, threads: int, n_prompt: int, n_gen: int, n_ctx: int, reps: int,
                 timeout: float) -> dict:
    cfg = {"model": str(model), "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "n_ctx": n_ctx,
           "repetitions": reps, "seed": SEED, "warmup_pp": WARMUP_PP}
    return _run_json([sys.executable, "-c", LLAMA_SCRIPT, json.dumps(cfg)], f"llama.cpp on {model.name}", timeout)


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "tok/s":
        return f"{value:.1f}"
    if unit == "MiB":
        return f"{value:.0f}"
    return f"{value:.2f}"


def compare_table(ours: list[dict], theirs: list[dict], n_prompt: int, n_gen: int) -> str:
    rows = ["| figure | ours | llama.cpp | ours / llama.cpp |", "| --- | ---: | ---: | ---: |"]
    for key, label, unit, higher in FIGURES:
        a, b = _median(ours, key), _median(theirs, key)
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        better = "higher is better" if higher else "lower is better"
        rows.append(f"| {label.format(p=n_prompt, n=n_gen)} ({unit}, {better}) | {_fmt(a, unit)} | "
                    f"{_fmt(b, unit)} | {ratio} |")
    return "\n".join(rows)


def _spread(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{min(values):.1f}-{max(values):.1f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        changed = [line[3:] for line in dirty if line.strip()]
        return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_fingerprint() -> str:
    """A hash of the runtime's sources: tells whether the code changed while the benchmark ran."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "edgellama").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=None,
                        help="GGUF files (default: SmolLM2-135M Q4_1, Q8_0, Q4_0)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-p", "--n-prompt", type=int, default=256)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="pp/tg repetitions inside each run")
    parser.add_argument("-c", "--ctx", type=int, default=None, help="context size (default as edgellama bench)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per side and model (median)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--markdown", type=Path, default=None, help="append the results section to this file")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("llama_cpp") is None:
        print("bench_vs_llamacpp: llama_cpp is not installed (pip install llama-cpp-python)", file=sys.stderr)
        return 2
    try:
        n_ctx = check_args(args.n_prompt, args.n_gen, args.repetitions, args.threads, args.ctx)
        if args.runs <= 0:
            raise ValueError(f"--runs must be a positive integer, got {args.runs}")
        models = args.models or default_models()
        for m in models:
            if not Path(m).is_file():
                raise ValueError(f"{m}: no such file")
    except ValueError as e:
        print(f"bench_vs_llamacpp: error: {e}", file=sys.stderr)
        return 1

    started = datetime.datetime.now()
    load_start = load_average()
    git_start, sources_start = git_state(), source_fingerprint()
    print(f"{started:%Y-%m-%d %H:%M}  {cpu_model()}  threads {args.threads}  n_ctx {n_ctx}  "
          f"load average {load_start}", file=sys.stderr)
    sections = []
    for model in map(Path, models):
        ours, theirs = [], []
        for i in range(args.runs):
            order = ("ours", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "ours")
            for side in order:
                try:
                    if side == "ours":
                        r = run_ours(model, args.threads, args.n_prompt, args.n_gen, n_ctx, args.repetitions,
                                     args.timeout)
                        ours.append(r)
                    else:
                        r = run_llamacpp(model, args.threads, args.n_prompt, args.n_gen, n_ctx, args.repetitions,
                                         args.timeout)
                        theirs.append(r)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    print(f"bench_vs_llamacpp: {e}", file=sys.stderr)
                    return 1
                extra = f", Numba cache {r['numba_cache']}" if side == "ours" else ""
                print(f"  {model.name} run {i + 1}/{args.runs} {side:9s}: pp {r['pp_tok_s']:.1f} tok/s, "
                      f"tg {r['tg_tok_s']:.1f} tok/s, load {r['load_s']:.2f} s, warm-up {r['compile_s']:.2f} s"
                      f"{extra}, first token {r['first_token_s']:.2f} s, RSS {r['peak_rss_mb']:.0f} MiB",
                      file=sys.stderr)
        types = ", ".join(f"{k} x{v}" for k, v in ours[0]["tensor_types"].items())
        caches = ", ".join(r["numba_cache"] for r in ours)
        title = f"### {model.name} ({types})"
        note = (f"Median of {args.runs} fresh processes per side (pp/tg: each the median of "
                f"{args.repetitions} repetitions inside the process). Run-to-run range, ours: "
                f"pp {_spread(ours, 'pp_tok_s')}, tg {_spread(ours, 'tg_tok_s')}; llama.cpp: "
                f"pp {_spread(theirs, 'pp_tok_s')}, tg {_spread(theirs, 'tg_tok_s')} tok/s. "
                f"Our Numba cache per run: {caches}.")
        table = compare_table(ours, theirs, args.n_prompt, args.n_gen)
        note += (f" Ours: kernels {ours[0].get('kernels', '?')}, KV cache {ours[0].get('cache_type', '?')}; "
                 f"llama.cpp: {theirs[0].get('system_info', '?')}.")
        sections.append(f"{title}\n\n{table}\n\n{note}\n")
        print(f"\n{title}\n\n{table}\n\n{note}\n", flush=True)

    load_end = load_average()
    print(f"load average at the end: {load_end}", file=sys.stderr)
    changed = ""
    if source_fingerprint() != sources_start:
        changed = (f"- **warning: edgellama's sources changed during this run** (git at the end: "
                   f"{git_state()}); figures may mix two versions of the code\n")
        print(f"bench_vs_llamacpp: {changed[2:].strip()}", file=sys.stderr)
    if args.markdown:
        header = (
            f"## {started:%Y-%m-%d %H:%M}: {args.threads} threads, pp{args.n_prompt} / tg{args.n_gen}, "
            f"n_ctx {n_ctx}\n\n"
            f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}\n"
            f"- Python {platform.python_version()}, numpy {_version('numpy')}, numba {_version('numba')}, "
            f"llama-cpp-python {_version('llama_cpp_python')}, edgellama {_version('edgellama')} "
            f"(git {git_start})\n"
            f"- load average (1/5/15 min) at the start: {load_start}; at the end: {load_end}\n"
            + changed +
            f"- command: `python tools/bench_vs_llamacpp.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        )
        new_file = not args.markdown.exists() or args.markdown.stat().st_size == 0
        with open(args.markdown, "a") as f:
            if new_file:
                f.write("# Benchmarks\n\n")
            f.write("\n" + header + "\n".join(sections))
        print(f"appended to {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
