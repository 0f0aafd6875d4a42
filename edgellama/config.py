"""ModelArgs: a llama model's hyper-parameters, read from GGUF metadata and validated.

Every ``llama.*`` key the runtime reads is checked here, before anything is derived from it: its type
(an integer, a finite number, a string), its range, and its consistency with the other keys (heads
divide the width, KV heads divide the heads, the RoPE dimension is even and fits a head) and with the
tensors (the vocabulary is the number of embedding rows, of output rows and of tokenizer tokens; each
layer's matrices have the shapes the keys imply; ``rope_freqs.weight`` holds rope_dim/2 finite
positive factors).  A bad value is a ``ModelFormatError`` naming the source, the key and the value.

``ModelArgs.from_metadata`` works on any metadata mapping (a ``GGUFFile``'s, or what a converter is
about to write: values may be ``(ValueType, value)`` pairs) with tensor shapes in numpy order;
``ModelArgs.from_gguf`` is the same on an open file, plus the rope factors' values.  This module
imports neither Numba nor the kernels: ``edgellama info`` and the quantizer use it as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ._validate import is_int, is_number
from .gguf import GGUFFile, ModelFormatError, StringArray, ValueType
from .quants import F16_LOAD_WIDTH, KV_CACHE_TYPES, QK, GGMLType, dequantize, type_name  # noqa: F401

# QK: activations are quantized in blocks of 32, so width and ffn are multiples of it
DEFAULT_MAX_CTX = 4096  # the context a load uses by default (at most the trained one)
MAX_CONTEXT_LENGTH = 1 << 27  # 134,217,728 trained positions (the longest real context is ~10M)
MAX_INT = (1 << 31) - 1  # every other count: llama.cpp keeps them in 32 bits
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp's; only none and linear run here
LAYER_TENSORS = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                 "ffn_down")

# ModelArgs field -> the GGUF key it comes from (for messages)
KEYS = {
    "dim": "llama.embedding_length",
    "n_layers": "llama.block_count",
    "n_heads": "llama.attention.head_count",
    "n_kv_heads": "llama.attention.head_count_kv",
    "ffn_dim": "llama.feed_forward_length",
    "n_vocab": "llama.vocab_size",
    "max_ctx": "llama.context_length",
    "norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "rope_dim": "llama.rope.dimension_count",
    "rope_scale": "llama.rope.scaling.factor",
}


def _plain(value: Any) -> Any:
    """A metadata value as GGUFFile reads it: writer-style ``(ValueType, value)`` pairs unwrapped."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ValueType):
        value = value[1]
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ValueType):
            value = value[1]  # an array: (item type, items)
    return value


def _show(value: Any) -> str:
    """A value for a one-line message (arrays by their length: never a huge repr)."""
    if isinstance(value, (list, tuple, StringArray, np.ndarray)):
        return f"an array of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Metadata:
    """Typed access to ``llama.*`` keys: the type is checked here, ranges in ModelArgs.validate."""

    def __init__(self, metadata: Mapping[str, Any], source: str):
        self.metadata, self.source = metadata, source

    def fail(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.source}: {message}")

    def raw(self, key: str) -> Any:
        return _plain(self.metadata.get(key))

    def integer(self, key: str, default: Any = ...) -> Any:
        value = self.raw(key)
        if value is None:
            if default is ...:
                raise self.fail(f"missing metadata {key!r}")
            return default
        if not is_int(value):
            raise self.fail(f"{key} is {_show(value)}: it must be an integer")
        return int(value)

    def number(self, key: str, default: Any = ...) -> Any:
        value = self.raw(key)
        if value is None:
            if default is ...:
                raise self.fail(f"missing metadata {key!r}")
            return default
        if not is_number(value):
            raise self.fail(f"{key} is {_show(value)}: it must be a number")
        try:
            return float(value)
        except OverflowError:
            raise self.fail(f"{key} is {_show(value)}: it must be a finite number") from None

    def string(self, key: str, default: Any = ...) -> Any:
        value = self.raw(key)
        if value is None:
            if default is ...:
                raise self.fail(f"missing metadata {key!r}")
            return default
        if not isinstance(value, str):
            raise self.fail(f"{key} is {_show(value)}: it must be a string")
        return value

    def rope_scale(self) -> float:
        """The linear position scale, as llama.cpp reads it: the factor (``rope.scale_linear`` in
        older files; 0 means none) applies unless the scaling type says "none"; the type defaults
        to linear.  Other types (YaRN, LongRoPE) run only unscaled."""
        kind = self.string("llama.rope.scaling.type", "linear")
        key = "llama.rope.scaling.factor"
        factor = self.number(key, None)
        if factor is None:
            key = "llama.rope.scale_linear"
            factor = self.number(key, None)
        if factor is not None and not (math.isfinite(factor) and (factor == 0 or factor >= 1)):
            raise self.fail(f"{key} is {factor!r}: it must be a finite number, at least 1 (or 0: no scaling)")
        if kind not in ROPE_SCALING_TYPES:
            raise self.fail(f"llama.rope.scaling.type is {_show(kind)}: it must be one of "
                            f"{', '.join(ROPE_SCALING_TYPES)}")
        scale = factor or 1.0
        if kind == "none":
            return 1.0  # llama.cpp never scales with type none, whatever the factor says
        if kind != "linear" and scale != 1.0:
            raise self.fail(f"llama.rope.scaling.type {kind!r} with {key} {factor:g} is not supported (only "
                            "linear scaling; Llama 3.1's arrives as the rope_freqs.weight tensor)")
        return scale


@dataclass
class ModelArgs:
    """A llama model's hyper-parameters; constructing one validates them (see ``validate``)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_vocab: int
    max_ctx: int                       # the model's training context
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None        # rotated dims per head (default: head_dim)
    rope_scale: float = 1.0            # linear position scaling (positions are divided by it)
    source: str = field(default="<ModelArgs>", repr=False, compare=False)  # for messages: the file's path
    head_dim: int = field(init=False)
    kv_dim: int = field(init=False)

    def __post_init__(self):
        self.validate(self.source)  # before anything is derived: no division by a zero head count
        self.head_dim = self.dim // self.n_heads
        self.kv_dim = self.n_kv_heads * self.head_dim
        if self.rope_dim is None:
            self.rope_dim = self.head_dim

    # ----- construction ---------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]] | None,
                      source: str) -> "ModelArgs":
        """Validated hyper-parameters from GGUF metadata (plain values or ``(ValueType, value)``
        pairs); ``tensors``: name -> shape in numpy order, checked against the keys (None: only the
        metadata is checked, and the vocabulary comes from llama.vocab_size or the token list)."""
        m = _Metadata(metadata, source)
        arch = m.raw("general.architecture")
        if arch != "llama":
            raise m.fail(f"general.architecture is {_show(arch)}; only 'llama' is supported")
        n_heads = m.integer("llama.attention.head_count")
        args = cls(
            dim=m.integer("llama.embedding_length"),
            n_layers=m.integer("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=m.integer("llama.attention.head_count_kv", n_heads),
            ffn_dim=m.integer("llama.feed_forward_length"),
            n_vocab=_vocab_size(m, tensors),
            max_ctx=m.integer("llama.context_length", DEFAULT_MAX_CTX),
            norm_eps=m.number("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=m.number("llama.rope.freq_base", 10000.0),
            rope_dim=m.integer("llama.rope.dimension_count", None),
            rope_scale=m.rope_scale(),
            source=source,
        )
        args._check_unsupported(m)
        args._check_vocabulary(m, tensors)
        if tensors is not None:
            args.check_tensors(tensors)
        return args

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        """``from_metadata`` on an open file, and the values of its rope_freqs.weight."""
        args = cls.from_metadata(f.metadata, {name: info.shape for name, info in f.tensors.items()}, f.path)
        if "rope_freqs.weight" in f.tensors:
            info = f.tensors["rope_freqs.weight"]
            if info.qtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
                raise ModelFormatError(f"{f.path}: tensor 'rope_freqs.weight' must be F32/F16/BF16, got "
                                       f"{type_name(info.qtype)}")
            args.check_rope_freqs(dequantize(f.raw("rope_freqs.weight"), info.qtype, info.shape))
        return args

    # ----- validation -----------------------------------------------------------------------------

    def validate(self, source: str | None = None) -> None:
        """Types, ranges, then consistency, in that order (no derived value is computed before the
        values it comes from are checked)."""
        source = self.source if source is None else source

        def fail(message: str) -> ModelFormatError:
            return ModelFormatError(f"{source}: {message}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_vocab", "max_ctx", "rope_dim"):
            value = getattr(self, name)
            if value is None and name == "rope_dim":
                continue
            if not is_int(value):
                raise fail(f"{KEYS[name]} is {_show(value)}: it must be an integer")
            limit = MAX_CONTEXT_LENGTH if name == "max_ctx" else MAX_INT
            if not 1 <= value <= limit:
                raise fail(f"{KEYS[name]} is {value}: it must be a positive integer"
                           + (f" of at most {limit}" if value > 0 else ""))
        for name in ("norm_eps", "rope_theta", "rope_scale"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise fail(f"{KEYS[name]} is {_show(value)}: it must be a finite number")
        if not 0 < self.norm_eps < 1:
            raise fail(f"{KEYS['norm_eps']} is {self.norm_eps!r}: it must be in (0, 1)")
        if not self.rope_theta > 0:
            raise fail(f"{KEYS['rope_theta']} is {self.rope_theta!r}: it must be positive")
        if not self.rope_scale >= 1:
            raise fail(f"{KEYS['rope_scale']} is {self.rope_scale!r}: the linear scale must be at least 1")
        if self.dim % self.n_heads:
            raise fail(f"{KEYS['n_heads']} {self.n_heads} does not divide the width ({KEYS['dim']}) {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise fail(f"{KEYS['n_kv_heads']} {self.n_kv_heads} does not divide the head count "
                       f"({KEYS['n_heads']}) {self.n_heads}")
        head_dim = self.dim // self.n_heads
        if self.rope_dim is not None and (self.rope_dim > head_dim or self.rope_dim % 2):
            raise fail(f"{KEYS['rope_dim']} is {self.rope_dim}: it must be even and at most the head size "
                       f"{head_dim}")
        if self.dim % QK or self.ffn_dim % QK:
            raise fail(f"the width ({KEYS['dim']}) {self.dim} and the feed-forward size ({KEYS['ffn_dim']}) "
                       f"{self.ffn_dim} must be multiples of {QK}")

    def _check_unsupported(self, m: _Metadata) -> None:
        """Keys that describe a model this runtime cannot run (rather than failing later on shapes)."""
        for key in ("llama.attention.key_length", "llama.attention.value_length"):
            value = m.integer(key, None)
            if value is not None and value != self.head_dim:
                raise m.fail(f"{key} is {value}: only heads of {KEYS['dim']} / {KEYS['n_heads']} = "
                             f"{self.head_dim} are supported")
        experts = m.integer("llama.expert_count", 0)
        if experts:
            raise m.fail(f"llama.expert_count is {experts}: mixture-of-experts models are not supported")

    def _check_vocabulary(self, m: _Metadata, tensors: Mapping[str, tuple[int, ...]] | None) -> None:
        """llama.vocab_size, the embedding's rows, the output's rows and the tokenizer's token count
        are one number."""
        tokens = m.raw("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, tuple, StringArray)) and len(tokens) != self.n_vocab:
            raise m.fail(f"tokenizer.ggml.tokens has {len(tokens)} tokens but the model has {self.n_vocab} "
                         f"({_vocab_origin(m, tensors)})")

    def check_tensors(self, tensors: Mapping[str, tuple[int, ...]]) -> None:
        """Every tensor the keys imply is there with its shape (numpy order); a missing output.weight
        means it is tied to token_embd.weight."""
        def fail(message: str) -> ModelFormatError:
            return ModelFormatError(f"{self.source}: {message}")

        if len(tensors) < len(LAYER_TENSORS) * self.n_layers:  # before looping over n_layers
            raise fail(f"{KEYS['n_layers']} is {self.n_layers} but the file has {len(tensors)} tensors "
                       f"(each layer has {len(LAYER_TENSORS)})")
        for name in tensors:  # llama.cpp refuses layers beyond the count too
            parts = name.split(".", 2)
            if parts[0] == "blk" and len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() \
                    and int(parts[1]) >= self.n_layers:
                raise fail(f"tensor {name!r} lies beyond the {self.n_layers} layers of {KEYS['n_layers']}")
        for name, shape in self.expected_tensors().items():
            found = tensors.get(name)
            if found is None:
                if name in ("output.weight", "rope_freqs.weight"):
                    continue
                raise fail(f"missing tensor {name!r} (the file's keys say {self.n_layers} layers)"
                           if name.startswith("blk.") else f"missing tensor {name!r}")
            if tuple(found) != shape:
                raise fail(f"tensor {name!r} has shape {tuple(found)}, expected {shape} from the metadata")

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """name -> shape (numpy order) of every tensor the runtime reads; output.weight and
        rope_freqs.weight are optional."""
        d, kv, ffn = self.dim, self.kv_dim, self.ffn_dim
        shapes = {"token_embd.weight": (self.n_vocab, d), "output.weight": (self.n_vocab, d),
                  "output_norm.weight": (d,), "rope_freqs.weight": (self.rope_dim // 2,)}
        layer = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, d), "ffn_gate": (ffn, d), "ffn_up": (ffn, d), "ffn_down": (d, ffn)}
        for i in range(self.n_layers):
            shapes.update((f"blk.{i}.{name}.weight", shape) for name, shape in layer.items())
        return shapes

    def check_rope_freqs(self, values: np.ndarray) -> None:
        """Llama 3.1's frequency factors (rope_freqs.weight): rope_dim/2 finite positive numbers."""
        values = np.asarray(values)
        if values.shape != (self.rope_dim // 2,):
            raise ModelFormatError(f"{self.source}: tensor 'rope_freqs.weight' has shape {values.shape}, "
                                   f"expected ({self.rope_dim // 2},) from {KEYS['rope_dim']} {self.rope_dim}")
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ModelFormatError(f"{self.source}: tensor 'rope_freqs.weight' holds {values[i]} at index {i}: "
                                   "the factors must be finite and positive")

    def check_cache_type(self, cache_type: str, path: str) -> None:
        """The KV cache type's head-size rule (quants.KV_CACHE_TYPES)."""
        kind = KV_CACHE_TYPES.get(cache_type)
        if kind is None:
            raise ValueError(f"cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {cache_type!r}")
        if self.head_dim % kind.head_multiple:  # (no real model's head size breaks the f16 rule)
            fallback = ": use cache_type='f32'" if cache_type == "f16" else ""
            raise ValueError(f"{path}: a {cache_type} KV cache needs a head size that is a multiple of "
                             f"{kind.head_multiple} ({kind.rule}), not {self.head_dim}{fallback}")


def _vocab_size(m: _Metadata, tensors: Mapping[str, tuple[int, ...]] | None) -> int:
    """llama.vocab_size, else the embedding's rows, else the token count; the first two must agree
    (and the output's rows with them: checked with the other shapes)."""
    declared = m.integer("llama.vocab_size", None)
    rows = None
    if tensors is not None:
        shape = tensors.get("token_embd.weight")
        if shape is None:
            raise m.fail("missing tensor 'token_embd.weight'")
        if len(shape) != 2:
            raise m.fail(f"tensor 'token_embd.weight' has shape {tuple(shape)}, expected (n_vocab, "
                         f"{KEYS['dim']})")
        rows = int(shape[0])
        if declared is not None and declared != rows:
            raise m.fail(f"llama.vocab_size is {declared} but token_embd.weight has {rows} rows")
    if declared is not None:
        return declared
    if rows is not None:
        return rows
    tokens = m.raw("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, tuple, StringArray)):
        return len(tokens)
    raise m.fail("missing metadata 'llama.vocab_size' (and no token_embd.weight or tokenizer.ggml.tokens to "
                 "count)")


def _vocab_origin(m: _Metadata, tensors: Mapping[str, tuple[int, ...]] | None) -> str:
    if tensors is not None and "token_embd.weight" in tensors:
        return "rows of token_embd.weight"
    return "llama.vocab_size"
