"""tests/test_server_fuzz.py's guarantees on a server with parallel slots (edgellama.server.SlotEngine):
hostile values in every field never cause a 500, a failing tokenizer is a JSON error naming the
field, a failure of the model mid-stream ends the stream with an error event, and the worker goes
on serving every time."""

from __future__ import annotations

import json

import pytest

import edgellama
from edgellama.quants import GGMLType
from edgellama.tokenizer import TokenizerError
from test_server import Running, wait_until
from test_server_fuzz import (PanicException, test_a_million_spaces,  # noqa: F401  (collected here too)
                              test_any_model_name_is_served_and_the_reply_names_the_served_model,
                              test_hostile_bodies_and_headers, test_hostile_values_in_every_field_never_cause_a_500,
                              test_logit_bias_key_beyond_int64_is_a_400_naming_the_field,
                              test_random_combinations_of_hostile_values)
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", GGMLType.Q8_0, ctx=64)
    return edgellama.load(path, n_ctx=64, threads=1)


@pytest.fixture(scope="module")
def server(tiny):
    s = Running(tiny, parallel=2)
    yield s
    s.close()


@pytest.mark.parametrize("error,status,param", [
    (PanicException("regex stack overflow"), 500, None),
    (RuntimeError("a bug"), 500, None),
    (TokenizerError("the text cannot be tokenized"), 400, "prompt"),
])
def test_a_failing_tokenizer_is_a_json_error_in_a_slot(tiny, error, status, param, monkeypatch):
    s = Running(tiny, parallel=2)
    try:
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(tiny.tokenizer, "encode", fail)
        for path, body, blamed in [("/v1/completions", {"prompt": "hi"}, param),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                    param and "messages"),
                                   ("/v1/completions", {"prompt": "hi", "stream": True}, param),
                                   ("/v1/embeddings", {"input": "hi"}, param and "input")]:
            got, headers, reply = s.post(path, body)
            assert got == status and headers["Content-Type"] == "application/json", reply
            assert reply["error"]["param"] == blamed and reply["error"]["message"]
        monkeypatch.undo()
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
        # the reply is sent before the step that ends the sequence returns: wait for the state
        wait_until(s.engine.idle, "the engine to free the slot")
        assert s.engine.fatal is None
    finally:
        s.close()


def test_a_failure_of_the_model_mid_stream_ends_the_streams_with_an_error_event(tiny, monkeypatch):
    s = Running(tiny, parallel=2)
    try:
        real, calls = s.engine.batch.rows.forward, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise PanicException("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(s.engine.batch.rows, "forward", failing)
        status, _, text = s.post("/v1/completions", {"prompt": "hello", "max_tokens": 20, "stream": True})
        assert status == 200
        last = [line for line in text.split("\n\n") if line.strip()][-1]
        assert json.loads(last[len("data: "):])["error"]["type"] == "server_error"
        status, _, reply = s.post("/v1/completions", {"prompt": "hello", "max_tokens": 20})
        assert status == 500 and reply["error"]["message"] == "internal error: PanicException"
        monkeypatch.undo()
        assert s.post("/v1/completions", {"prompt": "hello", "max_tokens": 2})[0] == 200
        # the reply is sent before the step that ends the sequence returns: wait for the state
        wait_until(s.engine.idle, "the engine to free the slot")
        assert s.engine.fatal is None
    finally:
        s.close()
