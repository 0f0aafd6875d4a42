"""edgellama vs llama.cpp's own C++ ``llama-bench`` on the same GGUF file and thread count.

Every run is a fresh process, so load time, time to first token and peak RSS are what a user sees.
Ours is ``python -m edgellama.cli bench --json``.  llama.cpp's is the C++ ``llama-bench`` (built once
from the llama-cpp-python sdist's sources by tools/llamacpp.py; not the Python binding, whose
per-token Python cost would flatter us): ``llama-bench -p P -n N -r R -o json`` for pp and tg, and
``llama-bench -p 0 -n 1 -r 1 --no-warmup`` timed from process start for the first token (load
included).  Peak RSS of each llama.cpp process comes from wait4 in a small parent (tools/peak_rss.py;
ours is the process's own VmHWM).  The two sides alternate (ours first on even runs) and each figure is
the median over ``--runs`` processes.

The DRAM roofline: tools/membw.py measures the streaming read bandwidth with the same thread count
before each pair of runs (each run's figure uses the one measured just before it); a decode step
reads every weight matrix once (the embedding table one row), so
tg x (bytes of weights per token) / bandwidth is the fraction of the hardware decoding reaches.

With ``-d D`` both sides run pp and tg after D tokens already in the KV cache (llama-bench's
``-d``, ``edgellama bench -d``): attention deep in a context; the roofline then counts the f16 KV
cache's bytes read per token too (at the mean position of the tg test).

Usage:  python tools/bench_vs_llamacpp.py [--models F.gguf ...] [-t 2] [-p 256] [-n 128] [-d 0] [--runs 3]
                                          [--markdown BENCHMARKS.md]
Exit status: 0 done, 1 a run failed, 2 llama.cpp's tools could not be built.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
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

from edgellama.bench import check_args  # noqa: E402  (light: imports numpy and the GGUF reader only)


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step reads (edgellama.info.weight_bytes_per_token)."""
    from edgellama.gguf import GGUFFile
    from edgellama.info import weight_bytes_per_token as of_file

    f = GGUFFile(path)
    try:
        return of_file(f)
    finally:
        f.close()


def kv_bytes_per_token(path: Path, n_past: float) -> float:
    """Bytes of an f16 KV cache one decode step reads with n_past positions cached (keys and values
    of every layer and KV head)."""
    from edgellama.config import ModelArgs
    from edgellama.gguf import GGUFFile

    f = GGUFFile(path)
    a = ModelArgs.from_gguf(f)
    f.close()
    return 2 * 2 * a.n_layers * a.n_kv_heads * a.head_dim * n_past


def _run_timed(cmd: list[str], timeout: float) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MiB) of one child process, both measured by tools/peak_rss.py:
    the child is started from that small interpreter, not from this script, whose own peak would
    otherwise floor the child's figure (see there)."""
    import signal
    import threading

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # Python's bytecode cache as users have it (on by default): with PYTHONDONTWRITEBYTECODE set (as
    # some sandboxes and CI images do) every start compiles edgellama's modules again, 0.2-0.5 s
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-S", str(ROOT / "tools" / "peak_rss.py"), str(report_w)] + cmd,
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(report_w,), start_new_session=True)
    finally:
        os.close(report_w)
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k, f: chunks.__setitem__(k, f.read()), args=(k, f), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr), ("report", os.fdopen(report_r, "rb")))]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))  # the command too
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    for r in readers:
        r.join()
    report = chunks.get("report", b"").split()
    returncode = int(report[2]) if len(report) == 3 else proc.returncode or -signal.SIGKILL
    if returncode != 0:
        err = chunks.get("err", b"").decode(errors="replace")
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} failed (exit {returncode}):\n"
                           f"{err.strip()[-2000:]}")
    return chunks.get("out", b"").decode(errors="replace"), float(report[0]), int(report[1]) / 1024


# (key, label, unit, higher is better)
FIGURES = [
    ("pp_tok_s", "pp{p}", "tok/s", True),
    ("tg_tok_s", "tg{n}", "tok/s", True),
    ("process_first_token_s", "first token, from process start (load included)", "s", False),
    ("peak_rss_mb", "peak RSS", "MiB", False),
    ("roofline", "tg x weight bytes per token / DRAM read bandwidth", "%", True),
]


def default_models() -> list[Path]:
    from tools.fetch_models import smollm2_q4_1, smollm2_requantized

    return [smollm2_q4_1(), smollm2_requantized("q8_0"), smollm2_requantized("q4_0")]


def run_ours(model: Path, threads: int, n_prompt: int, n_gen: int, n_ctx: int, reps: int, timeout: float,
             depth: int = 0) -> dict:
    cmd = [sys.executable, "-m", "edgellama.cli", "bench", "-m", str(model), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-c", str(n_ctx), "-r", str(reps), "-d", str(depth), "--json"]
    out, _, _ = _run_timed(cmd, timeout)
    return json.loads([line for line in out.splitlines() if line.strip()][-1])


def run_llamacpp(model: Path, threads: int, n_prompt: int, n_gen: int, n_ctx: int, reps: int,
                 timeout: float, depth: int = 0) -> dict:
    """llama-bench's pp and tg (mean tokens/s over its repetitions), and the first token from
    process start of a second llama-bench process that loads the model and generates one token."""
    from tools.llamacpp import tool

    bench = str(tool("llama-bench"))
    out, _, rss = _run_timed([bench, "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                              "-r", str(reps), "-d", str(depth), "-o", "json"], timeout)
    tests = json.loads(out)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] == n_prompt and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] == n_gen and t["n_prompt"] == 0)
    _, first_s, rss_first = _run_timed([bench, "-m", str(model), "-t", str(threads), "-p", "0", "-n", "1", "-r", "1",
                                        "--no-warmup", "-o", "json"], timeout)
    return {"pp_tok_s": pp, "tg_tok_s": tg, "process_first_token_s": first_s, "peak_rss_mb": rss,
            "system_info": f"llama-bench build {tests[0].get('build_commit', '?')}, {tests[0].get('cpu_info', '?')}"}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "tok/s":
        return f"{value:.1f}"
    if unit in ("MiB", "%"):
        return f"{value:.0f}"
    return f"{value:.2f}"


def compare_table(ours: list[dict], theirs: list[dict], n_prompt: int, n_gen: int, depth: int = 0) -> str:
    rows = ["| figure | ours | llama.cpp | ours / llama.cpp |", "| --- | ---: | ---: | ---: |"]
    for key, label, unit, higher in FIGURES:
        a, b = _median(ours, key), _median(theirs, key)
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        better = "higher is better" if higher else "lower is better"
        label = label.format(p=n_prompt, n=n_gen) + (f" @ d{depth}" if depth and key in ("pp_tok_s", "tg_tok_s") else "")
        if depth and key == "roofline":
            label = "tg x (weight + KV cache) bytes per token / DRAM read bandwidth"
        rows.append(f"| {label} ({unit}, {better}) | {_fmt(a, unit)} | "
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
    parser.add_argument("--sized", nargs="*", default=None, metavar="SHAPE.TYPE",
                        help="also random-weight files of real shapes (tools/make_sized_model.py), e.g. "
                             "llama-3.2-1b.q4_0 llama-3-8b.q4_0")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-p", "--n-prompt", type=int, default=256)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="pp/tg repetitions inside each run")
    parser.add_argument("-d", "--depth", type=int, default=0,
                        help="tokens already cached when pp and tg start (llama-bench's -d)")
    parser.add_argument("-c", "--ctx", type=int, default=None, help="context size (default as edgellama bench)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per side and model (median)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--markdown", type=Path, default=None, help="append the results section to this file")
    args = parser.parse_args(argv)
    if args.n_prompt < 1 or args.n_gen < 1:
        parser.error("-p and -n must be >= 1 here: the comparison needs both pp and tg")

    try:
        from tools.llamacpp import build
        build(quiet=True)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"bench_vs_llamacpp: llama.cpp's tools could not be built: {e}", file=sys.stderr)
        return 2
    try:
        n_ctx = check_args(args.n_prompt, args.n_gen, args.repetitions, args.threads, args.ctx, args.depth)
        if args.runs <= 0:
            raise ValueError(f"--runs must be a positive integer, got {args.runs}")
        models = list(args.models or ([] if args.sized else default_models()))
        if args.sized:
            from tools.make_sized_model import parse_sized, sized_model
            models += [sized_model(*parse_sized(name)) for name in args.sized]
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
    def measure_bandwidth() -> float:
        # in a child, so that its 2 GiB buffer is never part of this process (whose children's peak
        # RSS would otherwise start from it)
        out, _, _ = _run_timed([sys.executable, str(ROOT / "tools" / "membw.py"), "-t", str(args.threads),
                                "--json"], args.timeout)
        gbs = json.loads(out)["read_gb_s"]
        print(f"DRAM read bandwidth with {args.threads} threads: {gbs:.1f} GB/s", file=sys.stderr)
        return gbs

    sections = []
    for model in map(Path, models):
        ours, theirs, bandwidths = [], [], []
        per_token = weight_bytes_per_token(model)
        if args.depth:
            per_token += kv_bytes_per_token(model, args.depth + args.n_gen / 2)
        for i in range(args.runs):
            # measured again before each pair of runs: a shared host's bandwidth moves within minutes
            # (13.0 and 23.7 GB/s in one run on 2026-12-03), and each run's roofline uses its own
            bandwidth = measure_bandwidth()
            bandwidths.append(bandwidth)
            order = ("ours", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "ours")
            for side in order:
                try:
                    if side == "ours":
                        r = run_ours(model, args.threads, args.n_prompt, args.n_gen, n_ctx, args.repetitions,
                                     args.timeout, args.depth)
                        ours.append(r)
                    else:
                        r = run_llamacpp(model, args.threads, args.n_prompt, args.n_gen, n_ctx, args.repetitions,
                                         args.timeout, args.depth)
                        theirs.append(r)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    print(f"bench_vs_llamacpp: {e}", file=sys.stderr)
                    return 1
                r["roofline"] = 100 * r["tg_tok_s"] * per_token / (bandwidth * 1e9)
                extra = (f", load {r['load_s']:.2f} s, Numba cache {r['numba_cache']}, packed weights "
                         f"{r.get('packed_weights', '?')}") if side == "ours" else ""
                print(f"  {model.name} run {i + 1}/{args.runs} {side:9s}: pp {r['pp_tok_s']:.1f} tok/s, "
                      f"tg {r['tg_tok_s']:.1f} tok/s ({r['roofline']:.0f}% of DRAM), first token "
                      f"{r['process_first_token_s']:.2f} s{extra}, RSS {r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
        types = ", ".join(f"{k} x{v}" for k, v in ours[0]["tensor_types"].items())
        caches = ", ".join(r["numba_cache"] for r in ours)
        packed = ", ".join(r.get("packed_weights", "?") for r in ours)
        title = f"### {model.name} ({types})"
        note = (f"Median of {args.runs} fresh processes per side (pp/tg: each the median of "
                f"{args.repetitions} repetitions inside the process). Run-to-run range, ours: "
                f"pp {_spread(ours, 'pp_tok_s')}, tg {_spread(ours, 'tg_tok_s')}; llama.cpp: "
                f"pp {_spread(theirs, 'pp_tok_s')}, tg {_spread(theirs, 'tg_tok_s')} tok/s. "
                f"Our Numba cache per run: {caches}; packed weights per run: {packed} (mapped: from the packed "
                f"cache an earlier load wrote). Weights read per token: {per_token / 1e9:.3f} GB; DRAM "
                f"read bandwidth ({args.threads} threads, tools/membw.py, before each pair of runs; each run's "
                f"roofline uses its own): {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s.")
        table = compare_table(ours, theirs, args.n_prompt, args.n_gen, args.depth)
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
            f"llama.cpp C++ tools from the llama-cpp-python 0.3.36 sdist, edgellama {_version('edgellama')} "
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
