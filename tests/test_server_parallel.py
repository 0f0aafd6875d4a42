"""``edgellama serve --parallel N``: requests generated together in slots (edgellama.server.SlotEngine),
and ``POST /v1/embeddings``.  Replies are checked against the batch API run alone (batch
invariance: a reply does not depend on what runs beside it); the scheduling rules are observed
through the engine's state, never through timings."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import edgellama
from edgellama.batch import Batch
from edgellama.quants import GGMLType
from test_server import ROOT, Running, events, wait_until
from tiny_model import write_tiny_model

CHATS = [[{"role": "user", "content": "hello there"}], [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "what is the theremin?"}],
         [{"role": "user", "content": "a"}], [{"role": "user", "content": "once upon a time " * 6}]]
NO_END = None  # set per model: a logit bias that bans the end-of-generation tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("parallel") / "tiny.gguf", GGMLType.Q8_0, ctx=512)
    return edgellama.load(path, n_ctx=512, threads=2)


@pytest.fixture(scope="module")
def server(tiny):
    s = Running(tiny, parallel=3, max_queue=4)
    yield s
    s.close()


def _no_end(model) -> dict:
    return {str(i): -100 for i in model.tokenizer.eog_ids}


def _alone(model, chat, n_ctx, **options):
    """The reply the batch API gives this chat alone: (text, finish_reason, token logprobs)."""
    batch = Batch(model, n_slots=1, n_ctx=n_ctx)
    seq = batch.add_chat(chat, **options)
    list(batch.stream())
    return seq.text, seq.finish_reason, [c.logprob for c in seq.chunks if c.token is not None]


def _slow_steps(engine, monkeypatch, seconds=0.02):
    """Each batch step takes at least ``seconds`` (the tiny model is too fast to watch otherwise);
    returns the list of each step's (rows, sequences) as the engine ran them."""
    real_step, real_forward = engine.batch.step, engine.batch.rows.forward
    steps = []

    def forward(tokens, positions, slots, out_rows, want_logits=True):
        steps.append((len(tokens), list(slots)))
        return real_forward(tokens, positions, slots, out_rows, want_logits)

    def step():
        time.sleep(seconds)
        return real_step()

    monkeypatch.setattr(engine.batch, "step", step)
    monkeypatch.setattr(engine.batch.rows, "forward", forward)
    return steps


def test_concurrent_replies_are_each_the_reply_alone(server, tiny):
    """Four chats at once on three slots (one waits for a slot), greedy and seeded, with logprobs:
    each reply is the batch API's for that chat alone, bit for bit (logprobs compared exactly)."""
    n_ctx = server.engine.n_ctx
    assert n_ctx == 512 // 3
    requests = [dict(messages=chat, max_tokens=12, logprobs=True, top_logprobs=2, temperature=t, seed=7 * i)
                for i, (chat, t) in enumerate(zip(CHATS, (0.0, 1.0, 0.7, 0.0)))]
    want = [_alone(tiny, r["messages"], n_ctx, max_tokens=12, temperature=r["temperature"], seed=r["seed"],
                   logprobs=2) for r in requests]
    results = [None] * len(requests)

    def client(i):
        results[i] = server.post("/v1/chat/completions", requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (status, _, body), (text, finish, logprobs) in zip(results, want):
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["message"]["content"] == text and choice["finish_reason"] == finish
        assert [e["logprob"] for e in choice["logprobs"]["content"]] == logprobs


def test_streams_and_whole_replies_agree(server):
    req = {"messages": CHATS[1], "max_tokens": 10, "temperature": 0}
    whole = server.post("/v1/chat/completions", req)[2]["choices"][0]
    status, headers, text = server.post("/v1/chat/completions", {**req, "stream": True,
                                                                "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    evs = events(text)
    assert evs[-1] == "[DONE]" and evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in evs[:-1] if c["choices"])
    assert content == whole["message"]["content"]
    assert evs[-2]["usage"]["completion_tokens"] >= 1


def test_a_chats_next_turn_returns_to_its_slot(server):
    first = server.post("/v1/chat/completions", {"messages": CHATS[2], "max_tokens": 3, "temperature": 0})[2]
    turn = CHATS[2] + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "go on"}]
    # the other slots are given other contexts meanwhile
    for chat in CHATS[:2]:
        server.post("/v1/chat/completions", {"messages": chat, "max_tokens": 2, "temperature": 0})
    second = server.post("/v1/chat/completions", {"messages": turn, "max_tokens": 2, "temperature": 0})[2]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1


def test_health_and_slots_show_what_runs(tiny, monkeypatch):
    s = Running(tiny, parallel=2, max_queue=1)
    try:
        assert s.request("GET", "/health")[2] == {"status": "ok", "slots_idle": 2, "slots_processing": 0,
                                                  "requests_waiting": 0}
        _slow_steps(s.engine, monkeypatch)
        body = {"messages": CHATS[0], "max_tokens": 200, "temperature": 0, "logit_bias": _no_end(tiny)}
        threads = [threading.Thread(target=s.post, args=("/v1/chat/completions", body)) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: s.engine.waiting == 1 and len(s.engine.running) == 2, "two run, one waits")
        wait_until(lambda: s.request("GET", "/health")[2]["slots_processing"] == 2, "the health shows them")
        health = s.request("GET", "/health")[2]
        assert health["slots_idle"] == 0 and health["requests_waiting"] == 1
        # beyond the slots and the line: 503
        status, headers, reply = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 503 and headers["Retry-After"] == "1" and reply["error"]["code"] == "server_busy"
        slots = s.request("GET", "/slots")[2]
        assert [x["id"] for x in slots] == [0, 1] and all(x["n_ctx"] == 256 for x in slots)
        assert all(x["state"] in ("prompt", "generating") for x in slots)
        for t in threads:
            t.join(120)
        wait_until(s.engine.idle, "all done")
        slots = s.request("GET", "/slots")[2]
        assert all(x["state"] == "idle" and x["n_cached"] > 0 for x in slots)
    finally:
        s.close()


def test_a_new_request_joins_between_decode_steps(tiny, monkeypatch):
    """A short request sent while a long stream runs is answered while it still runs, and a long
    prompt is evaluated in pieces of at most batch_size rows, beside the running stream's tokens."""
    s = Running(tiny, parallel=2, batch_size=6)
    try:
        steps = _slow_steps(s.engine, monkeypatch)
        long_body = json.dumps({"messages": CHATS[0], "max_tokens": 150, "temperature": 0, "stream": True,
                                "logit_bias": _no_end(tiny)}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(long_body)).encode() + b"\r\n\r\n" + long_body)
        wait_until(lambda: s.engine.status()[0]["state"] == "generating", "the stream generates")
        long_job = s.engine.running[0]
        prompt = tiny.tokenize("a long prompt " * 10)
        status, _, body = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert status == 200 and body["usage"]["prompt_tokens"] == len(prompt)
        assert not long_job.done  # answered while the stream still runs
        assert max(n for n, _ in steps) <= 6
        mixed = [slots for _, slots in steps if 0 in slots and 1 in slots]
        assert len(mixed) >= len(prompt) // 5  # the prompt's pieces shared steps with the stream's tokens
        sock.close()
        wait_until(s.engine.idle, "the stream's slot is freed")
    finally:
        s.close()


def test_a_disconnect_frees_the_slot_at_once(tiny, monkeypatch):
    s = Running(tiny, parallel=2)
    try:
        steps = _slow_steps(s.engine, monkeypatch)
        body = json.dumps({"prompt": "hello", "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True,
                           "logit_bias": _no_end(tiny)}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        sock.close()
        wait_until(s.engine.idle, "the slot is free")
        assert len(steps) < 40, f"{len(steps)} steps for a client that left after 3 tokens"
        assert s.request("GET", "/slots")[2][0]["state"] == "idle"
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
    finally:
        s.close()


def test_bad_requests_and_errors_in_a_slot(server, tiny):
    status, _, body = server.post("/v1/completions", {"prompt": [1] * 400})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = server.post("/v1/chat/completions", {"messages": CHATS[0], "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature"
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


# ----- embeddings -----------------------------------------------------------------------------------

TEXTS = ["hello world", "the theremin is an instrument", "a", "once upon a time " * 8]


@pytest.mark.parametrize("parallel", [1, 3])
def test_embeddings(tiny, parallel):
    """OpenAI's request and response shapes; unit vectors; a text's vector is the same alone or in a
    batch of inputs (exactly), and as text or as its token ids; base64 is the float32 bytes."""
    s = Running(tiny, parallel=parallel)
    try:
        status, _, body = s.post("/v1/embeddings", {"model": "x", "input": TEXTS})
        assert status == 200, body
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
        vectors = np.array([d["embedding"] for d in body["data"]], np.float32)
        assert vectors.shape == (4, tiny.args.dim) and all(d["object"] == "embedding" for d in body["data"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(len(tiny.tokenize(t))
                                                                                    for t in TEXTS)
        alone = np.array(s.post("/v1/embeddings", {"input": TEXTS[1]})[2]["data"][0]["embedding"], np.float32)
        np.testing.assert_array_equal(alone, vectors[1])
        ids = s.post("/v1/embeddings", {"input": [tiny.tokenize(TEXTS[3])]})[2]["data"][0]["embedding"]
        np.testing.assert_array_equal(np.array(ids, np.float32), vectors[3])
        packed = s.post("/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})[2]
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
        np.testing.assert_array_equal(decoded, vectors)
        np.testing.assert_array_equal(tiny.embed(TEXTS), vectors)
        for bad in ({}, {"input": ""}, {"input": []}, {"input": [""]}, {"input": [[1, -3]]}, {"input": 5},
                    {"input": "x", "encoding_format": "hex"}, {"input": "x", "dimensions": 8}):
            status, _, reply = s.post("/v1/embeddings", bad)
            assert status == 400 and reply["error"]["param"] in ("input", "encoding_format", "dimensions"), bad
        status, _, reply = s.post("/v1/embeddings", {"input": [[5] * 600]})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert s.request("GET", "/v1/embeddings")[0] == 405
    finally:
        s.close()


def test_embed_is_mean_pooled_final_norm(tiny):
    """Model.embed = the mean over the text's tokens of the final-normed hidden states, L2-normalized:
    the same rows as the logits come from (checked against the vocabulary projection of the batch)."""
    ids = tiny.tokenize(TEXTS[1])
    batch = Batch(tiny, n_slots=1, n_ctx=64)
    hidden = batch.rows.forward(ids, range(len(ids)), [0] * len(ids), range(len(ids)), want_logits=False).copy()
    mean = hidden.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(tiny.embed([ids])[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tiny.embed([ids], normalize=False)[0], mean, rtol=1e-5, atol=1e-7)


# ----- the command ------------------------------------------------------------------------------------

def test_serve_command_with_parallel_slots(tiny):
    proc = subprocess.Popen([sys.executable, "-m", "edgellama.cli", "serve", "-m", str(tiny.path), "--port", "0",
                             "-t", "1", "-c", "256", "-np", "2"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [proc.stderr.readline()]
        while "listening on http://" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], lines
        assert "2 slots of 128" in lines[-1], lines[-1]
        port = int(lines[-1].split("127.0.0.1:")[1].split("/")[0])
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/slots")
        assert [x["n_ctx"] for x in json.loads(conn.getresponse().read())] == [128, 128]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("option", [["-np", "0"], ["--parallel", "x"], ["-np", "4", "-b", "2"], ["-b", "0"],
                                    ["-np", "257"]])
def test_serve_command_rejects_bad_parallel_options(tiny, option):
    r = subprocess.run([sys.executable, "-m", "edgellama.cli", "serve", "-m", str(tiny.path), *option],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and option[-2] in r.stderr, r.stderr
