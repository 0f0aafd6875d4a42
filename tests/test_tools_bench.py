"""tools/bench_vs_llamacpp.py's child measurement (tools/peak_rss.py): a child's peak RSS is its own,
not this process's peak, and a failing child is an error.  No timing assertions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tools.bench_vs_llamacpp import _run_timed

MIB = 1 << 20


def _own_peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the vfork inheritance are Linux's")
def test_a_small_child_is_not_measured_at_this_process_peak():
    """This process first peaks 400 MiB above its start; a child that holds a few MiB must still be
    reported far below that (wait4 in this process would report at least this process's peak: the
    figures of llama-bench on SmolLM2 read 457-820 MiB instead of ~130 after the script had written
    a model file)."""
    held = np.ones(400 * MIB // 8)  # written: resident
    del held
    assert _own_peak_mib() > 400
    out, wall, peak = _run_timed([sys.executable, "-S", "-c", "print('small')"], timeout=300)
    assert out == "small\n"
    assert 0 < peak < 100, peak
    assert wall > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_a_child_holding_memory_is_measured_with_it():
    _, _, peak = _run_timed([sys.executable, "-S", "-c", "b = b'x' * (200 << 20); print(len(b))"], timeout=300)
    assert 200 <= peak < 300, peak


def test_a_failing_child_is_an_error_with_its_message():
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\):\n.*went wrong"):
        _run_timed([sys.executable, "-S", "-c", "import sys; sys.stderr.write('it went wrong'); sys.exit(3)"],
                   timeout=300)


def test_a_command_that_cannot_start_is_an_error():
    with pytest.raises(RuntimeError, match="failed"):
        _run_timed(["/nonexistent/llama-bench"], timeout=300)
