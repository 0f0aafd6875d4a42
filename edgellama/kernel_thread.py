"""One thread of the process starts every parallel kernel: ``run(fn, *args, threads=N)``.

Numba's OpenMP threading layer (libgomp) gives each thread that starts parallel loops a team of
worker threads of its own.  Once two threads have started some (a model loaded in the main thread,
then generating in a server's worker thread, or in the threads of an app's pool), libgomp manages
more threads than there are cores and stops letting idle workers spin between loops: every loop
then waits for its workers to be woken.  A decode step runs a few hundred loops; measured on a
2-core Xeon (SmolLM2 Q8_0, 2 threads), decoding from a second thread ran at 29 tokens/s against 119
with every loop started from one thread, and ``edgellama serve`` streamed one request at 36
tokens/s (102 with this module).

So every evaluation (decode, prompt, batch step, packing at load, context shift) runs on one
kernel thread, started on first use (and again after a fork), whatever thread asks for it; the
caller waits.  Calls from the kernel thread itself run at once, so wrapped functions may call each
other.  It costs a hand-over per evaluation (tens of microseconds, against milliseconds of work),
and makes the evaluations of the process take turns, which on a CPU's few cores beats running them
at once.  The thread count a job asks for is the most it gets: while other programs keep cores
busy, edgellama.adaptive_threads gives it fewer (the results do not change).  Ctrl-C in the waiting
thread takes effect when the evaluation has finished, as it did when the evaluation ran in that
thread: nothing is left half-written.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

from . import adaptive_threads

_lock = threading.Lock()
_jobs: queue.SimpleQueue | None = None
_ident: int | None = None
_pid: int | None = None
_governor: adaptive_threads.Governor | None = adaptive_threads.from_system()  # measuring from the start
_asked: int | None = None  # the thread count the kernel thread's current job asked for


class _Job:
    __slots__ = ("fn", "args", "kwargs", "threads", "done", "finished", "result", "error")

    def __init__(self, fn, args, kwargs, threads):
        self.fn, self.args, self.kwargs, self.threads = fn, args, kwargs, threads
        self.done = threading.Lock()   # held until the job has run
        self.done.acquire()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import numba

        threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
        governor = _governor
        numba.set_num_threads(governor.threads(threads) if governor is not None else threads)


def adapt() -> None:
    """Between the parts of a long job (prompt chunks, the tokens of a short prompt): the thread
    count again, as at the start of a job, from what the other programs use now."""
    if _asked is not None and on_kernel_thread():
        _set_threads(_asked)


def governor() -> adaptive_threads.Governor | None:
    """This process's adaptive thread count (None: off)."""
    return _governor


def set_governor(governor: adaptive_threads.Governor | None) -> adaptive_threads.Governor | None:
    """Replace it (tests; apps that want fixed thread counts pass None); the previous one."""
    global _governor
    previous, _governor = _governor, governor
    return previous


def _serve(jobs: queue.SimpleQueue) -> None:
    global _asked
    while True:
        job = jobs.get()
        try:
            _asked = job.threads
            _set_threads(job.threads)
            job.result = job.fn(*job.args, **job.kwargs)
        except BaseException as e:  # noqa: B036  handed to the caller, which raises it
            job.error = e
        finally:
            _asked = None
            job.finished = True
            job.done.release()
        del job


def _queue() -> queue.SimpleQueue:
    """The kernel thread's queue, starting the thread (in this process) when needed."""
    global _jobs, _ident, _pid
    with _lock:
        if _jobs is None or _pid != os.getpid():
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=_serve, args=(jobs,), name="edgellama-kernels", daemon=True)
            thread.start()
            _jobs, _ident, _pid = jobs, thread.ident, os.getpid()
        return _jobs


def start() -> None:
    """Start the kernel thread now (it starts on first use otherwise), from the calling thread, at
    that thread's priority."""
    _queue()


def _forget_in_child() -> None:
    """After a fork: the child has no kernel thread (only the forking thread survives), and a lock
    held by another thread at the fork would stay held."""
    global _lock, _jobs, _ident, _pid, _governor, _asked
    _lock, _jobs, _ident, _pid, _asked = threading.Lock(), None, None, None, None
    if _governor is not None:  # the child's own CPU time starts again from zero
        _governor = adaptive_threads.from_system()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def on_kernel_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident and _pid == os.getpid()


def run(fn: Callable, /, *args, threads: int | None = None, **kwargs):
    """``fn(*args, **kwargs)`` on the kernel thread with Numba's thread count set to ``threads``
    (None: left as it is); its result, or its exception raised here."""
    if on_kernel_thread():  # a wrapped function calling another: at once, then the caller's thread count again
        if threads is None:
            return fn(*args, **kwargs)
        import numba

        global _asked
        before, asked = numba.get_num_threads(), _asked
        _asked = threads
        _set_threads(threads)
        try:
            return fn(*args, **kwargs)
        finally:
            _asked = asked
            numba.set_num_threads(before)
    job = _Job(fn, args, kwargs, threads)
    _queue().put(job)
    interrupted: BaseException | None = None
    while not job.finished:
        try:
            job.done.acquire()
        except BaseException as e:  # noqa: B036  Ctrl-C while waiting: raised once the evaluation has finished
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted
    if job.error is not None:
        error, job.error = job.error, None
        raise error
    return job.result
