"""Plan and run a conversion: checkpoint in, GGUF v3 out (atomically), with a per-tensor report.

``convert_file(source, target, "q8_0")`` is the whole job for any supported input (a GGUF file, a
Hugging Face folder, a Meta ``consolidated.*.pth`` folder).  The steps:
  1. open the checkpoint (metadata + lazily read tensors, already in GGUF naming and layout);
  2. ``make_plan``: the type of every tensor (``policy.TypeChooser``: llama-quantize's rules) and the
     output size;
  3. ``write_plan``: stream tensors one at a time through the Numba quantizers into
     ``edgellama.gguf.write_gguf`` (temp file + rename: an error or Ctrl-C leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgellama._validate import is_int, is_number
from edgellama.config import ModelArgs
from edgellama.gguf import ModelFormatError, TensorSpec, ValueType, publish, write_gguf
from edgellama.quants import GGMLType, tensor_nbytes, type_name

from . import blocks
from .files import regular_file
from .policy import Choice, FileType, TypeChooser, as_file_type, is_quantized, model_shape, parse_tensor_type
from .source import Checkpoint, QuantizeError, SourceTensor

GGML_QUANTIZATION_VERSION = 2
CHUNK_ELEMENTS = 1 << 24  # rows are converted in chunks of about this many floats (64 MB)


class RequantizeWarning(UserWarning):
    """The source is already quantized: requantizing it loses more quality than quantizing once."""


@dataclass
class PlannedTensor:
    tensor: SourceTensor
    choice: Choice

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.choice.qtype, self.tensor.shape)


@dataclass
class Plan:
    checkpoint: Checkpoint
    file_type: FileType  # what was asked for (Q4_K_M, Q8_0, ...): general.file_type
    metadata: dict
    tensors: list[PlannedTensor]
    requantized: list[str] = field(default_factory=list)  # names of already-quantized sources

    @property
    def target(self) -> GGMLType:
        """The file type's base tensor type."""
        return self.file_type.base

    @property
    def n_elements(self) -> int:
        return sum(p.tensor.n_elements for p in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(p.nbytes for p in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.output_bytes / max(1, self.n_elements)


@dataclass
class TensorResult:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    copied: bool
    rmse: float | None = None       # of the written tensor vs its source values (None: not measured)
    max_abs_error: float | None = None
    source_rms: float | None = None  # root mean square of the source values, to make rmse relative
    source_max_abs: float | None = None  # largest |source value|, to make max_abs_error relative
    seconds: float = 0.0
    note: str = ""

    @property
    def relative_rmse(self) -> float | None:
        if self.rmse is None or not self.source_rms:
            return None
        return self.rmse / self.source_rms

    @property
    def max_relative_error(self) -> float | None:
        """The largest |error| relative to the largest |source value| of the tensor."""
        if self.max_abs_error is None or not self.source_max_abs:
            return None
        return self.max_abs_error / self.source_max_abs


# ----- opening inputs ---------------------------------------------------------------------------

_MALFORMED = (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError, ZeroDivisionError,
              struct.error, RecursionError)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a GGUF file, a Hugging Face model folder or a Meta checkpoint folder.  Every reader
    names the file, field and value of what it refuses; anything a reader did not foresee in an
    untrusted file still becomes a ModelFormatError naming the input, never a traceback."""
    try:
        return _open_checkpoint(Path(path))
    except (QuantizeError, ModelFormatError, NotImplementedError, OSError, MemoryError):
        raise
    except _MALFORMED as e:
        raise ModelFormatError(f"{path}: cannot read this checkpoint ({type(e).__name__}: "
                               f"{str(e)[:200]})") from e


def _open_checkpoint(p: Path) -> Checkpoint:
    if not p.exists():
        raise QuantizeError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "params.json").exists() and any(p.glob("consolidated.*.pth")):
            from .meta import open_meta
            return open_meta(p)
        if (p / "config.json").exists():
            from .hf import open_hf
            return open_hf(p)
        raise QuantizeError(f"{p}: a model folder needs config.json (Hugging Face) or params.json + "
                            "consolidated.*.pth (Meta)")
    with open(regular_file(p), "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_source import open_gguf
        return open_gguf(str(p))
    if p.suffix == ".safetensors":
        raise QuantizeError(f"{p}: give the model folder (with config.json and the tokenizer), not "
                            "the .safetensors file alone")
    raise QuantizeError(f"{p}: not a GGUF file (magic {magic!r}) and not a model folder")


# ----- planning ---------------------------------------------------------------------------------

def make_plan(checkpoint: Checkpoint, target: GGMLType | FileType | str, *, output_type: GGMLType | None = None,
              embedding_type: GGMLType | None = None) -> Plan:
    """Every tensor's type, by llama-quantize's rules for the file type ``target`` (a FileType, a
    name such as "q4_k_m", or a tensor type meaning its plain file type)."""
    file_type = as_file_type(target)
    ordered = _llama_order(checkpoint.tensors)
    chooser = TypeChooser(file_type, ordered, model_shape(checkpoint.metadata), output_type=output_type,
                          embedding_type=embedding_type)
    planned = [PlannedTensor(tensor, chooser.choose(tensor)) for tensor in ordered]
    requantized = [p.tensor.name for p in planned
                   if not p.choice.copy and is_quantized(p.tensor.source_type)]
    return Plan(checkpoint, file_type, _output_metadata(checkpoint, file_type), planned, requantized)


def validate_plan(plan: Plan) -> None:
    """What the plan would write must load in the runtime: the metadata fits its GGUF types, and
    ``edgellama.config.ModelArgs`` (the runtime's own checks) accepts the metadata with the shapes of
    the tensors to be written, and the values of rope_freqs.weight.  Run before writing (and in
    dry runs), so that nothing invalid is ever written."""
    source = plan.checkpoint.path
    check_metadata(plan.metadata, source)
    shapes = {p.tensor.name: tuple(int(d) for d in p.tensor.shape) for p in plan.tensors}
    args = ModelArgs.from_metadata(plan.metadata, shapes, f"{source}: the metadata to be written")
    rope = next((p.tensor for p in plan.tensors if p.tensor.name == "rope_freqs.weight"), None)
    if rope is not None:
        args.check_rope_freqs(np.asarray(rope.read_rows(0, 1), dtype=np.float32).reshape(-1))
    check_tokenizer(plan.metadata, f"{source}: the metadata to be written")


def check_tokenizer(metadata: dict, source: str) -> None:
    """The runtime's tokenizer builds from the metadata (typed values, as write_gguf takes them):
    token ids within the vocabulary, merges of known tokens, no token twice, arrays of the
    vocabulary's length, a known tokenizer model.  (Building Llama 3's takes about 0.4 s.)"""
    from edgellama.gguf import _infer_value
    from edgellama.tokenizer import Tokenizer, TokenizerError

    plain = {}
    for key, value in metadata.items():
        vtype, v = _infer_value(key, value)
        plain[key] = v[1] if vtype == ValueType.ARRAY else v
    try:
        Tokenizer.from_gguf_metadata(plain, source)
    except TokenizerError as e:
        raise ModelFormatError(str(e)) from None


_INT_RANGES = {
    ValueType.UINT8: (0, (1 << 8) - 1), ValueType.INT8: (-(1 << 7), (1 << 7) - 1),
    ValueType.UINT16: (0, (1 << 16) - 1), ValueType.INT16: (-(1 << 15), (1 << 15) - 1),
    ValueType.UINT32: (0, (1 << 32) - 1), ValueType.INT32: (-(1 << 31), (1 << 31) - 1),
    ValueType.UINT64: (0, (1 << 64) - 1), ValueType.INT64: (-(1 << 63), (1 << 63) - 1),
}
_F32_MAX = float(np.finfo(np.float32).max)


def check_metadata(metadata: dict, source: str) -> None:
    """Every value fits the GGUF type it will be written as (integers in range, float32 scalars
    finite, strings valid Unicode), so that writing cannot fail half-way or store a different value."""
    def fail(key: str, what: str) -> ModelFormatError:
        return ModelFormatError(f"{source}: metadata {key}: {what}")

    def check_string(key: str, text: Any) -> None:
        if not isinstance(text, str):
            raise fail(key, f"expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise fail(key, f"not valid Unicode (a lone surrogate {text[e.start]!r} at character {e.start})") from None

    def check_scalar(key: str, vtype: ValueType, value: Any) -> None:
        if vtype in _INT_RANGES:
            low, high = _INT_RANGES[vtype]
            if not is_int(value) or not low <= int(value) <= high:
                raise fail(key, f"{str(value)[:40]} does not fit GGUF {vtype.name}")
        elif vtype in (ValueType.FLOAT32, ValueType.FLOAT64):
            if not is_number(value):
                raise fail(key, f"expected a number, got {type(value).__name__}")
            if not math.isfinite(float(value)) or (vtype == ValueType.FLOAT32 and abs(float(value)) > _F32_MAX):
                raise fail(key, f"{value!r} is not a finite {vtype.name} value")
        elif vtype == ValueType.BOOL:
            if not isinstance(value, (bool, np.bool_)):
                raise fail(key, f"expected true or false, got {type(value).__name__}")
        elif vtype == ValueType.STRING:
            check_string(key, value)

    for key, value in metadata.items():
        check_string("(key)", key)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ValueType):
            vtype, value = value
        elif isinstance(value, bool):
            vtype = ValueType.BOOL
        elif isinstance(value, str):
            vtype = ValueType.STRING
        elif isinstance(value, float):
            vtype = ValueType.FLOAT32
        else:
            continue  # the writer infers its own type (ints pick UINT32 or INT64)
        if vtype != ValueType.ARRAY:
            check_scalar(key, vtype, value)
            continue
        item_type, items = value
        if item_type == ValueType.STRING:
            for i, text in enumerate(items):
                check_string(f"{key}[{i}]", text)
        elif item_type in _INT_RANGES and not isinstance(items, np.ndarray):
            for i, item in enumerate(items):
                check_scalar(f"{key}[{i}]", item_type, item)


def _llama_order(tensors: list[SourceTensor]) -> list[SourceTensor]:
    """llama-quantize's order (non-layer tensors by name, then layer by layer, each by name), so
    requantized files match llama.cpp's byte for byte."""
    def key(t: SourceTensor):
        parts = t.name.split(".")
        layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() else -1
        return layer, t.name.encode()
    return sorted(tensors, key=key)


def _output_metadata(checkpoint: Checkpoint, file_type: FileType) -> dict:
    """The checkpoint's metadata; quantization_version and file_type moved to the end, as
    llama.cpp's gguf_set_val does."""
    metadata = {k: v for k, v in checkpoint.metadata.items()
                if k not in ("general.quantization_version", "general.file_type")}
    metadata["general.quantization_version"] = (ValueType.UINT32, GGML_QUANTIZATION_VERSION)
    metadata["general.file_type"] = (ValueType.UINT32, file_type.number)
    return metadata


# ----- writing ----------------------------------------------------------------------------------

def _row_chunks(tensor: SourceTensor) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, tensor.n_cols))
    for start in range(0, tensor.n_rows, step):
        yield start, min(tensor.n_rows, start + step)


def check_finite(values: np.ndarray, tensor: SourceTensor, row_offset: int) -> None:
    """Refuse NaN / Inf, naming the tensor and the first bad position."""
    counts = blocks.count_nonfinite(values)
    if counts.any():
        row = int(np.argmax(counts > 0))
        col = int(np.argmax(~np.isfinite(values[row])))
        raise QuantizeError(f"{tensor.origin or tensor.name}: {int(counts.sum())} NaN/Inf value(s), first at "
                            f"row {row + row_offset} column {col} ({values[row, col]}); refusing to quantize them")


def check_scales(raw: np.ndarray, tensor: SourceTensor, choice: Choice) -> None:
    """Refuse blocks whose half-precision scale overflowed (|values| beyond what the type can scale,
    e.g. above 65504 * 127 for Q8_0), as llama-quantize's data validation does."""
    bad = blocks.count_bad_scales(raw, choice.qtype)
    if bad:
        raise QuantizeError(f"{tensor.origin or tensor.name}: {bad} {_counted(choice.qtype)} overflow half precision in "
                            f"{type_name(choice.qtype)} (values too large for this type); refusing to write them")


def _counted(qtype: GGMLType) -> str:
    """What a count of bad entries of this type counts: float values, or quantized blocks' scales."""
    return "value(s)" if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) else "block scale(s)"


def check_copied(raw: np.ndarray, tensor: SourceTensor) -> None:
    """Refuse NaN / Inf in a tensor copied as stored (its values, or its blocks' scales), as a
    converted tensor's are refused."""
    qtype = tensor.source_type
    if qtype == GGMLType.F32:
        bad = blocks.count_exponent_all_ones(np.ascontiguousarray(raw).reshape(-1).view("<u4"), 0x7F800000)
    else:
        bad = blocks.count_bad_scales(np.ascontiguousarray(raw).reshape(tensor.n_rows, -1), qtype)
    if bad:
        raise QuantizeError(f"{tensor.origin or tensor.name}: {bad} NaN/Inf {_counted(qtype)} in the {type_name(qtype)} "
                            "data to be copied; refusing to write them")


def convert_tensor(tensor: SourceTensor, choice: Choice, measure: bool = True) -> tuple[np.ndarray, TensorResult]:
    """One tensor's output bytes (n_rows, row_bytes) and its error statistics."""
    start_time = time.perf_counter()
    result = TensorResult(tensor.name, type_name(choice.qtype), tensor.shape,
                          tensor_nbytes(choice.qtype, tensor.shape), choice.copy, note=choice.note)
    if choice.copy:
        data = np.asarray(tensor.raw())
        check_copied(data, tensor)
        if measure:
            result.rmse = result.max_abs_error = 0.0  # the stored values, unchanged
        result.seconds = time.perf_counter() - start_time
        return data, result
    out_row_bytes = result.nbytes // tensor.n_rows
    out = np.empty((tensor.n_rows, out_row_bytes), dtype=np.uint8)  # (n_rows, row_bytes) output
    sq_err, sq_src, max_err, max_src = 0.0, 0.0, 0.0, 0.0
    for start, stop in _row_chunks(tensor):
        try:
            values = np.ascontiguousarray(tensor.read_rows(start, stop), dtype=np.float32)  # (rows, n_cols)
        except ModelFormatError as e:
            raise ModelFormatError(f"{tensor.origin or tensor.name}: {e}") from None
        check_finite(values, tensor, start)
        blocks.quantize_rows(values, choice.qtype, out=out[start:stop])
        check_scales(out[start:stop], tensor, choice)
        if measure:
            chunk_err, chunk_src, chunk_max, chunk_max_src = blocks.error_stats(values, out[start:stop], choice.qtype)
            sq_err, sq_src = sq_err + chunk_err, sq_src + chunk_src
            max_err, max_src = max(max_err, chunk_max), max(max_src, chunk_max_src)
    if measure:
        n = max(1, tensor.n_elements)
        result.rmse, result.source_rms = math.sqrt(sq_err / n), math.sqrt(sq_src / n)
        result.max_abs_error, result.source_max_abs = max_err, max_src
    result.seconds = time.perf_counter() - start_time
    return out, result


def write_plan(plan: Plan, target_path: str | os.PathLike, *, measure: bool = True,
               on_tensor: Callable[[TensorResult], None] | None = None, replace: bool = True) -> list[TensorResult]:
    """Write the planned file atomically; returns one result per tensor, in file order."""
    validate_plan(plan)
    for p in plan.tensors:
        if not p.choice.copy and p.tensor.source_type not in blocks.READABLE_TYPES:
            raise QuantizeError(f"{p.tensor.origin or p.tensor.name}: {type_name(p.tensor.source_type)} tensors "
                                "cannot be decoded by this converter (only copied as they are)")
    specs = [TensorSpec(p.tensor.name, p.choice.qtype, p.tensor.shape) for p in plan.tensors]
    results: list[TensorResult] = []

    def data() -> Iterator[np.ndarray]:
        for p in plan.tensors:
            out, result = convert_tensor(p.tensor, p.choice, measure)
            results.append(result)
            if on_tensor is not None:
                on_tensor(result)
            yield out

    with _made_meanwhile(Path(target_path)):
        write_gguf(target_path, plan.metadata, specs, data(), replace=replace)
    return results


def _input_files(source: Path) -> set[tuple[int, int]]:
    """(device, inode) of the input file, or of every file directly inside the input folder."""
    paths = [source] if source.is_file() else [p for p in source.iterdir() if p.is_file()] if source.is_dir() else []
    identities = set()
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        identities.add((st.st_dev, st.st_ino))
    return identities


def check_target(source: str | os.PathLike, target: str | os.PathLike, force: bool, what: str = "output") -> None:
    """The rules for every file the command writes (the output, the --report file): never the input
    file, a file of the input folder or another name (hard link) of one, even with ``force``; an
    existing file only with ``force``; the folder must exist.  ``what`` names the file in messages."""
    src, dst = Path(source), Path(target)
    if dst.is_dir():
        raise QuantizeError(f"{dst}: {what} is a folder; give a file name")
    if dst.exists():
        if src.exists() and os.path.samefile(src, dst):
            raise QuantizeError(f"{dst}: {what} is the input file; refusing to overwrite it")
        if src.is_dir() and dst.resolve().is_relative_to(src.resolve()):
            raise QuantizeError(f"{dst}: {what} is a file of the input folder {src}; refusing to overwrite it")
        st = dst.stat()
        if (st.st_dev, st.st_ino) in _input_files(src):
            raise QuantizeError(f"{dst}: {what} is another name (hard link) of an input file; refusing to "
                                "overwrite it")
        if not force:
            raise QuantizeError(f"{dst}: {what} exists; use --force to overwrite it")
    if not dst.resolve().parent.is_dir():
        raise QuantizeError(f"{dst}: {what}'s folder {dst.resolve().parent} does not exist")


def check_paths(source: str | os.PathLike, target: str | os.PathLike, force: bool) -> None:
    """Never overwrite the input (not even a file inside an input folder); overwrite an existing
    output only with ``force``."""
    check_target(source, target, force, "output")


def stale_temp_files(target: str | os.PathLike) -> list[Path]:
    """Temp files an interrupted run (SIGKILL, power loss) left next to ``target``: ``.NAME.*.partial``,
    the names write_gguf and the report writer use."""
    path = Path(target)
    try:
        return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.partial"))
    except OSError:
        return []


def write_atomically(path: str | os.PathLike, data: bytes, replace: bool = True) -> None:
    """A small file (the report) as write_gguf writes its output: temp file in the same folder,
    fsync, usual permissions, rename (over an existing file only with ``replace``); nothing is left
    under either name if anything fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with _made_meanwhile(path):
            publish(tmp, path, replace)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def _made_meanwhile(path: Path):
    """A file that appeared at an output's name after check_target found none: the command's
    one-line error (it is not replaced without --force)."""
    try:
        yield
    except FileExistsError:
        raise QuantizeError(f"{path}: a file of this name was made while converting; not replaced (use --force "
                            "to overwrite it)") from None


def convert_file(source: str | os.PathLike, target: str | os.PathLike, qtype: str | GGMLType | FileType, *,
                 allow_requantize: bool = False, quiet: bool = False, force: bool = False,
                 output_type: str | GGMLType | None = None, embedding_type: str | GGMLType | None = None,
                 threads: int | None = None) -> list[TensorResult]:
    """Convert ``source`` (GGUF file or model folder) to a GGUF file of type ``qtype`` (a file type:
    "q4_k_m", "q8_0", ...) at ``target``."""
    target_type = as_file_type(qtype)
    check_paths(source, target, force)
    blocks.set_threads(threads)
    checkpoint = open_checkpoint(source)
    try:
        plan = make_plan(checkpoint, target_type, output_type=_as_type(output_type),
                         embedding_type=_as_type(embedding_type))
        check_requantize(plan, allow_requantize, quiet)
        return write_plan(plan, target, measure=not quiet)
    finally:
        checkpoint.close()


def check_requantize(plan: Plan, allow_requantize: bool, quiet: bool) -> None:
    if not plan.requantized:
        return
    kinds = sorted({type_name(p.tensor.source_type) for p in plan.tensors if p.tensor.name in plan.requantized})
    if not allow_requantize:
        raise QuantizeError(f"{plan.checkpoint.path}: {len(plan.requantized)} tensors are already quantized "
                            f"({', '.join(kinds)}); requantizing loses quality, pass --allow-requantize "
                            "to do it anyway")
    if not quiet:
        warnings.warn(f"{plan.checkpoint.path}: requantizing {len(plan.requantized)} tensors from "
                      f"{', '.join(kinds)}: quality drops compared with quantizing the original F16/F32 "
                      "weights", RequantizeWarning, stacklevel=3)


def _as_type(value: str | GGMLType | None) -> GGMLType | None:
    """A tensor type (--output-type / --embedding-type) by ggml name, or None."""
    if value is None or isinstance(value, GGMLType):
        return value
    return parse_tensor_type(value)


