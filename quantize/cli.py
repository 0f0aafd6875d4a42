"""edgellama-quantize: convert a checkpoint to a GGUF file the runtime (and llama.cpp) loads.

    edgellama-quantize INPUT OUTPUT --type q8_0|q4_0|q4_1|f16|bf16|f32
        [--output-type T] [--embedding-type T] [--dry-run] [--report FILE.json]
        [--force] [--threads N] [--allow-requantize] [--quiet]

INPUT is a Hugging Face model folder (config.json, safetensors, tokenizer), a Meta checkpoint
folder (params.json, consolidated.*.pth, tokenizer.model) or a GGUF file.  Errors are one line on
stderr: exit code 2 for bad arguments, 1 for anything else (bad input, refused output, NaN weights),
130 after Ctrl-C.  The output appears under its final name only when it is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from edgellama.gguf import ModelFormatError
from edgellama.quants import type_name

from . import blocks
from .convert import (Plan, TensorResult, check_paths, check_requantize, make_plan, open_checkpoint,
                      write_plan)
from .policy import TYPE_NAMES, parse_type
from .source import QuantizeError

PROG = "edgellama-quantize"
MIB = 1024 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's usual code, without usage spam)
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    types = "|".join(TYPE_NAMES)
    p = _Parser(prog=PROG, description="Convert a Hugging Face / Meta / GGUF checkpoint into a GGUF file "
                "(F32, F16, BF16, Q8_0, Q4_0, Q4_1), bit-exact with ggml's quantizers.")
    p.add_argument("input", help="model folder (HF or Meta layout) or .gguf file")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--type", required=True, metavar="T", help=f"main tensor type: {types}")
    p.add_argument("--output-type", metavar="T", help="type of output.weight (tied: token_embd.weight)")
    p.add_argument("--embedding-type", metavar="T", help="type of token_embd.weight")
    p.add_argument("--dry-run", action="store_true", help="print the plan (types, sizes) and write nothing")
    p.add_argument("--report", metavar="FILE.json", help="write per-tensor RMSE / max error as JSON")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists (never the input)")
    p.add_argument("--threads", type=int, metavar="N", help="quantizer threads (default: all cores)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow converting already-quantized (Q8_0/Q4_x) tensors; quality drops")
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
        f"{type_name(plan.target)})",
        f"{len(results)} tensors in {seconds:.2f} s: {len(results) / max(seconds, 1e-9):.1f} tensors/s, "
        f"{4 * n_elements / MIB / max(seconds, 1e-9):.1f} MB/s of float32 weights",
    ]
    measured = [r for r in results if r.relative_rmse is not None and not r.copied]
    if measured:
        worst = max(measured, key=lambda r: r.relative_rmse)
        lines.append(f"largest error: {worst.name} ({worst.type}) RMSE {worst.rmse:.3g} = "
                     f"{100 * worst.relative_rmse:.2f}% of its RMS, max |error| {worst.max_abs_error:.3g}")
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
            "relative_rmse": r.relative_rmse if r else None, "seconds": r.seconds if r else None,
        })
    report = {
        "input": str(args.input), "output": None if args.dry_run else str(args.output),
        "type": type_name(plan.target), "dry_run": bool(args.dry_run),
        "n_tensors": len(plan.tensors), "n_weights": plan.n_elements,
        "source_bytes": plan.checkpoint.source_bytes, "output_bytes": plan.output_bytes,
        "bits_per_weight": plan.bits_per_weight, "seconds": seconds, "tensors": tensors,
    }
    tmp = Path(path + ".partial")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _warn_line(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _type_option(value: str | None, option: str):
    if value is None:
        return None
    try:
        return parse_type(value)
    except QuantizeError as e:
        raise _UsageError(f"{option}: {e}") from None


def run(args) -> int:
    target = _type_option(args.type, "--type")
    output_type = _type_option(args.output_type, "--output-type")
    embedding_type = _type_option(args.embedding_type, "--embedding-type")
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be at least 1, got {args.threads}")
    if not args.dry_run:
        check_paths(args.input, args.output, args.force)
    if args.report and Path(args.report).resolve() in (Path(args.input).resolve(), Path(args.output).resolve()):
        raise QuantizeError(f"{args.report}: the report would overwrite the input or the output")
    blocks.set_threads(args.threads)
    checkpoint = open_checkpoint(args.input)
    try:
        plan = make_plan(checkpoint, target, output_type=output_type, embedding_type=embedding_type)
        if args.dry_run and plan.requantized and not args.allow_requantize:
            warnings.warn(f"{len(plan.requantized)} tensors are already quantized: converting needs "
                          "--allow-requantize (quality drops)")
        else:
            check_requantize(plan, args.allow_requantize, quiet=False)
        for p in plan.tensors:
            if p.choice.note and "instead" in p.choice.note:
                warnings.warn(f"{p.tensor.name}: {p.choice.note}")
        if args.dry_run:
            print_plan(plan)
            if args.report:
                write_report(args.report, plan, None, args, 0.0)
            return 0
        start = time.perf_counter()
        results = _write_with_progress(plan, args)
        seconds = time.perf_counter() - start
    finally:
        checkpoint.close()
    if args.report:
        write_report(args.report, plan, results, args, seconds)
    if not args.quiet:
        for line in summary_lines(plan, results, seconds):
            print(line, file=sys.stderr)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _write_with_progress(plan: Plan, args) -> list[TensorResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(plan.tensors), unit="tensor", disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    try:
        def on_tensor(result: TensorResult) -> None:
            bar.set_postfix_str(f"{result.name} {result.type}", refresh=False)
            bar.update(1)
        return write_plan(plan, args.output, on_tensor=on_tensor)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    blocks.prefer_workqueue_threads()
    previous = warnings.showwarning
    warnings.showwarning = _warn_line
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
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
