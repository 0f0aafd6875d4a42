"""Compare edgellama with the llama.cpp golden fixtures in tests/golden/ (made by tools/make_golden.py).

    python tools/golden.py            prints, per file and prompt: token match, top-1 agreement,
                                      logit differences, greedy continuation match

Why agreement is not 100%: with 8-bit activations (ggml's Q8_0/Q8_1 activation blocks, which
llama.cpp and edgellama both use) this model is chaotic: a 1e-6 relative change anywhere flips a
few activation roundings, and the flips grow through 30 layers into logit changes of ~0.1-1.
llama.cpp disagrees with itself on 4-6% of top-1 tokens when only its flash-attention or KV-cache
type setting changes.  So the checks are: exact token ids; top-1 equal wherever llama.cpp's margin
between its first and second token is clear (>= NEAR_TIE logits); everywhere else llama.cpp's top-1
is within NEAR_TIE of our best logit; the greedy continuation equal up to its first near tie.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
NEAR_TIE = 0.75  # logits; the largest disagreement seen between llama.cpp configurations is ~0.5


@dataclass
class PromptReport:
    name: str
    tokens_equal: bool
    positions: int
    top1_equal: int
    clear_disagreements: list = field(default_factory=list)  # (position, ref margin, our gap)
    max_logit_diff: float = 0.0       # over llama.cpp's top-8 logits at every position
    mean_logit_diff: float = 0.0
    greedy_equal: int = 0             # leading greedy tokens that match
    greedy_len: int = 0
    greedy_divergence_gap: float | None = None  # our logit gap to llama.cpp's token where we diverged
    forced_max_gap: float = 0.0       # teacher-forced: worst gap of llama.cpp's greedy token to our best

    @property
    def ok(self) -> bool:
        greedy_ok = self.greedy_equal == self.greedy_len or (self.greedy_divergence_gap or 0) < NEAR_TIE
        return (self.tokens_equal and not self.clear_disagreements and greedy_ok
                and self.forced_max_gap < NEAR_TIE)


def load_fixture(qtype: str) -> dict:
    return json.loads((GOLDEN / f"smollm2_{qtype}.json").read_text())


def compare_prompt(model, p: dict) -> PromptReport:
    ids = model.tokenize(p["text"], special=p["special"])
    ref_ids = p["ids"]
    rep = PromptReport(p["name"], ids == ref_ids, len(ref_ids), 0)
    logits = model.logits(ref_ids)
    diffs = []
    for t in range(len(ref_ids)):
        row = logits[t]
        ref_top, ref_logits = p["topk_ids"][t], np.array(p["topk_logits"][t])
        diffs.append(np.abs(row[ref_top] - ref_logits))
        if int(row.argmax()) == p["top1"][t]:
            rep.top1_equal += 1
            continue
        ref_margin = float(ref_logits[0] - ref_logits[1])
        gap = float(row.max() - row[p["top1"][t]])
        if ref_margin >= NEAR_TIE or gap >= NEAR_TIE:
            rep.clear_disagreements.append((t, round(ref_margin, 3), round(gap, 3)))
    diffs = np.concatenate(diffs)
    rep.max_logit_diff, rep.mean_logit_diff = float(diffs.max()), float(diffs.mean())

    # greedy continuation: free-running, then teacher-forced along llama.cpp's tokens
    ref_greedy = p["greedy_ids"]
    rep.greedy_len = len(ref_greedy)
    forced = model.logits(ref_ids + ref_greedy[:-1])[len(ref_ids) - 1:]
    gaps = [float(forced[i].max() - forced[i][tok]) for i, tok in enumerate(ref_greedy)]
    rep.forced_max_gap = max(gaps)
    model.reset()
    ours = [c.token for c in model.generate(ref_ids, max_tokens=len(ref_greedy), temperature=0.0)
            if c.token is not None]
    stop = p["greedy_stop"] == "eog"
    produced = ours + ([ref_greedy[-1]] if stop and len(ours) == len(ref_greedy) - 1 else [])
    for a, b in zip(produced, ref_greedy):
        if a != b:
            break
        rep.greedy_equal += 1
    if rep.greedy_equal < rep.greedy_len:
        rep.greedy_divergence_gap = gaps[rep.greedy_equal]
    return rep


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import edgellama
    from tools.fetch_models import smollm2_q4_1, smollm2_requantized

    files = {"q4_1": smollm2_q4_1(), "q8_0": smollm2_requantized("q8_0"), "q4_0": smollm2_requantized("q4_0")}
    all_ok = True
    for qtype, path in files.items():
        model = edgellama.load(path, n_ctx=512)
        reports = [compare_prompt(model, p) for p in load_fixture(qtype)["prompts"]]
        top1 = sum(r.top1_equal for r in reports) / sum(r.positions for r in reports)
        print(f"{qtype}: top-1 agreement {top1:.4f}, max |logit diff| {max(r.max_logit_diff for r in reports):.3f}, "
              f"mean {np.mean([r.mean_logit_diff for r in reports]):.4f}")
        for r in reports:
            all_ok &= r.ok
            print(f"  {r.name:9s} tokens {'==' if r.tokens_equal else '!='}  top-1 {r.top1_equal}/{r.positions}  "
                  f"greedy {r.greedy_equal}/{r.greedy_len}"
                  + (f" (diverged at a near tie, gap {r.greedy_divergence_gap:.3f})" if r.greedy_divergence_gap
                     is not None else "")
                  + f"  forced-gap {r.forced_max_gap:.3f}  {'ok' if r.ok else 'FAIL ' + str(r.clear_disagreements)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
