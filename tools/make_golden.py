"""Make the golden fixtures in tests/golden/ with the independent reference, llama.cpp.

Needs:  pip install llama-cpp-python gguf numpy      (llama-cpp-python builds llama.cpp from source)
Run:    cd /work/main && python tools/make_golden.py            # re-runnable; overwrites the JSONs
        python tools/make_golden.py --bench [--threads N]        # only print llama.cpp tok/s, write nothing

What it does (models come from ``tools.fetch_models.cache_dir()``):
  a. requantizes the SmolLM2 Q4_1 file with llama.cpp's own quantizer (default params,
     allow_requantize, 2 threads) into ``SmolLM2-135M-Instruct.llamacpp.{Q8_0,Q4_0}.gguf``
     (skipped when the file exists);
  b. for each of the three files writes ``smollm2_<type>.json``: llama.cpp's token ids, per-position
     top-8 logits (logits_all, n_ctx=512, 2 threads) and a greedy 32-token continuation for 6 prompts;
  c. writes ``smollm2_llamacpp_quant_hashes.json``: per tensor of the requantized files the ggml type,
     shape and sha256 of the raw data bytes, so our quantizer can be checked byte-identical;
  d. writes ``tokenizer_smollm2.json``: llama.cpp ids and detokenized text for ~40 varied strings.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.fetch_models import cache_dir, sha256_file, smollm2_q4_1  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
N_CTX = 512
N_THREADS = 2
SEED = 1234
TOP_K = 8
N_GREEDY = 32

PROMPTS = [  # (name, text, parse special tokens)
    ("english", "The old lighthouse keeper climbed the spiral stairs once more, counting each step as he "
     "had done every evening for forty years. Outside, the storm", False),
    ("python", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
     "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nprint(fibonacci(", False),
    ("french", "La Révolution française a profondément transformé la société. Les idées de liberté, "
     "d'égalité et de fraternité se sont répandues à travers l'Europe, et", False),
    ("cjk", "人工智能是计算机科学的一个分支，它试图理解智能的实质。東京は日本の首都で、", False),
    ("emoji_ws", "Hello 👋🏽 world!  \n\n\t  🧑\u200d💻 wrote   code\r\n   and then… 🎉🎉\n\n\n   ok", False),
    ("chatml", "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
     "<|im_start|>assistant\n", True),
]

TOKENIZER_CORPUS = [
    "",
    " ",
    "        ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \n\t\t\n   \r\n",
    "Hello",
    " Hello",
    "Hello world",
    "Hello, world! How are you today?",
    "don't I'll we've they're she'd it's DON'T WE'VE",
    "1234567 3.14159 -42 1,000,000 0x1F 2024-11-23",
    "The year 1999 had 365 days; 12345678901234567890.",
    "def f(x):\n    if x:\n        return x * 2\n    return None\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "https://example.com/path/to-page?query=1&lang=en#section",
    "user@example.org wrote: <b>bold</b> &amp; [link](http://x.y)",
    "人工智能是计算机科学的一个分支。",
    "東京は日本の首都です。カタカナ ひらがな",
    "한국어 텍스트입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα αβγ",
    "emoji 😀😃😄 👍 🎉",
    "👋🏻 👋🏽 👋🏿 skin tones",
    "👨‍👩‍👧‍👦 family 🧑‍💻 coder 🏳️‍🌈 flag",
    "café naïve résumé",
    "cafe\u0301 nai\u0308ve e\u0301\u0301\u0301",
    "<|im_start|>",
    "<|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text before <|endoftext|> text after <|im_end|>",
    "<|im_start |> <| im_end|> <|unknown|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!!!!!!!!!???????????......----------==========",
    "ÿ\u0000\u0001\u007f control chars",
    "    leading and trailing spaces    ",
    "MixedCASE camelCase snake_case SCREAMING_CASE kebab-case",
    "A\u00a0non-breaking\u2009thin\u3000ideographic space",
    "math: ∑ᵢ xᵢ² ≤ ∞, α→β, √2 ≈ 1.414",
]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - tool script
        raise SystemExit("make_golden.py needs llama-cpp-python: pip install llama-cpp-python") from e
    return llama_cpp



def _text(raw: bytes) -> dict:
    """Bytes as JSON: the UTF-8 text, plus hex when the bytes are not valid UTF-8."""
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text": raw.decode("utf-8", errors="replace"), "hex": raw.hex()}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


# --- a. requantize with llama.cpp -------------------------------------------------------------

def requantize(source: Path, qtype: str) -> Path:
    """``source`` requantized to ``qtype`` ("Q8_0" / "Q4_0") by llama.cpp's quantizer, cached."""
    llama_cpp = _llama_cpp()
    target = cache_dir() / f"SmolLM2-135M-Instruct.llamacpp.{qtype}.gguf"
    if target.exists() and target.stat().st_size > 0:
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = N_THREADS
    partial = target.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {qtype}) returned {rc}")
    partial.replace(target)
    return target


# --- b. logits and greedy continuations ---------------------------------------------------------

def model_golden(path: Path, qtype: str) -> dict:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                          logits_all=True, seed=SEED, verbose=False)
    add_bos = bool(llm._model.add_bos_token())
    out = {
        "llama_cpp_version": llama_cpp.__version__,
        "file": path.name,
        "file_sha256": sha256_file(path),
        "type": qtype,
        "n_ctx": N_CTX, "n_threads": N_THREADS, "seed": SEED, "top_k": TOP_K,
        "add_bos": add_bos,
        "greedy": {"max_tokens": N_GREEDY, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
                   "stops_at_eog": True},
        "prompts": [],
    }
    for name, text, special in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        # Full-sequence logits of the prompt (logits_all=True keeps one row per position).
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (n_prompt, n_vocab)
        top_ids = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]  # (n_prompt, TOP_K)
        top_logits = np.take_along_axis(scores, top_ids, axis=1)
        m = scores.max(axis=1, keepdims=True)
        logsumexp = (m[:, 0] + np.log(np.exp(scores - m).sum(axis=1))).astype(np.float64)

        # Greedy continuation from a fresh state, through llama.cpp's own sampler chain.
        llm.reset()
        gen: list[int] = []
        stop = "length"
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            gen.append(int(tok))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                stop = "eog"
                break
            if len(gen) >= N_GREEDY:
                break
        gen_top1_logits = [round(float(llm.scores[len(ids) - 1 + i].max()), 4) for i in range(len(gen))]

        out["prompts"].append({
            "name": name,
            "text": text,
            "special": special,
            "add_bos": add_bos,
            "ids": [int(t) for t in ids],
            "top1": [int(t) for t in top_ids[:, 0]],
            "topk_ids": top_ids.astype(int).tolist(),
            "topk_logits": np.round(top_logits.astype(np.float64), 4).tolist(),
            "logsumexp": np.round(logsumexp, 4).tolist(),
            "greedy_ids": gen,
            "greedy_text": llm.detokenize(gen).decode("utf-8", errors="replace"),
            "greedy_top1_logits": gen_top1_logits,
            "greedy_stop": stop,
        })
        if gen and gen[0] != int(top_ids[-1, 0]):
            print(f"WARNING {path.name} {name}: first greedy token {gen[0]} != last-position top1 "
                  f"{int(top_ids[-1, 0])}")
    del llm
    return out


# --- c. per-tensor hashes of the llama.cpp-requantized files -----------------------------------

def tensor_table(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = []
    for t in reader.tensors:
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        if raw.nbytes != int(t.n_bytes):
            raise RuntimeError(f"{path.name}:{t.name}: {raw.nbytes} data bytes != n_bytes {t.n_bytes}")
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],  # ggml order (ne0 = row length first)
            "n_bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(raw.tobytes()).hexdigest(),
        })
    file_type = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        file_type = int(field.parts[field.data[0]][0])
    return {
        "file": path.name,
        "file_size": path.stat().st_size,
        "file_sha256": sha256_file(path),
        "general.file_type": file_type,
        "type_counts": dict(sorted(Counter(t["type"] for t in tensors).items())),
        "tensors": tensors,
    }


# --- d. tokenizer ----------------------------------------------------------------------------------

def tokenizer_golden(path: Path) -> dict:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    add_bos_default = bool(llm._model.add_bos_token())
    md = llm.metadata
    out = {
        "llama_cpp_version": llama_cpp.__version__,
        "file": path.name,
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "add_bos_default": add_bos_default,
        "bos_id": int(llm.token_bos()),
        "eos_id": int(llm.token_eos()),
        "eot_id": int(llm._model.token_eot()),
        "n_vocab": int(llm.n_vocab()),
        "note": "detok is llama-cpp-python Llama.detokenize (token_to_piece concatenated); "
                "detok_special renders control tokens as their text",
        "cases": [],
    }
    for text in TOKENIZER_CORPUS:
        encodings = []
        for add_bos in sorted({add_bos_default, True}):
            for special in (False, True):
                ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)]
                enc = {"add_bos": add_bos, "special": special, "ids": ids}
                d = _text(llm.detokenize(ids, special=False))
                enc["detok"] = d["text"]
                if "hex" in d:
                    enc["detok_hex"] = d["hex"]
                d = _text(llm.detokenize(ids, special=True))
                enc["detok_special"] = d["text"]
                if "hex" in d:
                    enc["detok_special_hex"] = d["hex"]
                encodings.append(enc)
        out["cases"].append({"text": text, "encodings": encodings})
    del llm
    return out


# --- speed of the reference ----------------------------------------------------------------------

def bench(paths: dict[str, Path], n_threads: int = N_THREADS, n_prompt: int = 256, n_gen: int = 128,
          runs: int = 2) -> None:
    """Prompt-processing and generation tok/s of llama.cpp (median of ``runs``)."""
    llama_cpp = _llama_cpp()
    text = " ".join(p[1] for p in PROMPTS[:3]) * 20
    print(f"llama_cpp {llama_cpp.__version__}, n_threads={n_threads}, pp{n_prompt} / tg{n_gen}, "
          f"median of {runs}")
    for qtype, path in paths.items():
        llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=n_threads,
                              n_threads_batch=n_threads, seed=SEED, verbose=False)
        prompt = llm.tokenize(text.encode(), add_bos=False)[:n_prompt]
        assert len(prompt) == n_prompt
        pp, tg = [], []
        for _ in range(runs):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            pp.append(n_prompt / (time.perf_counter() - t0))
            llm.reset()
            llm.eval(prompt[:4])
            n_vocab = llm.n_vocab()
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            t0 = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([tok])
                tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            tg.append(n_gen / (time.perf_counter() - t0))
        print(f"  {qtype:5s} {path.name}: pp {statistics.median(pp):7.1f} tok/s   "
              f"tg {statistics.median(tg):6.1f} tok/s   (runs pp={[round(x, 1) for x in pp]} "
              f"tg={[round(x, 1) for x in tg]})")
        del llm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="only measure llama.cpp tok/s")
    parser.add_argument("--threads", type=int, default=N_THREADS, help="threads for --bench")
    args = parser.parse_args(argv)

    source = smollm2_q4_1()
    paths = {"q4_1": source, "q8_0": requantize(source, "Q8_0"), "q4_0": requantize(source, "Q4_0")}
    if args.bench:
        bench(paths, n_threads=args.threads)
        return 0

    for qtype, path in paths.items():
        _write_json(GOLDEN / f"smollm2_{qtype}.json", model_golden(path, qtype))

    llama_cpp = _llama_cpp()
    _write_json(GOLDEN / "smollm2_llamacpp_quant_hashes.json", {
        "llama_cpp_version": llama_cpp.__version__,
        "source": {"file": source.name, "file_sha256": sha256_file(source)},
        "quantize_params": {"defaults": "llama_model_quantize_default_params()",
                            "allow_requantize": True, "nthread": N_THREADS},
        "files": {qtype: tensor_table(paths[qtype]) for qtype in ("q8_0", "q4_0")},
    })
    _write_json(GOLDEN / "tokenizer_smollm2.json", tokenizer_golden(source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
