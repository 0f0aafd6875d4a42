"""Numba's on-disk cache for the kernels package.

**One stamp for the whole package.**  Numba keys a cached kernel on its own bytecode and stamps the
cache index with its source file's time and size: a change in another file (a helper, an intrinsic,
a layout constant in edgellama/quants.py) would go unnoticed and the old machine code would load.
Every kernel's index here is stamped instead with a hash of every file the kernels are made of
(``PACKAGE_FILES``), so that changing any of them recompiles every kernel once.

**One folder for every copy of the same sources.**  Numba caches a kernel next to its source file
(``__pycache__``) or, with NUMBA_CACHE_DIR, in a folder named after the source file's full path: a
new clone, a reinstall or a second virtual environment of the same edgellama compiles everything
again (minutes on a Raspberry Pi).  These kernels are cached instead in a folder named after the
stamp and the Numba version, ``<cache>/kernels/<stamp>-numba<version>``, where ``<cache>`` is
``$NUMBA_CACHE_DIR/edgellama`` when that is set, else ``$XDG_CACHE_HOME/edgellama`` (default
``~/.cache/edgellama``): any copy of the same sources imported under the same name finds them,
and a different one can never load them.  An index that cannot be read (damaged) counts as a miss:
the kernel is compiled again and the index written anew.  Where that folder cannot be written, Numba's own locations are used.

**Loading without the compiler's registries.**  Before loading a cached function Numba refreshes its
target context, which imports every lowering implementation it has (numpy, typed containers,
random, ...): about 40 MB of Python objects that only compiling needs.  Rebuilding a cached function
needs the NRT runtime alone, so these caches initialize just that (a cache miss compiles through
Numba's usual path, which refreshes by itself), and hand LLVM's code pages back once a kernel is
linked (edgellama.memory).  Where Numba's internals differ from the ones this was written for, or
with EDGELLAMA_NUMBA_FULL_REFRESH set, loading takes Numba's default path; the stamp applies either way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from ..memory import release_compiler_pages

_HERE = Path(__file__).resolve().parent
PACKAGE_FILES = tuple(sorted(_HERE.glob("*.py"))) + (_HERE.parent / "quants.py",)
# what the packed weights' bytes are made by (pack_rows, the helpers and constants it uses): their
# stamp is part of the key of the packed copies (edgellama.packed_cache), so that a change elsewhere
# in the kernels (a product, the attention, the thread launch) keeps those copies (GBs to write)
LAYOUT_FILES = tuple(_HERE / name for name in ("layout.py", "common.py", "llvm.py", "target.py")) \
    + (_HERE.parent / "quants.py",)


# called with a kernel's Python function once its compiled code is in the cache (kernel_cache's
# compile child reports a kernel then, not when its compilation ends: Numba saves after that)
SAVED_HOOKS: list = []


def _keep_reload_hooks(loaded) -> None:
    """Give a kernel loaded from the cache its library's reload hooks back.  Numba runs a cached
    kernel's hooks when loading it (parallel_rows's: registering ``numba_parallel_for`` with LLVM) but
    leaves its library's set empty, and a kernel compiled later that links that library inherits the
    set: the decode step compiled after its pieces came from a compile child's cache entries was
    saved without the hook, and a later process that loaded it alone crashed at its first parallel
    launch (an unresolved symbol)."""
    library = getattr(loaded, "library", None)
    hooks = getattr(loaded, "reload_init", None)
    if library is not None and hooks and hasattr(library, "_reload_init"):
        library._reload_init.update(hooks)


@functools.lru_cache(maxsize=None)
def package_stamp(files: tuple[Path, ...] = PACKAGE_FILES) -> str:
    """A hash of these sources: by default every kernel module's (and the type table's they are
    built from)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_root() -> Path:
    """The folder holding the kernel caches of every edgellama version (see the module docstring)."""
    from numba.core import config

    if config.CACHE_DIR:
        return Path(config.CACHE_DIR) / "edgellama"
    from ..packed_cache import user_cache

    return user_cache() / "edgellama"


@functools.lru_cache(maxsize=None)
def package_folder(kind: str = "kernels", stamp: str | None = None) -> Path | None:
    """The cache folder of one set of sources (by default the kernels'), created and marked as used;
    None where it cannot be created or written.  Folders of other sources unused for
    UNUSED_DAYS go (prune_unused)."""
    import numba

    folder = cache_root() / kind / f"{(stamp or package_stamp())[:20]}-numba{numba.__version__}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return None
    for mine in (folder, folder.parent, folder.parent.parent):  # (<stamp>, <kind>, edgellama)
        if not _own_folder(mine):
            import warnings

            warnings.warn(f"{mine} is not a folder of this user (another user's, or reached through another "
                          "user's symlink): its kernels are not used (they compile in this process; set "
                          "NUMBA_CACHE_DIR to a folder of your own)")
            return None
    _touch_daily(folder / USED_MARKER)
    if _touch_daily(folder / PRUNED_MARKER):
        prune_unused(folder.parent, folder)
    return folder


# Every version of the sources (every upgrade, every Numba version) compiles into a folder of its
# own, 10-35 MB each: the folders of versions no process has used for UNUSED_DAYS are removed, by a
# process of another version, at most once a day.  A process still running an old version recreates
# its folder when it next saves a kernel, and compiles what it had not loaded yet: nothing fails.
UNUSED_DAYS = 30
USED_MARKER = ".used"        # in a sources' folder: touched (at most once a day) by each process using it
PRUNED_MARKER = ".pruned"    # in the folder in use: when its process last looked at the others
_DAY = 86400.0


def _own_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder of this user, directly or through a symlink of this user's (a
    cache moved to another disk): the kernels Numba loads from a cache folder are pickled machine
    code, and a folder (or link) another user made in a shared NUMBA_CACHE_DIR (a /tmp) would run
    their code in our process and steer our marker files and pruning anywhere we may write.  One
    of ours that anyone may write (a umask of 0) is made writable by its owner's group at most."""
    from ..packed_cache import owned_folder

    if not owned_folder(folder):
        return False
    st = os.stat(folder)
    if st.st_mode & 0o002:
        try:
            os.chmod(folder, stat.S_IMODE(st.st_mode) & ~0o002)
        except OSError:
            return False
    return True


def _open_marker(path: Path, flags: int) -> int:
    """An fd of a marker or lock file in a kernel folder, never through a symlink."""
    return os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)


def _touch_daily(marker: Path, now: float | None = None) -> bool:
    """Set marker's time to now unless that was done within the last day; whether it was."""
    now = time.time() if now is None else now
    try:
        if now - os.lstat(marker).st_mtime < _DAY:
            return False
    except OSError:
        pass
    try:
        fd = _open_marker(marker, os.O_WRONLY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            os.utime(fd, (now, now)) if os.utime in os.supports_fd else os.utime(marker, (now, now))
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def prune_unused(kind_folder: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the folders in ``kind_folder`` (other than ``keep``) whose USED_MARKER (or, before
    markers, the folder itself) is older than UNUSED_DAYS; the removed ones."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(kind_folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry == keep or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            used = entry / USED_MARKER
            last = used.stat().st_mtime if used.exists() else entry.stat().st_mtime
        except OSError:
            continue
        if now - last > UNUSED_DAYS * _DAY:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def _exclusive(folder: str):
    """Hold an exclusive lock on ``folder/.lock`` (where the OS has flock): Numba adds an entry to a
    kernel's cache index by reading the index, choosing the first unused data file name and writing
    both back, so two processes compiling different signatures of a kernel at once (two commands
    started together on a cold cache, a parallel test run) could give both entries one data file,
    and one signature the other's machine code.  Saves are rare (a cache miss each); loads need no
    lock, as the index and the data are each replaced atomically."""
    try:
        import fcntl
    except ImportError:  # Windows: Numba's own behaviour
        yield
        return
    try:
        handle = os.fdopen(_open_marker(Path(folder) / ".lock", os.O_RDWR), "r+b")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _package_locator_class(kind: str, stamp: str):
    from numba.core import caching

    class PackageLocator(caching._CacheLocator):
        """Numba's cache locator for one set of sources: their folder, their stamp."""

        def __init__(self, py_func, folder: Path):
            self._lineno = py_func.__code__.co_firstlineno
            self._py_file = py_func.__code__.co_filename  # named by Numba's warning about an uncachable function
            self._folder = str(folder)

        def ensure_cache_path(self):  # made and checked once per process by package_folder
            os.makedirs(self._folder, exist_ok=True)

        def get_cache_path(self):
            return self._folder

        def get_source_stamp(self):
            return stamp

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            folder = package_folder(kind, stamp)
            return None if folder is None else cls(py_func, folder)

    return PackageLocator


def install(modules, files: tuple[Path, ...] = PACKAGE_FILES, kind: str = "kernels") -> int:
    """Give every Numba dispatcher of these modules the cache stamped with these source files (by
    default the kernels'), in ``<cache>/<kind>/<stamp>-numba<version>``, lean and locked while
    saving; returns how many."""
    from numba.core.caching import FunctionCache
    from numba.core.registry import CPUDispatcher

    # the sources and the name they are imported under: a cached kernel's index names its argument
    # types by module (edgellama.kernels.decode.DecodeWeights), so a copy imported under another
    # name (vendored in an app) could not read the original's index, nor the original a copy's
    names = sorted({module.__name__.rpartition(".")[0] for module in modules})
    stamp = hashlib.sha256("\0".join([package_stamp(tuple(files)), *names]).encode()).hexdigest()
    lean = (not os.environ.get("EDGELLAMA_NUMBA_FULL_REFRESH")
            and all(hasattr(FunctionCache, a) for a in ("_load_overload", "_guard_against_spurious_io_errors")))

    locator = _package_locator_class(kind, stamp)

    class PackageImpl(FunctionCache._impl_class):
        _locator_classes = [locator, *FunctionCache._impl_class._locator_classes]

    class PackageCache(FunctionCache):
        _impl_class = PackageImpl

        def __init__(self, py_func):
            super().__init__(py_func)
            self._cache_file._source_stamp = stamp  # the index is valid for these sources only

        def save_overload(self, sig, data):  # after a compilation (a cache miss)
            # the compiled code is in memory whatever happens here: a cache that cannot be written
            # (a full disk, a folder pruned under a long-running process and made again) costs a
            # compilation at the next start, never this call
            try:
                os.makedirs(self._cache_path, exist_ok=True)
                with _exclusive(self._cache_path):
                    FunctionCache.save_overload(self, sig, data)
                saved = True
            except OSError:
                saved = False
            release_compiler_pages()  # a compilation ended either way
            if saved:
                for hook in SAVED_HOOKS:
                    hook(self._py_func)

        def load_overload(self, sig, target_context):
            try:
                return self._load(sig, target_context)
            except Exception:  # noqa: BLE001  an index or data file that cannot be read is a miss
                self._discard_index()
                return None

        def _discard_index(self):
            """Remove this kernel's index (another process's save replaces it whole, so what could
            not be read is damaged, or was written by other code): the compilation that follows
            saves a new one, instead of failing to read this one again."""
            with _exclusive(self._cache_path):
                with contextlib.suppress(OSError):
                    os.unlink(self._cache_file._index_path)

        def _load(self, sig, target_context):
            if lean:
                from numba.core.runtime import rtsys

                rtsys.initialize(target_context)
                with self._guard_against_spurious_io_errors():
                    loaded = self._load_overload(sig, target_context)
                release_compiler_pages()  # linked: LLVM's code is not needed until the next one
            else:
                loaded = FunctionCache.load_overload(self, sig, target_context)
            _keep_reload_hooks(loaded)
            return loaded

    count = 0
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, CPUDispatcher) and type(getattr(value, "_cache", None)) is FunctionCache:
                value._cache = PackageCache(value.py_func)
                count += 1
    return count
