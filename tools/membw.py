"""Streaming read bandwidth of this machine with a given thread count: the roofline of decoding.

Reads a buffer of ``--gib`` GiB (default 2, far beyond any cache) with Numba ``prange`` sums of
64-bit words, the way decoding streams weights: the best of ``--reps`` passes, in GB/s (10^9 bytes).
Each chunk is summed with NumPy's ``sum`` of a slice (vectorized): an indexed loop ``s += words[i]``
is not vectorized (Numba's negative-index wraparound on a range that may start below zero) and read
a third of this (2 threads on a 2-core Xeon, 2026-12-03: 6.5-7.0 GB/s against 20.5), which made the
"tg x bytes / bandwidth" figures of tools/bench_vs_llamacpp.py above 100% before that day.

Usage:  python tools/membw.py [-t 2] [--gib 2] [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def read_bandwidth(threads: int, gib: float = 2.0, reps: int = 5) -> float:
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def total(words, n_chunks):
        size = words.shape[0] // n_chunks
        acc = np.zeros(n_chunks, np.uint64)
        for c in prange(n_chunks):
            acc[c] = words[c * size:(c + 1) * size].sum()
        return acc.sum()

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    words = np.ones(int(gib * (1 << 30)) // 8, np.uint64)  # written once: resident before timing
    n_chunks = 64 * threads
    total(words[: n_chunks * 1024], n_chunks)  # compile
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        total(words, n_chunks)
        best = max(best, words.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    gbs = read_bandwidth(args.threads, args.gib, args.reps)
    print(json.dumps({"threads": args.threads, "read_gb_s": gbs}) if args.json else f"{gbs:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
