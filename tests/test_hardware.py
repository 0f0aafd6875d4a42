"""The default thread count (edgellama/hardware.py): physical cores, only the big ones, within the
CPUs this process may use; and the CLI's warning for -t beyond them.  Topologies are fake sysfs
trees written here, so every case runs on every machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgellama import hardware
from edgellama.hardware import big_cores, cgroup_cpu_limit, parse_cpu_list

ROOT = Path(__file__).resolve().parent.parent


def fake_sysfs(tmp_path: Path, cores: list[list[int]], capacity: dict[int, int] | None = None,
               max_freq: dict[int, int] | None = None, topology: bool = True) -> Path:
    """/sys/devices/system/cpu with one entry per logical CPU; ``cores``: the logical CPUs of each
    physical core."""
    root = tmp_path / "cpu"
    for members in cores:
        for cpu in members:
            d = root / f"cpu{cpu}"
            (d / "topology").mkdir(parents=True)
            if topology:
                (d / "topology" / "core_cpus_list").write_text(",".join(map(str, members)) + "\n")
            if capacity:
                (d / "cpu_capacity").write_text(f"{capacity[cpu]}\n")
            if max_freq:
                (d / "cpufreq").mkdir()
                (d / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freq[cpu]}\n")
    return root


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}


def test_smt_siblings_count_once(tmp_path):
    sysfs = fake_sysfs(tmp_path, [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert len(big_cores(set(range(8)), sysfs)) == 4
    assert len(big_cores({0, 4, 1}, sysfs)) == 2  # the affinity mask decides which count


def test_raspberry_pi_4_and_5_four_equal_cores(tmp_path):
    sysfs = fake_sysfs(tmp_path, [[0], [1], [2], [3]], capacity=dict.fromkeys(range(4), 1024),
                       max_freq=dict.fromkeys(range(4), 2400000))
    assert len(big_cores(set(range(4)), sysfs)) == 4


def test_big_little_by_cpu_capacity(tmp_path):
    # 1 prime + 3 big + 4 little (a phone SoC): the little cores are left out, the middle ones kept
    capacity = {0: 1024, 1: 870, 2: 870, 3: 870, 4: 260, 5: 260, 6: 260, 7: 260}
    sysfs = fake_sysfs(tmp_path, [[c] for c in range(8)], capacity=capacity)
    assert sorted(min(m) for m in big_cores(set(range(8)), sysfs).values()) == [0, 1, 2, 3]


def test_hybrid_x86_by_max_frequency(tmp_path):
    # 2 performance cores with SMT at 5.0 GHz, 4 efficiency cores at 3.8 GHz
    freq = {0: 5000000, 1: 5000000, 2: 4900000, 3: 4900000, 4: 3800000, 5: 3800000, 6: 3800000, 7: 3800000}
    sysfs = fake_sysfs(tmp_path, [[0, 1], [2, 3], [4], [5], [6], [7]], max_freq=freq)
    assert len(big_cores(set(range(8)), sysfs)) == 2


def test_favoured_cores_of_a_uniform_cpu_all_count(tmp_path):
    freq = {0: 4800000, 1: 4800000, 2: 4600000, 3: 4600000}
    sysfs = fake_sysfs(tmp_path, [[0], [1], [2], [3]], max_freq=freq)
    assert len(big_cores(set(range(4)), sysfs)) == 4


def test_no_topology_is_no_answer(tmp_path):
    sysfs = fake_sysfs(tmp_path, [[0], [1]], topology=False)
    assert big_cores({0, 1}, sysfs) is None


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/job\n") == 1.5
    (tmp_path / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/job\n") is None


def test_cgroup_v1_quota(tmp_path):
    d = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("200000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/docker/abc\n") == 2.0
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/docker/abc\n") is None


def test_a_quota_caps_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(hardware, "affinity_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 1.5)
    assert hardware.usable_cpus() == 2   # a fraction of a CPU still runs a thread
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 0.2)
    assert hardware.usable_cpus() == 1


def test_the_default_is_within_what_this_process_can_use():
    n = hardware.default_threads()
    assert 1 <= n <= hardware.usable_cpus()
    affinity = hardware.affinity_cpus()
    if affinity:
        assert n <= len(affinity)
    from edgellama.model import physical_cores  # what Model uses when no thread count is given

    assert physical_cores() == n


def test_the_warning_is_for_more_threads_than_cpus():
    usable = hardware.usable_cpus()
    assert hardware.thread_warning(usable) is None
    assert hardware.thread_warning(1) is None
    assert f"more than the {usable} CPU" in hardware.thread_warning(usable + 1)


def test_run_warns_about_too_many_threads(tmp_path):
    from tiny_model import write_tiny_model

    tiny = write_tiny_model(tmp_path / "tiny.gguf", ctx=64)
    too_many = hardware.usable_cpus() + 3
    r = subprocess.run([sys.executable, "-m", "edgellama.cli", "run", "-m", str(tiny), "-p", "the", "-n", "1",
                        "-t", str(too_many)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warnings == [f"edgellama run: warning: -t {too_many} is more than the {hardware.usable_cpus()} "
                        f"CPU{'s' if hardware.usable_cpus() != 1 else ''} this process can use: the threads will "
                        f"wait for each other (default: {hardware.default_threads()}, the physical cores)"], r.stderr
