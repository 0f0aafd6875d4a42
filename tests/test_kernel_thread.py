"""edgellama.kernel_thread: every evaluation runs on one thread of the process, whoever asks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

from edgellama import kernel_thread
from tiny_model import write_tiny_model


def test_every_caller_gets_the_same_thread_which_is_none_of_theirs():
    callers = {threading.get_ident()}
    seen = {kernel_thread.run(threading.get_ident)}
    with ThreadPoolExecutor(4) as pool:
        for ident, caller in pool.map(lambda _: (kernel_thread.run(threading.get_ident), threading.get_ident()),
                                      range(32)):
            seen.add(ident)
            callers.add(caller)
    assert len(seen) == 1 and not seen & callers


def test_results_exceptions_keywords_and_nested_calls():
    assert kernel_thread.run(divmod, 17, 5) == (3, 2)
    assert kernel_thread.run(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ZeroDivisionError):
        kernel_thread.run(divmod, 1, 0)
    # a wrapped function that calls another runs it at once (no waiting on itself)
    outer = kernel_thread.run(lambda: (threading.get_ident(), kernel_thread.run(threading.get_ident)))
    assert outer[0] == outer[1]
    assert kernel_thread.run(kernel_thread.on_kernel_thread) and not kernel_thread.on_kernel_thread()


def test_the_thread_count_is_the_callers():
    most = numba.config.NUMBA_NUM_THREADS
    governor = kernel_thread.set_governor(None)  # counts as asked, whatever else the machine runs
    try:
        _check_thread_counts(most)
    finally:
        kernel_thread.set_governor(governor)


def _check_thread_counts(most):
    assert kernel_thread.run(numba.get_num_threads, threads=1) == 1
    assert kernel_thread.run(numba.get_num_threads, threads=most + 5) == most
    assert kernel_thread.run(numba.get_num_threads) == most  # None leaves it as it is
    # a nested call with its own count gives the outer one's back
    counts = kernel_thread.run(lambda: (kernel_thread.run(numba.get_num_threads, threads=1), numba.get_num_threads()),
                               threads=most)
    assert counts == (1, most)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals go to the main thread")
def test_ctrl_c_while_waiting_takes_effect_once_the_evaluation_has_finished():
    """SIGINT sent while the caller waits (seen in its frame, not guessed from time): the call
    raises KeyboardInterrupt, after the evaluation ran to its end, whether the caller sees the signal
    while it waits or only when its wait ends (as when a terminal's Ctrl-C reaches another thread
    of the process)."""
    main = threading.main_thread().ident
    steps = []
    waiting_line = _acquire_line()

    def evaluation():
        while True:  # until the caller is blocked in its wait
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code is kernel_thread.run.__code__ and frame.f_lineno == waiting_line:
                break
        steps.append("signalled")
        signal.pthread_kill(main, signal.SIGINT)  # to the waiting thread itself
        # go on until the caller has seen the interrupt and waits again (or has left: wrong); the
        # wait is bounded, since the caller may only see it once this returns (which is right too)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main)
            if frame is None or frame.f_code is not kernel_thread.run.__code__:
                steps.append("the caller left")
                break
            if frame.f_lineno == waiting_line and frame.f_locals.get("interrupted") is not None:
                break
            time.sleep(0.001)
        steps.append("finished")
        return "result"

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            kernel_thread.run(evaluation)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["signalled", "finished"]
    assert kernel_thread.run(lambda: "next") == "next"  # the thread goes on serving


def _acquire_line() -> int:
    import inspect

    lines, first = inspect.getsourcelines(kernel_thread.run)
    found = [first + i for i, line in enumerate(lines) if "job.done.acquire()" in line]
    assert len(found) == 1
    return found[0]


def _in_forked_child(queue):
    queue.put(kernel_thread.run(lambda: ("ran", os.getpid())))


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_gets_its_own_kernel_thread():
    kernel_thread.run(int)  # the parent's thread exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_forked_child, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the child waited for a kernel thread that does not exist in it")
    assert child.exitcode == 0
    assert queue.get(timeout=10) == ("ran", child.pid)


def test_a_model_gives_the_same_logits_from_any_thread(tmp_path):
    """Evaluations from several threads at once take turns on the kernel thread: each gets the
    logits it gets alone (one model per thread: a model's cache is its own; the same thread count
    for all, so the only difference is the calling thread)."""
    import edgellama

    path = tmp_path / "tiny.gguf"
    write_tiny_model(path)
    ids = [1, 5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 12]
    alone = edgellama.load(str(path), n_ctx=64, threads=2).logits(ids)
    models = [edgellama.load(str(path), n_ctx=64, threads=2) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: m.logits(ids), models))
    for got in results:
        np.testing.assert_array_equal(got, alone)
