"""Which tensor gets which type: llama-quantize's rules (``llama_tensor_get_type`` in llama.cpp's
src/llama-quant.cpp, restated) for the file types we write.

A *file type* (llama_ftype, written as ``general.file_type``) names a base tensor type and, for the
K-quant mixes, rules that give some tensors more bits.  Per tensor, in llama-quantize's order
(non-layer tensors, then layer by layer, each group by name):
  * only 2-D+ tensors whose name ends in "weight" and is not a norm / gate / position table are
    quantized; the rest keep their type (we store them as F32, the type every converter gives 1-D
    tensors);
  * a float file type (F32, F16, BF16) gives every quantizable tensor that type, nothing else;
  * ``output.weight`` (or ``token_embd.weight`` when the embeddings are tied: no ``output.weight``)
    gets Q8_0 when its rows are not a multiple of the base type's block, otherwise Q6_K unless the
    base type is Q8_0 (so Q4_0 / Q5_1 / Q4_K_M... files have a Q6_K output on 256-multiple rows);
  * Q4_K_M / Q5_K_M: ``attn_v`` and ``ffn_down`` of the layers ``use_more_bits`` picks (the first
    and last eighth, and every third in between, counted per tensor kind) get Q6_K;
    Q4_K_S: the first four ``attn_v`` and the ``ffn_down`` of the first eighth of the layers get
    Q5_K; on a Llama 70B shape (80 layers, grouped-query attention) a Q4_K ``attn_v`` becomes Q5_K;
  * a row length that is not a multiple of the chosen type's block falls back: Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0 (SmolLM2's width 576 is 2.25 x 256), and to F16 when even the
    fallback does not divide it (llama-quantize refuses those; a runtime-valid model never has one);
  * ``--output-type`` / ``--embedding-type`` override those two tensors;
  * a tensor already stored in the chosen type is copied byte for byte, not requantized.
Not implemented (llama.cpp rules for other architectures or types): Falcon, mixtures of experts,
fused QKV, the IQ / Q2_K / Q3_K mixes, importance matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edgellama.quants import BLOCK_LAYOUT, GGMLType, type_name

from .source import QuantizeError, SourceTensor


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type: its name (as llama-quantize prints it), its llama_ftype number
    (``general.file_type``) and the base type of its tensors."""

    name: str
    number: int
    base: GGMLType

    @property
    def is_k_mix(self) -> bool:
        return self.base in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


_G = GGMLType
FILE_TYPES_BY_NAME: dict[str, FileType] = {ft.name.lower(): ft for ft in (
    FileType("F32", 0, _G.F32), FileType("F16", 1, _G.F16), FileType("BF16", 32, _G.BF16),
    FileType("Q8_0", 7, _G.Q8_0), FileType("Q4_0", 2, _G.Q4_0), FileType("Q4_1", 3, _G.Q4_1),
    FileType("Q5_0", 8, _G.Q5_0), FileType("Q5_1", 9, _G.Q5_1),
    FileType("Q4_K_S", 14, _G.Q4_K), FileType("Q4_K_M", 15, _G.Q4_K),
    FileType("Q5_K_S", 16, _G.Q5_K), FileType("Q5_K_M", 17, _G.Q5_K), FileType("Q6_K", 18, _G.Q6_K),
)}
# llama-quantize's aliases: "Q4_K" is Q4_K_M, "Q5_K" is Q5_K_M
FILE_TYPE_ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m"}
FILE_TYPES_BY_NUMBER = {ft.number: ft for ft in FILE_TYPES_BY_NAME.values()}
# the plain file type of a tensor type (a GGMLType given where a file type is expected)
_FILE_TYPE_OF_BASE = {_G.F32: "f32", _G.F16: "f16", _G.BF16: "bf16", _G.Q8_0: "q8_0", _G.Q4_0: "q4_0",
                      _G.Q4_1: "q4_1", _G.Q5_0: "q5_0", _G.Q5_1: "q5_1", _G.Q4_K: "q4_k_m",
                      _G.Q5_K: "q5_k_m", _G.Q6_K: "q6_k"}
TYPE_NAMES = list(FILE_TYPES_BY_NAME)  # for --help: f32, f16, ..., q6_k
# tensor types for --output-type / --embedding-type (ggml type names, as llama-quantize takes them)
TENSOR_TYPES = {name: FILE_TYPES_BY_NAME[file_type].base for name, file_type in (
    ("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_1", "q4_1"),
    ("q5_0", "q5_0"), ("q5_1", "q5_1"), ("q4_k", "q4_k_m"), ("q5_k", "q5_k_m"), ("q6_k", "q6_k"))}
# llama-quantize's fallbacks for rows that are not a multiple of a K-quant's 256
K_FALLBACK = {_G.Q4_K: _G.Q5_0, _G.Q5_K: _G.Q5_1, _G.Q6_K: _G.Q8_0}


def is_quantized(qtype: GGMLType) -> bool:
    """Whether a ggml type stores blocks of several elements (every Q, K, IQ and TQ type), from
    edgellama.quants' block table: a source in any of them is requantized, not converted."""
    return BLOCK_LAYOUT[qtype][0] > 1


# Substrings of weight names llama-quantize never quantizes (besides norms).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "pos_embd.weight", "token_types.weight",
                    "rope_freqs.weight")


def parse_file_type(name: str) -> FileType:
    """A file type by name (any case: q4_k_m, Q6_K, q4_k = q4_k_m) or llama_ftype number (15)."""
    key = str(name).strip().lower()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key in FILE_TYPES_BY_NAME:
        return FILE_TYPES_BY_NAME[key]
    if key.isascii() and key.isdigit() and int(key) in FILE_TYPES_BY_NUMBER:
        return FILE_TYPES_BY_NUMBER[int(key)]
    raise QuantizeError(f"unknown type {str(name)[:40]!r} (choose from {', '.join(TYPE_NAMES)})")


def parse_tensor_type(name: str) -> GGMLType:
    """A tensor type by ggml name (any case: q6_k, Q8_0, f16)."""
    key = str(name).strip().lower()
    if key in TENSOR_TYPES:
        return TENSOR_TYPES[key]
    raise QuantizeError(f"unknown tensor type {str(name)[:40]!r} (choose from {', '.join(TENSOR_TYPES)})")


def parse_type(name: str) -> GGMLType:
    """The base tensor type of a file type name or number (kept for callers that want one type)."""
    return parse_file_type(name).base


def as_file_type(value: str | GGMLType | FileType) -> FileType:
    if isinstance(value, FileType):
        return value
    if isinstance(value, GGMLType):
        if value not in _FILE_TYPE_OF_BASE:
            raise QuantizeError(f"{type_name(value)} is not a type edgellama-quantize writes")
        return FILE_TYPES_BY_NAME[_FILE_TYPE_OF_BASE[value]]
    return parse_file_type(value)


@dataclass(frozen=True)
class Choice:
    qtype: GGMLType
    copy: bool          # the source bytes are already in this type: copy them as-is
    note: str = ""      # why the type differs from the requested one, for the plan / warnings


@dataclass(frozen=True)
class ModelShape:
    """What llama-quantize's rules read from the model's metadata."""

    n_layers: int            # {arch}.block_count (llama.cpp's n_layer_all)
    is_llama_70b: bool       # llama architecture, 80 layers, grouped-query attention


def model_shape(metadata: dict) -> ModelShape:
    def value(key: str):
        v = metadata.get(key)
        return v[1] if isinstance(v, tuple) and len(v) == 2 else v

    arch = value("general.architecture") or "llama"
    n_layers = _as_int(value(f"{arch}.block_count"))
    n_heads = _as_int(value(f"{arch}.attention.head_count"))
    n_kv_heads = _as_int(value(f"{arch}.attention.head_count_kv"))
    if n_kv_heads == 0:
        n_kv_heads = n_heads  # llama.cpp's default when the key is absent
    return ModelShape(n_layers, arch == "llama" and n_layers == 80 and n_heads != n_kv_heads)


def _as_int(v) -> int:
    try:
        return int(v) if v is not None and not isinstance(v, (str, bytes, list, tuple)) else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def is_quantizable(tensor: SourceTensor) -> bool:
    """llama-quantize's test: a 2-D+ weight that is not a norm / gate / position table."""
    name = tensor.name
    return (name.endswith("weight") and len(tensor.shape) >= 2
            and not any(part in name for part in _NEVER_QUANTIZED))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's pick for the higher type in _M mixes: the first and last eighth of the
    layers and every third one in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category, for the categories its rules for our types look at; fused
    QKV and MLA's kv_b count as attn_v (llama.cpp's category_is_attn_v, checked first)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                           ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                           ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


class TypeChooser:
    """llama-quantize's per-tensor choice; call ``choose`` on the tensors in file order (the
    ``attn_v`` / ``ffn_down`` rules count them as they come, over every tensor of the file)."""

    def __init__(self, file_type: FileType, tensors: Iterable[SourceTensor], shape: ModelShape, *,
                 output_type: GGMLType | None = None, embedding_type: GGMLType | None = None):
        names = [t.name for t in tensors]
        self.file_type = file_type
        self.shape = shape
        self.tied = "output.weight" not in names
        self.n_attn_v = sum(_category(n) == "attn_v" for n in names)
        self.i_attn_v = 0
        self.i_ffn_down = 0
        self.output_type = output_type
        self.embedding_type = embedding_type

    def choose(self, tensor: SourceTensor) -> Choice:
        qtype, note = self._choose(tensor)
        copy = tensor.raw is not None and tensor.source_type == qtype
        return Choice(qtype=qtype, copy=copy, note=note)

    def _choose(self, tensor: SourceTensor) -> tuple[GGMLType, str]:
        if not is_quantizable(tensor):
            return GGMLType.F32, ""
        category = _category(tensor.name)
        if self.embedding_type is not None and category == "token_embd":
            return self._fit(tensor, self.embedding_type)
        if self.output_type is not None and category == "output":
            return self._fit(tensor, self.output_type)
        base = self.file_type.base
        if not is_quantized(base):  # F32 / F16 / BF16 files: no mixture rules at all
            return self._fit(tensor, base)
        return self._fit(tensor, self._mixture(tensor, category, base))

    def _mixture(self, tensor: SourceTensor, category: str, qtype: GGMLType) -> GGMLType:
        """llama_tensor_get_type_impl for our file types (dense llama-family models)."""
        mix = self.file_type.name
        if category == "output" or (self.tied and category == "token_embd"):
            if self.output_type is not None:
                return self.output_type
            if tensor.n_cols % BLOCK_LAYOUT[qtype][0]:
                return GGMLType.Q8_0
            return qtype if qtype == GGMLType.Q8_0 else GGMLType.Q6_K
        if category == "attn_v":
            if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(self.i_attn_v, self.n_attn_v):
                qtype = GGMLType.Q6_K
            elif mix == "Q4_K_S" and self.i_attn_v < 4:
                qtype = GGMLType.Q5_K
            if self.shape.is_llama_70b and qtype == GGMLType.Q4_K:
                qtype = GGMLType.Q5_K  # 8 heads share each attn_v row: more bits cost little
            self.i_attn_v += 1
        elif category == "ffn_down":
            i_layer, n_layers = self.i_ffn_down, self.shape.n_layers
            if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
                qtype = GGMLType.Q6_K
            elif mix == "Q4_K_S" and i_layer < n_layers // 8:
                qtype = GGMLType.Q5_K
            self.i_ffn_down += 1
        return qtype

    @staticmethod
    def _fit(tensor: SourceTensor, qtype: GGMLType, note: str = "") -> tuple[GGMLType, str]:
        """llama-quantize's fallback for rows that are not a multiple of the block size."""
        block = BLOCK_LAYOUT[qtype][0]
        if tensor.n_cols % block == 0:
            return qtype, note
        fallback = K_FALLBACK.get(qtype, GGMLType.F16)
        if tensor.n_cols % BLOCK_LAYOUT[fallback][0]:
            fallback = GGMLType.F16
        return fallback, (f"row length {tensor.n_cols} is not a multiple of the {type_name(qtype)} block size "
                          f"{block}: using {type_name(fallback)} instead")

