"""Which tensor gets which type: llama-quantize's rules for the types we write.

llama.cpp (``llama_model_quantize_impl`` / ``llama_tensor_get_type``) decides per tensor:
  * only 2-D+ tensors whose name ends in "weight" and is not a norm are quantized; the rest keep
    their type (we store them as F32, the type every converter gives 1-D tensors);
  * for a quantized target, ``output.weight`` (or ``token_embd.weight`` when the embeddings are
    tied, i.e. there is no ``output.weight``) gets more bits: Q6_K unless the target is Q8_0.
    The runtime does not read K-quants, so we use Q8_0 there; for rows that are not a multiple of
    256 llama.cpp falls back from Q6_K to Q8_0 too, so on such models (SmolLM2) the files agree;
  * ``--output-type`` / ``--embedding-type`` override those two tensors;
  * a tensor already stored in the chosen type is copied byte for byte, not requantized;
  * rows that are not a multiple of the block size fall back to F16 (and we say so).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellama.quants import BLOCK_LAYOUT, GGMLType, type_name

from .source import QuantizeError, SourceTensor

TYPE_NAMES = {
    "f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16,
    "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
}

# llama_ftype values for general.file_type ("mostly <type>")
FILE_TYPES = {
    GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3,
    GGMLType.Q8_0: 7, GGMLType.BF16: 32,
}



def is_quantized(qtype: GGMLType) -> bool:
    """Whether a ggml type stores blocks of several elements (every Q, K, IQ and TQ type), from
    edgellama.quants' block table: a source in any of them is requantized, not converted."""
    return BLOCK_LAYOUT[qtype][0] > 1

# Substrings of weight names llama-quantize never quantizes (besides norms).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "pos_embd.weight", "token_types.weight",
                    "rope_freqs.weight")


def parse_type(name: str) -> GGMLType:
    """A type by name (any case), or by llama-quantize's file type number (2 = Q4_0, 7 = Q8_0, ...)."""
    key = name.strip().lower()
    if key in TYPE_NAMES:
        return TYPE_NAMES[key]
    by_number = {str(number): qtype for qtype, number in FILE_TYPES.items()}
    if key in by_number:
        return by_number[key]
    raise QuantizeError(f"unknown type {name[:40]!r} (choose from {', '.join(TYPE_NAMES)})")


@dataclass(frozen=True)
class Choice:
    qtype: GGMLType
    copy: bool          # the source bytes are already in this type: copy them as-is
    note: str = ""      # why the type differs from the requested one, for the plan / warnings


def is_quantizable(tensor: SourceTensor) -> bool:
    """llama-quantize's test: a 2-D+ weight that is not a norm / gate / position table."""
    name = tensor.name
    return (name.endswith("weight") and len(tensor.shape) >= 2
            and not any(part in name for part in _NEVER_QUANTIZED))


def choose(tensor: SourceTensor, target: GGMLType, *, tied_embeddings: bool,
           output_type: GGMLType | None = None, embedding_type: GGMLType | None = None) -> Choice:
    note = ""
    if not is_quantizable(tensor):
        qtype = GGMLType.F32
    else:
        qtype = target
        is_output = tensor.name == "output.weight" or (tied_embeddings and tensor.name == "token_embd.weight")
        if is_output and output_type is not None:
            qtype = output_type
        elif is_output and is_quantized(target) and target != GGMLType.Q8_0:
            qtype = GGMLType.Q8_0
            note = "output tensor kept at higher precision (llama-quantize's rule)"
        if tensor.name == "token_embd.weight" and embedding_type is not None:
            qtype = embedding_type
        block = BLOCK_LAYOUT[qtype][0]
        if tensor.n_cols % block:
            note = (f"row length {tensor.n_cols} is not a multiple of the {type_name(qtype)} block size "
                    f"{block}: using F16 instead")
            qtype = GGMLType.F16
    copy = tensor.raw is not None and tensor.source_type == qtype
    return Choice(qtype=qtype, copy=copy, note=note)
