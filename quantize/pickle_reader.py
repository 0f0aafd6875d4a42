"""Read PyTorch zip-format checkpoints (``torch.save``) without torch and without running code.

A pickle is a program: ``pickle.load`` on a downloaded ``.pth`` can execute anything (a
``__reduce__`` payload calling ``os.system``).  This reader runs the pickle with an unpickler whose
``find_class`` knows only the handful of names a state dict of tensors needs, each mapped to our
own harmless stand-in:

    torch._utils._rebuild_tensor_v2 / _rebuild_parameter   -> a read-only numpy view of a storage
    torch.<Float|Half|BFloat16|...>Storage                  -> a dtype marker
    collections.OrderedDict                                 -> dict

Any other global (``os.system``, ``builtins.eval``, ``numpy`` internals, ...) raises
``ModelFormatError`` before it is ever looked up.  Storages are the zip members ``<root>/data/<key>``,
memory-mapped (torch stores them uncompressed) and bounds-checked against the declared sizes.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.gguf import ModelFormatError

MAX_PICKLE_BYTES = 64 * 1024 * 1024
BF16 = np.dtype("<u2")  # bfloat16 items are kept as their uint16 bits

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"), "BFloat16Storage": BF16,
    "DoubleStorage": np.dtype("<f8"), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("u1"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str           # e.g. "BFloat16Storage"
    dtype: np.dtype


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the checkpoint: its items as a read-only numpy view (bfloat16 as uint16 bits)."""
    items: np.ndarray
    bf16: bool

    def to_float32(self) -> np.ndarray:
        if self.bf16:
            return (self.items.astype(np.uint32) << 16).view(np.float32)
        return self.items.astype(np.float32)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: "_Archive"):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise ModelFormatError(f"{self.archive.path}: the pickle wants global {module}.{name}, which a tensor "
                               "checkpoint never needs; refusing to load it (pickles can run code)")

    def persistent_load(self, pid: Any) -> Any:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or type(pid[4]) is not int or pid[4] < 0):
            raise ModelFormatError(f"{self.archive.path}: unexpected persistent id {pid!r:.120}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self.archive.storage(key, storage_type, numel)
        return self.storages[key], storage_type


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[1], _StorageType)):
        raise ModelFormatError("_rebuild_tensor_v2 called without a storage")
    items, storage_type = storage
    if (type(storage_offset) is not int or storage_offset < 0 or not isinstance(size, tuple)
            or not isinstance(stride, tuple) or len(size) != len(stride) or len(size) > 8
            or not all(type(d) is int and d >= 0 for d in size + stride)):
        raise ModelFormatError(f"tensor with bad geometry: offset {storage_offset!r}, size {size!r:.80}, "
                               f"stride {stride!r:.80}")
    bf16 = storage_type.name == "BFloat16Storage"
    if 0 in size:
        return StoredTensor(np.zeros(size, dtype=items.dtype), bf16)
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= items.shape[0]:
        raise ModelFormatError(f"tensor of size {list(size)} at offset {storage_offset} reaches item {last} of a "
                               f"{items.shape[0]}-item storage")
    itemsize = items.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(items[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return StoredTensor(view, bf16)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, StoredTensor):
        raise ModelFormatError("_rebuild_parameter called without a tensor")
    return data


def _ordered_dict(*args):
    if args:
        raise ModelFormatError("OrderedDict with constructor arguments in a checkpoint")
    return {}


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Archive:
    """The zip container of a torch.save file: data.pkl plus one member per storage."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelFormatError(f"{path}: not a zip-format PyTorch checkpoint ({e}); old-style (pre-1.6) "
                                   "pickles are not read") from None
        names = self.zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or \
                  [n for n in names if n == "data.pkl"]
        if len(pickles) != 1:
            raise ModelFormatError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pickles)}")
        self.pickle_name = pickles[0]
        self.root = pickles[0][:-len("data.pkl")]
        self._map = None

    def pickle_bytes(self) -> bytes:
        info = self.zip.getinfo(self.pickle_name)
        if info.file_size > MAX_PICKLE_BYTES:
            raise ModelFormatError(f"{self.path}: data.pkl of {info.file_size} bytes is too large")
        return self.zip.read(info)

    def storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        name = f"{self.root}data/{key}"
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise ModelFormatError(f"{self.path}: storage {key!r} is missing from the archive") from None
        nbytes = numel * storage_type.dtype.itemsize
        if info.file_size < nbytes:
            raise ModelFormatError(f"{self.path}: storage {key!r} declares {numel} items ({nbytes} bytes) but "
                                   f"holds {info.file_size} bytes")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFormatError(f"{self.path}: storage {key!r} is compressed; torch.save never does that")
        start = self._data_start(info)
        if start + nbytes > os.path.getsize(self.path):
            raise ModelFormatError(f"{self.path}: storage {key!r} runs past the end of the file "
                                   "(file is truncated or incomplete)")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[start:start + nbytes].view(storage_type.dtype)

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Offset of a stored member's bytes: after its local header (30 bytes + name + extra)."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ModelFormatError(f"{self.path}: bad zip local header for {info.filename!r}")
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
        return info.header_offset + 30 + name_len + extra_len

    def close(self) -> None:
        self.zip.close()
        mm = getattr(self._map, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass


class TorchCheckpoint:
    """A validated torch.save file; ``tensors`` maps names to ``StoredTensor``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._archive = _Archive(self.path)
        try:
            state = _RestrictedUnpickler(self._archive.pickle_bytes(), self._archive).load()
        except ModelFormatError:
            self._archive.close()
            raise
        except Exception as e:  # any other failure inside the pickle machine: malformed, not hostile
            self._archive.close()
            raise ModelFormatError(f"{self.path}: cannot read the pickled state dict: "
                                   f"{type(e).__name__}: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and len(state) <= 4:
            state = state["model"]  # some trainers wrap the state dict
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, StoredTensor)
                                                  for k, v in state.items()):
            self._archive.close()
            raise ModelFormatError(f"{self.path}: expected a dict of tensor names to tensors")
        self.tensors: dict[str, StoredTensor] = state

    def close(self) -> None:
        self._archive.close()
