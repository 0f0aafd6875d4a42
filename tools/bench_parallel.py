"""Concurrent streams on ``edgellama serve --parallel N`` and on llama.cpp's ``llama-server -np N``,
side by side: aggregate generation speed of 1 stream and of N concurrent ones, and whether each
concurrent stream's text equals the one it gets alone.

Each server is started in turn on loopback with the same file, threads and total context (``-c``,
split between the slots by both), given one warm-up request, then for every prompt one greedy
completion alone (``max_tokens`` tokens, end-of-generation tokens banned through ``logit_bias`` so
that every stream generates them all), then all prompts at once.  Speeds come from the streamed
events: a stream's generation time runs from its first token to its last; the aggregate speed of
concurrent streams is their tokens after the first, over the time from the earliest first token to
the latest last one.  The load average (``/proc/loadavg``) is printed with every figure: other work
on the machine skews them.

Usage:  python tools/bench_parallel.py [-m MODEL] [-t 2] [-np 4] [-c 4096] [-n 128] [--no-llama]
        [--json]          (default model: SmolLM2-135M-Instruct Q8_0 from the model cache)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.fetch_models import smollm2_requantized  # noqa: E402

PROMPTS = [
    "The old lighthouse keeper climbed the spiral stairs once more, and",
    "Here is a short recipe for a simple tomato soup:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of a great forest,",
    "The three most important ideas in thermodynamics are",
    "Dear team, following our meeting yesterday I would like to",
    "In 1905, Albert Einstein published four papers that",
    "A haiku about the sea:\n",
]


def load() -> str:
    """The 1-minute load average."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server process on a free loopback port, ready when /health answers 200."""

    def __init__(self, name: str, argv: list[str], port: int):
        self.name, self.port = name, port
        self.log = open(f"/tmp/bench_parallel.{name}.{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 900
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start (see {self.log.name})")
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream(port: int, prompt: str, n: int, ban: dict[str, float]) -> dict:
    """One streamed greedy completion: its text, token count, first and last token times."""
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                       "logit_bias": ban}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
    text, times = [], []
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        event = json.loads(data)
        for choice in event.get("choices", []):
            if choice.get("text"):
                text.append(choice["text"])
                times.append(time.perf_counter())
    conn.close()
    return {"text": "".join(text), "events": len(times), "sent": sent, "first": times[0] if times else sent,
            "last": times[-1] if times else sent}


def run_server(server: ServerProcess, prompts: list[str], n: int, ban: dict[str, float]) -> dict:
    stream(server.port, "Hello", 8, ban)  # warm-up
    solo, load_solo = [], load()  # each prompt alone
    for p in prompts:
        solo.append(stream(server.port, p, n, ban))
    results: list[dict | None] = [None] * len(prompts)

    def client(i):
        results[i] = stream(server.port, prompts[i], n, ban)

    load_before = load()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one = sorted((s["events"] - 1) / (s["last"] - s["first"]) for s in solo)[len(solo) // 2]  # the median stream
    first, last = min(s["first"] for s in results), max(s["last"] for s in results)
    aggregate = sum(s["events"] - 1 for s in results) / (last - first)
    return {"server": server.name, "one_stream": one, "aggregate": aggregate, "speedup": aggregate / one,
            "same_text": sum(a["text"] == b["text"] for a, b in zip(solo, results)), "streams": len(prompts),
            "load": f"{load_solo} / {load_before}-{load()}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx", type=int, default=4096, help="total context, split between the slots")
    ap.add_argument("-n", "--tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--no-llama", action="store_true", help="only edgellama")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = args.model or str(smollm2_requantized("q8_0"))
    prompts = PROMPTS[:args.parallel]
    rows = []
    servers = [("edgellama", lambda port: [sys.executable, "-m", "edgellama.cli", "serve", "-m", model, "-t",
                                          str(args.threads), "-c", str(args.ctx), "-np", str(args.parallel),
                                          "--port", str(port)])]
    if not args.no_llama:
        from tools.llamacpp import tool

        binary = str(tool("llama-server"))
        servers.append(("llama-server", lambda port: [binary, "-m", model, "-t", str(args.threads), "-tb",
                                                      str(args.threads), "-c", str(args.ctx), "-np",
                                                      str(args.parallel), "--host", "127.0.0.1", "--port", str(port)]))
    import edgellama
    from edgellama.gguf import GGUFFile

    tokenizer = edgellama.Tokenizer.from_gguf_metadata(GGUFFile(model).metadata)
    ban = {str(i): -100.0 for i in tokenizer.eog_ids}
    for name, make in servers:
        port = _free_port()
        server = ServerProcess(name, make(port), port)
        try:
            rows.append(run_server(server, prompts, args.tokens, ban))
        finally:
            server.close()
        print(f"{name}: done (load {load()})", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": Path(model).name, "threads": args.threads, "parallel": args.parallel,
                          "tokens": args.tokens, "rows": rows}, indent=1))
        return 0
    print(f"{Path(model).name}, {args.threads} threads, -c {args.ctx}, {args.parallel} streams of {args.tokens} "
          "greedy tokens")
    print("| server | 1 stream tok/s | {n} streams aggregate tok/s | speed-up | streams = solo text | load (alone / "
          "together) |".format(n=args.parallel))
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['server']} | {r['one_stream']:.1f} | {r['aggregate']:.1f} | {r['speedup']:.2f}x | "
              f"{r['same_text']}/{r['streams']} | {r['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
