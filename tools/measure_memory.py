"""Memory a model run takes, measured, against ``edgellama info``'s estimate (edgellama/info.py).

    python tools/measure_memory.py compare MODEL [MODEL ...] [-c 512] [-n 16] [--cache-type f16]
    python tools/measure_memory.py breakdown MODEL [-c 512]
    python tools/measure_memory.py table [--ram 3.5G --ram 7.5G]

``compare`` runs ``edgellama bench -c N -p N-n-1 -n n -r 1 --json`` in a child process for each model,
so that the whole context is used (every KV position written), and prints its peak resident set
size (the child's ``ru_maxrss``, all its memory: the packed weights, the mapped file pages it
touched, the KV cache, the buffers, Python, NumPy, Numba and LLVM) next to ``memory_needed``'s
estimate for the same settings, as a Markdown table.  The kernels' cache should be warm (a first
run compiles, and LLVM's compilation takes more memory: the ``compile`` column of ``breakdown``).

``breakdown`` loads a model step by step as ``Model`` does, in a child process, and prints the
resident memory after each step (anonymous and file-backed, from /proc/self/status): how the
constants of edgellama/info.py were measured.  Linux only.

``table`` prints the README's fit table from the estimate alone: Llama-3.2-1B / 3B and Llama-3-8B at
Q4_0 / Q4_K_M / Q8_0 with llama-quantize's tensor types (tools/make_sized_model.py's), without
writing the files (the Llama 3 vocabulary's header figures come from any such file: the smallest
is made if none is cached).
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


class _Standin:
    """What memory_needed reads of a GGUF file, for a model of this shape and type that is not on disk."""

    def __init__(self, base, shape, ftype: str):
        from edgellama.gguf import TensorInfo, tensor_nbytes
        from edgellama.quants import GGMLType
        from tools.make_sized_model import tensor_types

        self.header_memory, self.data_offset, self.path = base.header_memory, base.data_offset, f"{ftype}"
        head_dim = shape.dim // shape.n_heads
        kv = shape.n_kv_heads * head_dim
        dims = {"token_embd": (shape.n_vocab, shape.dim), "output": (shape.n_vocab, shape.dim),
                "attn_q": (shape.dim, shape.dim), "attn_k": (kv, shape.dim), "attn_v": (kv, shape.dim),
                "attn_output": (shape.dim, shape.dim), "ffn_gate": (shape.ffn, shape.dim),
                "ffn_up": (shape.ffn, shape.dim), "ffn_down": (shape.dim, shape.ffn)}
        shapes = {name: dims[name.split(".")[-2]] for name in tensor_types(shape, ftype)}
        types = dict(tensor_types(shape, ftype))
        shapes["output_norm.weight"], shapes["rope_freqs.weight"] = (shape.dim,), (head_dim // 2,)
        for i in range(shape.n_layers):
            shapes[f"blk.{i}.attn_norm.weight"] = shapes[f"blk.{i}.ffn_norm.weight"] = (shape.dim,)
        self.tensors = {}
        for name, tshape in shapes.items():
            qtype = types.get(name, GGMLType.F32)
            self.tensors[name] = TensorInfo(name, qtype, tshape, 0, tensor_nbytes(qtype, tshape))
        self.metadata = {**base.metadata, "llama.embedding_length": shape.dim, "llama.block_count": shape.n_layers,
                         "llama.feed_forward_length": shape.ffn, "llama.attention.head_count": shape.n_heads,
                         "llama.attention.head_count_kv": shape.n_kv_heads, "llama.rope.dimension_count": head_dim,
                         "llama.context_length": shape.ctx}


def table(rams: list[int], threads: int) -> None:
    from edgellama.config import ModelArgs
    from edgellama.gguf import GGUFFile
    from edgellama.info import max_context, memory_needed, size
    from tools.make_sized_model import SHAPES, sized_model

    base = GGUFFile(sized_model("llama-3.2-1b", "q4_0"))
    head = " | ".join(f"fits in {size(r)}: largest context" for r in rams)
    print(f"| model | type | file | weights held | KV cache per 1k tokens (f16) | needs at 4096 tokens | {head} |")
    print("| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(rams))
    names = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.2-3b": "Llama-3.2-3B", "llama-3-8b": "Llama-3-8B"}
    for key, shape in SHAPES.items():
        for ftype in ("q4_0", "q4_k_m", "q8_0"):
            f = _Standin(base, shape, ftype)
            args = ModelArgs.from_metadata(f.metadata, {n: i.shape for n, i in f.tensors.items()}, f.path)
            need = memory_needed(f, args, 4096, "f16", threads)
            cells = []
            for ram in rams:
                n = max_context(f, args, ram, "f16", threads)
                cells.append("does not fit" if n == 0 else f"{min(n, args.max_ctx)}"
                             + (" (trained)" if n >= args.max_ctx else ""))
            file_bytes = sum(i.nbytes for i in f.tensors.values())
            print(f"| {names[key]} | {ftype.upper()} | {size(file_bytes)} | {size(need.weights)} | "
                  f"{size(memory_needed(f, args, 1024).kv_cache)} | {size(need.total)} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("compare", "breakdown", "table"))
    parser.add_argument("models", nargs="*")
    parser.add_argument("--ram", action="append", default=[], help="(table) memory sizes, e.g. 3.5G")
    parser.add_argument("-c", "--ctx", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=16)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--cache-type", default="f16")
    args = parser.parse_args(argv)
    from edgellama.config import ModelArgs
    from edgellama.gguf import GGUFFile
    from edgellama.info import memory_needed, parse_size, size

    if args.command == "table":
        table([parse_size(r) for r in args.ram or ["3.5G", "7.5G"]], args.threads)
        return 0
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
