"""Run a command; write its wall time, peak RSS and exit status to a file descriptor.

Usage:  python -S tools/peak_rss.py FD COMMAND [ARG ...]

Why a separate small process: the peak RSS a parent reads from wait4 (``ru_maxrss``) is the larger
of the child's own peak and the high-water mark of the address space the child was started in, which
Linux carries across exec.  Python's subprocess and os.posix_spawn start children with vfork, so that
address space is the parent's own, with its lifetime peak: a benchmark script that once held 800 MiB
(writing a model file, say) would report every later child at 800 MiB or more.  Started from this
small interpreter instead (~8 MiB, ``-S``: no site imports), a child's figure is its own whenever it
exceeds that.

Written to FD, one line: ``<wall seconds> <peak RSS KiB> <exit code>`` (wall: from just before the
spawn to the reaping; exit code: negative for a signal, as subprocess reports it).  This process
exits with status 0 once the line is written, whatever the command's status.
"""

import os
import sys
import time


def main() -> int:
    fd, cmd = int(sys.argv[1]), sys.argv[2:]
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    os.write(fd, f"{wall:.6f} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}\n".encode())
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
