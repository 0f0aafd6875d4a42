"""Memory a model run takes, measured, against ``edgellama info``'s estimate (edgellama/info.py).

    python tools/measure_memory.py compare MODEL [MODEL ...] [-c 512] [-n 16] [--cache-type f16]
    python tools/measure_memory.py breakdown MODEL [-c 512]

``compare`` runs ``edgellama bench -c N -p N-n-1 -n n -r 1 --json`` in a child process for each model,
so that the whole context is used (every KV position written), and prints its peak resident set
size (the child's ``ru_maxrss``, all its memory: the packed weights, the mapped file pages it
touched, the KV cache, the buffers, Python, NumPy, Numba and LLVM) next to ``memory_needed``'s
estimate for the same settings, as a Markdown table.  The kernels' cache should be warm (a first
run compiles, and LLVM's compilation takes more memory: the ``compile`` column of ``breakdown``).

``breakdown`` loads a model step by step as ``Model`` does, in a child process, and prints the
resident memory after each step (anonymous and file-backed, from /proc/self/status): how the
constants of edgellama/info.py were measured.  Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20

BREAKDOWN_CHILD = r"""
import json, sys
import numpy as np

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

steps = [("python + numpy", status())]
import edgellama
from edgellama import model as M
from edgellama.gguf import GGUFFile
from edgellama.memory import trim_heap
from edgellama.tokenizer import Tokenizer
import numba
steps.append(("import edgellama, numba", status()))
f = GGUFFile(sys.argv[1])
steps.append(("GGUF header (metadata)", status()))
args = M.ModelArgs.from_gguf(f)
m = M.Model(f, n_ctx=int(sys.argv[2]), threads=int(sys.argv[3]), cache_type=sys.argv[4], check_memory=False)
steps.append(("Model (tokenizer, weights, state)", status()))
w = m.weights
packed = w.packed.nbytes + (w.output.packed.nbytes if w.output.packed is not None else 0)
m.warm_up()
steps.append(("kernels loaded (warm_up)", status()))
ids = np.random.default_rng(0).integers(0, args.n_vocab, m.n_ctx - 1)
m.eval(ids)
steps.append(("context filled (prefill)", status()))
print(json.dumps({"steps": steps, "header_memory": f.header_memory, "packed": packed}))
"""


def breakdown(path: str, n_ctx: int, threads: int, cache_type: str) -> dict:
    out = subprocess.run([sys.executable, "-c", BREAKDOWN_CHILD, path, str(n_ctx), str(threads), cache_type],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_peak(path: str, n_ctx: int, n_gen: int, threads: int, cache_type: str) -> tuple[float, dict]:
    """Peak RSS in bytes of ``edgellama bench`` filling an n_ctx context, and its JSON."""
    cmd = [sys.executable, "-m", "edgellama.cli", "bench", "-m", path, "-c", str(n_ctx), "-p", str(n_ctx - n_gen - 1),
           "-n", str(n_gen), "-r", "1", "-t", str(threads), "--cache-type", cache_type, "--json"]
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {stderr[-3000:]}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return peak, json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("compare", "breakdown"))
    parser.add_argument("models", nargs="+")
    parser.add_argument("-c", "--ctx", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=16)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--cache-type", default="f16")
    args = parser.parse_args(argv)
    from edgellama.config import ModelArgs
    from edgellama.gguf import GGUFFile
    from edgellama.info import memory_needed, size

    if args.command == "breakdown":
        for path in args.models:
            r = breakdown(path, args.ctx, args.threads, args.cache_type)
            print(f"{Path(path).name}, n_ctx={args.ctx} (header account {size(r['header_memory'])}, packed weights "
                  f"{size(r['packed'])})")
            previous = None
            for name, s in r["steps"]:
                delta = "" if previous is None else f"  (+{(s['RssAnon'] - previous['RssAnon']) / MIB:.1f} anon)"
                print(f"  {name:32s} rss {s['VmRSS'] / MIB:8.1f} MiB  anon {s['RssAnon'] / MIB:8.1f}  file "
                      f"{s['RssFile'] / MIB:6.1f}  peak {s['VmHWM'] / MIB:8.1f}{delta}")
                previous = s
        return 0
    print("| model | n_ctx | cache | estimate | weights | KV cache | buffers + runtime | measured peak RSS | "
          "estimate - measured |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.models:
        f = GGUFFile(path)
        need = memory_needed(f, ModelArgs.from_gguf(f), args.ctx, args.cache_type, args.threads)
        f.close()
        t0 = time.perf_counter()
        peak, report = bench_peak(path, args.ctx, args.n_gen, args.threads, args.cache_type)
        print(f"| {Path(path).name} | {args.ctx} | {args.cache_type} | {size(need.total)} | {size(need.weights)} | "
              f"{size(need.kv_cache)} | {size(need.total - need.weights - need.kv_cache)} | {size(peak)} | "
              f"{100 * (need.total - peak) / peak:+.1f}% |", flush=True)
        print(f"<!-- {Path(path).name}: bench peak_rss_mb {report['peak_rss_mb']:.1f}, numba cache "
              f"{report['numba_cache']}, {time.perf_counter() - t0:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
