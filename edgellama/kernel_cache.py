"""Numba's on-disk cache of the kernels: is it warm for this CPU, and what is compiling right now.

The first run on a machine compiles the kernels for its CPU (about half a minute on a fast x86-64
core, several minutes on a Raspberry Pi); later runs load them from Numba's cache in about a second.
``cache_status`` says before a model is loaded whether that compilation is ahead, without compiling
anything: Numba keeps one index file per kernel (``<module>.<kernel>-<line>.py<ver>.nbi`` in the
package's cache folder, ``~/.cache/edgellama/kernels/<stamp>-numba<version>``: see
edgellama/kernels/cache.py), stamped with a hash of the kernels' sources and keyed by (signature,
CPU triple + name + features, bytecode hash).  A kernel is cold when its index is missing, stale,
or has no entry for this CPU and this bytecode.

``CompileProgress`` reports compilations as they happen, from Numba's ``numba:compile`` event (sent
on cache misses only, with nested events for the helpers a kernel calls): a line saying what is
happening as soon as it is known, then a progress bar on a terminal, or one line per kernel
otherwise, then the total time, which callers report apart from their own timings.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field

from .quants import GGMLType

_FLOAT_TYPES = {int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)}
_HALF_TYPES = {int(GGMLType.F16), int(GGMLType.BF16)}


def expected_kernels(matrix_types, prompt_path: bool = True) -> list[str]:
    """The kernels (names in ``edgellama.kernels``) that a model whose matrices have these ggml type
    ids calls directly on the way load -> ``warm_up(prompt_path)``, in that order: each is one
    compilation, with the helpers it calls inside.  Quantized matrices are packed at load and
    multiplied by the int8 kernels; 16-bit float ones are widened in tiles for prompts.  Used only
    to predict the work ahead (a kernel this misses is still reported when it compiles)."""
    types = {int(t) for t in matrix_types}
    quantized = bool(types - _FLOAT_TYPES)
    packers = ["pack_rows_moved"] if quantized else []
    one_token = packers + ["decode_token"]
    if not prompt_path:
        return one_token
    return (one_token + ["embed_rows", "rmsnorm_rows"]
            + (["quantize_q8_rows", "matmul_packed"] if quantized else [])
            + (["dequantize_rows"] if types & _HALF_TYPES else [])
            + ["rope_rows", "store_kv", "attention", "swiglu", "rmsnorm"])


def matrix_types(gguf_file) -> set[int]:
    """ggml type ids of a GGUF file's matrices (its 2-D tensors)."""
    return {int(info.qtype) for info in gguf_file.tensors.values() if len(info.shape) == 2}


@dataclass
class CacheStatus:
    cpu: str                                       # the CPU name the kernels are compiled for
    directory: str                                 # where Numba caches them
    cold: list[str] = field(default_factory=list)  # kernels with no compiled code for this CPU there


def cache_status(kernel_names) -> CacheStatus | None:
    """Which of these kernels (names in ``edgellama.kernels``) have no cached code for this CPU; None
    where Numba's cache internals are not the ones this reads.  Imports Numba (about 0.3 s), compiles
    nothing."""
    from . import kernels

    try:
        first = getattr(kernels, kernel_names[0])
        magic = first.targetctx.codegen().magic_tuple()   # (triple, CPU name, CPU features)
        cold = [name for name in kernel_names if not _cached(getattr(kernels, name, None), magic)]
        return CacheStatus(cpu=magic[1], directory=str(first._cache._cache_path), cold=cold)
    except (AttributeError, IndexError, TypeError, ValueError, OSError):
        return None


def _cached(dispatcher, magic) -> bool:
    if dispatcher is None:  # no such kernel any more: nothing to predict
        return True
    cache = dispatcher._cache
    code = hashlib.sha256(dispatcher.py_func.__code__.co_code).hexdigest()
    try:
        index = cache._cache_file._load_index()   # {} when missing, stale or of another Numba version
    except Exception:  # an unreadable index is a cold one (Numba recompiles over it)  # noqa: BLE001
        return False
    return any(key[1] == magic and key[2][0] == code for key in index)


class CompileProgress:
    """``with CompileProgress(status, stream):`` reports the kernel compilations inside the block.

    The announcement (the CPU, "first run only", the cache directory) is written on entry when
    ``status`` predicts cold kernels, otherwise when a compilation starts.  Then a tqdm bar over
    the kernels (on a terminal; the kernel being compiled and its helpers as they go) or one line
    per kernel (elsewhere), and at the end one line with the count and the time; ``quiet``: none of
    it.  ``seconds``: the time spent compiling so far (top-level compilations only, so nothing is
    counted twice); ``compiled``: the kernels compiled.
    """

    def __init__(self, status: CacheStatus | None, stream=None, prefix: str = "edgellama", quiet: bool = False):
        self.status = status
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.expected = len(status.cold) if status else 0
        self.compiled: list[str] = []
        self.seconds = 0.0
        self._depth = 0
        self._started = 0.0
        self._announced = False
        self._bar = None
        self._listener = None

    # ----- the block ------------------------------------------------------------------------------

    def __enter__(self) -> "CompileProgress":
        from numba.core import event

        if self.expected:
            self._announce()
        progress = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                progress._on_start(ev.data["dispatcher"].py_func.__name__)

            def on_end(self, ev):
                progress._on_end(ev.data["dispatcher"].py_func.__name__)

        self._listener = _Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc) -> None:
        from numba.core import event

        event.unregister("numba:compile", self._listener)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.compiled and exc[0] is None and not self.quiet:
            self._line(f"{len(self.compiled)} kernel{'s' if len(self.compiled) != 1 else ''} compiled in "
                       f"{self.seconds:.1f} s (cached for the next runs)")

    # ----- events ---------------------------------------------------------------------------------

    def _on_start(self, name: str) -> None:
        self._depth += 1
        if self._depth > 1:  # a helper compiled inside the current kernel: show life
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.compiled[-1]}: {name}" if self.compiled else name)
            return
        self._announce()
        self._started = time.perf_counter()
        self.compiled.append(name)
        total = max(self.expected, len(self.compiled))
        if self._bar is not None:
            if total != self._bar.total:
                self._bar.total = total
            self._bar.set_postfix_str(name)
        elif not self.quiet:
            self._line(f"compiling kernel {len(self.compiled)}/{total}: {name}")

    def _on_end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._started
            if self._bar is not None:
                self._bar.update(1)

    # ----- output ---------------------------------------------------------------------------------

    def _announce(self) -> None:
        if self._announced or self.quiet:
            return
        self._announced = True
        where = f" (cpu {self.status.cpu}); they are cached in {self.status.directory}" if self.status else ""
        self._line(f"compiling the kernels for this CPU, first run only{where}")
        if _is_terminal(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=max(self.expected, 1), desc="compiling kernels", unit="kernel",
                             file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}")

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(f"{self.prefix}: {text}", file=self.stream)
        else:
            print(f"{self.prefix}: {text}", file=self.stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
