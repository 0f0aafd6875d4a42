"""Benchmark edgellama's Numba quantizers against gguf-py's numpy ones and llama.cpp's quantizer.

  1. kernels, in memory, on SmolLM2-135M as float32 (``<cache>/SmolLM2-135M-Instruct.F32.gguf``,
     made once from the shipped Q4_1 file): every 2-D tensor through
     ``quantize.blocks.quantize_rows`` (at each --threads) and, for the types gguf-py can write,
     through ``gguf.quants.quantize``; the bytes are compared, speeds reported as tensors/s and MB/s
     of float32 input (K-quants need rows of 256: SmolLM2's 576 are not, so they are skipped here);
  2. file to file, side by side with llama.cpp's C++ ``llama-quantize`` (tools/llamacpp.py; else
     llama-cpp-python's ``llama_model_quantize`` if installed) on the same input with the same
     thread count: both as commands (``python -m quantize IN OUT TYPE N`` and ``llama-quantize IN
     OUT TYPE N``), wall time and CPU time (user + system, of the child process); the outputs'
     sha256 are compared (identical: same type rules, same bytes).  Input: --input, by default the
     Llama-3.2-1B-shaped F16 file of tools/make_sized_model.py (2.5 GB, 1.24 B weights).

Usage:  python tools/bench_quantize.py [--types q8_0,q4_0,q4_1] [--threads 1,2] [--repeat 3]
                                       [--skip-gguf-py] [--skip-kernels] [--skip-files]
                                       [--file-types q4_k_m,q6_k] [--input FILE.gguf] [--json results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgellama.gguf import GGUFFile  # noqa: E402
from edgellama.quants import GGMLType  # noqa: E402
from quantize import blocks  # noqa: E402
from quantize.convert import convert_file  # noqa: E402
from tools.fetch_models import cache_dir, sha256_file, smollm2_q4_1  # noqa: E402

MB = 1e6


def f32_source() -> Path:
    target = cache_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not target.exists():
        convert_file(smollm2_q4_1(), target, "f32", allow_requantize=True, quiet=True)
    return target


def load_matrices(path: Path) -> dict[str, np.ndarray]:
    gguf = GGUFFile(path)
    out = {name: np.array(gguf.raw(name).view(np.float32).reshape(info.shape))
           for name, info in gguf.tensors.items() if len(info.shape) == 2}
    gguf.close()
    return out


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_kernels(matrices: dict[str, np.ndarray], qtypes: list[str], threads: list[int], repeat: int,
                  gguf_py: bool) -> list[dict]:
    from gguf import quants as gguf_quants
    from gguf.constants import GGMLQuantizationType

    n_bytes = sum(m.nbytes for m in matrices.values())
    rows = []
    for qtype in qtypes:
        gtype = GGMLType[qtype.upper()]
        if any(m.shape[1] % blocks.block_elems(gtype) for m in matrices.values()):
            print(f"{qtype}: rows of {sorted({m.shape[1] for m in matrices.values()})} are not all multiples of "
                  f"{blocks.block_elems(gtype)}; skipped (see the file-to-file section)", flush=True)
            continue
        outs = {name: np.empty((m.shape[0], blocks.row_bytes(gtype, m.shape[1])), np.uint8)
                for name, m in matrices.items()}  # preallocated, as the converter does
        blocks.quantize_rows(next(iter(matrices.values()))[:4], gtype)  # compile / load the cache
        for n in threads:
            blocks.set_threads(n)
            seconds = best_time(lambda: [blocks.quantize_rows(m, gtype, out=outs[name])
                                         for name, m in matrices.items()], repeat)
            rows.append(_row("edgellama (Numba)", qtype, n, len(matrices), n_bytes, seconds))
        if gguf_py and gtype in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1):
            reference = {}
            seconds = best_time(lambda: reference.update(
                {name: gguf_quants.quantize(m, GGMLQuantizationType(int(gtype))) for name, m in matrices.items()}), 1)
            same = all(np.array_equal(outs[name].ravel(), np.ascontiguousarray(reference[name]).view(np.uint8).ravel())
                       for name in matrices)
            rows.append(_row("gguf-py (numpy)", qtype, 1, len(matrices), n_bytes, seconds, identical=same))
    return rows


def bench_files(source: Path, qtypes: list[str], threads: list[int], repeat: int) -> list[dict]:
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    gguf = GGUFFile(source)
    n_tensors, n_bytes = len(gguf.tensors), sum(i.nbytes for i in gguf.tensors.values())
    gguf.close()
    rows = []
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        for qtype in qtypes:
            for n in threads:
                ours = Path(tmp) / f"ours.{qtype}.gguf"
                seconds = best_time(lambda: convert_file(source, ours, qtype, quiet=True, force=True, threads=n), repeat)
                rows.append(_row("edgellama-quantize (file)", qtype, n, n_tensors, n_bytes, seconds))
                if llama_cpp is None:
                    continue
                theirs = Path(tmp) / f"llamacpp.{qtype}.gguf"
                seconds = best_time(lambda: _llama_quantize(llama_cpp, source, theirs, qtype, n), repeat)
                rows.append(_row("llama.cpp llama_model_quantize", qtype, n, n_tensors, n_bytes, seconds,
                                 identical=sha256_file(ours) == sha256_file(theirs)))
    return rows


def _run_timed(argv: list[str]) -> tuple[float, float]:
    """Run a command to completion (output discarded); (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ...: exit {result.returncode}: {result.stderr[-1000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_commands(source: Path, qtypes: list[str], threads: list[int], repeat: int) -> list[dict]:
    """edgellama-quantize and llama-quantize as commands on the same input, side by side."""
    from tools import llamacpp

    binary = llamacpp.bin_dir() / "llama-quantize" if llamacpp.available() else None
    n_bytes = os.path.getsize(source)
    rows = []
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        for qtype in qtypes:
            for n in threads:
                ours, theirs = Path(tmp) / f"ours.{qtype}.gguf", Path(tmp) / f"llamacpp.{qtype}.gguf"
                ours_argv = [sys.executable, "-m", "quantize", str(source), str(ours), qtype, str(n), "--force",
                             "--quiet", "--allow-requantize"]
                theirs_argv = [str(binary), "--allow-requantize", str(source), str(theirs), qtype.upper(), str(n)]
                best = {"ours": (float("inf"), 0.0), "theirs": (float("inf"), 0.0)}
                for _ in range(repeat):  # alternate, so that a change of machine load hits both
                    best["ours"] = min(best["ours"], _run_timed(ours_argv))
                    if binary is not None:
                        best["theirs"] = min(best["theirs"], _run_timed(theirs_argv))
                load = os.getloadavg()[0]
                rows.append(_row("edgellama-quantize", qtype, n, 0, n_bytes, best["ours"][0],
                                 cpu_seconds=round(best["ours"][1], 2), load=round(load, 2)))
                if binary is not None:
                    rows.append(_row("llama-quantize (C++)", qtype, n, 0, n_bytes, best["theirs"][0],
                                     cpu_seconds=round(best["theirs"][1], 2), load=round(load, 2),
                                     identical=sha256_file(ours) == sha256_file(theirs)))
                    theirs.unlink()
                ours.unlink()
    return rows


def _llama_quantize(llama_cpp, source: Path, target: Path, qtype: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    with _silenced():  # llama.cpp logs every tensor to stdout / stderr
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


class _silenced:
    """Point file descriptors 1 and 2 at /dev/null for a while (C code writes to them directly)."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)



def _row(what: str, qtype: str, threads: int, n_tensors: int, n_bytes: int, seconds: float, **extra) -> dict:
    row = {"what": what, "type": qtype, "threads": threads, "seconds": round(seconds, 4),
           "tensors_per_s": round(n_tensors / seconds, 1), "mb_per_s": round(n_bytes / MB / seconds, 1), **extra}
    same = "" if "identical" not in extra else ("  bytes identical" if extra["identical"] else "  BYTES DIFFER")
    cpu = f"  cpu {extra['cpu_seconds']:7.2f} s  load {extra['load']:.1f}" if "cpu_seconds" in extra else ""
    rate = f"{row['tensors_per_s']:8.1f} tensors/s  " if n_tensors else ""
    print(f"{what:<32} {qtype:<6} threads={threads}  {seconds:8.3f} s  {rate}{row['mb_per_s']:8.1f} MB/s of input"
          f"{cpu}{same}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q4_0,q4_1")
    parser.add_argument("--threads", default=",".join(sorted({"1", str(os.cpu_count() or 1)})))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-gguf-py", action="store_true", help="skip the (slow) numpy reference")
    parser.add_argument("--skip-files", action="store_true", help="only the in-memory kernel benchmark")
    parser.add_argument("--skip-kernels", action="store_true", help="only the file-to-file benchmark")
    parser.add_argument("--file-types", default="q4_k_m,q6_k", help="types of the file-to-file benchmark")
    parser.add_argument("--input", type=Path, help="file-to-file input (default: the Llama-3.2-1B-shaped F16 file)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    qtypes = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    if not args.skip_kernels:
        source = f32_source()
        print(f"input: {source} ({os.path.getsize(source) / MB:.0f} MB); {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}\n-- kernels, in memory", flush=True)
        rows += bench_kernels(load_matrices(source), qtypes, threads, args.repeat, not args.skip_gguf_py)
    if not args.skip_files:
        from tools import llamacpp

        if args.input is None:
            from tools.make_sized_model import sized_model

            args.input = sized_model("llama-3.2-1b", "f16")
        file_types = [t.strip().lower() for t in args.file_types.split(",") if t.strip()]
        print(f"-- file to file: {args.input} ({os.path.getsize(args.input) / MB:.0f} MB), commands side by side; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        if llamacpp.available():
            rows += bench_commands(args.input, file_types, threads, args.repeat)
        else:
            print("(llama.cpp's tools are not built: python tools/llamacpp.py; trying llama-cpp-python)", flush=True)
            rows += bench_files(args.input, file_types, threads, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
