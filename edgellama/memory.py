"""Give memory the runtime no longer needs back to the operating system.

Two kinds of pages stay resident in a Python + Numba process for no use after start-up:

* **The compiler's code.**  LLVM (llvmlite's shared library, ~180 MB on disk) runs only to link
  compiled kernels: importing Numba runs its static initializers and loading the first cached
  kernel sets up its JIT, which together touch 50-70 MB of the library's code and read-only data.
  Those pages are clean copies of the file: ``release_compiler_pages`` unmaps them from this
  process (``madvise(MADV_DONTNEED)``) and the page cache keeps them, so a later compilation only
  takes minor faults to map them again.  Only mappings that were never written (no anonymous
  pages, not writable) are touched: nothing the process changed is dropped.
* **Freed heap.**  Building a tokenizer makes hundreds of thousands of short-lived Python objects;
  glibc keeps the freed pages among the live ones.  ``trim_heap`` returns them (``malloc_trim``).

And one kind is kept from becoming resident early: **caches written a little at a time**
(``lazy_zeros``: the KV caches).  NumPy asks the kernel for transparent huge pages on every large
array (``madvise(MADV_HUGEPAGE)``), so the first write into each 2 MB of a cache zeroes all of it
(and, with the kernel's default ``defrag=madvise``, may first compact memory to find the 2 MB): a
first token, which writes one row into every layer's and head's region, made the whole KV cache
resident and took 0.1-0.25 s of system time at a 1B model's 4096-token context (measured on a
2-core Xeon; about 0.01 s when it did not compact).  ``lazy_zeros`` maps its own zero pages, 4 KB
each.

Where the platform lacks what they use (no ``/proc``, no glibc, no ``mmap`` flags), the first two do
nothing and ``lazy_zeros`` is ``np.zeros``.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

__all__ = ["lazy_zeros", "release_compiler_pages", "trim_heap"]

_MADV_DONTNEED = 4  # Linux, every architecture
_COMPILER_LIBRARIES = ("libllvmlite",)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _clean_mappings(names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of the read-only, never-written mappings of files whose name contains one of
    ``names``, from /proc/self/smaps."""
    spans = []
    current = None  # (start, end, eligible) of the mapping whose fields are being read
    try:
        with open("/proc/self/smaps", "rb") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if head and b"-" in head[0] and not head[0].endswith(b":"):  # a mapping's first line
                    path = head[5].decode("utf-8", "replace") if len(head) > 5 else ""
                    start, end = (int(x, 16) for x in head[0].split(b"-"))
                    current = (start, end, b"w" not in head[1] and any(n in path for n in names))
                elif head and head[0] == b"Anonymous:" and current is not None:
                    if current[2] and head[1] == b"0":
                        spans.append(current[:2])
                    current = None
    except (OSError, ValueError, IndexError):
        return []
    return spans


_compiler_spans: list[tuple[int, int]] = []  # found once: a loaded library does not move


def release_compiler_pages() -> int:
    """Unmap LLVM's clean code pages from this process; returns the bytes of address space advised."""
    global _compiler_spans
    if _LIBC is None:
        return 0
    if not _compiler_spans:
        _compiler_spans = _clean_mappings(_COMPILER_LIBRARIES)
    advised = 0
    for start, end in _compiler_spans:
        if _LIBC.madvise(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def trim_heap() -> None:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim``)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


LAZY_MIN_BYTES = 1 << 21  # smaller arrays never get huge pages: np.zeros


def lazy_zeros(shape, dtype) -> np.ndarray:
    """A zeroed, writable array whose memory becomes resident 4 KB at a time as it is written (a
    private anonymous mapping, no huge pages), for a cache filled a little at a time; np.zeros
    where that is not available.  Out of address space: MemoryError, as np.zeros."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes < LAZY_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):  # (not POSIX: no flags)
        return np.zeros(shape, dtype)
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: a forked child writes its own copy
    except OSError as e:
        raise MemoryError(f"cannot map {nbytes} bytes: {e.strerror}") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(mapping, dtype, count).reshape(shape)
