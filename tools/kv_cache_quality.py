"""What the f16 and q8_0 KV caches cost in quality, measured against the f32 cache on the real
SmolLM2 files.

For each file every cache evaluates the same token sequences (the golden fixture prompts, and a
~500-token passage of public-domain prose), from an empty cache, one prompt-sized chunk at a time
(n_batch tokens through the prompt kernels, as a long prompt is evaluated).  Reported per file and
cache type: top-1 agreement with the f32 cache, mean and max |logit difference|, mean
KL(p_f32 || p_type) in nats, and the passage's perplexity under f32 and under the type.

Usage:  python tools/kv_cache_quality.py [--models F.gguf ...] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.make_perplexity_fixture import PASSAGE, next_token_nll  # noqa: E402  (public-domain prose, ~480 tokens)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(path: Path, n_ctx: int = 1024, types: tuple[str, ...] = ("f16", "q8_0")) -> list[dict]:
    """Each cache type against the f32 cache for one GGUF file (see the module docstring)."""
    import edgellama

    caches = {t: edgellama.load(path, n_ctx=n_ctx, threads=2, cache_type=t) for t in ("f32",) + types}
    tok = caches["f32"].tokenizer
    sequences = [tok.encode(PASSAGE)]
    golden = ROOT / "tests" / "golden" / "smollm2_q8_0.json"
    if golden.exists():
        sequences += [p["ids"] for p in json.loads(golden.read_text())["prompts"]]
    agree = {t: 0 for t in types}
    diffs, kls = {t: [] for t in types}, {t: [] for t in types}
    total = 0
    for i, ids in enumerate(sequences):
        raw = {t: m.logits(ids) for t, m in caches.items()}                 # each evaluated once
        a = _log_softmax(raw["f32"])
        total += len(ids)
        for t in types:
            b = _log_softmax(raw[t])
            agree[t] += int((a.argmax(-1) == b.argmax(-1)).sum())
            diffs[t].append(np.abs(raw["f32"] - raw[t]).reshape(-1))
            kls[t].append((np.exp(a) * (a - b)).sum(-1))
        if i == 0:  # the passage: NLL of each next token
            nll = {t: float(next_token_nll(v, ids).mean()) for t, v in raw.items()}
    rows = []
    for t in types:
        d = np.concatenate(diffs[t])
        rows.append({
            "file": path.name,
            "cache_type": t,
            "tokens": total,
            "passage_tokens": len(sequences[0]),
            "top1_agreement": agree[t] / total,
            "mean_abs_logit_diff": float(d.mean()),
            "max_abs_logit_diff": float(d.max()),
            "mean_kl_nats": float(np.concatenate(kls[t]).mean()),
            "ppl_f32": float(np.exp(nll["f32"])),
            "ppl": float(np.exp(nll[t])),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.models is None:
        from tools.fetch_models import smollm2_q4_1, smollm2_requantized

        args.models = [smollm2_q4_1(), smollm2_requantized("q8_0"), smollm2_requantized("q4_0")]
    rows = [r for m in args.models for r in compare(Path(m))]
    if args.markdown:
        print("| file | cache | tokens | top-1 agreement with f32 | mean / max abs logit diff | mean KL (nats) | "
              "passage perplexity f32 / this cache |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['file']} | {r['cache_type']} | {r['tokens']} | {100 * r['top1_agreement']:.1f}% | "
                  f"{r['mean_abs_logit_diff']:.3f} / {r['max_abs_logit_diff']:.2f} | {r['mean_kl_nats']:.5f} | "
                  f"{r['ppl_f32']:.2f} / {r['ppl']:.2f} |")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
