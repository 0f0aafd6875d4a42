"""Make tests/golden/smollm2_passage.json: llama.cpp's per-token log-likelihood of a ~500-token text.

Needs:  pip install llama-cpp-python   (see BENCHMARKS.md for a build that runs on CPUs with AMX)
Run:    python tools/make_perplexity_fixture.py        # re-runnable; overwrites the JSON

The text is the opening of "A Scandal in Bohemia" (Arthur Conan Doyle, 1891; public domain).  For the
shipped SmolLM2 Q4_1 file and the Q8_0 / Q4_0 files requantized from it by llama.cpp (the files
tools/make_golden.py makes, cached; byte-identical to edgellama-quantize's), llama.cpp tokenizes the text,
evaluates it in one pass (logits_all, n_ctx 1024, n_batch 512, its default f16 KV cache, 2 threads) and
the fixture records the token ids and, per position, -log p(next token) (4 decimals).  A test checks
that edgellama's perplexity over the same ids agrees: an end-to-end check over a sequence longer
than one prompt chunk, through the whole cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.fetch_models import sha256_file, smollm2_q4_1  # noqa: E402

OUT = REPO / "tests" / "golden" / "smollm2_passage.json"
N_CTX, N_BATCH, N_THREADS = 1024, 512, 2

PASSAGE = """To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any \
other name. In his eyes she eclipses and predominates the whole of her sex. It was not that he felt \
any emotion akin to love for Irene Adler. All emotions, and that one particularly, were abhorrent to \
his cold, precise but admirably balanced mind. He was, I take it, the most perfect reasoning and \
observing machine that the world has seen, but as a lover he would have placed himself in a false \
position. He never spoke of the softer passions, save with a gibe and a sneer. They were admirable \
things for the observer - excellent for drawing the veil from men's motives and actions. But for the \
trained reasoner to admit such intrusions into his own delicate and finely adjusted temperament was to \
introduce a distracting factor which might throw a doubt upon all his mental results. Grit in a \
sensitive instrument, or a crack in one of his own high-power lenses, would not be more disturbing \
than a strong emotion in a nature such as his. And yet there was but one woman to him, and that woman \
was the late Irene Adler, of dubious and questionable memory.

I had seen little of Holmes lately. My marriage had drifted us away from each other. My own complete \
happiness, and the home-centred interests which rise up around the man who first finds himself master \
of his own establishment, were sufficient to absorb all my attention, while Holmes, who loathed every \
form of society with his whole Bohemian soul, remained in our lodgings in Baker Street, buried among \
his old books, and alternating from week to week between cocaine and ambition, the drowsiness of the \
drug, and the fierce energy of his own keen nature. He was still, as ever, deeply attracted by the \
study of crime, and occupied his immense faculties and extraordinary powers of observation in \
following out those clues, and clearing up those mysteries which had been abandoned as hopeless by \
the official police. From time to time I heard some vague account of his doings: of his summons to \
Odessa in the case of the Trepoff murder, of his clearing up of the singular tragedy of the Atkinson \
brothers at Trincomalee, and finally of the mission which he had accomplished so delicately and \
successfully for the reigning family of Holland."""


def next_token_nll(scores: np.ndarray, ids: list[int]) -> np.ndarray:
    """-log p(ids[t+1] | ids[:t+1]) for t = 0 .. len(ids) - 2, from the logits rows."""
    from edgellama.perplexity import next_token_nll as nll

    return nll(scores[:-1], np.asarray(ids[1:]))


def main() -> int:
    import llama_cpp

    from tools.make_golden import requantize

    source = smollm2_q4_1()
    files = {"q4_1": source, "q8_0": requantize(source, "Q8_0"), "q4_0": requantize(source, "Q4_0")}
    out = {"llama_cpp_version": llama_cpp.__version__, "text": PASSAGE,
           "source": "Arthur Conan Doyle, A Scandal in Bohemia (1891), opening; public domain",
           "n_ctx": N_CTX, "n_batch": N_BATCH, "n_threads": N_THREADS, "files": {}}
    for qtype, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS, logits_all=True,
                              verbose=False)
        ids = llm.tokenize(PASSAGE.encode(), add_bos=False, special=False)
        llm.eval(ids)
        nll = next_token_nll(np.array(llm.scores[:len(ids)]), ids)
        out.setdefault("ids", ids)
        assert out["ids"] == ids, "the three files share one vocabulary"
        out["files"][qtype] = {"file": path.name, "file_sha256": sha256_file(path),
                               "perplexity": round(float(np.exp(nll.mean())), 4),
                               "nll": [round(float(v), 4) for v in nll]}
        print(f"{qtype}: {len(ids)} tokens, perplexity {np.exp(nll.mean()):.3f}", file=sys.stderr)
        llm.close()
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
