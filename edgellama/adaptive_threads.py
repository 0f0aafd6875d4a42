"""Fewer threads while other programs keep the cores busy.

The kernels' parallel loops end at a barrier: the threads that have finished spin (libgomp, up to
GOMP_SPINCOUNT pauses) until the last one arrives.  When other programs keep cores busy, a thread
of ours waits for a time slice, and every loop waits for it; a decode step runs a few hundred
loops.  Measured on a 2-core Xeon with one busy process (another session, nice 0), SmolLM2 Q4_1
decode: 0.64 tokens/s with 2 threads, 92 with 1 (159 with 2 on the quiet machine); llama.cpp's
llama-bench collapses the same way (112 -> 6.45).

So, between evaluations (at most once per ``WINDOW`` seconds), ``Governor`` measures how much CPU
the other programs used on the CPUs this process may run on: the busy time of those CPUs
(``/proc/stat``) minus this process's own (``time.process_time``, every thread of ours, spinning
included), over the wall time since the last measurement; the first measurement runs from the
governor's creation (loading the model), so the first evaluation already gets the right count.
The next evaluations use at most int(CPUs - others + 1/4) threads (at least 1, never more than
asked): with one busy core of two, one thread; when it goes quiet, two again.  A program using under
a quarter of a core changes nothing (measured: one using half a core took SmolLM2's decoding from 86
tokens/s with one thread to 63 with two).

Results do not change: the kernels give the same bits whatever the thread count (each row's sums
in a fixed order; tests/test_model.py::test_results_do_not_depend_on_thread_count).  Off with
``EDGELLAMA_ADAPTIVE_THREADS=0``, and where ``/proc/stat`` is missing (not Linux).
"""

from __future__ import annotations

import os
import time
from typing import Callable

WINDOW = 0.25   # seconds of measurement between decisions: /proc/stat counts in ticks of 10 ms per CPU
STAT = "/proc/stat"


def enabled_by_environment(environ=os.environ) -> bool:
    return environ.get("EDGELLAMA_ADAPTIVE_THREADS", "1").strip().lower() not in ("0", "off", "false", "no")


def parse_busy(text: str, cpus: set[int] | None) -> float:
    """Seconds of busy time (user, nice, system, irq, softirq, steal) of ``cpus`` (None: all) in a
    /proc/stat text.  Guest time is already inside user and nice."""
    ticks = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            values = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        values += [0] * (8 - len(values))
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        ticks += user + nice + system + irq + softirq + steal
    return ticks / CLOCK_TICKS


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK") or 100
    except (AttributeError, ValueError, OSError):
        return 100


CLOCK_TICKS = _clock_ticks()  # /proc/stat's unit: ticks per second (USER_HZ)


class Governor:
    """How many threads the next evaluation gets (``threads(asked)``), from the measured CPU use of
    other programs.  ``read_busy``: the busy seconds of ``n_cpus`` CPUs so far; ``read_own``: this
    process's CPU seconds so far; ``clock``: wall seconds.  Counts what it decided, for reports."""

    def __init__(self, n_cpus: int, read_busy: Callable[[], float], read_own: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic, window: float = WINDOW):
        self.n_cpus = max(1, int(n_cpus))
        self._read_busy, self._read_own, self._clock, self.window = read_busy, read_own, clock, window
        self.limit: int | None = None   # None: as many as asked
        self.others = 0.0               # the last measurement: CPUs' worth used by other programs
        self.busiest = 0.0              # the largest measurement so far
        self.asked = 0                  # evaluations that asked for more than one thread
        self.reduced = 0                # ... of which ran with fewer than asked
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            return self._clock(), self._read_busy(), self._read_own()
        except (OSError, ValueError):
            return None

    def update(self) -> None:
        """Measure and decide, when a window has passed since the last decision."""
        if self._start is None:
            self._start = self._sample()
            return
        t0, busy0, own0 = self._start
        now = self._clock()
        if now - t0 < self.window:
            return
        sample = self._sample()
        if sample is None:
            return
        t1, busy1, own1 = sample
        self.others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        self.busiest = max(self.busiest, self.others)
        free = int(self.n_cpus - self.others + 0.25)  # a quarter of a core busy costs a thread
        self.limit = None if free >= self.n_cpus else max(1, free)
        self._start = sample

    def threads(self, asked: int) -> int:
        """The thread count for an evaluation that asks for ``asked``."""
        self.update()
        if asked <= 1:
            return asked
        self.asked += 1
        if self.limit is not None and self.limit < asked:
            self.reduced += 1
            return self.limit
        return asked


def from_system(environ=os.environ, stat: str = STAT) -> Governor | None:
    """The governor of this process (None: disabled, or no /proc/stat)."""
    if not enabled_by_environment(environ):
        return None
    from .hardware import affinity_cpus

    cpus = affinity_cpus()

    def read_busy() -> float:
        with open(stat, encoding="ascii", errors="replace") as fh:
            return parse_busy(fh.read(), cpus)

    try:
        read_busy()
    except OSError:
        return None
    return Governor(len(cpus) if cpus else (os.cpu_count() or 1), read_busy)
