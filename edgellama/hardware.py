"""How many threads to compute with: the physical cores this process may use, only the big ones.

The kernels keep every thread busy on dense integer work: a second hardware thread of a core adds
next to nothing, a slow core makes every fast one wait at each barrier, and a thread more than the
CPUs the process may run on (its affinity mask, its cgroup's CPU quota) is a thread that waits.
So the default (``default_threads``) is:

* the logical CPUs this process may run on (``sched_getaffinity``), at most ceil(cgroup CPU quota);
* grouped into physical cores by Linux's topology (``core_cpus_list`` / ``thread_siblings_list``);
* on a heterogeneous CPU only the big cores: by ``cpu_capacity`` (the scheduler's own measure of a
  core's performance on arm64 big.LITTLE: a little core is a quarter to a third of a big one, a
  middle one three quarters or more) where a core under half of the largest is little; else by
  ``cpufreq/cpuinfo_max_freq``, where a core under 85% of the fastest is little (an efficiency core
  of an x86 hybrid clocks 70-80% of a performance core's maximum, while the favoured cores of a
  uniform CPU differ by under 10%);
* never more than the physical cores, nor than the CPUs usable, nor fewer than 1.

Elsewhere: macOS's performance-core count (``hw.perflevel0.physicalcpu``, else ``hw.physicalcpu``),
else ``os.cpu_count()``.  No Numba import: ``edgellama info`` and the CLI's checks use this too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
CAPACITY_LITTLE = 0.5    # cpu_capacity below this fraction of the largest: a little core
FREQUENCY_LITTLE = 0.85  # cpuinfo_max_freq below this fraction of the fastest: an efficiency core


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_cpu_list(text: str) -> set[int]:
    """Linux's CPU list format: '0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def affinity_cpus() -> set[int] | None:
    """The logical CPUs this process may run on (None where the OS does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP, membership: str | None = None) -> float | None:
    """This process's cgroup CPU quota in CPUs (quota / period; the smallest along the way), or None
    without one.  ``membership``: /proc/self/cgroup's text (read when None); ``root``: the cgroup mount."""
    if membership is None:
        membership = _read(Path("/proc/self/cgroup"))
        if membership is None:
            return None
    lines = membership.splitlines()
    limits = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.rstrip("/")
        if hierarchy == "0" and controllers == "":  # v2: every ancestor's cpu.max applies
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                text = _read(root.joinpath(*parts[:depth], "cpu.max"))
                if text:
                    quota, _, period = text.partition(" ")
                    if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                        limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):       # v1
            for base in dict.fromkeys((root / "cpu" / path.lstrip("/"), root / "cpu,cpuacct" / path.lstrip("/"),
                                       root / "cpu", root / "cpu,cpuacct")):
                quota, period = _int(base / "cpu.cfs_quota_us"), _int(base / "cpu.cfs_period_us")
                if quota is not None and period:
                    if quota > 0:
                        limits.append(quota / period)
                    break
    return min(limits) if limits else None


def usable_cpus() -> int:
    """Logical CPUs this process can keep busy: its affinity mask, within its cgroup's quota."""
    cpus = affinity_cpus()
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _core_of(cpu: int, sysfs: Path) -> tuple | None:
    """A key shared by the logical CPUs of one physical core."""
    topo = sysfs / f"cpu{cpu}" / "topology"
    for name in ("core_cpus_list", "thread_siblings_list"):
        text = _read(topo / name)
        if text:
            try:
                return ("siblings", frozenset(parse_cpu_list(text)))
            except ValueError:
                pass
    package, core = _int(topo / "physical_package_id"), _int(topo / "core_id")
    return ("core", package, core) if core is not None else None


def _speed(cpu: int, sysfs: Path) -> tuple[int | None, int | None]:
    """(cpu_capacity, cpuinfo_max_freq) of a logical CPU, each None where absent."""
    return (_int(sysfs / f"cpu{cpu}" / "cpu_capacity"),
            _int(sysfs / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq"))


def big_cores(cpus: set[int], sysfs: Path = SYSFS_CPU) -> dict[tuple, set[int]] | None:
    """The physical cores (key -> their logical CPUs among ``cpus``) that are not little ones; None
    without a topology to read."""
    cores: dict[tuple, set[int]] = {}
    for cpu in sorted(cpus):
        key = _core_of(cpu, sysfs)
        if key is None:
            return None
        cores.setdefault(key, set()).add(cpu)
    speeds = {key: [_speed(c, sysfs) for c in members] for key, members in cores.items()}
    for index, threshold in ((0, CAPACITY_LITTLE), (1, FREQUENCY_LITTLE)):
        values = {key: max((s[index] for s in v if s[index]), default=None) for key, v in speeds.items()}
        if all(v for v in values.values()):  # every core reports this measure
            top = max(values.values())
            return {key: members for key, members in cores.items() if values[key] >= threshold * top}
    return cores


def _macos_cores() -> int | None:
    for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
        try:
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return int(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def default_threads() -> int:
    """The thread count to use when none is asked for (see the module's docstring)."""
    usable = usable_cpus()
    if sys.platform.startswith("linux"):
        cpus = affinity_cpus() or set(range(os.cpu_count() or 1))
        cores = big_cores(cpus)
        if cores:
            return max(1, min(len(cores), usable))
        return usable
    if sys.platform == "darwin":
        n = _macos_cores()
        if n:
            return max(1, min(n, usable))
    return usable


physical_cores = default_threads  # the name model.py and the CLI have used


def thread_warning(threads: int) -> str | None:
    """What is wrong with ``threads`` when it is more than the CPUs this process can run on at once
    (to follow "-t N "); None otherwise."""
    usable = usable_cpus()
    if threads > usable:
        return (f"is more than the {usable} CPU{'s' if usable != 1 else ''} this process can use: the threads will "
                f"wait for each other (default: {default_threads()}, the physical cores)")
    return None
