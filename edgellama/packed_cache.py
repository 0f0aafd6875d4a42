"""The packed weights kept on disk: a model's later loads map them instead of packing again.

Loading packs every quantized matrix into the kernels' layout (edgellama.kernels.layout): about a
second for a 1B model and several for an 8B one on a slow core, at every start.  The first load of a
model file packs in memory as before and writes the packed copy to a cache file in a thread, while the
model runs; later loads map that file read-only (and read it ahead): no packing, and the
packed pages are file pages, which the system can drop and read back under memory pressure rather
than swap or kill.

**Where.**  ``$EDGELLAMA_PACKED_CACHE`` when set (``off``, ``0`` or an empty value turn the cache
off), else ``$XDG_CACHE_HOME/edgellama/packed`` (default ``~/.cache/edgellama/packed``); or
``Model(..., packed_cache=False | folder)``.  One file per model file and target layout, named after
the model's real path: loading a model that changed (size, times, inode, a hash of its header and of
pages sampled across it, tensor layout) or with other packing sources (the stamp of
``kernels.cache.LAYOUT_FILES``) writes it again, and each write removes the files
of models that are gone or changed.  Delete the folder at any time to reclaim the space.

**Safely.**  A copy is written only when it leaves ``MIN_FREE_BYTES`` of the disk free, by a thread
that writes the data to a temporary file, flushes it to disk, then writes the header that makes the
file valid and renames it into place; the interpreter waits for that thread at exit (seconds on an
SSD, minutes for GBs on an SD card).  A reader sees a whole file or none, even after a power cut; a
file whose header differs from what this load computes is ignored and replaced.  Wherever the cache
cannot be used (no folder, no room, a read-only or failing disk) the weights are packed in memory,
as without it: nothing fails because of the cache.

**Small things beside them** (``load_blob``/``keep_blob``, each followed by its SHA-256, at most
``MAX_TABLES`` per kind): the token each BPE merge of a vocabulary makes (``bpe-merges/``, keyed by a
hash of the vocabulary and merges), a model file's parsed GGUF header (``gguf-headers/``, see
``edgellama.gguf.GGUFFile``) and the tables a byte-level BPE tokenizer is built into from such a
header (``tokenizers/``, see ``edgellama.tokenizer.kept``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ENV = "EDGELLAMA_PACKED_CACHE"
MAGIC = b"EDGLPACK"
VERSION = 1
DATA_OFFSET = 1 << 16            # header room; the data starts page-aligned for any page size up to 64 KiB
SECTION_ALIGN = 1 << 12
MIN_FREE_BYTES = 1 << 30         # a copy is written only when this much of the disk stays free after it
STALE_TEMP_SECONDS = 24 * 3600   # a temporary file this old is a crashed writer's (where locks do not work)
# The file is written in windows of WRITE_CHUNK bytes at multiples of it (a multiple of 2 MiB), each
# one call whatever sections and gaps it spans: the page cache then holds the new file in 2 MiB
# folios where memory allows, which a later load maps with 2 MiB pages (fewer TLB misses in the
# kernels' streams).  Written a section at a time from its own (4 KiB-aligned) offset, copies had
# 8-96% of their bytes in such folios (a 1B shape's, an 8B's: 8% and 11%); written by windows, 99.8%
# (as read back from disk); decoding the 1B shape (Q4_0, Zen 4) from the second was about 6% faster
# (medians of 8 interleaved runs; anonymous memory in 2 MiB pages, +11%).
WRITE_CHUNK = 64 << 20
_IOV_MAX = 512  # buffers per pwritev call (POSIX guarantees 16; Linux takes 1024)
SAMPLES = 64
_HEADER = struct.Struct("<8sI")
# the names of the copies (PackedCache.path) and of their writers' temporary files (mkstemp's)
_COPY_NAME = re.compile(r"[0-9a-f]{32}\.packed")
_TEMP_NAME = re.compile(r"[0-9a-f]{32}\.[A-Za-z0-9_]+\.tmp")
_BLOB_NAME = re.compile(r"[0-9a-f]{64}\.bin")  # keep_blob's (names are SHA-256 digests)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def default_folder() -> Path | None:
    """The cache folder for this process: EDGELLAMA_PACKED_CACHE, else the user's cache folder;
    None when turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "no", "false") else Path(value).expanduser()
    return user_cache() / "edgellama" / "packed"


def user_cache() -> Path:
    """The user's cache folder: $XDG_CACHE_HOME where that is an absolute path (the XDG spec: a
    relative one is ignored, as it would move with the working directory), else ~/.cache (an
    empty or relative $HOME: the account's home folder)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):  # (HOME="" made "~" the root folder)
        try:
            import pwd

            return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache"
        except (ImportError, KeyError):
            pass
    return Path(os.path.expanduser("~")) / ".cache"


def resolve_folder(packed_cache) -> Path | None:
    """``Model(packed_cache=...)``: None = default_folder(), False = off, True = default, a path = that folder."""
    if packed_cache is None or packed_cache is True:
        return default_folder()
    if packed_cache is False:
        return None
    return Path(packed_cache).expanduser()


def _model_identity(path: str, st: os.stat_result | None = None) -> dict:
    """What names a model file's version: its real path, and the size, times and inode of ``st``
    (the file as opened; default: what is at the path now)."""
    real = os.path.realpath(path)
    st = os.stat(real) if st is None else st
    return {"model": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def _content_digest(read_at: Callable[[int, int], bytes], size: int) -> str:
    """A hash of the file's first MiB (its header) and of SAMPLES pages spread over the rest
    (``read_at(offset, n)``: the bytes of the model file as opened): a file rewritten in place
    within one tick of the file system's clock (same size, times and inode: a test, a quantizer run
    twice) still differs here, without reading GBs."""
    digest = hashlib.sha256(read_at(0, 1 << 20))
    for i in range(SAMPLES):
        digest.update(read_at((1 << 20) + max(size - (1 << 20), 0) * i // SAMPLES, 4096))
    return digest.hexdigest()


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, at = [], DATA_OFFSET
    for size in sizes:
        out.append(at)
        at += -(-size // SECTION_ALIGN) * SECTION_ALIGN
    return out + [at]  # the last entry: the file's size


def _read_header(path: Path) -> dict | None:
    """A cache file's header, or None for anything that is not a whole one."""
    try:  # (not through a symlink, not blocking on a FIFO: only a regular file is a cache file)
        with os.fdopen(os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            head = fh.read(DATA_OFFSET)
    except OSError:
        return None
    if len(head) < _HEADER.size:
        return None
    magic, length = _HEADER.unpack_from(head)
    if magic != MAGIC or length > DATA_OFFSET - _HEADER.size:
        return None
    try:
        header = json.loads(head[_HEADER.size:_HEADER.size + length])
    except (ValueError, RecursionError):  # (UnicodeDecodeError, JSONDecodeError; nesting beyond the stack)
        return None
    return header if isinstance(header, dict) else None


class PackedCache:
    """The cache file of one model file for this target's layout.

    ``layout``: what the packed bytes depend on besides the file (kernel sources, lanes, each
    matrix's name, type, shape and offset), any JSON-able value; ``sizes``: the bytes of each
    packed section."""

    def __init__(self, folder: Path, model_path: str, model_stat: os.stat_result,
                 read_at: Callable[[int, int], bytes], layout, sizes: Sequence[int]):
        """``model_stat``, ``read_at(offset, n)``: the fstat and the bytes of the model file whose
        weights are packed, as opened (the key describes that file, even when another one has
        since been renamed over its path)."""
        self.folder = Path(folder)
        identity = _model_identity(model_path, model_stat)
        digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()
        self.key = {"version": VERSION, **identity, "content": _content_digest(read_at, model_stat.st_size),
                    "layout": digest, "sizes": [int(s) for s in sizes]}
        name = f"{identity['model']}\0{json.dumps(layout.get('target'))}".encode("utf-8", "surrogateescape")
        name = hashlib.sha256(name).hexdigest()
        self.path = self.folder / f"{name[:32]}.packed"
        self.sizes = [int(s) for s in sizes]
        self.offsets = _offsets(self.sizes)

    # ----- reading --------------------------------------------------------------------------------

    def load(self) -> list[np.ndarray] | None:
        """The sections of a valid cache file, mapped read-only; None on a miss.  The file is read
        ahead into the page cache at once but enters this process's memory as the kernels first
        read it (a MAP_POPULATE'd copy would be resident before the first kernel loads, and loading
        a kernel briefly takes tens of MB: a higher peak)."""
        header = _read_header(self.path)
        if header != self.key:
            return None
        try:
            with os.fdopen(os.open(self.path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK), "rb") as fh:
                if os.fstat(fh.fileno()).st_size != self.offsets[-1]:
                    return None
                mapping = mmap.mmap(fh.fileno(), self.offsets[-1], flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        for advice in ("MADV_HUGEPAGE", "MADV_WILLNEED"):  # 2 MiB pages where the page cache has them
            if hasattr(mmap, advice):                      # (see WRITE_CHUNK); read ahead now, map as used
                try:
                    mapping.madvise(getattr(mmap, advice))
                except OSError:
                    pass
        return self._sections(mapping)

    def _sections(self, mapping) -> list[np.ndarray]:
        return [np.frombuffer(mapping, np.uint8, size, offset) for size, offset in zip(self.sizes, self.offsets)]

    # ----- writing --------------------------------------------------------------------------------

    def save(self, sections: Sequence[np.ndarray]) -> bool:
        """Start writing ``sections`` (packed in memory, read-only from now on) to the cache file,
        in a thread: the data, flushed to disk, then the header that makes the file valid, then its
        name (``wait_for_writes``; the interpreter waits for it at exit: seconds on an SSD, minutes
        for GBs on an SD card).  False, having started nothing, where the disk lacks the room."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.folder).free - self.offsets[-1] < MIN_FREE_BYTES:
                return False
            self._sweep()
            fd, temp = tempfile.mkstemp(dir=self.folder, prefix=self.path.stem + ".", suffix=".tmp")
        except OSError:
            return False
        _lock(fd)  # held until the writer closes it: a sweep removes only temp files nobody holds
        _OWN_TEMPS.add(os.path.abspath(temp))  # (where locks are per process, as NFS's: never this process's)
        finished = threading.Event()
        _WRITERS.append(finished)
        threading.Thread(target=self._write, args=(fd, temp, list(sections), finished),
                         name="edgellama-packed-cache", daemon=False).start()
        return True

    def _write(self, fd: int, temp: str, sections: list[np.ndarray], finished: threading.Event) -> None:
        done = False
        try:
            pieces = [(offset, memoryview(section).cast("B")) for section, offset in zip(sections, self.offsets)]
            for window in range(0, self.offsets[-1], WRITE_CHUNK):  # (the GIL is free during each write)
                if _ABANDON.is_set() or not _write_window(fd, window, min(window + WRITE_CHUNK, self.offsets[-1]),
                                                          pieces):
                    return
            os.ftruncate(fd, self.offsets[-1])
            os.fsync(fd)  # the data on disk before the header that makes the file valid
            header = json.dumps(self.key).encode()
            os.pwrite(fd, _HEADER.pack(MAGIC, len(header)) + header, 0)
            os.fsync(fd)
            os.replace(temp, self.path)
            done = True
            _fsync_folder(self.folder)
        except OSError:  # a full or failing disk: no cache file, nothing else changes
            pass
        finally:
            os.close(fd)
            if not done:
                _unlink(temp)
            _OWN_TEMPS.discard(os.path.abspath(temp))
            finished.set()

    def _sweep(self) -> None:
        """Remove the copies of model files that are gone or changed, and crashed writers' files:
        only files named as this module names them (the folder may be one a user also keeps other
        files in: ``$EDGELLAMA_PACKED_CACHE``)."""
        now = time.time()
        for entry in self.folder.iterdir():
            try:
                if _TEMP_NAME.fullmatch(entry.name):
                    # (a writer locks its file as it creates it; one caught between the two loses
                    # its file and writes its copy at a later load: nothing else)
                    if os.path.abspath(entry) in _OWN_TEMPS:
                        continue
                    if now - entry.lstat().st_mtime > STALE_TEMP_SECONDS or _abandoned(entry):
                        entry.unlink()
                    continue
                if not _COPY_NAME.fullmatch(entry.name) or entry == self.path:
                    continue
                header = _read_header(entry)
                if header is None or not _still_current(header):
                    entry.unlink()
            except OSError:
                continue


def _lock(fd: int) -> bool:
    """Take an exclusive lock on the open file (flock: released when it is closed, also when its
    process is killed); False where the file system takes no locks."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (ImportError, OSError):
        return False


def _abandoned(path: Path) -> bool:
    """A writer's temporary file that no process holds locked: its writer was killed (SIGKILL, the
    OOM killer, a closed terminal) or it is no writer's."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and _lock(fd)
    finally:
        os.close(fd)


def _write_window(fd: int, start: int, end: int, pieces: list[tuple[int, memoryview]]) -> bool:
    """Write the file's bytes [start, end): the parts of the sections (offset, bytes) that fall in
    it, zeros between them, in one call (a few where it spans more than _IOV_MAX buffers)."""
    buffers, at = [], start
    for offset, data in pieces:
        lo, hi = max(offset, start), min(offset + len(data), end)
        if lo >= hi:
            continue
        if lo > at:
            buffers.append(bytes(lo - at))
        buffers.append(data[lo - offset:hi - offset])
        at = hi
    if at < end:
        buffers.append(bytes(end - at))
    at = start
    for i in range(0, len(buffers), _IOV_MAX):
        group = buffers[i:i + _IOV_MAX]
        size = sum(len(b) for b in group)
        written = os.pwritev(fd, group, at) if hasattr(os, "pwritev") else os.pwrite(fd, b"".join(group), at)
        if written != size:
            return False
        at += size
    return True


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# each writer's end, waited for on an Event (not Thread.join: before Python 3.13 a join that Ctrl-C
# interrupts takes the thread for finished while it still runs)
_WRITERS: list[threading.Event] = []
_OWN_TEMPS: set[str] = set()  # this process's writers' temporary files
_ABANDON = threading.Event()


def wait_for_writes() -> None:
    """Wait until every cache file this process started writing is on disk and in place."""
    while _WRITERS:
        _WRITERS[0].wait()
        _WRITERS.pop(0)


def abandon_writes() -> None:
    """Stop the writers at their next chunk (WRITE_CHUNK) and remove their unfinished files, then
    return: Ctrl-C while a command waits for its copy to be written (the copy is made again at a
    later load).  Writes that finished stay."""
    _ABANDON.set()
    try:
        wait_for_writes()
    finally:
        _ABANDON.clear()  # (later copies of this process are written again)


def _still_current(header: dict) -> bool:
    try:
        identity = _model_identity(header["model"])
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return all(header.get(k) == v for k, v in identity.items())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def packed_sections(folder: Path | None, model_path: str, model_stat: os.stat_result,
                    read_at: Callable[[int, int], bytes], layout, sizes: Sequence[int],
                    fill: Callable[[list[np.ndarray]], None]) -> tuple[list[np.ndarray], str]:
    """The packed sections of a model, read-only: mapped from the cache (``"mapped"``), or packed
    in memory by ``fill`` (given zeroed, writable sections) and being written to the cache
    (``"saving"``) or not (``"memory"``: no folder, no room, nothing to pack).  ``model_stat``,
    ``read_at``: the model file as opened (PackedCache)."""
    cache = None
    if folder is not None and any(sizes) and hasattr(os, "pwrite") and hasattr(mmap, "PROT_READ"):  # (POSIX)
        try:
            cache = PackedCache(folder, model_path, model_stat, read_at, layout, sizes)
        except OSError:
            cache = None
        if cache is not None:
            sections = cache.load()
            if sections is not None:
                return sections, "mapped"
    sections = [np.zeros(size, np.uint8) for size in sizes]
    fill(sections)
    for s in sections:
        s.setflags(write=False)
    return sections, "saving" if cache is not None and cache.save(sections) else "memory"


# ----- small things derived from a model's metadata -------------------------------------------------
# (which token each BPE merge makes: ~0.4 s to work out for Llama 3's 280k merges, 2 MB to keep; a
# GGUF file's parsed header: ~0.5 s to parse for Llama 3's vocabulary, 0.1 s to read back)

MAX_TABLES = 64  # per kind; the oldest go first
_UNSET = object()
_SIDE_FOLDER: contextvars.ContextVar = contextvars.ContextVar("edgellama_side_folder", default=_UNSET)


@contextlib.contextmanager
def side_folder(folder: Path | None):
    """Within this block (this thread or task), the small things are kept in ``folder`` (None: not
    kept), as a load's ``packed_cache`` says, instead of default_folder()."""
    token = _SIDE_FOLDER.set(folder)
    try:
        yield
    finally:
        _SIDE_FOLDER.reset(token)


def owned_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of this user, reached directly or through a symlink of this
    user's (a user's own link to another disk); not through a link another user of a shared folder
    planted, which would steer what is written and pruned there into the folder it points to."""
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except OSError:
        return False
    uid = os.getuid() if hasattr(os, "getuid") else None
    if stat.S_ISLNK(link.st_mode) and uid is not None and link.st_uid != uid:
        return False
    return stat.S_ISDIR(st.st_mode) and (uid is None or st.st_uid == uid)


def _kind_folder(kind: str, create: bool = False) -> Path | None:
    """``<folder>/<kind>``: a folder of this user (owned_folder)."""
    folder = _SIDE_FOLDER.get()
    folder = default_folder() if folder is _UNSET else folder
    if folder is None:
        return None
    path = Path(folder) / kind
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if owned_folder(path) else None


def load_blob(kind: str, name: str) -> memoryview | None:
    """The bytes ``keep_blob`` kept as ``name`` (a view, not a copy), if they are whole (their own
    SHA-256 follows them); else None."""
    folder = _kind_folder(kind)
    if folder is None:
        return None
    try:
        with os.fdopen(os.open(folder / f"{name}.bin", os.O_RDONLY | _NOFOLLOW | _NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            data = fh.read()
    except OSError:
        return None
    body = memoryview(data)[:-32]
    if len(data) < 32 or hashlib.sha256(body).digest() != data[-32:]:
        return None
    return body


def keep_blob(kind: str, name: str, data: bytes) -> None:
    """Keep ``data`` for ``load_blob`` (written whole or not at all; errors are ignored); at most
    MAX_TABLES of a kind, the least recently written go first."""
    folder = _kind_folder(kind, create=True)
    if folder is None:
        return
    try:
        kept = sorted((p for p in folder.iterdir() if _BLOB_NAME.fullmatch(p.name)), key=lambda p: p.lstat().st_mtime)
        for old in kept[:max(0, len(kept) - MAX_TABLES + 1)]:
            old.unlink()
        fd, temp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.write(hashlib.sha256(data).digest())
            os.replace(temp, folder / f"{name}.bin")
        except BaseException:
            _unlink(temp)
            raise
    except OSError:
        pass


def load_table(kind: str, digest: str, dtype, count: int) -> np.ndarray | None:
    """The table ``keep_table`` kept under ``digest`` (a hash of everything it was computed from),
    if it is whole and has ``count`` items; else None."""
    dtype = np.dtype(dtype)
    data = load_blob(kind, digest)
    if data is None or len(data) != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count)


def keep_table(kind: str, digest: str, table: np.ndarray) -> None:
    """Keep ``table`` for ``load_table``."""
    keep_blob(kind, digest, np.ascontiguousarray(table).tobytes())
