"""Make tests/golden/smollm2_embeddings.json: llama.cpp's own embeddings of a few texts, the reference
for ``Model.embed`` and ``POST /v1/embeddings``.

llama.cpp's ``llama-server`` (built by tools/llamacpp.py from the llama-cpp-python 0.3.36 sdist) is
started on loopback with ``--embedding --pooling mean`` on SmolLM2-135M-Instruct Q8_0 (our quantizer's
requantization of the Q4_1 file: byte-identical to llama-quantize's, tests/test_golden.py), 2
threads; each text is sent alone to its OpenAI-compatible ``/v1/embeddings`` (mean of the final
normed hidden states, L2-normalized: ``--embd-normalize`` 2, the default), and its ``/tokenize``
gives the token ids it evaluated.  The fixture keeps the texts, the ids and each embedding to 7
significant digits (tests compare cosine similarities, >= 0.99 required).

Run:  python tools/make_embedding_fixture.py          (about a minute; re-runnable, deterministic)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.fetch_models import smollm2_requantized  # noqa: E402
from tools.llamacpp import VERSION, tool  # noqa: E402

OUT = REPO / "tests" / "golden" / "smollm2_embeddings.json"
THREADS = 2
TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital and largest city of France, on the river Seine.",
    "def add(a, b):\n    return a + b\n",
    "La Révolution française a profondément transformé la société.",
    "人工智能是计算机科学的一个分支。",
    "hi",
    "The old lighthouse keeper climbed the spiral stairs once more, counting each step as he had done every "
    "evening for forty years. Outside, the storm gathered over the grey water, and the gulls had long since "
    "gone quiet. He trimmed the wick, wound the clockwork that turned the great lens, and sat down by the "
    "window with his tea, listening to the wind. Somewhere out there a ship was running for the harbour, and "
    "he meant to see it home.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def main() -> int:
    model = smollm2_requantized("q8_0")
    port = _free_port()
    server = subprocess.Popen([str(tool("llama-server")), "-m", str(model), "--embedding", "--pooling", "mean",
                               "-c", "2048", "-b", "2048", "-ub", "2048", "-np", "1", "-t", str(THREADS),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("llama-server did not start")
            time.sleep(0.5)
        cases = []
        for text in TEXTS:
            vector = _post(port, "/v1/embeddings", {"input": text, "model": "smollm2"})["data"][0]["embedding"]
            ids = _post(port, "/tokenize", {"content": text, "add_special": True})["tokens"]
            cases.append({"text": text, "ids": ids, "embedding": [float(f"{v:.7g}") for v in vector]})
            print(f"{len(ids):4d} tokens, |e| = {sum(v * v for v in vector) ** 0.5:.6f}: {text[:40]!r}")
    finally:
        server.terminate()
        server.wait(30)
    head = {"made_by": f"llama-server (llama-cpp-python {VERSION} sdist) --embedding --pooling mean, -t {THREADS}",
            "model": model.name}
    lines = ",\n".join(json.dumps(case, ensure_ascii=False) for case in cases)  # one case a line
    OUT.write_text(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n' + lines + "\n]}\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
