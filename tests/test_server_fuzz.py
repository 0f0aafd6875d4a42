"""Hostile values in every request field, and failures inside the model's worker (issue 11,
items 5 and 6; issue 12, item 14).

No request may produce a 500 whose cause is the request: every field of both completion endpoints
gets huge, negative, fractional, NaN-like, mistyped, nested, very long and unusual Unicode values,
alone and in seeded random combinations, and only 200 or a JSON 4xx naming a field may come back.
A failure that is not the request's fault (here: a tokenizer that panics, as tiktoken did on a
million spaces) is a JSON 500, and the server keeps serving.
"""

from __future__ import annotations

import json
import random
import socket

import pytest

import edgellama
from edgellama.quants import GGMLType
from edgellama.tokenizer import TokenizerError
from test_server import Running
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", GGMLType.Q8_0, ctx=64)
    return edgellama.load(path, n_ctx=64, threads=1)


@pytest.fixture(scope="module")
def server(tiny):
    s = Running(tiny)
    yield s
    s.close()


class Raw(str):
    """A JSON literal written as is (1e400 parses to infinity in Python, -0, ...)."""


def encode(body) -> bytes:
    raws = {}

    def sub(value):
        if isinstance(value, Raw):
            key = f"__raw{len(raws)}__"
            raws[key] = str(value)
            return key
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    text = json.dumps(sub(body))
    for key, literal in raws.items():
        text = text.replace(f'"{key}"', literal)
    return text.encode()


HOSTILE = [
    None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 40,
    -10 ** 40, 1.5, -0.5, 1e308, -1e308, 5e-324, Raw("1e400"), Raw("-1e400"), Raw("-0"), Raw("1E2"),
    "NaN", "nan", "Infinity", "-inf", "1e400", "", "0", "1", "9223372036854775808", "-1", " 5", "5_0",
    "\u0663", "x" * 100_000, "\x00", "\ud800", "\udfff\ud800", "\U0001f600" * 1000, "\u202eevil", "<|im_end|>",
    [], [None], [[[[[[]]]]]], [1] * 1000, ["a"] * 10, [{"type": "text", "text": "hi"}], {}, {"a": {"b": {"c": []}}},
    {"": None}, {"9" * 30: 1}, {"type": "text"}, {"include_usage": True},
]

CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "min_p", "typical_p", "seed", "repeat_penalty", "repeat_last_n", "presence_penalty",
               "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "stop", "stream", "stream_options",
               "n", "tools", "functions", "tool_choice", "response_format", "user", "best_of", "suffix", "echo",
               "parallel_tool_calls", "service_tier", "metadata", "no_such_field"]
COMPLETION_FIELDS = [f for f in CHAT_FIELDS if f not in ("messages", "max_completion_tokens", "top_logprobs")] \
    + ["prompt"]


def base(chat: bool) -> dict:
    if chat:
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": True}
    return {"prompt": "hi", "max_tokens": 1}


def nested_cases(chat: bool):
    """(field path, body) for values inside structures."""
    for v in HOSTILE:
        if chat:
            yield "messages[0].content", {**base(True), "messages": [{"role": "user", "content": v}]}
            yield "messages[0].role", {**base(True), "messages": [{"role": v, "content": "hi"}]}
            yield "messages[0]", {**base(True), "messages": [v]}
            yield "messages[1]", {**base(True), "messages": [{"role": "user", "content": "hi"}, v]}
            yield "content part", {**base(True), "messages": [{"role": "user", "content": [
                {"type": "text", "text": v}]}]}
            yield "content part type", {**base(True), "messages": [{"role": "user", "content": [
                {"type": v, "text": "hi"}]}]}
        else:
            yield "prompt[0]", {**base(False), "prompt": [v]}
            yield "prompt ids", {**base(False), "prompt": [1, v]}
        yield "logit_bias value", {**base(chat), "logit_bias": {"5": v}}
        yield "stream_options.include_usage", {**base(chat), "stream": True, "stream_options": {"include_usage": v}}
        yield "response_format.type", {**base(chat), "response_format": {"type": v}}
        yield "stop[0]", {**base(chat), "stop": [v]}
        if isinstance(v, str):
            yield "logit_bias key", {**base(chat), "logit_bias": {v: 1}}


def check(server, path: str, body, what: str) -> int:
    status, headers, reply = server.post(path, encode(body))
    assert status < 500, (what, str(body)[:300], reply)
    if status >= 400:
        assert headers["Content-Type"] == "application/json", (what, reply)
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], (what, reply)
    else:
        assert status == 200, (what, status)
    return status


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_hostile_values_in_every_field_never_cause_a_500(server, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    seen = set()
    for name in CHAT_FIELDS if chat else COMPLETION_FIELDS:
        for value in HOSTILE:
            seen.add(check(server, path, {**base(chat), name: value}, name))
    for what, body in nested_cases(chat):
        seen.add(check(server, path, body, what))
    assert seen >= {200, 400}
    assert server.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("seed", range(4))
def test_random_combinations_of_hostile_values(server, seed):
    rng = random.Random(seed)
    for _ in range(60):
        chat = rng.random() < 0.5
        body = base(chat)
        for name in rng.sample(CHAT_FIELDS if chat else COMPLETION_FIELDS, rng.randint(1, 4)):
            body[name] = rng.choice(HOSTILE)
        check(server, "/v1/chat/completions" if chat else "/v1/completions", body, "random")
    assert server.request("GET", "/health")[0] == 200


def test_hostile_bodies_and_headers(server):
    for data in [b"", b"null", b"1e400", b"\"x\"", b"{\"a\":1e400}", b"{" * 10000, b"{\"messages\": [" * 5000,
                 b"\xef\xbb\xbf{}", b"{\"prompt\": \"\\ud800\"}", "{\"prompt\": \"\u00e9\"}".encode("latin-1")]:
        check(server, "/v1/completions", Raw(data.decode("latin-1")), "body")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30):
        pass
    heads = [b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + n + b"\r\n\r\n{}"
             for n in (b"+2", b"2 2", b"0x2", b"-0", b"1e1", "\u0663".encode(), b"9" * 40, b"")]
    heads += [b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
              b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length : 2\r\n\r\n{}",
              b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n folded: x\r\nContent-Length: 2\r\n\r\n{}",
              b"GET /health HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", b"GET /health\r\n\r\n",
              b"GET  /health HTTP/1.1\r\n\r\n", b"G\x00T /health HTTP/1.1\r\n\r\n",
              b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
              b"GET /health HTTP/1.1\r\nX: " + b"y" * 40000 + b"\r\n\r\n",
              b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"]
    for head in heads:
        answer = server.raw(head)
        status = int(answer[9:12])
        assert 400 <= status < 500, (head[:80], answer[:200])
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_logit_bias_key_beyond_int64_is_a_400_naming_the_field(server):
    for key in ("9223372036854775808", str(2 ** 64), "-9223372036854775809", "99999999999999999999"):
        status, _, reply = server.post("/v1/completions", {"prompt": "hi", "logit_bias": {key: 1}})
        assert status == 400 and reply["error"]["param"] == "logit_bias", reply


def test_a_million_spaces(server):
    """The audit's prompt that made tiktoken panic: now a clean answer (too long for this context)."""
    status, _, reply = server.post("/v1/completions", {"prompt": " " * 1_000_000, "max_tokens": 1})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert server.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("model", ["gpt-4o-mini", "llama3.2", "", "tiny", "x" * 1000, "\u202e"])
def test_any_model_name_is_served_and_the_reply_names_the_served_model(server, model):
    status, _, reply = server.post("/v1/chat/completions", {"model": model, "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and reply["model"] == "tiny"
    assert [m["id"] for m in server.request("GET", "/v1/models")[2]["data"]] == ["tiny"]


class PanicException(BaseException):
    """What pyo3 raises when Rust code panics (tiktoken's regex on a long run of spaces)."""


@pytest.mark.parametrize("error,status,param", [
    (PanicException("regex stack overflow"), 500, None),
    (RuntimeError("a bug"), 500, None),
    (MemoryError(), 500, None),
    (TokenizerError("the text cannot be tokenized"), 400, "prompt"),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), 400, "prompt"),
])
def test_a_failing_tokenizer_is_a_json_error_and_the_worker_goes_on(tiny, error, status, param, monkeypatch):
    s = Running(tiny)
    try:
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(tiny.tokenizer, "encode", fail)
        for path, body, blamed in [("/v1/completions", {"prompt": "hi"}, param),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                    param and "messages"),
                                   ("/v1/completions", {"prompt": "hi", "stream": True}, param)]:
            got, headers, reply = s.post(path, body)
            assert got == status and headers["Content-Type"] == "application/json", reply
            assert reply["error"]["param"] == blamed and reply["error"]["message"]
        monkeypatch.undo()
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
        assert s.engine.fatal is None
    finally:
        s.close()


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(tiny, monkeypatch):
    s = Running(tiny)
    try:
        real_eval, calls = tiny.eval, []

        def failing_eval(ids, *a, **kw):
            calls.append(1)
            if len(calls) > 3:
                raise PanicException("boom")
            return real_eval(ids, *a, **kw)

        monkeypatch.setattr(tiny, "eval", failing_eval)
        status, _, text = s.post("/v1/completions", {"prompt": "hello", "max_tokens": 20, "stream": True})
        assert status == 200
        last = [line for line in text.split("\n\n") if line.strip()][-1]
        assert json.loads(last[len("data: "):])["error"]["type"] == "server_error"
        status, _, reply = s.post("/v1/completions", {"prompt": "hello", "max_tokens": 20})
        assert status == 500 and reply["error"]["message"] == "internal error: PanicException"
        monkeypatch.undo()
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    finally:
        s.close()
