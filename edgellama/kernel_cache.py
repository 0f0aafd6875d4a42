"""Numba's on-disk cache of the kernels: is it warm for this CPU, and what is compiling right now.

The first run on a machine compiles the kernels for its CPU (about half a minute on a fast x86-64
core, several minutes on a Raspberry Pi); later runs load them from Numba's cache in about a second.
``cache_status`` says before a model is loaded whether that compilation is ahead, without compiling
anything: Numba keeps one index file per kernel (``<module>.<kernel>-<line>.py<ver>.nbi`` in the
package's cache folder, ``~/.cache/edgellama/kernels/<stamp>-numba<version>``: see
edgellama/kernels/cache.py), stamped with a hash of the kernels' sources and keyed by (signature,
CPU triple + name + features, bytecode hash).  A kernel is cold when its index is missing, stale,
or has no entry for this CPU and this bytecode.

``CompileChild`` compiles some kernels in a forked copy of the process (compiling only, never
running them) while this process compiles others: a first run on a machine with two or more cores
waits for the longer of the two instead of their sum.

``CompileProgress`` reports compilations as they happen, from Numba's ``numba:compile`` event (sent
on cache misses only, with nested events for the helpers a kernel calls): a line saying what is
happening as soon as it is known, then a progress bar on a terminal, or one line per kernel
otherwise, then the total time, which callers report apart from their own timings.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

from .quants import GGMLType

_FLOAT_TYPES = {int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)}
_HALF_TYPES = {int(GGMLType.F16), int(GGMLType.BF16)}
_K_QUANT_TYPES = {int(GGMLType.Q4_K), int(GGMLType.Q5_K), int(GGMLType.Q6_K)}  # activations: quantize_q8k
_BLOCK_TYPES = {int(GGMLType.Q8_0), int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0), int(GGMLType.Q5_1)}


def expected_kernels(matrix_types, prompt_path: bool = True) -> list[str]:
    """The kernels (names in ``edgellama.kernels``) that a model whose matrices have these ggml type
    ids calls directly on the way load -> ``warm_up(prompt_path)``, in that order: each is one
    compilation, with the helpers it calls inside.  Quantized matrices are packed at load and
    multiplied by the int8 kernels; 16-bit float ones are widened in tiles for prompts.  Used only
    to predict the work ahead (a kernel this misses is still reported when it compiles)."""
    types = {int(t) for t in matrix_types}
    quantized = bool(types - _FLOAT_TYPES)
    k_quants = bool(types & _K_QUANT_TYPES)
    packers = ["pack_rows_moved"] if quantized else []
    one_token = packers + ["decode_token"]
    if not prompt_path:
        return one_token
    return (one_token + ["embed_rows", "rmsnorm_rows"]
            + (["quantize_q8_rows"] if types & _BLOCK_TYPES else []) + (["quantize_q8k_rows"] if k_quants else [])
            + (["matmul_packed"] if quantized else [])
            + (["dequantize_rows"] if types & _HALF_TYPES else [])
            + ["rope_rows", "store_kv", "attention", "swiglu", "rmsnorm"])


# the decode step compiled in pieces (a first run that needs only it, on a machine where a compile
# child may start): these helper functions of decode_token compile first, the first group in this
# process and the second in a CompileChild at the same time, then decode_token itself, which finds
# them all in the cache (Model.warm_up)
DECODE_PIECES_HERE = ("embed_row", "_quantize", "rmsnorm", "rope", "_swiglu_inplace", "_byte_shares")
DECODE_PIECES_CHILD = ("_layer_matvec", "attention_one")


@dataclass
class WarmUpPlan:
    status: "CacheStatus | None"   # the kernels ahead (cache_status of ``kernels``)
    kernels: list[str]             # every kernel compiled or loaded on the way, in order
    prompt_child: bool = False     # the prompt path compiles in a child while the decode step compiles here
    split_decode: bool = False     # the decode step compiles in pieces, some in a child


def plan_warm_up(matrix_types, prompt_path: bool = True) -> WarmUpPlan:
    """How load -> ``Model.warm_up(prompt_path)`` compiles what is cold, and what that is: with
    both paths cold, the prompt path in a CompileChild beside the decode step; with only the
    decode step cold, the decode step in pieces (DECODE_PIECES_*); everything in this process
    where no child may start (``child_possible``) or nothing big is cold.  Reads the cache's
    index files; compiles nothing."""
    names = expected_kernels(matrix_types, prompt_path)
    status = cache_status(names)
    if status is None or "decode_token" not in status.cold or not child_possible():
        return WarmUpPlan(status, names)
    one_token = expected_kernels(matrix_types, prompt_path=False)
    if any(name not in one_token for name in status.cold):
        return WarmUpPlan(status, names, prompt_child=True)
    at = names.index("decode_token")
    names = names[:at] + list(DECODE_PIECES_HERE + DECODE_PIECES_CHILD) + names[at:]
    return WarmUpPlan(cache_status(names), names, split_decode=True)


def compile_for(dispatcher, *args) -> None:
    """Compile a kernel (or load it from the cache) for these arguments' types, without running it."""
    dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))


# the tokenizer's compiled functions a byte-level vocabulary's loading runs (edgellama.tokenizer.merge)
TOKENIZER_FUNCTIONS = ("_build_slots", "_encode")


def _kernel(name: str):
    """The dispatcher of this name: a kernel of ``edgellama.kernels``, a helper function of its
    decode or ops room (DECODE_PIECES_*), or one of TOKENIZER_FUNCTIONS; None if there is none."""
    from . import kernels
    from .tokenizer import merge

    for room in (kernels, kernels.decode, kernels.ops, merge):
        found = getattr(room, name, None)
        if found is not None:
            return found
    return None


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
        cold = [name for name in kernel_names if not _cached(_kernel(name), magic)]
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


# events (numba.core.event, custom kinds) through which CompileProgress hears of a compile child's
# work: the wait for it (start / end), and each kernel it compiled (data: {"kernel": name})
CHILD_WAIT = "edgellama:compile-child-wait"
CHILD_KERNEL = "edgellama:compile-child-kernel"
PROCESSES_ENV = "EDGELLAMA_COMPILE_PROCESSES"  # "1": compile everything in this process
CHILD_MIN_MEMORY = 512 << 20                   # what must be available to start one (LLVM's memory)


def child_possible() -> bool:
    """Whether a compile child may start: Linux (a fork of a process that has started threads is
    safe there as long as the child only compiles), two or more usable CPUs, memory to spare, and
    not turned off with EDGELLAMA_COMPILE_PROCESSES=1."""
    if os.environ.get(PROCESSES_ENV, "").strip() == "1" or not sys.platform.startswith("linux") \
            or not hasattr(os, "fork"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    from .info import available_memory

    available = available_memory()
    return available is None or available >= CHILD_MIN_MEMORY


class _CompileOnly:
    """Stands in for a kernel inside a compile child: compiles it for the arguments' types (or loads it
    from the cache), never runs it; ``skip``: not even that (a call deferred to a later pass)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.skip = False

    def __call__(self, *args):
        if not self.skip:
            compile_for(self.dispatcher, *args)


class CompileChild:
    """A forked copy of this process that compiles kernels while this one compiles others.

    ``CompileChild.start(work, deferred)`` (None where ``child_possible`` says no or the fork
    fails) forks; the child replaces every kernel of ``edgellama.kernels`` by a compile-only
    stand-in and calls ``work()`` twice: first with the kernels named in ``deferred`` skipped (they
    share helper functions with what this process compiles meanwhile, which by the second pass are
    in the cache), then with every kernel.  It writes each kernel it compiled to a pipe once the
    kernel's code is saved in the cache (not when its compilation ends: Numba saves after that, and a
    child killed in between had not left it for this process), silences its output, and
    leaves with ``os._exit`` (no exit handlers, no buffers flushed twice).  ``work`` must only call
    the kernels the way the process will (so that the signatures are the ones it will need), and
    must not depend on their results: nothing runs, so no thread pool starts in the child.

    Start it from the thread that runs the kernels (edgellama.kernel_thread), between evaluations,
    so that no compilation holds Numba's lock at the fork.  ``finish(timeout)`` waits for the child
    (reporting its kernels to CompileProgress), or kills it after ``timeout`` seconds; whatever it
    did not compile is compiled here later, as without a child.  Numba's cache saves are locked
    across processes (edgellama.kernels.cache), so two processes may compile the same kernel.
    """

    def __init__(self, pid: int, reader: int):
        self.pid, self.reader = pid, reader
        self.kernels: list[str] = []
        self.status: int | None = None

    @classmethod
    def start(cls, work, deferred=()) -> "CompileChild | None":
        if not child_possible():
            return None
        try:
            reader, writer = os.pipe()
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            os.close(reader)
            os.close(writer)
            return None
        if pid == 0:  # the child: never returns
            os.close(reader)
            _child(work, deferred, writer)
        os.close(writer)
        return cls(pid, reader)

    def finish(self, timeout: float) -> list[str]:
        """Wait for the child (at most ``timeout`` seconds, then kill it); the kernels it compiled."""
        from numba.core import event

        deadline = time.monotonic() + timeout
        pending = b""
        with event.trigger_event(CHILD_WAIT):
            try:
                killed = False
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 and not killed:  # then what it wrote before dying is read to the end
                        os.kill(self.pid, signal.SIGKILL)
                        killed = True
                    if not select.select([self.reader], [], [], None if killed else left)[0]:
                        continue
                    chunk = os.read(self.reader, 4096)
                    if not chunk:  # the child has gone
                        break
                    *names, pending = (pending + chunk).split(b"\n")
                    for name in names:
                        self.kernels.append(name.decode())
                        event.broadcast(event.Event(CHILD_KERNEL, event.EventStatus.END,
                                                    data={"kernel": name.decode()}))
            except BaseException:  # Ctrl-C while waiting: the child goes too
                os.kill(self.pid, signal.SIGKILL)
                raise
            finally:
                os.close(self.reader)
                self.status = os.waitpid(self.pid, 0)[1]
        return self.kernels


def _child(work, deferred, writer: int) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: gone at once
        import warnings

        import numpy as np
        from numba.core import event
        from numba.core.registry import CPUDispatcher

        from . import kernels

        warnings.simplefilter("ignore")
        stand_ins = {}
        for name, value in list(vars(kernels).items()):
            if isinstance(value, CPUDispatcher):
                stand_ins[name] = _CompileOnly(value)
                setattr(kernels, name, stand_ins[name])
        from .kernels.cache import SAVED_HOOKS

        depth = [0]
        compiled = []  # the kernel whose compilation just ended (its helpers' compile inside it)

        class _Listener(event.Listener):
            def on_start(self, ev):
                depth[0] += 1

            def on_end(self, ev):
                depth[0] -= 1
                if depth[0] == 0:
                    compiled.append(ev.data["dispatcher"].py_func)

        def saved(py_func):  # reported once in the cache: a child killed before that reported nothing
            if depth[0] == 0 and py_func in compiled:
                compiled.remove(py_func)
                os.write(writer, py_func.__name__.encode() + b"\n")

        event.register("numba:compile", _Listener())
        SAVED_HOOKS.append(saved)
        with np.errstate(all="ignore"):
            for name in deferred:
                if name in stand_ins:
                    stand_ins[name].skip = True
            work()
            for stand_in in stand_ins.values():
                stand_in.skip = False
            work()
        code = 0
    finally:
        os._exit(code)


class CompileProgress:
    """``with CompileProgress(status, stream):`` reports the kernel compilations inside the block.

    The announcement (the CPU, "first run only", the cache directory) is written on entry when
    ``status`` predicts cold kernels, otherwise when a compilation starts.  Then a tqdm bar over
    the kernels (on a terminal; the kernel being compiled and its helpers as they go) or one line
    per kernel (elsewhere), and at the end one line with the count and the time; ``quiet``: none of
    it.  ``seconds``: the time spent compiling so far (top-level compilations only, so nothing is
    counted twice, and the waits for a CompileChild); ``compiled``: the kernels compiled (here or
    in a CompileChild).
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
        self._listeners = {}
        self._waited = 0.0

    def expect(self, status: CacheStatus | None) -> None:
        """The prediction, known once the block has begun (a command builds the tokenizer, whose
        functions may compile, before it knows which kernels it needs): its cold kernels join the
        total, and are announced now if nothing was."""
        if status is None:
            return
        self.status = status
        self.expected = len(self.compiled) + len(status.cold)
        if status.cold:
            self._announce()
            if self._bar is not None and self._bar.total != max(self.expected, 1):
                self._bar.total = max(self.expected, 1)

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

        class _ChildWait(event.Listener):
            def on_start(self, ev):
                progress._on_wait(True)

            def on_end(self, ev):
                progress._on_wait(False)

        class _ChildKernel(event.Listener):
            def on_start(self, ev):
                pass

            def on_end(self, ev):
                progress._on_child_kernel(ev.data["kernel"])

        self._listeners = {"numba:compile": _Listener(), CHILD_WAIT: _ChildWait(), CHILD_KERNEL: _ChildKernel()}
        for kind, listener in self._listeners.items():
            event.register(kind, listener)
        return self

    def __exit__(self, *exc) -> None:
        from numba.core import event

        for kind, listener in self._listeners.items():
            event.unregister(kind, listener)
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
        self._started = time.perf_counter()
        self._count(name, "compiling kernel {n}: {name}", name)

    def _on_end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._started
            if self._bar is not None:
                self._bar.update(1)

    def _on_wait(self, start: bool) -> None:
        """The wait for a compile child: compilation time (this process compiles nothing meanwhile)."""
        if start:
            self._waited = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._waited

    def _on_child_kernel(self, name: str) -> None:
        self._count(name, "compiled kernel {n} in a second process: {name}", f"{name} (second process)")
        if self._bar is not None:
            self._bar.update(1)

    def _count(self, name: str, line: str, postfix: str) -> None:
        """One more kernel: the bar's total and postfix, or a line ({n}: "k/total", {name})."""
        self._announce()
        self.compiled.append(name)
        total = max(self.expected, len(self.compiled))
        if self._bar is not None:
            if total != self._bar.total:
                self._bar.total = total
            self._bar.set_postfix_str(postfix)
        elif not self.quiet:
            self._line(line.format(n=f"{len(self.compiled)}/{total}", name=name))

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
