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

from edgellama._validate import is_number
from edgellama.config import MAX_CONTEXT_LENGTH, MAX_INT
from edgellama.gguf import ModelFormatError, ValueType
from edgellama.quants import GGMLType

from .files import distinct_files, folder_file, folder_root, regular_file
from .safetensors import FLOAT_DTYPES, SafetensorsFile, to_float32
from .source import Checkpoint, QuantizeError, SourceTensor, show
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
_IGNORED = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,8})\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,8})\.(.+)$")  # plain numbers below 10^9

F32_MAX = float(np.finfo(np.float32).max)
_REQUIRED = object()


class ConfigValues:
    """Typed, range-checked reads from a JSON object (config.json, params.json, rope_scaling):
    every refusal is a ModelFormatError naming the file, the key and the value."""

    def __init__(self, path: Path, data: dict, prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what}")

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(f"{self.prefix}{key} is missing")
            return default
        return value

    def get_int(self, key: str, default: Any = _REQUIRED, *, maximum: int = MAX_INT,
                limit_name: str = "counts are 32-bit in llama.cpp") -> int:
        value = self._get(key, default)
        if type(value) is not int or value <= 0:
            raise self.fail(f"{self.prefix}{key} must be a positive integer, got {show(value)}")
        if value > maximum:
            raise self.fail(f"{self.prefix}{key} {show(value)} exceeds the limit of {maximum} ({limit_name})")
        return value

    def get_float(self, key: str, default: Any = _REQUIRED, *, below: float | None = None) -> float:
        value = self._get(key, default)
        if not is_number(value):
            raise self.fail(f"{self.prefix}{key} must be a positive number, got {show(value)}")
        if isinstance(value, int) and value > F32_MAX:
            raise self.fail(f"{self.prefix}{key} {show(value)} exceeds the float32 range")
        value = float(value)
        if not 0 < value <= F32_MAX:  # NaN fails too
            raise self.fail(f"{self.prefix}{key} must be a positive number within float32's range, got {value!r}")
        if np.float32(value) == 0:
            raise self.fail(f"{self.prefix}{key} {value!r} rounds to 0 in float32")
        if below is not None and value >= below:
            raise self.fail(f"{self.prefix}{key} {value!r} must be below {below}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{self.prefix}{key} must be true or false, got {show(value)}")
        return value


@dataclass(frozen=True)
class RopeScaling:
    kind: str                    # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: float = 8192.0


def read_rope_scaling(path: Path, scaling: Any) -> RopeScaling | None:
    """config.json's rope_scaling, validated: None (no scaling), linear or llama3."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelFormatError(f"{path}: rope_scaling must be an object or null, got {show(scaling)}")
    kind = scaling.get("rope_type") or scaling.get("type") or ""
    if not isinstance(kind, str):
        raise ModelFormatError(f"{path}: rope_scaling type must be a string, got {show(kind)}")
    kind = kind.lower()
    values = ConfigValues(path, scaling, "rope_scaling ")
    if kind in ("default", ""):
        return None
    if kind == "linear":
        return RopeScaling("linear", values.get_float("factor"))
    if kind == "llama3":
        rope = RopeScaling("llama3", values.get_float("factor", 8.0), values.get_float("low_freq_factor", 1.0),
                           values.get_float("high_freq_factor", 4.0),
                           values.get_float("original_max_position_embeddings", 8192.0))
        if rope.original_context > MAX_CONTEXT_LENGTH:
            raise values.fail(f"rope_scaling original_max_position_embeddings {rope.original_context!r} exceeds "
                              f"the limit of {MAX_CONTEXT_LENGTH} (MAX_CONTEXT_LENGTH)")
        if rope.high_freq_factor <= rope.low_freq_factor:
            raise values.fail(f"rope_scaling high_freq_factor {rope.high_freq_factor!r} must be larger than "
                              f"low_freq_factor {rope.low_freq_factor!r}")
        return rope
    raise QuantizeError(f"{path}: rope_scaling type {kind[:40]!r} is not supported (linear and llama3 are)")


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
    rope_scaling: RopeScaling | None = None


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's GGUF name for an HF tensor name; None for tensors the converter drops."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if _IGNORED.match(hf_name):
        return None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise QuantizeError(f"tensor {hf_name[:120]!r} is not part of a LlamaForCausalLM model (cannot map it to GGUF)")


def layer_count(names: list[str], layer_re: re.Pattern) -> int:
    """1 + the highest layer number among tensor names (0 without layers)."""
    highest = -1
    for name in names:
        m = layer_re.match(name)
        if m:
            highest = max(highest, int(m.group(1)))
    return highest + 1


def qk_permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """Source row of each output row for llama.cpp's Q/K permute: within each head, HF's
    [first halves | second halves] order becomes interleaved pairs (x0, x_half, x1, x_half+1, ...)."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


# ----- config.json -------------------------------------------------------------------------------

def read_params(folder: Path) -> tuple[dict, LlamaParams]:
    """config.json's hyper-parameters, each typed and range-checked (not yet against the tensors:
    ``check_counts`` does that before anything is built from them)."""
    path = folder / "config.json"
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    llama_archs = set(LLAMA_ARCHITECTURES) & set(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()
    if not (llama_archs or model_type in ("llama", "mistral")):
        raise QuantizeError(f"{path}: architecture {show(archs or model_type)} is not supported "
                            f"(supported: {', '.join(LLAMA_ARCHITECTURES)})")
    values = ConfigValues(path, config)
    n_heads = values.get_int("num_attention_heads")
    dim = values.get_int("hidden_size")
    n_kv_heads = values.get_int("num_key_value_heads", n_heads)
    head_dim_given = config.get("head_dim") is not None
    if head_dim_given:
        head_dim = values.get_int("head_dim")
    elif dim % n_heads:
        raise ModelFormatError(f"{path}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    else:
        head_dim = dim // n_heads
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{path}: num_attention_heads {n_heads} is not a multiple of "
                               f"num_key_value_heads {n_kv_heads}")
    if head_dim % 2:
        raise ModelFormatError(f"{path}: head dimension {head_dim} is odd; RoPE needs pairs")
    params = LlamaParams(
        n_layers=values.get_int("num_hidden_layers"), dim=dim, ffn_dim=values.get_int("intermediate_size"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=values.get_int("vocab_size"),
        context_length=values.get_int("max_position_embeddings", 2048, maximum=MAX_CONTEXT_LENGTH,
                                  limit_name="MAX_CONTEXT_LENGTH"),
        norm_eps=values.get_float("rms_norm_eps", 1e-6, below=1.0), rope_theta=values.get_float("rope_theta", 10000.0),
        tied_embeddings=values.get_bool("tie_word_embeddings", False), head_dim_given=head_dim_given,
        rope_scaling=read_rope_scaling(path, config.get("rope_scaling")))
    return config, params


def check_counts(path: Path, p: LlamaParams, n_layers_present: int, shape_of: Callable[[str], tuple | None],
                 names: dict[str, str], keys: dict[str, str]) -> None:
    """Every count of the config against the tensors really present, before anything is built from
    it.  ``shape_of`` gives a GGUF-named tensor's shape (None if absent), ``names`` the source name of
    a GGUF name, ``keys`` the config's key for each count (HF and Meta spell them differently)."""
    def fail(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: {what}")

    if p.n_layers != n_layers_present:
        held = (f"{n_layers_present} layers ({names['layer'].format(0)} to {names['layer'].format(n_layers_present - 1)})"
                if n_layers_present else "no layers")
        raise fail(f"{keys['n_layers']} {p.n_layers} but the weights hold {held}")
    embedding = shape_of("token_embd.weight")
    if embedding is not None and len(embedding) == 2:
        if p.vocab_size != embedding[0]:
            raise fail(f"{keys['vocab_size']} {p.vocab_size} does not match the weights: "
                       f"{names['token_embd.weight']} has shape {list(embedding)}")
        if p.dim != embedding[1]:
            raise fail(f"{keys['dim']} {p.dim} does not match the weights: {names['token_embd.weight']} has "
                       f"shape {list(embedding)}")
    head_dim = (f"{keys['head_dim']} {p.head_dim}" if p.head_dim_given else
                f"head dimension {p.head_dim} ({keys['dim']} {p.dim} / {keys['n_heads']} {p.n_heads})")
    for gguf, heads, key in (("blk.0.attn_q.weight", p.n_heads, "n_heads"),
                             ("blk.0.attn_k.weight", p.n_kv_heads, "n_kv_heads")):
        shape = shape_of(gguf)
        if shape is not None and len(shape) == 2 and shape[0] != heads * p.head_dim:
            raise fail(f"{keys[key]} {heads} x {head_dim} = {heads * p.head_dim} rows, but {names[gguf]} has "
                       f"shape {list(shape)}")
    gate = shape_of("blk.0.ffn_gate.weight")
    if gate is not None and len(gate) == 2 and gate[0] != p.ffn_dim:
        raise fail(f"{keys['ffn_dim']} {p.ffn_dim} does not match the weights: {names['blk.0.ffn_gate.weight']} "
                   f"has shape {list(gate)}")


def llama_metadata(folder: Path, config: dict, p: LlamaParams) -> dict[str, Any]:
    """llama.* hyper-parameters in convert_hf_to_gguf's order (file_type is set by the writer)."""
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    name_or_path = config.get("_name_or_path")
    if not isinstance(name_or_path, str) or not name_or_path.strip("/"):
        root, repository = folder.resolve(), folder_root(folder)
        # (a Hugging Face cache snapshot's folder is named by its commit: the repository's name)
        name_or_path = root.name if repository == root else repository.name.split("--")[-1]
    name = name_or_path.rstrip("/").split("/")[-1]
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
    if p.rope_scaling is not None and p.rope_scaling.kind == "linear":
        meta["llama.rope.scaling.type"] = "linear"
        meta["llama.rope.scaling.factor"] = (f32, p.rope_scaling.factor)
    return meta


def llama3_rope_factors(config: dict, p: LlamaParams) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1 RoPE scaling (the rope_freqs.weight tensor)."""
    if p.rope_scaling is None or p.rope_scaling.kind != "llama3":
        return None
    factor, low, high = p.rope_scaling.factor, p.rope_scaling.low_freq_factor, p.rope_scaling.high_freq_factor
    old_context = p.rope_scaling.original_context
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
        return [folder_file(single)], None
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return [folder_file(others[0])], None
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
    base = folder.resolve()
    shards: dict[str, Path] = {}
    mapping: dict[str, Path] = {}
    for tensor, filename in weight_map.items():
        if filename not in shards:
            shards[filename] = _shard_path(base, index_path, tensor, filename)
        mapping[tensor] = shards[filename]
    files = sorted(set(shards.values()))
    distinct_files(files)
    return files, mapping


def _shard_path(base: Path, index_path: Path, tensor: str, filename: Any) -> Path:
    """A shard named by the index: a plain file name in the model folder ``base`` (a regular file
    there, or a link to one: quantize.files), nothing else."""
    if not isinstance(filename, str) or not filename:
        raise ModelFormatError(f"{index_path}: tensor {tensor!r} maps to {filename!r}, not a file name")
    candidate = Path(filename)
    if (candidate.is_absolute() or ".." in candidate.parts or "\\" in filename or ":" in filename
            or "\0" in filename):
        raise ModelFormatError(f"{index_path}: shard {filename!r} (tensor {tensor!r}) is outside the model "
                               "folder; refusing it")
    path = (base / candidate).resolve()
    if not path.exists():
        raise ModelFormatError(f"{index_path}: shard {filename!r} (tensor {tensor!r}) does not exist")
    return regular_file(path)


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


_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_HF_KEYS = {"n_layers": "num_hidden_layers", "vocab_size": "vocab_size", "dim": "hidden_size",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "ffn_dim": "intermediate_size"}


def _source_tensors(folder: Path, located: dict[str, SafetensorsFile], config: dict,
                    p: LlamaParams) -> list[SourceTensor]:
    kept: dict[str, tuple[str, SafetensorsFile]] = {}  # GGUF name -> (HF name, file)
    for hf_name, st in located.items():
        try:
            name = gguf_name(hf_name)
        except QuantizeError as e:
            raise QuantizeError(f"{st.path}: {e}") from None
        if name is None or (name == "output.weight" and p.tied_embeddings):
            continue  # rotary inv_freq buffers; an lm_head copy of tied embeddings
        kept[name] = (hf_name, st)
    hf_names = {name: hf_name for name, (hf_name, _) in kept.items()}
    hf_names["layer"] = "model.layers.{}."
    check_counts(folder / "config.json", p, layer_count(list(kept), _GGUF_LAYER_RE),
                 lambda name: kept[name][1].tensors[kept[name][0]].shape if name in kept else None,
                 hf_names, _HF_KEYS)
    expected = _expected_shapes(p)
    optional_bias = {f"blk.{i}.attn_{k}.bias" for i in range(p.n_layers) for k in ("q", "k", "v", "output")}
    tensors: dict[str, SourceTensor] = {}
    for name, (hf_name, st) in kept.items():
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
                               f"(HF {hf_name_of(missing[0])!r})")
    factors = llama3_rope_factors(config, p)
    if factors is not None:
        tensors["rope_freqs.weight"] = _constant_tensor("rope_freqs.weight", factors, "config.json rope_scaling")
    return list(tensors.values())


def hf_name_of(gguf: str) -> str:
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
