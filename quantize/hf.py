"""A Hugging Face LlamaForCausalLM-family folder as a conversion source.

Reads ``config.json``, the weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``) and the tokenizer, and presents them the way llama.cpp's
``convert_hf_to_gguf.py`` writes a llama model: GGUF tensor names, Q/K rows permuted for the
interleaved-pair RoPE, hyper-parameters and tokenizer as GGUF metadata, and for Llama 3.1-style
``rope_scaling`` the ``rope_freqs.weight`` factors tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama.gguf import ModelFormatError, ValueType
from edgellama.quants import GGMLType

from .safetensors import FLOAT_DTYPES, SafetensorsFile, to_float32
from .source import Checkpoint, QuantizeError, SourceTensor
from .vocab import bpe_vocab, read_json, spm_vocab

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# HF name (after "model.") -> GGUF name; {i} is the layer
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LlamaParams:
    """The hyper-parameters a llama GGUF needs, validated."""
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float
    tied_embeddings: bool
    head_dim_given: bool


def gguf_name(hf_name: str, n_layers: int) -> str | None:
    """llama.cpp's GGUF name for an HF tensor name; None for tensors the converter drops."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if _IGNORED.match(hf_name):
        return None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < n_layers:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise QuantizeError(f"tensor {hf_name!r} is not part of a LlamaForCausalLM model (cannot map it to GGUF)")


def qk_permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """Source row of each output row for llama.cpp's Q/K permute: within each head, HF's
    [first halves | second halves] order becomes interleaved pairs (x0, x_half, x1, x_half+1, ...)."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


# ----- config.json -------------------------------------------------------------------------------

def read_params(folder: Path) -> tuple[dict, LlamaParams]:
    path = folder / "config.json"
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    archs = config.get("architectures") or []
    if not (set(archs if isinstance(archs, list) else []) & set(LLAMA_ARCHITECTURES)
            or config.get("model_type") in ("llama", "mistral")):
        raise QuantizeError(f"{path}: architecture {archs or config.get('model_type')!r} is not supported "
                            f"(supported: {', '.join(LLAMA_ARCHITECTURES)})")

    def get_int(key: str, default: int | None = None) -> int:
        value = config.get(key, default)
        if type(value) is not int or value <= 0:
            raise ModelFormatError(f"{path}: {key} must be a positive integer, got {value!r}")
        return value

    def get_float(key: str, default: float) -> float:
        value = config.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ModelFormatError(f"{path}: {key} must be a positive number, got {value!r}")
        return float(value)

    n_heads = get_int("num_attention_heads")
    dim = get_int("hidden_size")
    n_kv_heads = get_int("num_key_value_heads", n_heads)
    head_dim_given = config.get("head_dim") is not None
    if head_dim_given:
        head_dim = get_int("head_dim")
    elif dim % n_heads:
        raise ModelFormatError(f"{path}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    else:
        head_dim = dim // n_heads
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{path}: num_attention_heads {n_heads} is not a multiple of "
                               f"num_key_value_heads {n_kv_heads}")
    if head_dim % 2:
        raise ModelFormatError(f"{path}: head dimension {head_dim} is odd; RoPE needs pairs")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ModelFormatError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    params = LlamaParams(
        n_layers=get_int("num_hidden_layers"), dim=dim, ffn_dim=get_int("intermediate_size"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=get_int("vocab_size"),
        context_length=get_int("max_position_embeddings", 2048), norm_eps=get_float("rms_norm_eps", 1e-6),
        rope_theta=get_float("rope_theta", 10000.0), tied_embeddings=tied, head_dim_given=head_dim_given)
    return config, params


def llama_metadata(folder: Path, config: dict, p: LlamaParams) -> dict[str, Any]:
    """llama.* hyper-parameters in convert_hf_to_gguf's order (file_type is set by the writer)."""
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    name = str(config.get("_name_or_path") or folder.resolve().name).rstrip("/").split("/")[-1]
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": name,
        "llama.block_count": (u32, p.n_layers),
        "llama.context_length": (u32, p.context_length),
        "llama.embedding_length": (u32, p.dim),
        "llama.feed_forward_length": (u32, p.ffn_dim),
        "llama.attention.head_count": (u32, p.n_heads),
        "llama.attention.head_count_kv": (u32, p.n_kv_heads),
        "llama.rope.freq_base": (f32, p.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": (f32, p.norm_eps),
    }
    if p.head_dim_given:
        meta["llama.attention.key_length"] = (u32, p.head_dim)
        meta["llama.attention.value_length"] = (u32, p.head_dim)
    meta["llama.vocab_size"] = (u32, p.vocab_size)
    meta["llama.rope.dimension_count"] = (u32, p.head_dim)
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = str(scaling.get("rope_type") or scaling.get("type") or "").lower()
        if kind == "linear":
            meta["llama.rope.scaling.type"] = "linear"
            meta["llama.rope.scaling.factor"] = (f32, float(scaling["factor"]))
        elif kind not in ("llama3", "default", ""):
            raise QuantizeError(f"{folder / 'config.json'}: rope_scaling type {kind!r} is not supported "
                                "(linear and llama3 are)")
    elif scaling is not None:
        raise ModelFormatError(f"{folder / 'config.json'}: rope_scaling must be an object or null")
    return meta


def llama3_rope_factors(config: dict, p: LlamaParams) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1 RoPE scaling (the rope_freqs.weight tensor)."""
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, dict) or str(scaling.get("rope_type") or scaling.get("type") or "").lower() != "llama3":
        return None
    try:
        factor = float(scaling.get("factor", 8.0))
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling.get("original_max_position_embeddings", 8192))
    except (TypeError, ValueError):
        raise ModelFormatError(f"config.json: bad llama3 rope_scaling {scaling!r}") from None
    if not (factor > 0 and high > low > 0 and old_context > 0):
        raise ModelFormatError(f"config.json: llama3 rope_scaling values out of range: {scaling!r}")
    exponents = np.arange(0, p.head_dim, 2, dtype=np.float32) / np.float32(p.head_dim)
    freqs = np.float32(1.0) / np.power(np.float32(p.rope_theta), exponents, dtype=np.float32)
    factors = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ----- weights -----------------------------------------------------------------------------------

def safetensors_files(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files, and for sharded checkpoints the validated tensor -> shard map."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        return _read_index(folder, index_path)
    single = folder / "model.safetensors"
    if single.exists():
        return [single], None
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others, None
    if others:
        raise QuantizeError(f"{folder}: {len(others)} .safetensors files but no model.safetensors.index.json")
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
    if pickles:
        raise QuantizeError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}); pickles can run code, "
                            "so only safetensors (or Meta's consolidated.*.pth layout) are read")
    raise QuantizeError(f"{folder}: no model.safetensors")


def _read_index(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, Path]]:
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index_path}: weight_map must be a non-empty object")
    root = folder.resolve()
    shards: dict[str, Path] = {}
    mapping: dict[str, Path] = {}
    for tensor, filename in weight_map.items():
        if filename not in shards:
            shards[filename] = _shard_path(root, index_path, tensor, filename)
        mapping[tensor] = shards[filename]
    return sorted(set(shards.values())), mapping


def _shard_path(root: Path, index_path: Path, tensor: str, filename: Any) -> Path:
    """A shard named by the index: a plain file name inside the model folder, nothing else."""
    if not isinstance(filename, str) or not filename:
        raise ModelFormatError(f"{index_path}: tensor {tensor!r} maps to {filename!r}, not a file name")
    candidate = Path(filename)
    if (candidate.is_absolute() or ".." in candidate.parts or "\\" in filename or ":" in filename
            or "\0" in filename):
        raise ModelFormatError(f"{index_path}: shard {filename!r} (tensor {tensor!r}) is outside the model "
                               "folder; refusing it")
    path = (root / candidate).resolve()
    if not path.is_relative_to(root):
        raise ModelFormatError(f"{index_path}: shard {filename!r} resolves to {path}, outside the model "
                               "folder; refusing it")
    if not path.is_file():
        raise ModelFormatError(f"{index_path}: shard {filename!r} (tensor {tensor!r}) does not exist")
    return path


def open_hf(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    config, p = read_params(folder)
    files, mapping = safetensors_files(folder)
    opened = [SafetensorsFile(f) for f in files]
    try:
        located = _locate_tensors(opened, mapping)
        tensors = _source_tensors(folder, located, config, p)
        metadata = llama_metadata(folder, config, p)
        metadata.update(_vocab(folder, p))
    except BaseException:
        for st in opened:
            st.close()
        raise
    source_bytes = sum(st.size for st in opened)
    return Checkpoint(path=str(folder), kind="hf", metadata=metadata, tensors=tensors,
                      source_bytes=source_bytes, closers=[st.close for st in opened])


def _vocab(folder: Path, p: LlamaParams) -> dict[str, Any]:
    if (folder / "tokenizer.model").exists():
        return spm_vocab(folder, p.vocab_size)
    if (folder / "tokenizer.json").exists():
        return bpe_vocab(folder, p.vocab_size)
    raise QuantizeError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")


def _locate_tensors(opened: list[SafetensorsFile], mapping: dict[str, Path] | None) -> dict[str, SafetensorsFile]:
    located: dict[str, SafetensorsFile] = {}
    for st in opened:
        for name in st.tensors:
            if name in located:
                raise ModelFormatError(f"tensor {name!r} is in both {located[name].path} and {st.path}")
            if mapping is not None and mapping.get(name) != Path(st.path):
                raise ModelFormatError(f"{st.path}: tensor {name!r} is not listed for this shard in "
                                       "model.safetensors.index.json")
            located[name] = st
    if mapping is not None:
        missing = sorted(set(mapping) - set(located))
        if missing:
            raise ModelFormatError(f"model.safetensors.index.json lists {len(missing)} tensors that no shard "
                                   f"holds, e.g. {missing[0]!r} in {mapping[missing[0]].name}")
    return located


def _expected_shapes(p: LlamaParams) -> dict[str, tuple[int, ...]]:
    q_rows, kv_rows = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    shapes = {"token_embd.weight": (p.vocab_size, p.dim), "output_norm.weight": (p.dim,)}
    if not p.tied_embeddings:
        shapes["output.weight"] = (p.vocab_size, p.dim)
    for i in range(p.n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (p.dim,), f"blk.{i}.attn_q.weight": (q_rows, p.dim),
            f"blk.{i}.attn_k.weight": (kv_rows, p.dim), f"blk.{i}.attn_v.weight": (kv_rows, p.dim),
            f"blk.{i}.attn_output.weight": (p.dim, q_rows), f"blk.{i}.ffn_norm.weight": (p.dim,),
            f"blk.{i}.ffn_gate.weight": (p.ffn_dim, p.dim), f"blk.{i}.ffn_up.weight": (p.ffn_dim, p.dim),
            f"blk.{i}.ffn_down.weight": (p.dim, p.ffn_dim),
        })
    return shapes


def _source_tensors(folder: Path, located: dict[str, SafetensorsFile], config: dict,
                    p: LlamaParams) -> list[SourceTensor]:
    expected = _expected_shapes(p)
    optional_bias = {f"blk.{i}.attn_{k}.bias" for i in range(p.n_layers) for k in ("q", "k", "v", "output")}
    tensors: dict[str, SourceTensor] = {}
    for hf_name, st in located.items():
        name = gguf_name(hf_name, p.n_layers)
        if name is None or (name == "output.weight" and p.tied_embeddings):
            continue  # rotary inv_freq buffers; an lm_head copy of tied embeddings
        info = st.tensors[hf_name]
        if info.dtype not in FLOAT_DTYPES:
            raise ModelFormatError(f"{st.path}: tensor {hf_name!r} has dtype {info.dtype}, expected a float type")
        want = expected.get(name)
        if want is None and name in optional_bias:
            want = (p.dim if name.endswith("output.bias") else
                    (p.n_heads if ".attn_q." in name else p.n_kv_heads) * p.head_dim,)
        if want is None or info.shape != want:
            raise ModelFormatError(f"{st.path}: tensor {hf_name!r} has shape {list(info.shape)}, config.json "
                                   f"implies {list(want) if want else 'no such tensor'}")
        heads = p.n_heads if ".attn_q." in name else p.n_kv_heads if ".attn_k." in name else None
        tensors[name] = _hf_tensor(st, hf_name, name, heads)
    # no lm_head although tie_word_embeddings is false: the output layer is the embedding (tied)
    missing = [n for n in expected if n not in tensors and n != "output.weight"]
    if missing:
        raise ModelFormatError(f"{folder}: missing {len(missing)} tensors, e.g. {missing[0]!r} "
                               f"(HF {_hf_name_of(missing[0])!r})")
    factors = llama3_rope_factors(config, p)
    if factors is not None:
        tensors["rope_freqs.weight"] = _constant_tensor("rope_freqs.weight", factors, "config.json rope_scaling")
    return list(tensors.values())


def _hf_name_of(gguf: str) -> str:
    for hf, g in _GLOBAL_NAMES.items():
        if g == gguf:
            return hf
    _, layer, rest = gguf.split(".", 2)
    return f"model.layers.{layer}." + next(hf for hf, g in _LAYER_NAMES.items() if g == rest)


def _hf_tensor(st: SafetensorsFile, hf_name: str, name: str, permute_heads: int | None) -> SourceTensor:
    info = st.tensors[hf_name]
    shape = info.shape
    n_rows = shape[0] if len(shape) > 1 else 1
    perm = qk_permutation(shape[0], permute_heads) if permute_heads else None

    def read_rows(start: int, stop: int) -> np.ndarray:
        items = st.array(hf_name)
        if len(shape) == 1:
            values = items[perm] if perm is not None else items
            return to_float32(np.asarray(values), info.dtype).reshape(1, -1)
        items = items.reshape(n_rows, -1)
        rows = items[perm[start:stop]] if perm is not None else items[start:stop]
        return to_float32(rows, info.dtype)

    source_type = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}.get(info.dtype, GGMLType.F32)
    return SourceTensor(name=name, shape=shape, source_type=source_type, read_rows=read_rows,
                        origin=f"{st.path}: {hf_name}")


def _constant_tensor(name: str, values: np.ndarray, origin: str) -> SourceTensor:
    read: Callable[[int, int], np.ndarray] = lambda start, stop: values.reshape(1, -1)
    return SourceTensor(name=name, shape=values.shape, source_type=GGMLType.F32, read_rows=read, origin=origin)
