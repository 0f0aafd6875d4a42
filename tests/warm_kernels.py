"""A cold run's second process: it compiles the kernels the suite's model and quantizer tests use
while the first tests of the run (which use none: tokenizers, GGUF parsing, templates, sampling,
then the quantizer's) keep the other core busy.

Numba compiles a kernel on first use, on one core; a run on an empty cache compiled for about four
minutes of its twelve on a 2-core Xeon (the tests that compile on purpose, in caches of their own,
not counted), one core idle meanwhile.  conftest.py starts this script (``python
tests/warm_kernels.py``) when the run's tests are known, and orders the test files so that the ones
that need no kernels come first (FIRST below).  The script does, on tiny models, what those tests
do (load, a prompt and a few decode steps, a batch of two sequences, a context shift, an embedding,
for each KV cache type; then the quantizer's types), so that the kernels land in the cache the tests
read (the same argument types: the same compiled code).  Whatever it has not reached when a test
needs it, the test compiles as it would without it (Numba's cache saves are locked across
processes: edgellama.kernels.cache); a warm cache costs it a few seconds of loading.  It changes no
result: it only fills the cache, and its output goes nowhere unless it fails (then the run prints
the end of it, as a warning: the tests still compile what they need).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# test files whose tests call no kernel (or the quantizer's few): they run first, while this
# script compiles (conftest.py's pytest_collection_modifyitems; the others keep their order)
FIRST = ("test_tokenizer.py", "test_tokenizer_hostile.py", "test_gguf_bad_inputs.py", "test_chat_hostile.py",
         "test_sampling.py", "test_validate.py", "test_hardware.py", "test_quantize_hostile.py",
         "test_quantize_safetensors.py", "test_quantize_cli.py", "test_quantize_blocks.py", "test_quantize_kquants.py",
         "test_quantize_convert.py", "test_quantize_meta.py", "test_quantize_hf.py", "test_quantize_kquant_golden.py")
# the files whose tests need the model kernels: without one of them in the run, nothing to warm
USERS = ("test_batch.py", "test_model.py", "test_golden.py", "test_context_shift.py", "test_cli.py",
         "test_chat_repl.py", "test_server_parallel.py", "test_kernels.py")


def order_key(path: str) -> int:
    """Sort key of a test file: FIRST's files in FIRST's order, then the others (a stable sort keeps
    their order)."""
    name = os.path.basename(path)
    return FIRST.index(name) if name in FIRST else len(FIRST)


def warm(folder: Path) -> None:
    """In the order the reordered run needs them: the quantizer's kernels (the quantize tests come
    right after the kernel-free ones), then the model's for each KV cache type, then one model's own
    set of packed types (tests/test_formats.py; the rest of the run compiles every type at once)."""
    os.environ["EDGELLAMA_COMPILE_PROCESSES"] = "1"  # this process is the second one
    os.environ.setdefault("EDGELLAMA_KERNEL_FORMATS", "all")  # as conftest.py sets it for the tests
    import edgellama
    from edgellama.batch import Batch
    from edgellama.model import FORMATS_ENV
    from edgellama.quants import GGMLType
    from quantize.convert import convert_file
    from tiny_model import write_tiny_model

    started = time.perf_counter()

    def done(what: str) -> None:
        print(f"{time.perf_counter() - started:7.1f} s  {what}", flush=True)

    # the quantizer: every type, from a tiny model whose rows take the K-quants
    source = write_tiny_model(folder / "f16.gguf", GGMLType.F16, dim=256, ffn=512, ctx=256)
    for qtype in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f32", "q4_k_m", "q5_k_s", "q6_k"):
        convert_file(source, folder / f"quantized-{qtype}.gguf", qtype, allow_requantize=True, quiet=True)
        done(f"quantizer: {qtype}")
    # the model: the prompt path, the decode step, a batch of two, a context shift, an embedding
    prompt = [(i * 37 + 11) % 250 + 2 for i in range(40)]
    for cache_type in ("f16", "f32", "q8_0"):
        extra = {"n_heads": 2} if cache_type == "q8_0" else {}  # head size 32: whole Q8_0 blocks
        path = write_tiny_model(folder / f"cache-{cache_type}.gguf", GGMLType.Q8_0, ctx=256, **extra)
        model = edgellama.load(path, n_ctx=256, threads=2, cache_type=cache_type)
        model.warm_up()
        list(model.generate(prompt, max_tokens=4, temperature=0))
        batch = Batch(model, n_slots=2)
        for i in range(2):
            batch.add(prompt[i:], 3, seed=i, temperature=0.9, top_k=40, logprobs=3)
        list(batch.stream())
        model.reset()
        model.eval(prompt)
        model.shift_context(4, 8)
        model.embed(["a b c"])
        done(f"model, KV cache {cache_type}")
    # a model's own set of packed types: Q4_K layers, Q8_0 embeddings (tests/test_formats.py's)
    path = write_tiny_model(folder / "mixed.gguf", GGMLType.Q4_K, dim=256, ffn=256, embd_type=GGMLType.Q8_0, ctx=64)
    os.environ.pop(FORMATS_ENV)
    model = edgellama.load(path, n_ctx=64, threads=2)
    model.warm_up()
    model.generate_many(["the sea", "cold water is deep and dark"], max_tokens=4, temperature=0)
    done("model, its own packed types")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))          # tiny_model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # edgellama, quantize
    with tempfile.TemporaryDirectory(prefix="edgellama-warm-") as folder:
        warm(Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
