"""What every checkpoint reader hands to the converter: GGUF metadata plus tensors read by row range.

A reader (GGUF, Hugging Face folder, Meta layout) produces a ``Checkpoint``: the output file's
metadata (typed, in order) and a list of ``SourceTensor`` already named and laid out the GGUF way
(llama.cpp's tensor names, Q/K rows permuted).  Tensors are read lazily, a range of rows at a time,
so converting never holds more than one tensor's output in memory.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgellama._validate import is_int
from edgellama.quants import GGMLType


class QuantizeError(ValueError):
    """A user-facing conversion error: bad input, bad option, refused output path."""


def map_file(path: str | os.PathLike) -> tuple[mmap.mmap, np.ndarray]:
    """A read-only map of a file and a uint8 array over it.  The array holds a buffer export, so
    ``unmap`` cannot pull the pages from under a view still in use (``np.memmap`` would let it)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, np.frombuffer(mm, dtype=np.uint8)


def unmap(mm: mmap.mmap | None) -> None:
    """Close a map whose own array the caller has dropped; while views of it live, leave it to them
    (it is freed with the last one)."""
    if mm is not None:
        try:
            mm.close()
        except BufferError:
            pass


def show(value: Any) -> str:
    """A value from an input file for an error message: short, and never an exception of its own
    (Python refuses to print integers of more than 4300 digits)."""
    if is_int(value) and int(value).bit_length() > 64:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class SourceTensor:
    name: str                    # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]       # numpy order: (..., n_rows, n_cols)
    source_type: GGMLType        # how the source stores it (F32, F16, BF16, Q8_0, ...)
    read_rows: Callable[[int, int], np.ndarray]  # (start, stop) -> float32 (stop - start, n_cols)
    raw: Callable[[], np.ndarray] | None = None  # stored GGUF bytes, when they can be copied as-is
    origin: str = ""             # where it came from, for messages (file and source tensor name)

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return self.n_rows * self.n_cols


@dataclass
class Checkpoint:
    path: str
    kind: str                                  # "gguf", "hf" or "meta"
    metadata: dict[str, Any]                   # GGUF metadata, values as write_gguf takes them
    tensors: list[SourceTensor]
    source_bytes: int = 0                      # size of the weights on disk, for the summary
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()
