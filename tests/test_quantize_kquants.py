"""quantize.kquants: the K-quant kernels against their twins.

* the vectorized fits (many sub-blocks per vector) against the scalar fits, which follow ggml's
  reference one sub-block at a time (and which llama-quantize's golden files pin:
  tests/test_quantize_kquant_golden.py), on every kind of row test_quantize_blocks uses;
* nearest_int and the half-precision helpers against numpy;
* the Numba dequantizers against gguf-py's (the definition of the formats);
* thread-count independence, error bounds, and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from edgellama.quants import GGMLType
from quantize import blocks, kquants
from test_quantize_blocks import KINDS, make_rows

K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]
WIDTHS = [256, 512, 2304, 4096 + 3 * 256]  # one super-block, two, a run of 8 plus 1, 2 runs minus 5

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def nearest_int_twin(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int in numpy: the low mantissa bits of v + 1.5 * 2^23 (float32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        biased = np.asarray(v, np.float32) + np.float32(12582912.0)
    return (biased.view(np.int32) & 0x7FFFFF) - 0x400000


@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_vectorized_fits_equal_the_scalar_fits(name, width, kind):
    x = make_rows(kind, (5, width), seed=width)
    fast = blocks.quantize_rows(x, GGMLType[name])
    slow = np.empty_like(fast)
    kquants.reference_rows(x, slow, name)
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("name", K_TYPES)
def test_mixed_rows_and_sub_blocks(name):
    """Sub-blocks of every kind side by side in one row (each lane of a vector takes its own path)."""
    rows = [make_rows(kind, (3, 256), seed=i) for i, kind in enumerate(KINDS)]
    x = np.concatenate(rows, axis=1)  # (3, 256 * len(KINDS))
    rng = np.random.default_rng(5)
    x = x.reshape(3, -1, 32)[:, rng.permutation(x.shape[1] // 32)].reshape(3, -1)  # shuffled sub-blocks
    fast = blocks.quantize_rows(x, GGMLType[name])
    slow = np.empty_like(fast)
    kquants.reference_rows(x, slow, name)
    np.testing.assert_array_equal(fast, slow)


def test_nearest_int_matches_its_numpy_twin():
    from numba import njit

    @njit
    def many(v, out):
        for i in range(v.shape[0]):
            out[i] = kquants.nearest_int(v[i])

    rng = np.random.default_rng(0)
    halves = np.arange(-2000, 2000, dtype=np.float32) / np.float32(2.0)  # every tie
    v = np.concatenate([halves, rng.standard_normal(10000).astype(np.float32) * 100,
                        np.array([4194303.0, -4194303.0, 4194304.5, 1e7, -3e9, 0.49999997, -0.5, -0.0,
                                  np.inf, -np.inf, np.nan], np.float32)])
    got = np.empty(v.shape, np.int32)
    many(v, got)
    np.testing.assert_array_equal(got, nearest_int_twin(v))
    small = np.abs(v) < 4194303
    np.testing.assert_array_equal(got[small], np.rint(v[small]).astype(np.int32))  # ties to even


def test_half_precision_helpers_match_numpy():
    from numba import njit

    @njit
    def to_half(v, out):
        for i in range(v.shape[0]):
            out[i] = kquants.f32_to_f16_bits(v[i])

    @njit
    def from_half(h, out):
        for i in range(h.shape[0]):
            out[i] = kquants.f16_bits_to_f32(h[i])

    base = np.arange(0, 1 << 32, 1 << 13, dtype=np.uint64)
    bits = (np.concatenate([base, base + 1, base + 0xFFF, base + 0x1000]) % (1 << 32)).astype(np.uint32)
    v = bits.view(np.float32)
    got = np.empty(v.shape, np.int64)
    to_half(v, got)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got.astype(np.uint16), v.astype(np.float16).view(np.uint16))
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = np.empty(halves.shape, np.float32)
    from_half(halves, back)
    np.testing.assert_array_equal(back.view(np.uint32), halves.view(np.float16).astype(np.float32).view(np.uint32))


def random_blocks(name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of valid blocks: every f16 scale a finite value of moderate size."""
    block_elems, block_bytes = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
                                "Q5_0": (32, 22), "Q5_1": (32, 24)}[name]
    rng = np.random.default_rng(seed)
    n_blocks = n_rows * n_cols // block_elems
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    offsets = blocks.SCALE_OFFSETS[GGMLType[name]]
    for o in offsets:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        raw[:, o:o + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("name", K_TYPES + ["Q5_0", "Q5_1"])
def test_dequantizers_match_gguf_py(name):
    raw = random_blocks(name, 7, 1024)
    ours = blocks.dequantize_rows(raw, GGMLType[name], 1024)
    want = gguf_dequantize(raw, GGMLQuantizationType[name]).reshape(7, 1024).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", K_TYPES + ["Q5_0", "Q5_1"])
def test_thread_count_does_not_change_the_bytes(name, monkeypatch):
    """Rows cut into ranges for 1, 2, 3 and 7 threads (as if the machine had 7 CPUs, whatever it
    has) give the same bytes."""
    from quantize import threads

    monkeypatch.setattr(threads, "_available_cpus", lambda: 7)
    x = make_rows("normal", (37, 2304), seed=9)
    outs = []
    try:
        for n in (1, 2, 3, 7):
            threads.set_threads(n)
            assert threads.thread_count() == n
            outs.append(blocks.quantize_rows(x, GGMLType[name]))
    finally:
        threads.set_threads(None)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_row_ranges_cover_every_row_once_and_errors_reach_the_caller(monkeypatch):
    from quantize import threads

    monkeypatch.setattr(threads, "_available_cpus", lambda: 3)
    threads.set_threads(3)
    try:
        for n_rows in (0, 1, 2, 5, 13, 100):
            seen = np.zeros(n_rows, np.int64)

            def run(lo, hi):
                seen[lo:hi] += 1
            threads.over_rows(n_rows, run)
            assert np.all(seen == 1), (n_rows, seen)

        def fail(lo, hi):
            if lo > 0:
                raise ValueError(f"rows {lo}:{hi}")
        with pytest.raises(ValueError, match="rows"):
            threads.over_rows(50, fail)
        # a range that runs rows over the threads itself (nested) runs them on its own thread
        seen = np.zeros(40, np.int64)

        def inner(lo, hi):
            seen[lo:hi] += 1

        def outer(lo, hi):
            for r in range(lo, hi):
                threads.over_rows(10, lambda a, b, r=r: inner(r * 10 + a, r * 10 + b))
        threads.over_rows(4, outer)
        assert np.all(seen == 1)
    finally:
        threads.set_threads(None)


@pytest.mark.parametrize("name, bound", [("Q4_K", 0.09), ("Q5_K", 0.045), ("Q6_K", 0.02), ("Q5_0", 0.05),
                                         ("Q5_1", 0.045)])
def test_round_trip_error_of_gaussian_rows(name, bound):
    """Relative RMS error of Gaussian weights, quantized and decoded: 4-bit about 7-8%, 5-bit
    about 3.5-4%, 6-bit about 1.8% (the bounds leave ~15% room over these figures)."""
    x = make_rows("normal", (64, 1024), seed=11)
    y = blocks.dequantize_rows(blocks.quantize_rows(x, GGMLType[name]), GGMLType[name], 1024)
    rel = np.sqrt(np.mean((y - x) ** 2, axis=1) / np.mean(x ** 2, axis=1))
    assert rel.max() < bound, (name, rel.max())


def test_rows_that_are_not_a_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of Q4_K's block size 256"):
        blocks.quantize_rows(np.ones((2, 576), np.float32), GGMLType.Q4_K)


def test_importance_weights_are_not_implemented_yet():
    with pytest.raises(NotImplementedError, match="imatrix"):
        blocks.quantize_rows(np.ones((2, 256), np.float32), GGMLType.Q4_K, importance=np.ones(256, np.float32))


def test_scale_overflow_is_refused_with_the_tensors_name(tmp_path):
    """Weights too large for a type's half-precision scales are refused (llama-quantize's data
    validation refuses them too), naming the tensor; nothing is written."""
    from quantize.convert import convert_file
    from quantize.source import QuantizeError
    from test_quantize_convert import write_small_gguf

    def huge(weights):
        weights["blk.0.ffn_down.weight"][3, :32] = 1e30

    src, _ = write_small_gguf(tmp_path / "src.gguf", seed=5, edit=huge)
    with pytest.raises(QuantizeError, match=r"blk\.0\.ffn_down\.weight: 1 block scale\(s\) overflow half precision"):
        convert_file(src, tmp_path / "out.gguf", "q8_0", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
