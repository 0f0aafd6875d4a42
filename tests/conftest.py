"""Shared fixtures: the real SmolLM2 model (fetched once through tools/fetch_models.py, which says
what is downloaded and kept) and the Q8_0 / Q4_0 files requantized from it by our quantizer
(byte-identical to llama.cpp's, which tests/test_golden.py checks), made in this session's
temporary directory and removed at its end."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))           # `tools` is importable from the tests
sys.path.insert(0, str(ROOT / "tests"))  # `reference`, `tiny_model`


def pytest_configure(config):
    """Fetch the real test assets once, before collection (test modules check for them at import).
    Point the packed-weights cache at a folder of this run.

    A test run started in the background of a non-interactive shell (`nohup ... &`, some CI
    runners) inherits SIGINT ignored, and so would every child it starts: the tests of Ctrl-C
    handling would wait for ever.  They test a program started from a terminal, so the run
    restores Python's usual handler (children then start with SIGINT at its default)."""
    import os
    import signal
    import tempfile

    # every model loaded by the tests, in this process or in the commands it starts, keeps its
    # packed weights in a folder of this run (a second load of a file maps them: both paths are
    # exercised), removed at the end, instead of in the user's cache
    global _PACKED_CACHE
    _PACKED_CACHE = tempfile.mkdtemp(prefix="edgellama-packed-")
    os.environ["EDGELLAMA_PACKED_CACHE"] = _PACKED_CACHE
    # the tests' models have many sets of tensor types: the kernels' int8 tiles are compiled for
    # every packed type once, not for each set (tests/test_formats.py checks that a model's own set
    # gives the same numbers)
    os.environ.setdefault("EDGELLAMA_KERNEL_FORMATS", "all")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from tools.fetch_models import llama3_tokenizer, smollm2_q4_1

    for fetch in (smollm2_q4_1, llama3_tokenizer):
        try:
            fetch()
        except Exception as e:  # offline: the tests that need the asset skip and say why
            print(f"warning: {fetch.__name__}() failed: {e}", file=sys.stderr)


_PACKED_CACHE = None


def pytest_collection_modifyitems(session, config, items):
    """The test files that call no model kernel run first (tests/warm_kernels.py's FIRST), while
    the kernel warm-up process compiles; the others keep their order."""
    from warm_kernels import order_key

    items.sort(key=lambda item: order_key(str(item.path)))


def pytest_collection_finish(session):
    """Once the run's tests are known, start the child processes of tests/test_targets.py (the
    kernels compiled for other CPUs), which then run beside the rest of the run, and the kernel
    warm-up process (tests/warm_kernels.py) where it helps: a run of the model tests on two or more
    cores, not in a child of test_targets.py."""
    import os

    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_children"):
            _CHILD_OWNERS.append(module)
            module.start_children(session.items)
            break
    from warm_kernels import USERS

    from edgellama.hardware import usable_cpus

    if usable_cpus() >= 2 and "NUMBA_CPU_NAME" not in os.environ \
            and any(item.path.name in USERS for item in session.items):
        import subprocess
        import tempfile

        log = tempfile.TemporaryFile("w+")
        # at the run's own priority, in its scheduling group: the tests it runs beside are mostly
        # single-threaded.  At nice 19 it would get only as much of the second core as the target
        # children's group (Linux splits a group's weight between the CPUs its tasks run on): cold
        # runs of fresh clones on a 2-core Xeon took 557 s with it at nice 19, 439 s without
        _WARM.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_kernels.py")], cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT, text=True), log))


_CHILD_OWNERS: list = []  # the test modules that started children (stopped at the end of the run)
_WARM: list = []          # (the kernel warm-up process, its output)


def pytest_unconfigure(config):
    for module in _CHILD_OWNERS:
        module.stop_children()
    for child, log in _WARM:
        if child.poll() is None:  # the run ended first (a few files): its work is not needed
            child.kill()
            child.wait()
        elif child.returncode != 0:
            log.seek(0)
            print(f"warning: tests/warm_kernels.py failed (exit {child.returncode}); the tests compiled "
                  f"what they needed themselves:\n{log.read()[-3000:]}", file=sys.stderr)
        log.close()
    _WARM.clear()
    if _PACKED_CACHE:
        from edgellama.packed_cache import wait_for_writes

        wait_for_writes()
        shutil.rmtree(_PACKED_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tools.fetch_models import smollm2_q4_1

    return smollm2_q4_1()


@pytest.fixture(scope="session")
def smollm2_files(smollm2_path, tmp_path_factory):
    """{"q4_1": shipped file, "q8_0": ..., "q4_0": ...} requantized by edgellama-quantize (about a
    second each) into a temporary directory that is removed after the session: 227 MiB that
    would otherwise stay behind (pytest keeps its last temporary directories)."""
    folder = tmp_path_factory.mktemp("smollm2")
    yield _SmolLM2Files(smollm2_path, folder)
    shutil.rmtree(folder, ignore_errors=True)


class _SmolLM2Files(dict):
    """The shipped Q4_1 file, and each requantized file made when first asked for (a run that
    needs only the Q4_1 file, such as the emulated arm64 stage, compiles no quantizer)."""

    def __init__(self, q4_1: Path, folder: Path):
        super().__init__(q4_1=q4_1)
        self.folder = folder

    def __missing__(self, qtype: str) -> Path:
        from tools.fetch_models import smollm2_requantized

        if qtype not in ("q8_0", "q4_0"):
            raise KeyError(qtype)
        self[qtype] = path = smollm2_requantized(qtype, self.folder)
        return path
