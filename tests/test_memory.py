"""What edgellama/memory.py and GGUFFile.release give back, read from /proc/self/smaps (Linux)."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellama.gguf import GGUFFile

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_kib(name_part: str) -> int:
    """Resident KiB of this process's mappings of files whose path contains name_part."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                current = len(head) > 5 and name_part in head[5]
            elif head[0] == "Rss:" and current:
                total += int(head[1])
    return total


def present_pages(a: np.ndarray) -> int:
    """How many of the pages under array a are mapped in this process (/proc/self/pagemap)."""
    page = mmap.PAGESIZE
    start = a.__array_interface__["data"][0] // page
    end = -(-(a.__array_interface__["data"][0] + a.nbytes) // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * start)
        entries = np.frombuffer(f.read(8 * (end - start)), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


def test_released_rows_leave_memory_and_read_back_the_same(smollm2_path):
    f = GGUFFile(smollm2_path)
    try:
        rows = f.rows("token_embd.weight")  # Q8_0, 28 MiB
        n = rows.shape[0]
        checksum = int(rows.sum(dtype=np.uint64))
        first, second = rows[:n // 2], rows[n // 2 + 64:]  # (a page's margin between the halves)
        # Pages of a file mapping that were read may be reclaimed at any time when the machine is
        # short of memory (seen under load: 87% of a half left a moment after reading it), so each
        # half is read again just before its pages are counted, and "kept" means most of what was
        # there a moment before; a release that reached the second half would leave none of it.
        half_pages = second.nbytes / mmap.PAGESIZE
        int(first.sum(dtype=np.uint64))
        assert present_pages(first) > 0.5 * half_pages
        int(second.sum(dtype=np.uint64))
        before = present_pages(second)
        f.release("token_embd.weight", 0, n // 2)
        assert present_pages(first) == 0
        assert before > 0.5 * half_pages and present_pages(second) > 0.5 * before
        f.release("token_embd.weight")
        assert present_pages(rows) == 0
        assert int(rows.sum(dtype=np.uint64)) == checksum  # back from the page cache, unchanged
        f.release("token_embd.weight", n, n + 5)  # an empty range is a no-op
    finally:
        f.close()


def test_compiler_pages_are_released_and_compiling_still_works():
    from numba import njit

    from edgellama import kernels  # noqa: F401  (imports Numba, which touches LLVM)
    from edgellama.memory import release_compiler_pages, trim_heap

    @njit(cache=False)
    def add(a, b):
        return a + b

    assert add(2, 3) == 5  # a compilation: LLVM's pages come back
    touched = resident_kib("libllvmlite")
    assert release_compiler_pages() > 0
    assert resident_kib("libllvmlite") < min(touched, 4096), touched

    @njit(cache=False)
    def mul(a, b):
        return a * b

    assert mul(6, 7) == 42  # compiling after the release: the pages fault back in from the page cache
    trim_heap()
    assert add(1, 1) == 2


CHILD = r"""
import json, mmap, sys
import numpy as np
import edgellama

def rss(name):
    total, cur = 0, False
    for line in open("/proc/self/smaps"):
        h = line.split()
        if "-" in h[0] and not h[0].endswith(":"):
            cur = len(h) > 5 and name in h[5]
        elif h[0] == "Rss:" and cur:
            total += int(h[1])
    return total // 1024

model = edgellama.load(sys.argv[1], n_ctx=256, threads=2)
model.eval(np.arange(20) + 100)  # the prompt kernels
model.eval(np.array([5]))        # the one-token kernels
k, page = model.state.k_cache, mmap.PAGESIZE
start, end = k.__array_interface__["data"][0] // page, -(-(k.__array_interface__["data"][0] + k.nbytes) // page)
with open("/proc/self/pagemap", "rb") as f:
    f.seek(8 * start)
    kv_pages = int(((np.frombuffer(f.read(8 * (end - start)), np.uint64) >> np.uint64(63)) & np.uint64(1)).sum())
print(json.dumps({"kv_pages": kv_pages, "kv_regions": k.shape[0] * k.shape[1],
                  "kv_region_bytes": k.nbytes // (k.shape[0] * k.shape[1]), "page": page,
                  "llvm_mib": rss("libllvmlite"), "file_mib": rss(sys.argv[1].rsplit("/", 1)[-1]),
                  "packed_mib": model.weights.packed.nbytes >> 20, "packed": model.weights.pack_source}))
"""


def test_a_loaded_model_keeps_neither_the_compiler_nor_the_file_resident(smollm2_path):
    """After loading and running both paths the weights are resident once (the packed copy, packed
    at load or mapped from the packed cache; of the model file's pages not even the metadata's,
    which the tokenizer was built from) and LLVM's code is not resident at all."""
    sources = []
    for _ in range(2):  # packed at load (the first load of the file in this run) and mapped from the packed cache
        out = subprocess.run([sys.executable, "-c", CHILD, str(smollm2_path)], capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["packed_mib"] > 50
        assert r["file_mib"] == 0, r  # < 1 MiB: not the metadata either (1.7 MiB: GGUFFile.release_header)
        assert r["llvm_mib"] < 4, r
        # 21 positions written: each (layer, KV head) region of the K cache has its first
        # 21 x 128 bytes in memory, one page, not the whole cache (memory.lazy_zeros)
        per_region = -(-21 * 128 // r["page"])
        assert r["kv_region_bytes"] >= 8 * r["page"] and r["kv_pages"] <= r["kv_regions"] * per_region, r
        sources.append(r["packed"])
    assert sources[1] == "mapped" and sources[0] in ("saving", "mapped")


def test_lazy_zeros_become_resident_a_page_at_a_time_and_stay_private_to_a_fork():
    import os

    from edgellama.memory import lazy_zeros

    a = lazy_zeros((16, 8, 4096, 64), np.uint16)  # 64 MiB: a 1B model's K cache at 4096 positions
    assert a.shape == (16, 8, 4096, 64) and a.dtype == np.uint16 and a.flags.writeable and a.flags.c_contiguous
    assert present_pages(a) == 0
    a[:, :, 0] = 1  # one position in each of the 128 (layer, head) regions, 512 KiB apart
    pages = a.nbytes // mmap.PAGESIZE
    # one page per region (huge pages: 2 MiB each, all 64 MiB); a larger base page or a small
    # multi-page folio would still be far below an eighth of the array
    assert present_pages(a) <= min(128 * max(1, 65536 // mmap.PAGESIZE), pages // 8), present_pages(a)
    assert int(a[:, :, 0].sum()) == 16 * 8 * 64 and not a[:, :, 1:3].any() and not a[-1, -1, -1].any()
    pid = os.fork()
    if pid == 0:  # a forked child (a kernel compile child) writes into its own copy
        a[0, 0, 5, 0] = 7
        os._exit(0 if a[0, 0, 5, 0] == 7 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and a[0, 0, 5, 0] == 0
    small = lazy_zeros((3, 4), np.float32)  # below a huge page: plain np.zeros
    assert small.shape == (3, 4) and not small.any() and small.flags.writeable
    assert lazy_zeros(0, np.float32).shape == (0,)
