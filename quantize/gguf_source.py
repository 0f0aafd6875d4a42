"""A GGUF file as a conversion source: metadata copied with its own value types, tensors as stored."""

from __future__ import annotations

from edgellama.gguf import GGUFFile
from edgellama.quants import GGMLType, type_name

from .blocks import READABLE_TYPES, dequantize_rows
from .source import Checkpoint, SourceTensor


def open_gguf(path: str) -> Checkpoint:
    gguf = GGUFFile(path)  # validates the whole header; raises ModelFormatError naming the problem
    tensors = [_source_tensor(gguf, info) for info in gguf.tensors.values()]
    return Checkpoint(path=str(path), kind="gguf", metadata=gguf.typed_metadata(), tensors=tensors,
                      source_bytes=sum(info.nbytes for info in gguf.tensors.values()),
                      closers=[gguf.close])


def _source_tensor(gguf: GGUFFile, info) -> SourceTensor:
    def read_rows(start: int, stop: int):
        if info.qtype not in READABLE_TYPES:
            raise NotImplementedError(f"{gguf.path}: tensor {info.name!r} is {type_name(info.qtype)}, "
                                      "which this converter cannot decode")
        return dequantize_rows(gguf.rows(info.name)[start:stop], info.qtype, info.shape[-1])

    return SourceTensor(name=info.name, shape=info.shape, source_type=GGMLType(info.qtype),
                        read_rows=read_rows, raw=lambda: gguf.raw(info.name),
                        origin=f"{gguf.path}: {info.name}")
