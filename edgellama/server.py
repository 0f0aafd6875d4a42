"""An OpenAI-compatible HTTP server for one model: ``edgellama serve -m model.gguf``.

Endpoints (JSON in, JSON out; ``"stream": true`` answers with server-sent events):

* ``POST /v1/chat/completions``: messages rendered with the model's chat template;
* ``POST /v1/completions``: a raw prompt (text or token ids);
* ``GET /v1/models``, ``GET /health``.

One model holds one KV cache, so requests are served one at a time, in arrival order; up to
``max_queue`` more wait, and beyond that a request gets 503 at once.  The cached prefix of the
previous request is reused (a chat's next turn evaluates only what is new).

Hostile clients are expected: the server binds 127.0.0.1 unless told otherwise; an API key
(``--api-key`` or ``EDGELLAMA_API_KEY``) is compared in constant time; on a loopback address the
``Host`` header must name this machine (DNS rebinding); cross-origin browsers get no CORS headers
unless their origin is listed, and credentials are never allowed; bodies must declare their length,
which is capped (413); malformed JSON or fields get a 400 naming the field; a client that goes away
mid-reply stops the decoding and frees the model.  Every error is an OpenAI-style JSON object and
the server keeps serving.  No endpoint touches files.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .chat import ChatTemplateError
from .generate import Chunk
from .sampling import MAX_LOGPROBS, Sampler, SamplingError

__all__ = ["ServerConfig", "Engine", "make_server", "serve"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_STOP_STRINGS = 4          # as OpenAI
COMPLETIONS_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str = ""               # the id clients name; default: the file name without .gguf
    api_key: str | None = None
    max_queue: int = 8                 # requests waiting for the model beyond the one running
    max_body_bytes: int = 1 << 20
    allowed_hosts: tuple[str, ...] = ()   # extra Host names accepted ("*": any)
    cors_origins: tuple[str, ...] = ()    # origins whose browsers may read responses ("*": any)
    request_timeout: float = 60.0      # seconds a client may stay silent (or not read) mid-request
    max_connections: int = 64          # open connections, idle ones included (then 503 at once)


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----- request fields -------------------------------------------------------------------------------

_MISSING = object()


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *,
           nullable: bool = True) -> Any:
    """body[name] if it has one of ``kinds`` (JSON true/false are not numbers), else a 400."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    if isinstance(value, bool) and bool not in kinds:
        value = _MISSING  # a bool where a number is wanted
    elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is _MISSING or not isinstance(value, kinds):
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
                 dict: "an object"}
        want = " or ".join(names[k] for k in kinds)
        raise APIError(400, f"'{name}' must be {want}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", param=name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                            "non-empty strings", param="stop")
    return tuple(stop)


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = _field(body, "logit_bias", (dict,))
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"'logit_bias' keys must be token ids, got {key[:40]!r}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, "'logit_bias' values must be numbers in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def _common_options(body: dict, n_vocab: int, top_logprobs: int | None) -> Sampler:
    """The sampler a request asks for (OpenAI's fields plus llama.cpp's top_k, min_p, ...)."""
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    options = dict(
        temperature=_field(body, "temperature", (float,), 1.0),
        top_p=_field(body, "top_p", (float,), 1.0),
        top_k=_field(body, "top_k", (int,), 0),
        min_p=_field(body, "min_p", (float,), 0.0),
        typical_p=_field(body, "typical_p", (float,), 1.0),
        seed=_field(body, "seed", (int,)),
        repeat_penalty=_field(body, "repeat_penalty", (float,), 1.0),
        presence_penalty=_field(body, "presence_penalty", (float,), 0.0),
        frequency_penalty=_field(body, "frequency_penalty", (float,), 0.0),
        penalty_last_n=_field(body, "repeat_last_n", (int,), 64),
        logit_bias=_logit_bias(body),
        logprobs=top_logprobs,
    )
    try:
        return Sampler(**options, n_vocab=n_vocab)
    except (SamplingError, ValueError) as e:
        message = str(e)
        param = next((name for name in options if message.startswith(name)), None)
        raise APIError(400, message, param=param) from None


def _max_tokens(body: dict, default: int | None, *names: str) -> int | None:
    for name in names:
        value = _field(body, name, (int,), _MISSING)
        if value is not _MISSING:
            if value < 0:
                raise APIError(400, f"'{name}' must not be negative", param=name)
            return value
    return default


def _message_text(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    messages = _field(body, "messages", (list,), None)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role {m['role'][:40]!r} is not one of system, developer, "
                                "user, assistant, tool", param=f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def _unsupported(body: dict) -> None:
    """Fields whose meaning we cannot honour: refused rather than silently ignored."""
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tool calling is not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", param="echo")
    if body.get("suffix"):
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")


# ----- the model, one request at a time -----------------------------------------------------------------

class Engine:
    """A model shared by the server's threads: one generation at a time, a bounded waiting line."""

    def __init__(self, model, name: str, max_queue: int = 8):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.name = name
        self.created = int(time.time())
        self.lock = threading.Lock()                       # held while the model generates
        self._places = threading.BoundedSemaphore(max_queue + 1)  # running + waiting requests

    def admit(self) -> None:
        """Take a place in line or fail with 503 (the line is full)."""
        if not self._places.acquire(blocking=False):
            raise APIError(503, "the server is busy: too many requests are waiting; retry later",
                           kind="server_error", code="server_busy", headers={"Retry-After": "1"})

    def leave(self) -> None:
        self._places.release()


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    data = tokenizer.token_bytes(token)
    return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}


def _chat_logprobs(tokenizer, chunks: list[Chunk]) -> dict | None:
    """The chat logprobs object of the chunks that carry a token's log-probability (None if none do)."""
    content = [{**_token_entry(tokenizer, c.token, c.logprob),
                "top_logprobs": [_token_entry(tokenizer, t.token, t.logprob) for t in c.top_logprobs or []]}
               for c in chunks if c.token is not None and c.logprob is not None]
    return {"content": content} if content else None


def _usage(chunk: Chunk) -> dict:
    u = chunk.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


# ----- HTTP -------------------------------------------------------------------------------------------------

class _ClientGone(Exception):
    """The client closed its connection: stop generating."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgellama"
    sys_version = ""
    # set by make_server on a subclass
    engine: Engine
    config: ServerConfig

    # --- plumbing ---

    default_request_version = "HTTP/1.0"  # even an unparsable request line gets a status line back

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, unknown method) as JSON."""
        self.close_connection = True
        self._body_read = False
        try:
            self._send(code, APIError(code, message or HTTPStatus(code).phrase).body(), {"Connection": "close"})
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _cors_headers(self) -> dict[str, str]:
        origin = self.headers.get("Origin") if getattr(self, "headers", None) is not None else None
        allowed = self.config.cors_origins
        if not origin or not allowed:
            return {}
        if "*" in allowed:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in allowed else {}

    def _send(self, status: int, body: dict | None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**self._cors_headers(), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e: APIError) -> None:
        headers = dict(e.headers)
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.command not in ("GET", "HEAD", "OPTIONS") and not self._body_read:
            self.close_connection = True  # an unread body would be taken for the next request
            headers["Connection"] = "close"
        self._send(e.status, e.body(), headers)

    def _handle(self, route) -> None:
        self._body_read = False
        self._streaming = False  # once the event stream has begun, errors can only end it
        try:
            self._check_host()
            if self.command != "OPTIONS" and self.path.split("?", 1)[0] != "/health":
                self._check_key()
            route()
        except APIError as e:
            self._send_error(e)
        except _ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 and keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            self.close_connection = True
            if not self._streaming:
                try:
                    self._send_error(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))
                except OSError:
                    pass

    def _check_host(self) -> None:
        """On a loopback address (or when names are configured) the Host header must name us: a
        web page whose DNS name was rebound to 127.0.0.1 cannot reach the model."""
        allowed = self.config.allowed_hosts
        if "*" in allowed:
            return
        if not allowed and self.config.host not in LOOPBACK_NAMES and not self.config.host.startswith("127."):
            return
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name not in LOOPBACK_NAMES | {self.config.host.lower()} | {h.lower() for h in allowed}:
            raise APIError(403, f"Host {host[:80]!r} is not allowed (use --allowed-host)", code="host_not_allowed",
                           kind="permission_error")

    def _check_key(self) -> None:
        key = self.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    def _read_json(self) -> dict:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise APIError(411, "chunked request bodies are not accepted: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a request body with Content-Length is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise APIError(400, f"bad Content-Length {length[:40]!r}") from None
        if n > self.config.max_body_bytes:
            raise APIError(413, f"the request body of {n} bytes is larger than the {self.config.max_body_bytes} "
                                "accepted", code="request_too_large")
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            raise _ClientGone()

        def no_constants(name: str):
            raise ValueError(f"{name} is not JSON")

        try:
            body = json.loads(data.decode("utf-8"), parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _check_model(self, body: dict) -> None:
        name = _field(body, "model", (str,))
        if name is not None and name != self.engine.name:
            raise APIError(404, f"model {name[:80]!r} does not exist; this server has {self.engine.name!r}",
                           param="model", code="model_not_found")

    def _client_gone(self) -> bool:
        """True once the client has closed its side (checked between tokens, without blocking)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- verbs ---

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._handle(self._route_get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(self._route_get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._route_post)

    def do_OPTIONS(self) -> None:  # noqa: N802
        def preflight():
            headers = self._cors_headers()
            if headers:
                headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                "Access-Control-Max-Age": "600"})
            self._send(204, None, headers)
        self._handle(preflight)

    def do_PUT(self) -> None:  # noqa: N802
        self._handle(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _not_allowed(self) -> None:
        raise APIError(405, f"{self.command} is not allowed here", headers={"Allow": "GET, POST, OPTIONS"})

    def _route_get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.engine.name}":
            self._send(200, self._model_card())
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(405, f"use POST for {path}", headers={"Allow": "POST"})
        else:
            raise APIError(404, f"no such endpoint: {path[:100]}", code="not_found")

    def _route_post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/v1/chat/completions":
            self._completion(chat=True)
        elif path == "/v1/completions":
            self._completion(chat=False)
        else:
            raise APIError(404, f"no such endpoint: {path[:100]}", code="not_found")

    def _model_card(self) -> dict:
        m = self.engine.model
        return {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "edgellama",
                "meta": {"n_ctx": m.n_ctx, "n_vocab": m.args.n_vocab}}

    # --- completions ---

    def _completion(self, chat: bool) -> None:
        body = self._read_json()
        self._check_model(body)
        _unsupported(body)
        model = self.engine.model
        stream = _field(body, "stream", (bool,), False)
        include_usage = bool(_field(_field(body, "stream_options", (dict,), {}), "include_usage", (bool,), False))
        if chat:
            messages = _messages(body)
            top = _field(body, "top_logprobs", (int,), 0) if _field(body, "logprobs", (bool,), False) else None
            max_tokens = _max_tokens(body, None, "max_completion_tokens", "max_tokens")
        else:
            prompt = self._prompt(body)
            top = _field(body, "logprobs", (int,))
            max_tokens = _max_tokens(body, COMPLETIONS_DEFAULT_TOKENS, "max_tokens")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs" if chat else "logprobs")
        sampler = _common_options(body, model.args.n_vocab, top)
        stop = _stop_strings(body)
        # one reply is at most one context of tokens (a chat's reply may shift the context, so an
        # unbounded one could run on forever)
        max_tokens = model.n_ctx if max_tokens is None else min(max_tokens, model.n_ctx)

        self.engine.admit()
        try:
            with self.engine.lock:
                if self._client_gone():
                    raise _ClientGone()
                try:
                    if chat:
                        chunks = model.chat(messages, max_tokens=max_tokens, sampler=sampler, stop=stop)
                    else:
                        chunks = model.generate(prompt, max_tokens=max_tokens, sampler=sampler, stop=stop,
                                                add_bos=None if isinstance(prompt, str) else False)
                    chunks = iter(chunks)
                    first = next(chunks)  # the prompt is evaluated here: its errors are still a 400
                except ChatTemplateError as e:
                    raise APIError(400, f"the chat template failed: {e}", param="messages") from None
                except ValueError as e:  # ContextOverflowError, bad token ids
                    code = "context_length_exceeded" if "context" in str(e) else None
                    raise APIError(400, str(e), param="messages" if chat else "prompt", code=code) from None
                try:
                    if stream:
                        self._stream(chat, first, chunks, include_usage)
                    else:
                        self._whole(chat, first, chunks)
                finally:
                    if hasattr(chunks, "close"):
                        chunks.close()
        finally:
            self.engine.leave()

    def _prompt(self, body: dict) -> str | list[int]:
        prompt = body.get("prompt", _MISSING)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", param="prompt")
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            n_vocab = self.engine.model.args.n_vocab
            bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {n_vocab})", param="prompt")
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1:
            raise APIError(400, "one prompt per request is supported", param="prompt")
        raise APIError(400, "'prompt' must be a non-empty string or array of token ids", param="prompt")

    def _chunks(self, first: Chunk, chunks: Iterator[Chunk], check_every: int) -> Iterator[Chunk]:
        """first, then the rest; between tokens, stop if the client went away."""
        yield first
        for i, chunk in enumerate(chunks, 1):
            if i % check_every == 0 and self._client_gone():
                raise _ClientGone()
            yield chunk

    def _whole(self, chat: bool, first: Chunk, chunks: Iterator[Chunk]) -> None:
        text, logprobs, last = [], [], first
        for chunk in self._chunks(first, chunks, check_every=8):
            text.append(str(chunk))
            if chunk.logprob is not None:
                logprobs.append(chunk)
            last = chunk
        tok = self.engine.model.tokenizer
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": _chat_logprobs(tok, logprobs),
                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": "".join(text), "logprobs": _completion_logprobs(tok, logprobs),
                      "finish_reason": last.finish_reason}
        self._send(200, {"id": _new_id(chat), "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.engine.name, "choices": [choice],
                         "usage": _usage(last), "system_fingerprint": _FINGERPRINT})

    def _stream(self, chat: bool, first: Chunk, chunks: Iterator[Chunk], include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        for k, v in self._cors_headers().items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        self._streaming = True
        ident, created, tok = _new_id(chat), int(time.time()), self.engine.model.tokenizer
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, usage: dict | None = None) -> None:
            payload = {"id": ident, "object": kind, "created": created, "model": self.engine.name,
                       "system_fingerprint": _FINGERPRINT, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            try:
                self.wfile.write(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            except OSError:
                raise _ClientGone() from None

        if chat:
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}])
        last = first
        for chunk in self._chunks(first, chunks, check_every=1):
            last = chunk
            if chunk.token is None:
                if str(chunk):  # the held-back end of the text
                    event([self._stream_choice(chat, tok, chunk, str(chunk))])
                break
            if str(chunk) or chunk.logprob is not None:
                event([self._stream_choice(chat, tok, chunk, str(chunk))])
        end = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        end.update({"delta": {}} if chat else {"text": ""})
        event([end])
        if include_usage:
            event([], _usage(last))
        try:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            raise _ClientGone() from None

    @staticmethod
    def _stream_choice(chat: bool, tok, chunk: Chunk, text: str) -> dict:
        if chat:
            return {"index": 0, "delta": {"content": text}, "logprobs": _chat_logprobs(tok, [chunk]),
                    "finish_reason": None}
        return {"index": 0, "text": text,
                "logprobs": _completion_logprobs(tok, [chunk] if chunk.logprob is not None else []),
                "finish_reason": None}


def _completion_logprobs(tokenizer, chunks: list[Chunk]) -> dict | None:
    """The legacy /v1/completions logprobs object."""
    if not chunks:
        return None
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for c in chunks:
        piece = tokenizer.token_bytes(c.token).decode("utf-8", "replace")
        tokens.append(piece)
        lps.append(c.logprob)
        tops.append({tokenizer.token_bytes(t.token).decode("utf-8", "replace"): t.logprob
                     for t in c.top_logprobs or []})
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


_FINGERPRINT = "edgellama"


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


_BUSY = json.dumps(APIError(503, "too many open connections; retry later", kind="server_error",
                            code="server_busy").body()).encode()


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them: a flood of idle sockets gets 503s
    instead of exhausting the machine's threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, max_connections: int):
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._connections.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(_BUSY), _BUSY))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def server_bind(self) -> None:
        if ":" in self.server_address[0]:
            self.address_family = socket.AF_INET6
            self.socket = socket.socket(self.address_family, self.socket_type)
        super().server_bind()

    def handle_error(self, request, client_address) -> None:  # a connection's failure stays its own
        print(f"edgellama serve: connection from {client_address[0]} failed: {sys.exc_info()[1]!r}",
              file=sys.stderr)


def make_server(model, config: ServerConfig) -> ThreadingHTTPServer:
    """A server bound to config.host:config.port (port 0: any free one); call serve_forever()."""
    if config.max_body_bytes <= 0 or config.max_connections <= 0:
        raise ValueError(f"max_body_bytes and max_connections must be positive, got {config.max_body_bytes} "
                         f"and {config.max_connections}")
    name = config.model_name or os.path.basename(str(model.path)).removesuffix(".gguf")
    handler = type("EdgellamaHandler", (Handler,), {"engine": Engine(model, name, config.max_queue),
                                                   "config": config, "timeout": config.request_timeout})
    return _Server((config.host, config.port), handler, config.max_connections)


def serve(model, config: ServerConfig) -> int:
    server = make_server(model, config)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"edgellama serve: {server.RequestHandlerClass.engine.name} on http://{shown}:{port}/v1 "
          f"(n_ctx {model.n_ctx}, {model.threads} threads)", file=sys.stderr)
    if not config.api_key and config.host not in LOOPBACK_NAMES and not config.host.startswith("127."):
        print("edgellama serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
