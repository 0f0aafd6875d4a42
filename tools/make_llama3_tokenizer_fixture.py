"""Golden ids for Llama 3's vocabulary as a GGUF, from llama.cpp (llama-cpp-python).

    pip install llama-cpp-python && python tools/make_llama3_tokenizer_fixture.py

Builds a vocabulary-only GGUF from Llama 3's official tiktoken ``tokenizer.model`` (fetched by
tools/fetch_models.py) the way llama.cpp's converter does (tokens in the GPT-2 byte alphabet, merges
ordered by the rank of the token they make, pre-tokenizer ``llama-bpe``), tokenizes the corpus of
tests/golden/tokenizer_smollm2.json with llama.cpp and writes tests/golden/tokenizer_llama3.json.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellama.gguf import write_gguf  # noqa: E402
from edgellama.tokenizer import llama3_special_tokens  # noqa: E402
from tools.fetch_models import llama3_tokenizer  # noqa: E402

OUT = ROOT / "tests" / "golden" / "tokenizer_llama3.json"


def gpt2_byte_alphabet() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def llama3_gguf_metadata(path: Path) -> dict:
    """GGUF tokenizer metadata for Llama 3 as llama.cpp's converter makes it: every split of every
    token into two tokens is a merge, ordered by the rank of the token it makes."""
    b2u = gpt2_byte_alphabet()
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    by_rank = sorted(ranks, key=ranks.get)
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    merges = []
    for tok in by_rank:
        splits = sorted((ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok))
                        if tok[:i] in ranks and tok[i:] in ranks)
        merges += [text(tok[:i]) + " " + text(tok[i:]) for _, _, i in splits]
    specials = llama3_special_tokens(len(ranks))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": [text(t) for t in by_rank] + specials,
        "tokenizer.ggml.token_type": np.array([1] * len(by_rank) + [3] * len(specials), np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    }


def main() -> int:
    from llama_cpp import Llama, __version__

    md = llama3_gguf_metadata(llama3_tokenizer())
    md.update({"general.architecture": "llama", "llama.block_count": 1, "llama.context_length": 8192,
               "llama.embedding_length": 64, "llama.feed_forward_length": 128,
               "llama.attention.head_count": 2, "llama.attention.head_count_kv": 2,
               "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
               "llama.vocab_size": len(md["tokenizer.ggml.tokens"])})
    corpus = [c["text"] for c in json.loads((ROOT / "tests/golden/tokenizer_smollm2.json").read_text())["cases"]]
    corpus += ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama3-vocab.gguf"
        write_gguf(path, md, [], [])
        llm = Llama(str(path), vocab_only=True, verbose=False)
        cases = []
        for text in corpus:
            encodings = []
            for special in (False, True):
                ids = llm.tokenize(text.encode(), add_bos=True, special=special)
                encodings.append({"special": special, "ids": ids,
                                  "detok": llm.detokenize(ids).decode("utf-8", errors="replace")})
            cases.append({"text": text, "encodings": encodings})
    OUT.write_text(json.dumps({"llama_cpp_version": __version__, "source": "llama-models==0.3.0 "
                               "llama3/tokenizer.model as a GGUF vocabulary (pre llama-bpe)",
                               "add_bos": True, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
