"""kernels.parallel.parallel_rows: the launch every parallel kernel uses instead of prange.

Whatever the thread count and the length, the ranges handed to the body cover 0..n-1 exactly once,
each range contiguous; nothing runs for n = 0; the arguments reach every range (arrays shared,
scalars by value).  The kernels built on it are held to their twins and to thread-count and batch
invariance by the kernel, batch and model tests.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit

from edgellama.kernels.parallel import parallel_rows


@njit
def _mark(lo, hi, counts, starts, ends, offset):
    for i in range(lo, hi):
        counts[i] += 1
        starts[i] = lo + offset
        ends[i] = hi + offset


@njit
def _launch(n, counts, starts, ends, offset):
    parallel_rows(_mark, n, (counts, starts, ends, offset))


@pytest.mark.parametrize("threads", sorted({1, 2, numba.config.NUMBA_NUM_THREADS}))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1000, 4097])
def test_ranges_cover_every_index_once(n, threads):
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        counts = np.zeros(n + 1, np.int64)  # one more than asked: it must stay untouched
        starts = np.full(n + 1, -1, np.int64)
        ends = np.full(n + 1, -1, np.int64)
        _launch(n, counts, starts, ends, 1000)
    finally:
        numba.set_num_threads(before)
    assert np.all(counts[:n] == 1) and counts[n] == 0 and starts[n] == -1
    lo, hi = starts[:n] - 1000, ends[:n] - 1000
    index = np.arange(n)
    assert np.all((lo <= index) & (index < hi)), "an index outside the range it was handed in"
    # each index's range is the one all its members report: ranges are contiguous and disjoint
    for i in np.unique(lo):
        members = index[lo == i]
        assert members[0] == i and members[-1] == hi[members[0]] - 1 and np.all(np.diff(members) == 1)
    assert len(np.unique(lo)) <= max(threads, 1) * 64  # at most a few ranges per thread, not one per index


def test_a_body_that_does_not_take_the_arguments_is_a_typing_error():
    @njit
    def wrong_body(lo, hi, a):
        a[lo] = hi

    @njit
    def launch(a, b):
        parallel_rows(wrong_body, a.shape[0], (a, b))

    with pytest.raises(numba.core.errors.TypingError):
        launch(np.zeros(4), np.zeros(4))
