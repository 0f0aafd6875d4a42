"""quantize.blocks: the Numba quantizers are byte-identical to gguf-py's reference (= ggml's C)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

from edgellama.quants import GGMLType
from edgellama.quants import dequantize as numpy_dequantize
from quantize import blocks

# gguf-py's float16 casts warn when a block scale overflows to inf; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TYPES = ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"]
GGUF_PY_QUANTIZED = TYPES + ["Q5_0", "Q5_1"]  # gguf-py quantizes these too (K-quants: test_quantize_kquants)
SHAPES = [(1, 32), (3, 64), (17, 96), (64, 1024), (5, 4096)]


def reference_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's bytes for float32 rows x, as (n_rows, row_bytes) uint8."""
    out = gguf_quants.quantize(x, GGMLQuantizationType[name])
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[0], -1)


def make_rows(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(shape).astype(np.float32)
    if kind == "normal":
        return normal * rng.uniform(1e-3, 10.0, (shape[0], 1)).astype(np.float32)
    if kind == "zeros":
        return np.zeros(shape, dtype=np.float32)
    if kind == "constant":
        return np.full(shape, 0.3125, dtype=np.float32)
    if kind == "negative_constant":
        return np.full(shape, -2.7, dtype=np.float32)
    if kind == "negative_only":
        return -np.abs(normal) - np.float32(0.01)
    if kind == "positive_only":
        return np.abs(normal) + np.float32(0.5)
    if kind == "huge":
        return normal * np.float32(1e30)
    if kind == "beyond_half_range":  # block scales overflow float16 to inf
        return normal * np.float32(3e6)
    if kind == "tiny":
        return normal * np.float32(1e-30)
    if kind == "half_subnormal_scales":  # scales land among float16 subnormals
        return normal * np.float32(1e-5)
    if kind == "ties":  # exact multiples of half-steps: every rounding rule is exercised
        levels = rng.integers(-254, 255, shape).astype(np.float32) / np.float32(2.0)
        levels[:, ::32] = 127.0
        return levels
    if kind == "sparse":
        return np.where(rng.random(shape) < 0.9, np.float32(0.0), normal).astype(np.float32)
    if kind == "one_outlier":
        rows = normal * np.float32(0.01)
        rows[:, 5::32] = 40.0
        return rows
    raise ValueError(kind)


KINDS = ["normal", "zeros", "constant", "negative_constant", "negative_only", "positive_only", "huge",
         "beyond_half_range", "tiny", "half_subnormal_scales", "ties", "sparse", "one_outlier"]


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_rows_matches_gguf_py(name, shape, kind):
    x = make_rows(kind, shape)
    ours = blocks.quantize_rows(x, GGMLType[name])
    assert ours.dtype == np.uint8 and ours.shape == reference_bytes(x, name).shape
    np.testing.assert_array_equal(ours, reference_bytes(x, name))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_rows_matches_numpy_twin(name):
    x = make_rows("normal", (33, 256), seed=3)
    raw = reference_bytes(x, name)
    ours = blocks.dequantize_rows(raw, GGMLType[name], 256)
    twin = numpy_dequantize(raw, GGMLType[name], (33, 256))
    np.testing.assert_array_equal(ours.view(np.uint32), twin.view(np.uint32))


def test_f16_conversion_matches_numpy_on_special_values():
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65519.99, 65520.0, 1e-8,
                         2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -24, 3 * 2.0 ** -26, 6.1e-5, 1e-45,
                         np.finfo(np.float32).max, np.finfo(np.float32).tiny], dtype=np.float32)
    payloads = (np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7F802000, 0x7FFFFFFF], dtype=np.uint32)
                .view(np.float32))
    x = np.concatenate([specials, payloads]).reshape(1, -1)
    np.testing.assert_array_equal(blocks.quantize_rows(x, GGMLType.F16).view(np.uint16),
                                  x.astype(np.float16).view(np.uint16))


def test_f16_conversion_matches_numpy_on_a_sweep_of_bit_patterns():
    # every 2^11-th float32 bit pattern plus its neighbours: all exponents, rounding ties, NaNs
    base = np.arange(0, 1 << 32, 1 << 11, dtype=np.uint64)
    bits = np.concatenate([base, base + 1, base + 0xFFF, base + 0x1000, base + 0x1001]) % (1 << 32)
    x = bits.astype(np.uint32).view(np.float32).reshape(64, -1)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(blocks.quantize_rows(x, GGMLType.F16).view(np.uint16), expected)


def test_bf16_conversion_matches_gguf_py_including_nan():
    bits = np.array([0x7F800001, 0xFFC00001, 0x7FBFFFFF, 0x3F808000, 0x3F818000, 0x7F7FFFFF,
                     0x00000001, 0x80000000, 0x7F800000], dtype=np.uint32)
    rng = np.random.default_rng(1)
    x = np.concatenate([bits, rng.integers(0, 1 << 32, 4087, dtype=np.uint64).astype(np.uint32)])
    x = x.view(np.float32).reshape(4, -1)
    np.testing.assert_array_equal(blocks.quantize_rows(x, GGMLType.BF16), reference_bytes(x, "BF16"))


def test_row_length_not_a_block_multiple_is_refused():
    with pytest.raises(ValueError, match="multiple of"):
        blocks.quantize_rows(np.ones((2, 48), dtype=np.float32), GGMLType.Q8_0)


def test_quantize_accepts_read_only_and_strided_input():
    x = make_rows("normal", (8, 128))
    view = x[::2]
    view.flags.writeable = False
    np.testing.assert_array_equal(blocks.quantize_rows(view, GGMLType.Q4_1),
                                  reference_bytes(np.ascontiguousarray(view), "Q4_1"))
