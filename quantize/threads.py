"""The quantizer's threads: a row kernel runs on disjoint row ranges at once.

The row kernels (``blocks``, ``kquants``) are serial Numba functions compiled with ``nogil``: they
take any C-contiguous run of rows, so a tensor is cut into contiguous row ranges and each range is
one call on a thread of a small pool (the GIL is released inside the call).  Numba's ``prange``
would do the same, but it compiles every kernel about twice more (the loop body as a separate
function and a wrapper around it, each re-optimizing everything the body calls: 21 of the 39
seconds that the Q4_K / Q5_K fit took to compile on a Zen 1), and a quantizer calls each kernel
once per tensor, where a pool's dispatch cost (tens of microseconds) is nothing.

Rows are independent (each row's bytes depend on that row alone), so the bytes do not depend on
how the rows are cut or on the thread count.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

CHUNKS_PER_THREAD = 4  # ranges per thread: evens out rows that cost differently (NaN rows, zero rows)

_threads: int | None = None  # set_threads; None = every CPU this process may run on
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_PREFIX = "edgellama-quantize"


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None) -> None:
    """Use n threads, at most one per CPU this process may run on (None or 0: one per CPU)."""
    global _threads
    _threads = max(1, min(int(n), _available_cpus())) if n else None


def thread_count() -> int:
    return _threads or _available_cpus()


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=_PREFIX)
            _pool_size = n
        return _pool


def over_rows(n_rows: int, run: Callable[[int, int], None]) -> None:
    """Call ``run(start, stop)`` over contiguous row ranges covering [0, n_rows), on the threads.

    The first row runs first, alone, in this thread: a kernel's first call compiles it (or loads
    it from the cache) once, before the threads call it.  An error in any range is raised here,
    after the ranges not yet started are cancelled."""
    if n_rows <= 0:
        return
    n = min(thread_count(), n_rows)
    if n == 1 or threading.current_thread().name.startswith(_PREFIX):
        run(0, n_rows)  # one thread, or already on one of the pool's (waiting on the pool could deadlock)
        return
    run(0, 1)
    chunks = min(n_rows - 1, n * CHUNKS_PER_THREAD)
    bounds = [1 + (n_rows - 1) * i // chunks for i in range(chunks + 1)]
    futures = [_executor(n).submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        raise
