"""Numba's on-disk cache of the kernels package: a change in any of its files recompiles the kernels,
not only a change in the file that defines a kernel (Numba alone stamps each kernel with its own
file, so an edited helper in another module would load stale machine code)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# swiglu lives in kernels/ops.py and calls _expf from kernels/llvm.py
PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from edgellama import kernels as K
    from edgellama.kernel_cache import cache_status
    status = cache_status(["swiglu"])
    g, u = np.linspace(-3, 3, 64, dtype=np.float32), np.ones(64, np.float32)
    K.swiglu(g, u)
    stats = K.swiglu.stats
    print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                      "predicted_cold": status.cold if status else None, "out": float(g.sum())}))
""")


def _probe(tree: Path, home: Path | None = None) -> dict:
    home = home or tree
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tree, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editing_another_module_of_the_package_recompiles(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "edgellama", tree / "edgellama", ignore=shutil.ignore_patterns("__pycache__"))
    first = _probe(tree)
    assert first["misses"] == 1 and first["hits"] == 0 and first["predicted_cold"] == ["swiglu"]
    again = _probe(tree)
    assert again["hits"] == 1 and again["misses"] == 0 and again["predicted_cold"] == []
    assert again["out"] == first["out"]
    # a harmless edit in llvm.py (not ops.py, where swiglu is): the whole package's stamp changes
    llvm = tree / "edgellama" / "kernels" / "llvm.py"
    llvm.write_text(llvm.read_text() + "\n# edited\n")
    edited = _probe(tree)
    assert edited["predicted_cold"] == ["swiglu"]
    assert edited["misses"] == 1 and edited["hits"] == 0
    # and the type table the kernels are built from counts too
    quants = tree / "edgellama" / "quants.py"
    quants.write_text(quants.read_text() + "\n# edited\n")
    assert _probe(tree)["misses"] == 1


def test_another_copy_of_the_same_sources_finds_the_kernels(tmp_path):
    """A new clone, a reinstall or a second venv of the same edgellama loads what the first compiled
    (the cache folder is named after the sources' stamp, not their path); a copy whose sources differ
    does not, and its compilation leaves the first copy's kernels in place."""
    home = tmp_path / "home"
    first, second, edited = (tmp_path / name for name in ("clone1", "somewhere/else/clone2", "clone3"))
    for tree in (first, second, edited):
        shutil.copytree(ROOT / "edgellama", tree / "edgellama", ignore=shutil.ignore_patterns("__pycache__"))
    assert _probe(first, home)["misses"] == 1
    moved = _probe(second, home)
    assert moved["hits"] == 1 and moved["misses"] == 0 and moved["predicted_cold"] == []
    assert not (second / "edgellama" / "kernels" / "__pycache__").exists() or not any(
        (second / "edgellama" / "kernels" / "__pycache__").glob("*.nbi"))
    ops = edited / "edgellama" / "kernels" / "ops.py"
    ops.write_text(ops.read_text() + "\n# edited\n")
    assert _probe(edited, home)["misses"] == 1
    assert _probe(first, home)["hits"] == 1
    folders = sorted(p.name for p in (home / ".cache" / "edgellama" / "kernels").iterdir())
    assert len(folders) == 2, folders


QUANTIZER_PROBE = textwrap.dedent("""
    import json
    import numpy as np
    from quantize import blocks
    rows = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    out = np.empty((2, 34), np.uint8)
    blocks.quantize_rows_q8_0(rows, out)
    stats = blocks.quantize_rows_q8_0.stats
    print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                      "folder": blocks.quantize_rows_q8_0._cache._cache_path}))
""")


def test_the_quantizers_compiled_functions_are_found_by_another_copy_of_the_sources(tmp_path):
    """edgellama-quantize's Numba functions are cached like the kernels: a fresh clone of sources
    already run on the machine compiles nothing (Numba alone keeps them in each copy's __pycache__)."""
    home = tmp_path / "home"
    trees = [tmp_path / "clone1", tmp_path / "else" / "clone2"]
    for tree in trees:
        for package in ("edgellama", "quantize"):
            shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    runs = []
    for tree in trees:
        out = subprocess.run([sys.executable, "-c", QUANTIZER_PROBE], cwd=tree, capture_output=True, text=True,
                             timeout=600, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(home)})
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] == 1 and runs[1] == {**runs[0], "hits": 1, "misses": 0}
    assert Path(runs[0]["folder"]).parent == home / ".cache" / "edgellama" / "quantizer"
    assert not any((trees[1] / "quantize").glob("__pycache__/*.nbi"))


def _cached_probe(tmp_path, monkeypatch, fn, kind="probe", name="probe_module"):
    """``fn`` as module ``name``'s kernel, jitted with the package's cache (cache.install) for a
    sources file of its own, in a cache under tmp_path."""
    from numba import njit

    from edgellama.kernels import cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr("numba.core.config.CACHE_DIR", "")
    sources = tmp_path / "probe_source.py"
    sources.write_text("# the probe's stamp\n")
    module = types.ModuleType(name)
    module.probe = njit(cache=True)(fn)
    assert cache.install([module], (sources,), kind=kind) == 1
    return module.probe


def test_saving_a_compiled_kernel_holds_the_folders_lock(tmp_path, monkeypatch):
    """Numba adds an index entry by read-modify-write: two processes saving different signatures at
    once could share a data file.  Each save holds an exclusive flock on the folder's .lock, which
    another open file (another process, or another thread) cannot take meanwhile."""
    fcntl = pytest.importorskip("fcntl")
    from numba.core.caching import FunctionCache

    probe = _cached_probe(tmp_path, monkeypatch, lambda x: x + 1)
    folder = Path(probe._cache._cache_path)
    assert folder.parent == tmp_path / "xdg" / "edgellama" / "probe"
    seen = []
    original = FunctionCache.save_overload

    def save(self, sig, data):
        with open(folder / ".lock", "a+b") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                seen.append("held")
        return original(self, sig, data)

    monkeypatch.setattr(FunctionCache, "save_overload", save)
    assert probe(1) == 2 and probe(1.5) == 2.5
    assert seen == ["held", "held"]
    with open(folder / ".lock", "a+b") as other:  # released after each save
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert len(list(folder.glob("*.nbc"))) == 2


def test_an_index_that_cannot_be_read_is_compiled_again(tmp_path, monkeypatch):
    """A kernel's index that does not unpickle (damaged, or written by a copy of the sources imported
    under another name, whose argument types live in other modules) is a cache miss: the kernel
    compiles and a readable index replaces it, where Numba alone raised at every start."""
    def fresh():
        return _cached_probe(tmp_path, monkeypatch, lambda x: x * 3)

    probe = fresh()
    assert probe(2) == 6 and sum(probe.stats.cache_misses.values()) == 1
    index = Path(probe._cache._cache_file._index_path)
    import pickle
    with open(index, "rb") as fh:
        version = pickle.load(fh)  # Numba's version record, then the pickled entries
    index.write_bytes(pickle.dumps(version, protocol=-1) + b"\x80\x04\x95garbage, not a pickle")
    again = fresh()
    assert again(2) == 6
    assert sum(again.stats.cache_misses.values()) == 1 and sum(again.stats.cache_hits.values()) == 0
    third = fresh()  # the index written by that compilation reads back
    assert third(2) == 6 and sum(third.stats.cache_hits.values()) == 1


def test_a_copy_imported_under_another_name_has_its_own_cache_folder(tmp_path):
    """The kernels' folder is named after their sources and the package's import name: a copy
    vendored in an app under another name never meets an index whose argument types name
    ``edgellama``'s modules (which it could not unpickle), and leaves the original's in place."""
    home = tmp_path / "home"
    original, vendored = tmp_path / "original", tmp_path / "app"
    shutil.copytree(ROOT / "edgellama", original / "edgellama", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "edgellama", vendored / "vendored_llama", ignore=shutil.ignore_patterns("__pycache__"))
    (vendored / "edgellama").mkdir()  # the probe imports "edgellama": here it is the vendored copy
    (vendored / "edgellama" / "__init__.py").write_text(
        "import sys, vendored_llama, vendored_llama.kernels, vendored_llama.kernel_cache\n"
        "sys.modules[__name__] = vendored_llama\n")
    assert _probe(original, home)["misses"] == 1
    first = _probe(vendored, home)
    assert first["misses"] == 1 and first["predicted_cold"] == ["swiglu"]
    assert _probe(vendored, home)["hits"] == 1 and _probe(original, home)["hits"] == 1
    assert len(list((home / ".cache" / "edgellama" / "kernels").iterdir())) == 2


def _aged(path: Path, days: float, now: float) -> Path:
    import os

    os.utime(path, (now - days * 86400, now - days * 86400))
    return path


def test_folders_of_sources_unused_for_a_month_are_removed(tmp_path):
    """Every version of the sources compiles into a folder of its own (10-35 MB): those no process
    has used for UNUSED_DAYS go; the one in use, recent ones, and anything not a folder stay.  A
    folder from before the use markers counts from its own time."""
    import time

    from edgellama.kernels import cache

    now = time.time()
    kind = tmp_path / "kernels"
    folders = {name: kind / name for name in ("current", "old", "recent", "old_unmarked", "recent_unmarked")}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        (folder / "k.nbi").write_bytes(b"index")
        if "unmarked" not in name:
            (folder / cache.USED_MARKER).touch()
    _aged(folders["current"] / cache.USED_MARKER, 400, now)
    _aged(folders["old"] / cache.USED_MARKER, cache.UNUSED_DAYS + 1, now)
    _aged(folders["old"], 1, now)  # (a folder's own time moves with its files: the marker decides)
    _aged(folders["recent"] / cache.USED_MARKER, cache.UNUSED_DAYS - 1, now)
    _aged(folders["old_unmarked"], cache.UNUSED_DAYS + 1, now)
    _aged(folders["recent_unmarked"], 2, now)
    (kind / "a-file").write_text("not a folder")
    _aged(kind / "a-file", 400, now)
    (tmp_path / "elsewhere").mkdir()
    (kind / "a-link").symlink_to(tmp_path / "elsewhere")
    removed = cache.prune_unused(kind, folders["current"], now)
    assert sorted(p.name for p in removed) == ["old", "old_unmarked"]
    assert sorted(p.name for p in kind.iterdir()) == ["a-file", "a-link", "current", "recent", "recent_unmarked"]
    assert (tmp_path / "elsewhere").is_dir()


def test_a_folder_in_use_is_marked_and_old_ones_are_looked_at_once_a_day(tmp_path, monkeypatch):
    import os
    import time

    from edgellama.kernels import cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr("numba.core.config.CACHE_DIR", "")
    kind = tmp_path / "xdg" / "edgellama" / "probe-prune"
    now = time.time()
    stale = kind / "0123456789abcdef0123-numba0.0"
    stale.mkdir(parents=True)
    _aged(stale, cache.UNUSED_DAYS + 5, now)
    folder = cache.package_folder("probe-prune", os.urandom(16).hex())
    assert folder is not None and folder.parent == kind
    assert not stale.exists() and (folder / cache.USED_MARKER).exists() and (folder / cache.PRUNED_MARKER).exists()
    assert sorted(p.name for p in kind.iterdir()) == [folder.name]  # (the markers are inside it)
    stale.mkdir()
    _aged(stale, cache.UNUSED_DAYS + 5, now)
    (folder / cache.PRUNED_MARKER).touch()
    _aged(folder, 0, now)
    cache.package_folder.cache_clear()  # a later process with the same sources, the same day
    assert cache.package_folder("probe-prune", folder.name.split("-")[0]) == folder
    assert stale.exists()
    _aged(folder / cache.PRUNED_MARKER, 2, now)
    cache.package_folder.cache_clear()  # and one two days later
    assert cache.package_folder("probe-prune", folder.name.split("-")[0]) == folder
    assert not stale.exists() and folder.exists()


def test_a_kernel_whose_cache_cannot_be_written_still_runs(tmp_path, monkeypatch):
    """A save that fails (a full disk) leaves the call's result alone; a folder removed under a
    running process (pruned by another version's) is made again at its next save."""
    import errno
    import shutil as sh

    from numba.core.caching import FunctionCache

    probe = _cached_probe(tmp_path, monkeypatch, lambda x: x * 5, kind="probe-save")
    folder = Path(probe._cache._cache_path)
    assert probe(2) == 10 and len(list(folder.glob("*.nbc"))) == 1
    sh.rmtree(folder)
    assert probe(2.5) == 12.5  # a new signature: compiled, and saved into the folder made again
    assert len(list(folder.glob("*.nbc"))) == 1 and list(folder.glob("*.nbi"))

    def full(self, sig, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FunctionCache, "save_overload", full)
    assert probe(3 + 1j) == 15 + 5j


def test_a_function_numba_cannot_cache_still_runs(tmp_path, monkeypatch):
    """A function whose machine code holds a run-time address (numba.get_num_threads() inside it)
    cannot be cached: Numba warns and keeps it in memory.  The package's cache locator once lacked
    the attribute that warning names (AttributeError: '_py_file'), so such a function failed at
    its first call instead; the decode step's fused launch reads the thread count with its own
    intrinsic for that reason, and any future kernel must still run."""
    import warnings

    import numba

    probe = _cached_probe(tmp_path, monkeypatch, lambda x: x + numba.get_num_threads() * 0, kind="probe-uncachable",
                   name="probe_uncachable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe(7) == 7
    assert any("Cannot cache" in str(w.message) for w in caught), [str(w.message) for w in caught]
    folder = Path(probe._cache._cache_path)
    assert not list(folder.glob("*.nbc"))


def test_kernel_folders_of_another_user_or_through_links_are_not_used(tmp_path, monkeypatch):
    """A fifth review: with a shared NUMBA_CACHE_DIR (a /tmp), another user could make the kernel
    folder first, its .used marker a symlink to any path of ours (touch followed it: as root, an
    /etc/nologin), and its pickled kernels ours to load.  Markers and the lock never follow links;
    a folder not of this user is not used (a warning; the kernels compile in the process)."""
    import os
    import warnings

    from edgellama.kernels import cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr("numba.core.config.CACHE_DIR", "")
    folder = tmp_path / "k"
    folder.mkdir()
    target = tmp_path / "victim" / "nologin"
    target.parent.mkdir()
    os.symlink(target, folder / cache.USED_MARKER)
    assert not cache._touch_daily(folder / cache.USED_MARKER) and not target.exists()
    os.symlink(target, folder / ".lock")
    with cache._exclusive(str(folder)):  # (no lock where the lock file is a link: no file made through it)
        pass
    assert not target.exists()
    # our own link (a cache moved to another disk), and a folder of ours that anyone may write
    # (made group-writable at most)
    os.symlink(folder, tmp_path / "link")
    assert cache._own_folder(tmp_path / "link")
    os.chmod(folder, 0o777)
    assert cache._own_folder(folder) and folder.stat().st_mode & 0o777 == 0o775
    if os.getuid() != 0:
        return  # (making a folder or a link another user's needs root)
    os.symlink(folder, tmp_path / "planted")
    os.lchown(tmp_path / "planted", 65534, 65534)  # a link another user planted, to a folder of ours
    assert not cache._own_folder(tmp_path / "planted")
    stamp = os.urandom(16).hex()
    theirs = tmp_path / "xdg" / "edgellama" / "probe-owner" / f"{stamp[:20]}-numba{__import__('numba').__version__}"
    theirs.mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.package_folder("probe-owner", stamp) is None
    assert any("is not a folder of this user" in str(w.message) for w in caught)
    assert not (theirs / cache.USED_MARKER).exists()
