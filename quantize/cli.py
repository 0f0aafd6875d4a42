"""edgellama-quantize: convert a checkpoint to a GGUF file the runtime (and llama.cpp) loads.

    edgellama-quantize INPUT OUTPUT [TYPE [NTHREADS]]
        [--type q4_k_m|q4_k_s|q5_k_m|q5_k_s|q6_k|q5_0|q5_1|q8_0|q4_0|q4_1|f16|bf16|f32]
        [--output-type T] [--embedding-type T] [--dry-run] [--report FILE.json]
        [--force] [--threads N] [--allow-requantize] [--quiet]

INPUT is a Hugging Face model folder (config.json, safetensors, tokenizer), a Meta checkpoint
folder (params.json, consolidated.*.pth, tokenizer.model) or a GGUF file.  The type may be given
positionally, as llama-quantize takes it (``IN OUT Q4_K_M``, also its file type numbers, its
aliases Q4_K = Q4_K_M and Q5_K = Q5_K_M, and an optional thread count).  Errors are one line on stderr: exit code 2 for bad arguments, 1 for
anything else (bad input, refused output, NaN weights), 130 after Ctrl-C, 143 after SIGTERM (129
after SIGHUP).  The output and the report appear under their final names only when complete; both
follow the same rules (never an input, never an existing file without --force).  Progress is a bar
on a terminal, one line per tensor group when stderr is a pipe or a file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from edgellama.gguf import ModelFormatError
from edgellama.quants import type_name

from . import blocks
from .convert import (Plan, TensorResult, check_requantize, check_target, make_plan, open_checkpoint,
                      stale_temp_files, validate_plan, write_atomically, write_plan)
from .policy import TENSOR_TYPES, TYPE_NAMES, parse_file_type, parse_tensor_type
from .source import QuantizeError

PROG = "edgellama-quantize"
MIB = 1024 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's usual code, without usage spam)
        raise _UsageError(message)


class _UsageError(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised in the main thread like KeyboardInterrupt so that every ``finally``
    and ``except BaseException`` (the writers' temp-file cleanup) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending_signals: list[int] = []
_written: list[str] = []  # the output, once it is complete under its final name


def _terminate(signum, frame):
    """Raise Terminated (KeyboardInterrupt for SIGINT) where the signal lands, unless that is inside
    Numba / llvmlite (loading or compiling a kernel: an exception there leaves half-built LLVM
    objects that complain when freed); then the run stops at the next tensor boundary
    (``_check_pending``)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in ("numba", "llvmlite"):
            _pending_signals.append(signum)
            return
        frame = frame.f_back
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _check_pending() -> None:
    if _pending_signals:
        signum = _pending_signals.pop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)


def build_parser() -> argparse.ArgumentParser:
    types = "|".join(TYPE_NAMES)
    p = _Parser(prog=PROG, description="Convert a Hugging Face / Meta / GGUF checkpoint into a GGUF file "
                "(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K), byte-identical "
                "to llama-quantize (its per-tensor type rules, ggml's reference quantizers).")
    from edgellama.cli import VersionAction

    p.add_argument("--version", action=VersionAction)
    p.add_argument("input", help="model folder (HF or Meta layout) or .gguf file")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("qtype", nargs="?", metavar="TYPE", help=f"file type, as llama-quantize takes it: {types} (or its number)")
    p.add_argument("nthreads", nargs="?", metavar="NTHREADS", help="quantizer threads, as llama-quantize takes them")
    p.add_argument("--type", metavar="T", help=f"file type: {types} (or the positional TYPE)")
    tensor_types = "|".join(TENSOR_TYPES)
    p.add_argument("--output-type", metavar="T", help=f"type of output.weight (tied: token_embd.weight): {tensor_types}")
    p.add_argument("--embedding-type", metavar="T", help=f"type of token_embd.weight: {tensor_types}")
    p.add_argument("--dry-run", action="store_true", help="print the plan (types, sizes) and write nothing")
    p.add_argument("--report", metavar="FILE.json", help="write per-tensor RMSE / max error as JSON (also with "
                   "--dry-run; the same rules as OUTPUT)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT and the --report file if they exist "
                   "(never an input file)")
    p.add_argument("--threads", type=int, metavar="N", help="quantizer threads (default: all cores)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow converting already-quantized tensors (any Q, K, IQ or TQ type); quality drops")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in reversed(shape))  # ggml order, as llama.cpp prints it


def print_plan(plan: Plan, out=None) -> None:
    out = out or sys.stdout
    width = max(len(p.tensor.name) for p in plan.tensors)
    for p in plan.tensors:
        action = "copy" if p.choice.copy else f"{type_name(p.tensor.source_type)} ->"
        note = f"  ({p.choice.note})" if p.choice.note else ""
        print(f"{p.tensor.name:<{width}}  {_fmt_shape(p.tensor.shape):>12}  {action:>9} "
              f"{type_name(p.choice.qtype):<5} {p.nbytes / MIB:9.2f} MiB{note}", file=out)
    print(f"{len(plan.tensors)} tensors, {plan.n_elements / 1e6:.1f} M weights: "
          f"{plan.output_bytes / MIB:.2f} MiB, {plan.bits_per_weight:.2f} bits per weight", file=out)


def summary_lines(plan: Plan, results: list[TensorResult], seconds: float) -> list[str]:
    n_elements = plan.n_elements
    source_bytes = plan.checkpoint.source_bytes
    lines = [
        f"model size  = {source_bytes / MIB:9.2f} MiB ({8 * source_bytes / max(1, n_elements):.2f} bits per weight)",
        f"quant size  = {plan.output_bytes / MIB:9.2f} MiB ({plan.bits_per_weight:.2f} bits per weight, "
        f"{plan.file_type.name})",
        f"{len(results)} tensors in {seconds:.2f} s: {len(results) / max(seconds, 1e-9):.1f} tensors/s, "
        f"{4 * n_elements / MIB / max(seconds, 1e-9):.1f} MB/s of float32 weights",
    ]
    measured = [r for r in results if r.relative_rmse is not None and not r.copied]
    if measured:
        worst = max(measured, key=lambda r: r.relative_rmse)
        max_relative = "" if worst.max_relative_error is None else (
            f" ({100 * worst.max_relative_error:.2f}% of its largest |value|)")
        lines.append(f"largest error: {worst.name} ({worst.type}) RMSE {worst.rmse:.3g} = "
                     f"{100 * worst.relative_rmse:.2f}% of its RMS, max |error| {worst.max_abs_error:.3g}"
                     f"{max_relative}")
    return lines


def write_report(path: str, plan: Plan, results: list[TensorResult] | None, args, seconds: float) -> None:
    by_name = {r.name: r for r in results or []}
    tensors = []
    for p in plan.tensors:
        r = by_name.get(p.tensor.name)
        tensors.append({
            "name": p.tensor.name, "shape": list(reversed(p.tensor.shape)),
            "source_type": type_name(p.tensor.source_type), "type": type_name(p.choice.qtype),
            "bytes": p.nbytes, "copied": p.choice.copy, "note": p.choice.note,
            "rmse": r.rmse if r else None, "max_abs_error": r.max_abs_error if r else None,
            "relative_rmse": r.relative_rmse if r else None,
            "max_relative_error": r.max_relative_error if r else None, "seconds": r.seconds if r else None,
        })
    report = {
        "input": str(args.input), "output": None if args.dry_run else str(args.output),
        "type": plan.file_type.name, "dry_run": bool(args.dry_run),
        "n_tensors": len(plan.tensors), "n_weights": plan.n_elements,
        "source_bytes": plan.checkpoint.source_bytes, "output_bytes": plan.output_bytes,
        "bits_per_weight": plan.bits_per_weight, "seconds": seconds, "tensors": tensors,
    }
    write_atomically(path, json.dumps(report, indent=1).encode(), replace=args.force)


def _warn_line(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _type_option(value: str | None, option: str, parse=parse_tensor_type):
    if value is None:
        return None
    try:
        return parse(value)
    except QuantizeError as e:
        raise _UsageError(f"{option}: {e}") from None


def _resolve_type_and_threads(args) -> None:
    """llama-quantize's positional TYPE [NTHREADS], or --type / --threads (not both, unless equal)."""
    if args.qtype is not None and args.type is not None and args.qtype.lower() != args.type.lower():
        raise _UsageError(f"type given twice: {args.qtype!r:.40} and --type {args.type!r:.40}")
    if args.qtype is None and args.type is None:
        raise _UsageError("the type is missing: give it after OUTPUT (llama-quantize's way) or as --type")
    args.type = args.type or args.qtype
    if args.nthreads is not None:
        try:
            threads = int(args.nthreads)
        except ValueError:
            raise _UsageError(f"NTHREADS must be an integer, got {args.nthreads!r:.40} (threads)") from None
        if args.threads is not None and args.threads != threads:
            raise _UsageError(f"threads given twice: {threads} and --threads {args.threads}")
        args.threads = threads


def _warn_fallbacks(plan: Plan) -> None:
    """One warning per kind of type fallback (a K-quant model of width 576 has hundreds), naming
    the tensors (the first few when there are many)."""
    by_note: dict[str, list[str]] = {}
    for p in plan.tensors:
        if p.choice.note and "instead" in p.choice.note:
            by_note.setdefault(p.choice.note, []).append(p.tensor.name)
    for note, names in by_note.items():
        if len(names) == 1:
            warnings.warn(f"{names[0]}: {note}")
        else:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            warnings.warn(f"{len(names)} tensors ({shown}): {note}")


def _warn_stale(*targets: str) -> None:
    for target in targets:
        for stale in stale_temp_files(target):
            warnings.warn(f"{stale}: a temp file left by an earlier interrupted run; delete it unless another "
                          f"conversion is writing {Path(target).name} now")


def run(args) -> int:
    _resolve_type_and_threads(args)
    target = _type_option(args.type, "--type" if args.qtype is None else "TYPE", parse_file_type)
    output_type = _type_option(args.output_type, "--output-type")
    embedding_type = _type_option(args.embedding_type, "--embedding-type")
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be at least 1, got {args.threads}")
    # every file this run writes follows the same rules, checked before anything is read
    if not args.dry_run:
        check_target(args.input, args.output, args.force, "output")
    if args.report:
        if Path(args.report).resolve() == Path(args.output).resolve() and not args.dry_run:
            raise QuantizeError(f"{args.report}: the --report file would be the output file")
        check_target(args.input, args.report, args.force, "--report file")
    _warn_stale(*([] if args.dry_run else [args.output]), *([args.report] if args.report else []))
    blocks.set_threads(args.threads)
    checkpoint = open_checkpoint(args.input)
    try:
        plan = make_plan(checkpoint, target, output_type=output_type, embedding_type=embedding_type)
        validate_plan(plan)  # the runtime's checks, before anything is said about the plan
        if args.dry_run and plan.requantized and not args.allow_requantize:
            kinds = sorted({type_name(p.tensor.source_type) for p in plan.tensors if p.tensor.name in plan.requantized})
            warnings.warn(f"{len(plan.requantized)} tensors are already quantized ({', '.join(kinds)}): "
                          "converting needs --allow-requantize (quality drops)")
        else:
            check_requantize(plan, args.allow_requantize, quiet=False)
        _warn_fallbacks(plan)
        if args.dry_run:
            print_plan(plan)
            if args.report:
                write_report(args.report, plan, None, args, 0.0)
            return 0
        start = time.perf_counter()
        results = _write_with_progress(plan, args)
        seconds = time.perf_counter() - start
        _written.append(args.output)
    finally:
        checkpoint.close()
    if args.report:
        write_report(args.report, plan, results, args, seconds)
    if not args.quiet:
        for line in summary_lines(plan, results, seconds):
            print(line, file=sys.stderr)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _group(name: str) -> str:
    """A tensor's progress group: its layer (blk.N), or the global tensors."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blk" and len(parts) > 2 else "global"


def _write_with_progress(plan: Plan, args) -> list[TensorResult]:
    """A tqdm bar on a terminal; on a pipe or a file one line per finished tensor group (layer)."""
    if args.quiet:
        return write_plan(plan, args.output, on_tensor=lambda result: _check_pending(), replace=args.force)
    total = len(plan.tensors)
    if not sys.stderr.isatty():
        last = {"group": None, "count": 0, "start": time.perf_counter()}
        groups = [_group(p.tensor.name) for p in plan.tensors]

        def on_line(result: TensorResult) -> None:
            _check_pending()
            last["count"] += 1
            done, group = last["count"], _group(result.name)
            if done == total or groups[done] != group:
                print(f"[{done}/{total}] {group} ({time.perf_counter() - last['start']:.1f} s)", file=sys.stderr,
                      flush=True)
        return write_plan(plan, args.output, on_tensor=on_line, replace=args.force)

    from tqdm import tqdm

    bar = tqdm(total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        def on_tensor(result: TensorResult) -> None:
            _check_pending()
            bar.set_postfix_str(f"{result.name} {result.type}", refresh=False)
            bar.update(1)
        return write_plan(plan, args.output, on_tensor=on_tensor, replace=args.force)
    finally:
        bar.close()


def _what_was_written() -> str:
    return f"{_written[0]} is complete" if _written else "no output written"


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP end the run the way Ctrl-C does (temp files removed), and all three wait
    for the kernel being compiled; the previous handlers are returned for restoring (main() may run
    inside another program, e.g. tests).  A SIGINT handler the host program installed is kept."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
            continue
        previous[signum] = signal.signal(signum, _terminate)
    return previous


def main(argv: list[str] | None = None) -> int:
    previous = warnings.showwarning
    warnings.showwarning = _warn_line
    handlers = _install_signal_handlers()
    _pending_signals.clear()
    _written.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            args = build_parser().parse_args(argv)
            return run(args)
    except _UsageError as e:
        print(f"{PROG}: error: {e} (see {PROG} --help)", file=sys.stderr)
        return 2
    except (QuantizeError, ModelFormatError, NotImplementedError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}".replace(": : ", ": "), file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_what_was_written()}", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{PROG}: terminated by {signal.Signals(e.signum).name}; {_what_was_written()}", file=sys.stderr)
        return 128 + e.signum
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
