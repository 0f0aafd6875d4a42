"""Make tests/fixtures/meta_tiny/: a tiny random Llama checkpoint in Meta's original layout.

    consolidated.00.pth   torch.save of the state dict (bfloat16, Meta's names, incl. rope.freqs)
    params.json           dim 32, 2 layers, 4 heads, 2 KV heads (GQA), FFN 64
    tokenizer.model       a small SentencePiece BPE model (bytes + letters + a few merges), written
                          here as protobuf by hand
    mp2/                  the same model split in two model-parallel parts, as Meta ships 13B+ models
    expected.json         per GGUF tensor name: shape and sha256 of the float32 values the converter
                          must produce (Meta layout needs no Q/K permutation)

Needs torch at creation time only (``pip install torch``); the converter never imports it.
Run once from the repo root:  python tools/make_meta_fixture.py   (output is committed, < 200 KB)

``write_torch_zip`` / ``torch_pickle`` write torch.save's zip format by hand, without torch (tests
use them to build checkpoints with unusual views: shared storages, strides, offsets).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quantize.meta import _SPLIT_COLUMNS, gguf_name  # noqa: E402  (the converter's Meta -> GGUF names)

OUT = REPO / "tests" / "fixtures" / "meta_tiny"
PARAMS = {"dim": 32, "multiple_of": 32, "ffn_dim_multiplier": 0.75, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
          "norm_eps": 1e-05, "vocab_size": -1, "rope_theta": 10000.0}
FFN_DIM = 64  # Meta's rule: multiple_of * ceil(int(ffn_dim_multiplier * int(2 * 4 * dim / 3)) / multiple_of)
MERGES = ["▁t", "he", "▁the", "in", "▁a", "er", "an", "▁s", "on", "re", "▁w", "at", "en", "ll", "▁o", "▁i",
          "ing", "▁and", "or", "is"]


# ----- a SentencePiece model written as protobuf ---------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are sign-extended to 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _message(number: int, body: bytes) -> bytes:
    return _field(number, 2, _varint(len(body)) + body)


def sentencepiece_model() -> tuple[bytes, list[str]]:
    """ModelProto bytes: <unk> <s> </s>, 256 byte pieces, "▁" and letters, then MERGES (BPE scores)."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    singles = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?'")
    normal = MERGES + singles
    pieces += [(text, -float(i), 1) for i, text in enumerate(normal)]
    body = b"".join(_message(1, _field(1, 2, _varint(len(t.encode())) + t.encode())
                             + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind)))
                    for t, score, kind in pieces)
    trainer = (_field(3, 0, _varint(2)) + _field(4, 0, _varint(len(pieces))) + _field(35, 0, _varint(1))
               + _field(40, 0, _varint(0)) + _field(41, 0, _varint(1)) + _field(42, 0, _varint(2))
               + _field(43, 0, _varint(-1)))
    normalizer = (_field(1, 2, _varint(8) + b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(0)))
    return body + _message(2, trainer) + _message(3, normalizer), [p[0] for p in pieces]


# ----- the weights -------------------------------------------------------------------------------

def meta_weights(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Meta's names and layout, rounded to bfloat16 values."""
    rng = np.random.default_rng(seed)
    dim, n_heads, n_kv = PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_kv_heads"]
    head_dim = dim // n_heads
    w = lambda *shape: rng.standard_normal(shape) / np.sqrt(shape[-1])
    weights = {"tok_embeddings.weight": w(vocab_size, dim), "norm.weight": 1 + 0.1 * rng.standard_normal(dim),
               "output.weight": w(vocab_size, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        weights.update({
            p + "attention.wq.weight": w(dim, dim), p + "attention.wk.weight": w(n_kv * head_dim, dim),
            p + "attention.wv.weight": w(n_kv * head_dim, dim), p + "attention.wo.weight": w(dim, dim),
            p + "feed_forward.w1.weight": w(FFN_DIM, dim), p + "feed_forward.w2.weight": w(dim, FFN_DIM),
            p + "feed_forward.w3.weight": w(FFN_DIM, dim),
            p + "attention_norm.weight": 1 + 0.1 * rng.standard_normal(dim),
            p + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(dim),
        })
    weights = {n: bf16_round(a.astype(np.float32)) for n, a in weights.items()}
    weights["rope.freqs"] = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    return weights


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values exactly representable in bfloat16 (round to nearest even)."""
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def split_axis(meta: str) -> int | None:
    """How Meta's model-parallel parts split a tensor: 1-D ones (norms, rope.freqs) are replicated,
    those the converter joins along columns (quantize.meta._SPLIT_COLUMNS) are split along axis 1,
    the others along rows."""
    name = gguf_name(meta)
    if name is None or name.endswith("norm.weight"):
        return None
    return 1 if name.endswith(_SPLIT_COLUMNS) else 0


def save(path: Path, weights: dict[str, np.ndarray]) -> None:
    import torch

    state = {}
    for name, a in weights.items():
        t = torch.from_numpy(np.ascontiguousarray(a))
        state[name] = t if name == "rope.freqs" else t.to(torch.bfloat16)
    torch.save(state, path)


# ----- torch.save's format, written by hand (no torch needed) ---------------------------------------

STORAGE_TYPES = {np.dtype("<f4"): "FloatStorage", np.dtype("<f2"): "HalfStorage",
                 np.dtype("<u2"): "BFloat16Storage", np.dtype("<f8"): "DoubleStorage"}


@dataclass(frozen=True)
class TorchView:
    """One pickled tensor: ``size`` items of storage ``storage`` from ``offset``, with ``stride``
    (None: contiguous), as torch._utils._rebuild_tensor_v2 receives them."""
    storage: str
    size: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    offset: int = 0


def contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(size[i + 1:], dtype=np.int64)) for i in range(len(size)))


def _op(value) -> bytes:
    """The opcodes of one value, without protocol header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def torch_pickle(views: dict[str, TorchView], storages: dict[str, tuple[str, int]],
                 state_dict_metadata: bool = False) -> bytes:
    """data.pkl of ``{name: tensor}`` as torch.save writes it (protocol 2, persistent storage ids).
    ``storages`` maps a key to (storage class name, number of items).  ``state_dict_metadata``:
    an OrderedDict carrying a ``_metadata`` attribute (set by BUILD), as ``model.state_dict()`` is."""
    new_dict = b"ccollections\nOrderedDict\n)R"
    out = [b"\x80\x02", new_dict if state_dict_metadata else b"}"]
    if views:
        out.append(b"(")
    for name, view in views.items():
        storage_class, numel = storages[view.storage]
        stride = view.stride if view.stride is not None else contiguous_stride(view.size)
        out += [_op(name), b"ctorch._utils\n_rebuild_tensor_v2\n(",
                b"(", _op("storage"), f"ctorch\n{storage_class}\n".encode(), _op(view.storage), _op("cpu"),
                _op(numel), b"tQ",                                        # persistent id -> storage
                _op(view.offset), _op(tuple(view.size)), _op(tuple(stride)), b"\x89",
                new_dict, b"tR"]                                          # rebuild(storage, offset, size, stride, False, {})
    if views:
        out.append(b"u")
    if state_dict_metadata:
        out.append(b"}" + _op("_metadata") + new_dict + _op("version") + _op(1) + b"ss" + b"b")
    out.append(b".")
    return b"".join(out)


def write_torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes], root: str = "archive") -> Path:
    """The zip container torch.save writes: <root>/data.pkl, <root>/data/<key>, all stored uncompressed."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", pickle_bytes)
        zf.writestr(f"{root}/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"{root}/data/{key}", data)
        zf.writestr(f"{root}/version", "3\n")
    return path


def save_by_hand(path: Path, tensors: dict[str, np.ndarray | TorchView], storages: dict[str, np.ndarray] | None = None,
                 state_dict_metadata: bool = False) -> Path:
    """torch.save without torch: each array gets its own contiguous storage (uint16 arrays are
    bfloat16 bits); a ``TorchView`` refers to one of ``storages`` (arrays keyed by storage key)."""
    storages = dict(storages or {})
    views: dict[str, TorchView] = {}
    for name, value in tensors.items():
        if isinstance(value, TorchView):
            views[name] = value
        else:
            key = f"t{len(storages)}"
            while key in storages:
                key += "_"
            storages[key] = np.ascontiguousarray(value)
            views[name] = TorchView(key, tuple(value.shape))
    kinds = {key: (STORAGE_TYPES[a.dtype.newbyteorder("<")], a.size) for key, a in storages.items()}
    data = torch_pickle(views, kinds, state_dict_metadata)
    return write_torch_zip(path, data, {key: a.astype(a.dtype.newbyteorder("<")).tobytes() for key, a in storages.items()})


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "mp2").mkdir(parents=True)
    model, tokens = sentencepiece_model()
    weights = meta_weights(len(tokens))
    params = json.dumps(PARAMS, indent=2)
    for folder in (OUT, OUT / "mp2"):
        (folder / "tokenizer.model").write_bytes(model)
        (folder / "params.json").write_text(params)
    save(OUT / "consolidated.00.pth", weights)
    for k in range(2):
        part = {}
        for name, a in weights.items():
            axis = split_axis(name)
            part[name] = a if axis is None else np.array_split(a, 2, axis=axis)[k]
        save(OUT / "mp2" / f"consolidated.{k:02d}.pth", part)
    expected = {gguf_name(n): {"shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                for n, a in weights.items() if n != "rope.freqs"}
    (OUT / "expected.json").write_text(json.dumps({"n_vocab": len(tokens), "tensors": expected}, indent=1))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
