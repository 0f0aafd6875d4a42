"""Make the SentencePiece test fixture: a small BPE model trained by the ``sentencepiece`` package
and that package's own ids for a test corpus.

    pip install sentencepiece      # for this tool only; the tests do not need it
    python tools/make_spm_fixture.py

Writes ``tests/fixtures/tokenizer/spm_bpe.model`` (the model, ~40 KB) and
``tests/fixtures/tokenizer/spm_bpe_cases.json`` (for each test string: sentencepiece's ids, pieces
and decoded text).  The model is trained as Llama's tokenizer was: BPE, byte fallback, digits split,
no normalization, no removal of extra spaces, a dummy-prefix space; the training corpus is
generated here from a fixed seed, so a rerun with the same sentencepiece version is reproducible.
The tests load the ``.model`` with edgellama's own protobuf reader (``spm_model_to_metadata``).
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "tokenizer"
MODEL = OUT_DIR / "spm_bpe.model"
CASES = OUT_DIR / "spm_bpe_cases.json"
VOCAB_SIZE = 2000

SEEDS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Tokenizers turn text into numbers, and numbers back into text.",
    "She said: \"It's not what you think, it's what you do.\"",
    "In 1969, 600 million people watched the Moon landing on 20 July.",
    "Prices rose by 3.5% in March; rents were up 12% year on year.",
    "Please call +1 (555) 010-9999 or write to info@example.com.",
    "def add(a, b):\n    return a + b",
    "for i in range(10): print(i * i)",
    "if (x > 0 && y < 10) { return x * y; } else { return -1; }",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    "import numpy as np; x = np.zeros((3, 4), dtype=np.float32)",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El niño comió una manzana y bebió agua fría.",
    "Привет, как дела? Всё хорошо, спасибо.",
    "我们今天去公园散步，天气很好。",
    "東京は日本の首都です。",
    "The café served crème brûlée and a naïve piñata.",
    "Emoji are fun 😀 and sometimes confusing 🤔 for tokenizers.",
    "Tabs\tand  double  spaces   stay as they are.",
    "Use <b>bold</b> and <i>italic</i> tags in HTML.",
    "https://www.example.org/path/to/page?query=value&x=1",
    "The meeting is at 10:30 am on Monday, 2024-05-06.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Machine learning models need data, compute and patience.",
]
WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money "
         "story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city name "
         "token model vector matrix layer weight cache prompt answer reason").split()


def corpus(seed: int = 1234, n_lines: int = 6000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.45:
            lines.append(rng.choice(SEEDS))
        elif kind < 0.85:
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ";", ""]))
        else:
            a, b = rng.choice(SEEDS), rng.choice(SEEDS)
            lines.append(a[: rng.randint(1, len(a))] + " " + b[rng.randint(0, len(b) - 1):])
    # every line is one sentence for the trainer: newlines inside a seed become separate lines
    return [part for line in lines for part in line.split("\n") if part.strip()]


TEST_STRINGS = [
    "",
    "Hello world",
    "Hello world.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple   spaces\tand\ttabs",
    "line one\nline two\n\nline four",
    "The quick brown fox jumps over the lazy dog.",
    "It's 2024: 1234567890 and 3.14159!",
    "def add(a, b):\n    return a + b\n",
    "if (x > 0 && y < 10) { return x * y; }",
    "我们今天去公园散步，天气很好。",
    "東京は日本の首都です。カタカナとひらがな",
    "Привет, мир! Ελληνικά αβγ",
    "emoji 😀🤔👍🏽 and a family 👨\u200d👩\u200d👧",
    "byte fallback: ǅ ₿ ∮ 𝔘𝔫𝔦 \u00a0nbsp \u2003em",
    "café naïve résumé",
    "▁ literal lower-one-eighth block ▁▁",
    "<s> and </s> and <unk> as plain text",
    "ALLCAPS and MiXeD case words",
    "   ",
    "\n",
    "a",
]

TRAIN_ARGS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    num_threads=1,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=4096,
)


def main() -> int:
    try:
        import sentencepiece as spm
    except ImportError:
        print("this tool needs the sentencepiece package: pip install sentencepiece", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from edgellama.tokenizer import spm_model_to_metadata

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, **TRAIN_ARGS)
    data = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)

    # our protobuf reader must see the same pieces, scores and types as sentencepiece
    meta = spm_model_to_metadata(data, source="trained")
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for i in range(sp.get_piece_size()):
        assert meta["tokenizer.ggml.scores"][i] == sp.get_score(i), i
        kind = (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else None)
        if kind is not None:
            assert meta["tokenizer.ggml.token_type"][i] == kind, i

    cases = []
    for text in TEST_STRINGS:
        ids = sp.encode(text, out_type=int)
        cases.append({"text": text, "ids": ids, "pieces": [sp.id_to_piece(i) for i in ids],
                      "decoded": sp.decode(ids)})
    MODEL.write_bytes(data)
    CASES.write_text(json.dumps({
        "sentencepiece_version": spm.__version__,
        "train_args": TRAIN_ARGS,
        "vocab_size": sp.get_piece_size(),
        "note": "ids from SentencePieceProcessor.encode (no BOS/EOS), decoded from .decode(ids)",
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {MODEL} ({len(data)} bytes) and {CASES} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
