"""edgellama and llama.cpp on every quantization format llama.cpp writes, against an exact reference.

Needs:  pip install llama-cpp-python   (see BENCHMARKS.md for a build that runs on CPUs with AMX)
Run:    python tools/compare_formats.py [--types Q4_K_M Q6_K ...] [--markdown]

SmolLM2-135M's Hugging Face checkpoint (tools/make_hf_checkpoint.py) is converted to an F32 GGUF by
edgellama-quantize, then quantized by llama.cpp's own quantizer to each type (files cached in the
model cache).  For each file, over the passage of tests/golden/smollm2_passage.json (482 tokens):
our logits, llama.cpp's (logits_all, n_batch 512, f16 KV cache), and a float64-free numpy reference
that uses the file's weights exactly as gguf-py dequantizes them with float activations and an f32
cache (tests/reference.py).  Reported: perplexity of each, mean |logit - reference| of ours and of
llama.cpp's, and the top-1 agreement of ours with llama.cpp.  Both runtimes quantize activations to
8 bits; llama.cpp uses 256-element blocks (Q8_K) for K-quants where we keep 32-element ones.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from tools.fetch_models import cache_dir  # noqa: E402
from tools.make_perplexity_fixture import next_token_nll  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


def f32_source() -> Path:
    """SmolLM2-135M as an F32 GGUF made by edgellama-quantize from the HF checkpoint (cached)."""
    from quantize.convert import convert_file
    from tools.make_hf_checkpoint import smollm2_hf

    target = cache_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not target.exists():
        convert_file(smollm2_hf(), target, "f32", quiet=True)
    return target


def llama_cpp_quantized(source: Path, name: str) -> Path:
    """source quantized to llama.cpp's ftype ``name`` by llama.cpp (cached)."""
    import llama_cpp

    target = cache_dir() / f"SmolLM2-135M-Instruct.llamacpp-from-f32.{name}.gguf"
    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = 2
    partial = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {name}")
    partial.replace(target)
    return target


def compare(path: Path, ids: list[int]) -> dict:
    import llama_cpp

    import edgellama
    from edgellama.gguf import GGUFFile
    from edgellama.quants import type_name
    from reference import ReferenceModel

    ours = edgellama.load(path, n_ctx=1024, threads=2).logits(ids)
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    exact = ReferenceModel(str(path)).forward(ids, quantize_activations=False, half_kv=False)
    types: dict[str, int] = {}
    for info in GGUFFile(path).tensors.values():
        types[type_name(info.qtype)] = types.get(type_name(info.qtype), 0) + 1
    ppl = lambda logits: float(np.exp(next_token_nll(logits, ids).mean()))
    return {"file": path.name, "types": types, "ppl_ours": ppl(ours), "ppl_llama_cpp": ppl(theirs),
            "ppl_reference": ppl(exact), "ours_vs_reference": float(np.abs(ours - exact).mean()),
            "llama_cpp_vs_reference": float(np.abs(theirs - exact).mean()),
            "top1_ours_vs_llama_cpp": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    ids = json.loads((ROOT / "tests" / "golden" / "smollm2_passage.json").read_text())["ids"]
    source = f32_source()
    rows = []
    for name in args.types:
        r = compare(llama_cpp_quantized(source, name), ids)
        r["ftype"] = name
        rows.append(r)
        if not args.markdown:
            print(json.dumps(r), flush=True)
    if args.markdown:
        print("| llama.cpp type | tensor types | perplexity: ours / llama.cpp / exact reference | "
              "mean abs logit error vs reference: ours / llama.cpp | top-1 ours = llama.cpp |")
        print("| --- | --- | ---: | ---: | ---: |")
        for r in rows:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]) if k != "F32")
            print(f"| {r['ftype']} | {kinds} | {r['ppl_ours']:.2f} / {r['ppl_llama_cpp']:.2f} / "
                  f"{r['ppl_reference']:.2f} | {r['ours_vs_reference']:.3f} / {r['llama_cpp_vs_reference']:.3f} | "
                  f"{100 * r['top1_ours_vs_llama_cpp']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
