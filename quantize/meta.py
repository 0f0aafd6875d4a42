"""Meta's original Llama layout as a conversion source: params.json + consolidated.*.pth + tokenizer.model.

The ``.pth`` files are read with the restricted unpickler (``pickle_reader``): no torch, no code
execution.  Meta's attention weights already use the interleaved-pair RoPE layout GGUF wants, so
unlike Hugging Face checkpoints they are not permuted.  Model-parallel checkpoints (several
``consolidated.NN.pth``) are joined the way Meta's code split them: column-parallel weights (wq,
wk, wv, w1, w3, output) along rows, row-parallel ones (wo, w2) and the embedding along columns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.gguf import ModelFormatError
from edgellama.quants import GGMLType

from .hf import (MAX_CONTEXT_LENGTH, ConfigValues, LlamaParams, RopeScaling, _expected_shapes, check_counts,
                 layer_count, llama3_rope_factors, llama_metadata)
from .files import distinct_files, folder_file
from .pickle_reader import StoredTensor, TorchCheckpoint
from .source import Checkpoint, QuantizeError, SourceTensor, show
from .vocab import read_json, spm_vocab

_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "output.weight": "output.weight"}
_SPLIT_COLUMNS = ("token_embd.weight", "attn_output.weight", "ffn_down.weight")  # joined along axis 1
_LAYER_RE = re.compile(r"^layers\.(0|[1-9][0-9]{0,8})\.(.+)$")  # plain numbers below 10^9
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_META_KEYS = {"n_layers": "n_layers", "vocab_size": "vocab_size", "dim": "dim", "n_heads": "n_heads",
              "n_kv_heads": "n_kv_heads", "head_dim": "head_dim", "ffn_dim": "the FFN width"}


def gguf_name(meta_name: str) -> str | None:
    if meta_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[meta_name]
    if meta_name == "rope.freqs":
        return None  # Llama 1/2 checkpoints carry the plain RoPE frequencies; llama.cpp drops them
    m = _LAYER_RE.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise QuantizeError(f"tensor {meta_name[:120]!r} is not part of a Meta Llama checkpoint (cannot map it to GGUF)")


def _params(folder: Path, embed_rows: int, ffn_dim: int) -> tuple[dict, LlamaParams]:
    """params.json, typed and range-checked; the vocabulary and FFN width come from the tensors."""
    path = folder / "params.json"
    params = read_json(path, "params.json")
    if not isinstance(params, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    values = ConfigValues(path, params)
    dim, n_heads = values.get_int("dim"), values.get_int("n_heads")
    n_kv_heads = values.get_int("n_kv_heads", n_heads)
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ModelFormatError(f"{path}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not divide "
                               "into whole heads of even size")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is not None and vocab_size != -1 and (type(vocab_size) is not int or vocab_size != embed_rows):
        raise ModelFormatError(f"{path}: vocab_size {show(vocab_size)} but tok_embeddings.weight has {embed_rows} rows")
    norm_eps, rope_theta = values.get_float("norm_eps", 1e-5, below=1.0), values.get_float("rope_theta", 10000.0)
    scaled = params.get("use_scaled_rope", False) is True
    # Meta's params.json has no context length: llama.cpp's legacy converter guesses it the same way
    guess = 131072 if scaled else 8192 if rope_theta >= 500000 else 4096 if norm_eps == 1e-5 else 2048
    context = values.get_int("max_seq_len", guess, maximum=MAX_CONTEXT_LENGTH, limit_name="MAX_CONTEXT_LENGTH")
    config: dict[str, Any] = {"_name_or_path": folder.resolve().name}
    return config, LlamaParams(
        n_layers=values.get_int("n_layers"), dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads, vocab_size=embed_rows, context_length=context, norm_eps=norm_eps,
        rope_theta=rope_theta, tied_embeddings=False, head_dim_given=False,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192.0) if scaled else None)


def open_meta(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    paths = [folder_file(path) for path in sorted(folder.glob("consolidated.*.pth"))]
    distinct_files(paths)
    parts: list[TorchCheckpoint] = []
    try:
        for path in paths:
            parts.append(TorchCheckpoint(path))
        return _checkpoint(folder, parts)
    except BaseException:
        for part in parts:
            part.close()
        raise


def _checkpoint(folder: Path, parts: list[TorchCheckpoint]) -> Checkpoint:
    names = list(parts[0].tensors)
    for part in parts[1:]:
        if set(part.tensors) != set(names):
            raise ModelFormatError(f"{part.path}: holds different tensor names than {parts[0].path}")
    pieces: dict[str, list[StoredTensor]] = {}
    for name in names:
        try:
            gguf = gguf_name(name)
        except QuantizeError as e:
            raise QuantizeError(f"{parts[0].path}: {e}") from None
        if gguf is not None:
            pieces[gguf] = [part.tensors[name] for part in parts]
    for required in ("token_embd.weight", "blk.0.ffn_gate.weight"):
        if required not in pieces:
            raise ModelFormatError(f"{parts[0].path}: no {required} tensor")
    shapes = {name: _joined_shape(name, p, parts) for name, p in pieces.items()}
    config, params = _params(folder, shapes["token_embd.weight"][0], shapes["blk.0.ffn_gate.weight"][0])
    meta_names = {gguf: meta for meta in names if (gguf := gguf_name(meta)) is not None}
    meta_names["layer"] = "layers.{}."
    check_counts(folder / "params.json", params, layer_count(list(shapes), _GGUF_LAYER_RE), shapes.get,
                 meta_names, _META_KEYS)
    expected = _expected_shapes(params)
    for name, shape in shapes.items():
        if expected.get(name) != shape:
            raise ModelFormatError(f"{parts[0].path}: tensor {name!r} has shape {list(shape)}, params.json "
                                   f"implies {list(expected[name]) if name in expected else 'no such tensor'}")
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise ModelFormatError(f"{parts[0].path}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    tensors = [_source_tensor(name, pieces[name], shapes[name], parts[0].path) for name in shapes]
    factors = llama3_rope_factors(config, params)
    if factors is not None:
        tensors.append(SourceTensor("rope_freqs.weight", factors.shape, GGMLType.F32,
                                    lambda start, stop: factors.reshape(1, -1), origin="params.json use_scaled_rope"))
    metadata = llama_metadata(folder, config, params)
    metadata.update(_vocab(folder, params.vocab_size))
    return Checkpoint(path=str(folder), kind="meta", metadata=metadata, tensors=tensors,
                      source_bytes=sum(p.path.stat().st_size for p in parts),
                      closers=[p.close for p in parts])


def _joined_shape(name: str, pieces: list[StoredTensor], parts: list[TorchCheckpoint]) -> tuple[int, ...]:
    shapes = [p.items.shape for p in pieces]
    if len(pieces) == 1 or len(shapes[0]) == 1:
        if any(s != shapes[0] for s in shapes):
            raise ModelFormatError(f"{parts[0].path}: replicated tensor {name!r} differs in shape across parts")
        return tuple(shapes[0])
    axis = 1 if name.endswith(_SPLIT_COLUMNS) else 0
    other = 1 - axis
    if any(len(s) != 2 or s[other] != shapes[0][other] for s in shapes):
        raise ModelFormatError(f"{parts[0].path}: the parts of {name!r} have shapes {shapes} that do not join")
    joined = list(shapes[0])
    joined[axis] = sum(s[axis] for s in shapes)
    return tuple(joined)


def _source_tensor(name: str, pieces: list[StoredTensor], shape: tuple[int, ...], path: Path) -> SourceTensor:
    if not (pieces[0].bf16 or pieces[0].items.dtype.kind == "f"):
        raise ModelFormatError(f"{path}: tensor {name!r} has dtype {pieces[0].items.dtype}, expected floats")
    split_columns = len(pieces) > 1 and name.endswith(_SPLIT_COLUMNS)
    bounds = np.cumsum([0] + [p.items.shape[0] for p in pieces]) if len(shape) > 1 else None

    def read_rows(start: int, stop: int) -> np.ndarray:
        if len(shape) == 1:
            return pieces[0].to_float32().reshape(1, -1)
        if len(pieces) == 1:
            return _rows(pieces[0], start, stop)
        if split_columns:
            return np.hstack([_rows(p, start, stop) for p in pieces])
        blocks = []
        for p, lo, hi in zip(pieces, bounds[:-1], bounds[1:]):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                blocks.append(_rows(p, a - lo, b - lo))
        return np.vstack(blocks)

    kind = GGMLType.BF16 if pieces[0].bf16 else {np.dtype("<f2"): GGMLType.F16}.get(pieces[0].items.dtype, GGMLType.F32)
    return SourceTensor(name=name, shape=shape, source_type=kind, read_rows=read_rows, origin=f"{path}: {name}")


def _rows(piece: StoredTensor, start: int, stop: int) -> np.ndarray:
    return StoredTensor(piece.items[start:stop], piece.bf16).to_float32()


def _vocab(folder: Path, vocab_size: int) -> dict[str, Any]:
    path = folder / "tokenizer.model"
    if not path.exists():
        raise QuantizeError(f"{folder}: no tokenizer.model")
    with open(folder_file(path), "rb") as f:
        head = f.read(64)
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\n", head):
        raise QuantizeError(f"{path}: a tiktoken (Llama 3) tokenizer; only SentencePiece tokenizer.model files "
                            "are converted (use the Hugging Face release of the model instead)")
    return spm_vocab(folder, vocab_size)
