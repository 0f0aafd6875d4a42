"""edgellama.adaptive_threads: fewer threads while other programs keep the cores busy.

The decisions are checked on a simulated machine (a clock, the CPUs' busy time and this process's
CPU time written by the test), never on this machine's timing; then through the kernel thread (and
a real model in tests/test_model.py, where only the thread count may change, never the results)."""

from __future__ import annotations

import numba
import pytest

from edgellama import adaptive_threads, kernel_thread
from edgellama.adaptive_threads import Governor, from_system, parse_busy

STAT = """cpu  900 10 200 5000 30 0 5 7 0 0
cpu0 100 1 20 700 3 4 5 6 0 0
cpu1 200 2 30 800 4 0 0 0 0 0
cpu2 400 4 60 900
intr 12345 1 2 3
ctxt 999
procs_running 3
"""


def test_busy_time_of_the_allowed_cpus_only():
    tick = adaptive_threads.CLOCK_TICKS
    # cpu0: user+nice+system+irq+softirq+steal, not idle (700) nor iowait (3)
    assert parse_busy(STAT, {0}) * tick == pytest.approx(100 + 1 + 20 + 4 + 5 + 6)
    assert parse_busy(STAT, {1}) * tick == pytest.approx(232)
    # an old kernel's four fields; the aggregate "cpu " line is never added
    assert parse_busy(STAT, None) * tick == pytest.approx(136 + 232 + 464)
    assert parse_busy(STAT, {0, 7}) * tick == pytest.approx(136)   # a CPU /proc/stat does not list: nothing
    assert parse_busy("", None) == 0.0


class Machine:
    """A simulated machine: ``run(seconds, ours, others)`` advances the clock while this process
    uses ``ours`` CPUs and other programs ``others``."""

    def __init__(self):
        self.now, self.busy, self.own = 100.0, 5000.0, 3.0
        self.fail = False

    def run(self, seconds, ours, others):
        self.now += seconds
        self.busy += seconds * (ours + others)
        self.own += seconds * ours

    def read_busy(self):
        if self.fail:
            raise OSError("no /proc/stat")
        return self.busy

    def governor(self, n_cpus, window=0.25):
        return Governor(n_cpus, self.read_busy, lambda: self.own, lambda: self.now, window)


def test_one_busy_core_of_two_means_one_thread_until_it_is_free_again():
    m = Machine()
    g = m.governor(2)
    m.run(0.5, ours=1.0, others=0.0)           # loading the model: one of our threads, nobody else
    assert g.threads(2) == 2 and g.limit is None and g.others == pytest.approx(0.0)
    m.run(0.3, ours=1.0, others=1.0)           # a busy program starts: our two threads get one CPU
    assert g.threads(2) == 1 and g.limit == 1 and g.others == pytest.approx(1.0)
    assert g.threads(1) == 1                   # never more than asked, one asked is not counted
    m.run(0.3, ours=1.0, others=1.0)
    assert g.threads(2) == 1
    m.run(0.3, ours=1.0, others=0.0)           # it has ended
    assert g.threads(2) == 2 and g.limit is None
    assert (g.asked, g.reduced) == (4, 2) and g.busiest == pytest.approx(1.0)


def test_decisions_wait_for_a_whole_window():
    m = Machine()
    g = m.governor(2, window=0.25)
    m.run(0.1, ours=0.5, others=2.0)
    assert g.threads(2) == 2                   # 0.1 s measured: no decision yet
    m.run(0.2, ours=0.5, others=2.0)
    assert g.threads(2) == 1                   # 0.3 s: decided over the whole 0.3 s
    assert g.others == pytest.approx(2.0)


@pytest.mark.parametrize("n_cpus, others, asked, expected", [
    (2, 0.2, 2, 2),    # under a quarter of a core: nothing changes
    (2, 0.3, 2, 1),    # more: one thread fewer
    (2, 1.9, 2, 1),    # at least one
    (2, 3.0, 2, 1),
    (8, 3.5, 8, 4),    # 4.5 CPUs left: 4 threads
    (8, 3.5, 3, 3),    # never more than asked
    (8, 0.0, 16, 16),  # nor fewer when nobody else runs
    (4, 1.0, 4, 3),
])
def test_threads_left_by_the_other_programs(n_cpus, others, asked, expected):
    m = Machine()
    g = m.governor(n_cpus)
    m.run(1.0, ours=min(asked, n_cpus) / 2, others=others)
    assert g.threads(asked) == expected


def test_unreadable_or_inconsistent_counters_change_nothing():
    m = Machine()
    g = m.governor(2)
    m.fail = True
    m.run(1.0, ours=1.0, others=1.0)
    assert g.threads(2) == 2 and g.limit is None
    # ticks counted late: this process's time runs ahead of the CPUs' busy time -> no one else
    m.fail = False
    g = m.governor(2)
    m.own += 0.5
    m.run(1.0, ours=1.0, others=0.0)
    assert g.threads(2) == 2 and g.others == 0.0


def test_the_environment_and_the_system():
    assert from_system({"EDGELLAMA_ADAPTIVE_THREADS": "0"}) is None
    assert from_system({"EDGELLAMA_ADAPTIVE_THREADS": "off"}) is None
    assert from_system({}, stat="/nonexistent/stat") is None
    try:
        open(adaptive_threads.STAT).close()
    except OSError:
        pytest.skip("no /proc/stat here")
    g = from_system({})
    from edgellama.hardware import affinity_cpus

    assert g is not None and g.n_cpus == len(affinity_cpus() or range(g.n_cpus))
    assert g._read_busy() > 0   # the CPUs this process may use have been busy since boot


@pytest.fixture
def busy_machine():
    """The kernel thread's governor replaced by a simulated machine's (given back afterwards)."""
    m = Machine()
    previous = kernel_thread.set_governor(m.governor(2))
    yield m
    kernel_thread.set_governor(previous)


needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")


@needs_two
def test_the_kernel_thread_asks_the_governor_at_each_job_and_between_parts(busy_machine):
    m = busy_machine
    m.run(0.5, ours=1.0, others=0.0)
    assert kernel_thread.run(numba.get_num_threads, threads=2) == 2

    def job():
        before = numba.get_num_threads()
        m.run(0.5, ours=1.0, others=1.0)   # another program starts while the job runs
        kernel_thread.adapt()              # between two parts of it
        return before, numba.get_num_threads()

    assert kernel_thread.run(job, threads=2) == (2, 1)
    assert kernel_thread.run(numba.get_num_threads, threads=2) == 1
    assert kernel_thread.run(numba.get_num_threads) == 1   # a job that asks nothing leaves it as it is
    m.run(0.5, ours=1.0, others=0.0)
    assert kernel_thread.run(numba.get_num_threads, threads=2) == 2
    kernel_thread.adapt()   # outside a job: nothing to do
