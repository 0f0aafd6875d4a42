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

The pickle machine itself is bounded (pure-Python unpickler, every opcode counted): a pickle is at
most MAX_PICKLE_BYTES, stored uncompressed as torch.save writes it, runs at most MAX_PICKLE_OPS
opcodes, holds at most MAX_PICKLE_STACK items on its stacks and MAX_PICKLE_MEMO memoized objects
(``DUP``, ``MARK``, ``MEMOIZE``, empty containers: opcodes that grow memory faster than they consume
bytes), and opcodes no tensor checkpoint uses (sets, bytearrays, out-of-band buffers, object
construction through ``__new__``, extension codes, text persistent ids) are refused.  ``BUILD`` may
only set a state dict's ``_metadata``.  Tensor views must stay inside their storage and may not
repeat its items (stride 0, overlapping strides), and two tensors may not share storage items
unless they are the very same view (tied weights, at most two names per view): the tensors of a
checkpoint never hold more elements than its storages hold items.
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

from .files import regular_file
from .safetensors import narrow_float64
from .source import map_file, unmap

MAX_PICKLE_BYTES = 64 * 1024 * 1024
# torch.save spends about 32 opcodes and 8 memo entries per tensor, and its stack holds a batch of
# 1000 dict items: these caps admit about 32,000 tensors per file (the largest real checkpoints have
# about 1,100 per file) and keep the pickle machine's own memory to a few tens of MB.
MAX_PICKLE_OPS = 1 << 20     # opcodes run
MAX_PICKLE_STACK = 1 << 18   # items on the stack and the mark stack together
MAX_PICKLE_MEMO = 1 << 18    # memoized objects
MAX_VIEWS_PER_TENSOR = 2     # names one storage view may have (an embedding tied to the output)
# The zip's central directory, which zipfile reads whole and turns into one object per member
# (about 0.5 KB each): a checkpoint has one member per storage (Llama 3 405B's shards: ~1,200 of
# about 100 bytes), so 4 MiB and 65,536 members are far above any real one.
MAX_ZIP_DIRECTORY_BYTES = 4 * 1024 * 1024
MAX_ZIP_MEMBERS = 1 << 16
BF16 = np.dtype("<u2")  # bfloat16 items are kept as their uint16 bits

# Opcodes a state dict of tensors never contains; each can build objects or buffers the reader has
# no use for (and BYTEARRAY8 allocates its declared size before reading it).
_REFUSED_OPCODES = ("EMPTY_SET", "ADDITEMS", "FROZENSET", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER",
                    "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "EXT1", "EXT2", "EXT4", "PERSID")

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
class _Storage:
    """A storage as persistent_load hands it to the pickle: only our code can make one."""
    key: str
    type: _StorageType
    items: np.ndarray   # (numel,) read-only view of the zip member


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the checkpoint: its items as a read-only numpy view (bfloat16 as uint16 bits),
    and where they come from (storage key, first item, strides in items) for the sharing checks."""
    items: np.ndarray
    bf16: bool
    storage: str = ""
    offset: int = 0
    stride: tuple[int, ...] = ()

    def to_float32(self) -> np.ndarray:
        if self.bf16:
            return (self.items.astype(np.uint32) << 16).view(np.float32)
        if self.items.dtype == np.float64:
            return narrow_float64(self.items)
        return self.items.astype(np.float32)

    def __setstate__(self, state):
        raise ModelFormatError("the pickle sets the state of a StoredTensor (BUILD); a tensor checkpoint "
                               "never does that")

    @property
    def span(self) -> int:
        """Items from the first to one past the last the view reaches (0 for an empty tensor)."""
        if self.items.size == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.items.shape, self.stride))

    def repeats_items(self) -> bool:
        """Whether two elements of the view are the same storage item (stride 0, overlapping strides):
        with the dimensions sorted by stride, each stride must step over everything inside it."""
        inner = 1
        for stride, size in sorted((st, d) for d, st in zip(self.items.shape, self.stride) if d > 1):
            if stride < inner:
                return True
            inner += (size - 1) * stride
        return False


class _StateDict(dict):
    """collections.OrderedDict's stand-in; ``model.state_dict()`` pickles its ``_metadata`` attribute
    through BUILD, which is accepted and dropped."""

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise ModelFormatError(f"the pickle sets the state of a dict (BUILD) to {state!r:.80}; a state "
                                   "dict only carries _metadata")


class _OpcodeGuard:
    """The unpickler's opcode table, counting work and checking the caps before every opcode."""

    def __init__(self, unpickler: "_RestrictedUnpickler", table: dict):
        self.unpickler, self.table, self.ops = unpickler, table, 0

    def __getitem__(self, code: int):
        u = self.unpickler
        self.ops += 1
        if self.ops > MAX_PICKLE_OPS:
            raise u.fail(f"the pickle runs more than {MAX_PICKLE_OPS} operations (limit MAX_PICKLE_OPS; "
                         "torch.save spends about 32 per tensor)")
        if len(u.stack) + u.held > MAX_PICKLE_STACK:
            raise u.fail(f"the pickle's stack grows beyond {MAX_PICKLE_STACK} items (limit MAX_PICKLE_STACK)")
        if len(u.memo) > MAX_PICKLE_MEMO:
            raise u.fail(f"the pickle memoizes more than {MAX_PICKLE_MEMO} objects (limit MAX_PICKLE_MEMO)")
        try:
            return self.table[code]
        except KeyError:
            raise u.fail(f"cannot read the pickled state dict: unknown opcode {code:#04x}") from None


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, so that every opcode passes _OpcodeGuard) with
    globals, persistent ids and BUILD restricted to what a tensor state dict needs."""

    def __init__(self, data: bytes, archive: "_Archive"):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, _Storage] = {}
        self.held = 0  # items parked on the mark stack (each MARK counts as one)
        table = dict(pickle._Unpickler.dispatch)
        for name in _REFUSED_OPCODES:
            table[getattr(pickle, name)[0]] = _refused(name)
        table[pickle.MARK[0]] = _RestrictedUnpickler.load_mark
        table[pickle.BUILD[0]] = _RestrictedUnpickler.load_build
        self.dispatch = _OpcodeGuard(self, table)

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.archive.path}: {what}")

    def load_mark(self):
        self.held += len(self.stack) + 1
        super().load_mark()

    def pop_mark(self):
        items = super().pop_mark()
        self.held -= len(self.stack) + 1
        return items

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_StateDict, StoredTensor)):
            raise self.fail(f"the pickle sets the state of a {type(target).__name__} (BUILD); a tensor "
                            "checkpoint only does that for a state dict's _metadata")
        try:
            target.__setstate__(state)
        except ModelFormatError as e:
            raise self.fail(str(e)) from None

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
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _Storage(key, storage_type, self.archive.storage(key, storage_type, numel))
        elif known.type != storage_type or known.items.shape[0] != numel:
            raise self.fail(f"storage {key!r:.40} is read as {known.items.shape[0]} items of {known.type.name} "
                            f"and as {numel} items of {storage_type.name}")
        return known


def _refused(name: str):
    def refuse(unpickler: _RestrictedUnpickler):
        raise unpickler.fail(f"the pickle uses opcode {name}, which a tensor checkpoint never contains; "
                             "refusing it")
    return refuse


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise ModelFormatError("_rebuild_tensor_v2 called without a storage")
    items = storage.items
    if (type(storage_offset) is not int or storage_offset < 0 or not isinstance(size, tuple)
            or not isinstance(stride, tuple) or len(size) != len(stride) or len(size) > 8
            or not all(type(d) is int and 0 <= d < 1 << 62 for d in size + stride)):
        raise ModelFormatError(f"tensor with bad geometry: offset {storage_offset!r:.40}, size {size!r:.80}, "
                               f"stride {stride!r:.80}")
    bf16 = storage.type.name == "BFloat16Storage"
    if 0 in size:
        return StoredTensor(np.empty(size, dtype=items.dtype), bf16, storage.key, 0, stride)
    # the extent: one past the last item the view reaches (stride 0 included)
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= items.shape[0]:
        raise ModelFormatError(f"tensor of size {list(size)} at offset {storage_offset} reaches item {last} of a "
                               f"{items.shape[0]}-item storage")
    itemsize = items.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(items[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return StoredTensor(view, bf16, storage.key, storage_offset, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, StoredTensor):
        raise ModelFormatError("_rebuild_parameter called without a tensor")
    return data


def _ordered_dict(*args):
    if args:
        raise ModelFormatError("OrderedDict with constructor arguments in a checkpoint")
    return _StateDict()


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


def _check_zip_directory(path: Path) -> None:
    """Refuse a zip whose central directory (size and member count, from its end records, zip64's
    included) is beyond MAX_ZIP_DIRECTORY_BYTES / MAX_ZIP_MEMBERS, before zipfile reads it.  A file
    with no end record is left to zipfile, which says it is not a zip."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            tail_at = max(0, size - (22 + 0xFFFF))  # the end record, then at most a 64 KiB comment
            f.seek(tail_at)
            tail = f.read(22 + 0xFFFF)
            end = tail.rfind(b"PK\x05\x06")
            if end < 0 or len(tail) - end < 22:
                return
            members = int.from_bytes(tail[end + 10:end + 12], "little")
            directory = int.from_bytes(tail[end + 12:end + 16], "little")
            locator = end - 20
            if (members == 0xFFFF or directory == 0xFFFFFFFF) and locator >= 0 \
                    and tail[locator:locator + 4] == b"PK\x06\x07":
                record_at = int.from_bytes(tail[locator + 8:locator + 16], "little")
                f.seek(record_at)
                record = f.read(56)
                if len(record) == 56 and record[:4] == b"PK\x06\x06":
                    members = int.from_bytes(record[32:40], "little")
                    directory = int.from_bytes(record[40:48], "little")
    except OSError:
        return  # zipfile reports it
    if directory > MAX_ZIP_DIRECTORY_BYTES or members > MAX_ZIP_MEMBERS:
        raise ModelFormatError(f"{path}: the zip's central directory declares {members} members in {directory} "
                               f"bytes, beyond the {MAX_ZIP_MEMBERS} members and {MAX_ZIP_DIRECTORY_BYTES} bytes "
                               "accepted (MAX_ZIP_MEMBERS, MAX_ZIP_DIRECTORY_BYTES); a checkpoint has one member "
                               "per tensor")


class _Archive:
    """The zip container of a torch.save file: data.pkl plus one member per storage."""

    def __init__(self, path: Path):
        self.path = path
        _check_zip_directory(path)
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            try:
                with open(path, "rb") as f:
                    zip_start = f.read(4) == b"PK\x03\x04"
                    f.seek(max(0, os.fstat(f.fileno()).st_size - (22 + 0xFFFF)))
                    tail = f.read()
                    end = tail.rfind(b"PK\x05\x06")  # (the end record: 22 bytes and a comment)
                    zip_start = zip_start and (end < 0 or len(tail) - end < 22)
            except OSError:
                zip_start = False
            if zip_start:  # a zip's first member, and no whole directory record at the end: cut short
                raise ModelFormatError(f"{path}: file is truncated or incomplete (a zip archive without its "
                                       f"central directory: {e})") from None
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
        self._mmap = None
        self._ranges: list[tuple[int, int, str]] = []  # (start, end, member) of every storage read

    def pickle_bytes(self) -> bytes:
        info = self.zip.getinfo(self.pickle_name)
        if info.file_size > MAX_PICKLE_BYTES:
            raise ModelFormatError(f"{self.path}: data.pkl of {info.file_size} bytes is too large (limit "
                                   f"MAX_PICKLE_BYTES = {MAX_PICKLE_BYTES})")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFormatError(f"{self.path}: data.pkl is compressed; torch.save never does that")
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
        self._ranges.append((start, start + nbytes, name))
        if self._map is None:
            self._mmap, self._map = map_file(self.path)
        return self._map[start:start + nbytes].view(storage_type.dtype)

    def check_disjoint(self) -> None:
        """Each storage read must have bytes of its own (crafted central directories can point two
        members at the same bytes: the output would then repeat the input)."""
        previous_end, previous = 0, ""
        for start, end, name in sorted(self._ranges):
            if start < previous_end:
                raise ModelFormatError(f"{self.path}: zip member {name!r} overlaps the bytes of {previous!r}; "
                                       "each storage must have bytes of its own")
            if end > previous_end:
                previous_end, previous = end, name

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Offset of a stored member's bytes: after its local header (30 bytes + name + extra)."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ModelFormatError(f"{self.path}: bad zip local header for {info.filename!r}")
            name_len = int.from_bytes(header[26:28], "little")
            extra_len = int.from_bytes(header[28:30], "little")
            local_name = f.read(name_len)
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise ModelFormatError(f"{self.path}: zip member {info.filename!r} points at the local header of "
                                   f"{local_name.decode('utf-8', 'replace')!r}")
        return info.header_offset + 30 + name_len + extra_len

    def close(self) -> None:
        self.zip.close()
        self._map = None
        unmap(self._mmap)


class TorchCheckpoint:
    """A validated torch.save file; ``tensors`` maps names to ``StoredTensor``."""

    def __init__(self, path: str | os.PathLike):
        self.path = regular_file(Path(path))
        self._archive = _Archive(self.path)
        try:
            self.tensors: dict[str, StoredTensor] = self._load()
        except BaseException:
            self._archive.close()
            raise

    def _load(self) -> dict[str, StoredTensor]:
        try:
            state = _RestrictedUnpickler(self._archive.pickle_bytes(), self._archive).load()
        except ModelFormatError as e:
            if str(e).startswith(f"{self.path}:"):
                raise
            raise ModelFormatError(f"{self.path}: {e}") from None
        except Exception as e:  # any other failure inside the pickle machine: malformed, not hostile
            raise ModelFormatError(f"{self.path}: cannot read the pickled state dict: "
                                   f"{type(e).__name__}: {str(e)[:200]}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and len(state) <= 4:
            state = state["model"]  # some trainers wrap the state dict
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, StoredTensor)
                                                  for k, v in state.items()):
            raise ModelFormatError(f"{self.path}: expected a dict of tensor names to tensors")
        self._archive.check_disjoint()
        self._check_views(state)
        return dict(state)

    def _check_views(self, state: dict[str, StoredTensor]) -> None:
        """No tensor holds more elements than the storage items it covers: views may not repeat
        items, and two tensors share items only as the same view under at most two names."""
        views: dict[tuple, list[str]] = {}
        for name, t in state.items():
            if t.repeats_items():
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r:.80} of size {list(t.items.shape)} with stride {list(t.stride)} "
                    f"repeats storage items (a stride-0 or overlapping view): its {t.items.size} elements would be "
                    f"made from at most {t.span} items; refusing views larger than their storage")
            if t.items.size:
                views.setdefault((t.storage, t.offset, t.items.shape, t.stride), []).append(name)
        by_storage: dict[str, list[tuple[int, int, list[str]]]] = {}
        for (storage, offset, _shape, _stride), names in views.items():
            if len(names) > MAX_VIEWS_PER_TENSOR:
                raise ModelFormatError(f"{self.path}: {len(names)} tensors share one view of storage "
                                       f"{storage!r:.40} ({', '.join(names[:4])}...); only tied weights may, two at a time")
            t = state[names[0]]
            by_storage.setdefault(storage, []).append((offset, offset + t.span, names))
        for storage, spans in by_storage.items():
            spans.sort(key=lambda span: span[:2])
            for (_, end, names), (start, _, next_names) in zip(spans, spans[1:]):
                if start < end:
                    raise ModelFormatError(f"{self.path}: tensors {names[0]!r:.80} and {next_names[0]!r:.80} overlap "
                                           f"in storage {storage!r:.40}; tensors may not share storage items "
                                           "(except tied weights that are the very same view)")

    def close(self) -> None:
        self._archive.close()
