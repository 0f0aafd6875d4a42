"""An OpenAI-compatible HTTP server for one model: ``edgellama serve -m model.gguf``.

Endpoints (JSON in, JSON out; ``"stream": true`` answers with server-sent events):

* ``POST /v1/chat/completions``: messages rendered with the model's chat template;
* ``POST /v1/completions``: a raw prompt (text or token ids);
* ``POST /v1/embeddings``: mean-pooled, normalized embeddings (as llama.cpp's ``--pooling mean``);
* ``GET /v1/models``, ``GET /health``, ``GET /slots`` (what each slot does; no prompt contents).

Shape: an asyncio front end and one model worker.

* **The model worker** is one thread that owns the model and takes jobs from a line.  ``Engine``
  (the default): one generation at a time, in arrival order, up to ``max_queue`` more waiting
  (beyond them: 503 with Retry-After); the cached prefix of the previous request is reused (a
  chat's next turn evaluates only what is new).  ``SlotEngine`` (``--parallel N``): N generations
  at once in slots with their own KV caches, evaluated together in batched steps, new requests
  joining between two steps, and ``max_queue`` waiting beyond the slots (see its docstring).
  A job formats its reply as it goes (a whole JSON reply, or SSE events: ``Reply``) into its own
  bounded output buffer (``Job``): the model runs at full speed whatever the client's reading pace,
  and is free for the next job as soon as the generation ends, while the bytes drain to the client.
* **The front end** is one asyncio event loop (``Server``, asyncio streams: no dependencies).  A
  waiting socket costs a coroutine and a transport, not a thread.  Measured on the 2-core test
  machine (tiny test model, the server in its own process): 1000 or 5000 idle connections cost
  ~6 KiB of RSS each and no thread (the process keeps its 4 threads whatever the number of
  connections), where the previous thread-per-connection server cost a thread and ~24 KiB each
  and had to cap connections at 64; with 80 sockets trickling header bytes, 40/40 normal requests
  succeeded, with the default slots and with only 64 (0/40 before: 503s and resets); a 2-token
  request behind a streaming client that reads 4 KB every 5 s was answered in 2 s, the rest of the
  running generation (before: still waiting after 60 s).  An ASGI stack (uvicorn) would add a
  dependency for the same event loop and still need the connection rules below, which are this
  server's policy, not the HTTP library's.

Slow or hostile clients (the limits are ``ServerConfig`` fields and ``edgellama serve`` flags):

* a whole request, head and body, must arrive within ``request_timeout`` of its first byte (408
  otherwise: trickling one byte at a time does not extend it), and a connection with no request
  under way is closed after ``idle_timeout``;
* at most ``max_connections`` are open, at most ``max_connections_per_client`` from one client
  address (an IPv6 /64 counts as one address); when a new connection finds no room, the oldest
  connection that has not yet delivered a complete request (a trickler, an idle keep-alive) is
  closed to make room: sockets that never finish a request cannot keep others out, and the
  per-address share keeps the rest of the slots for other clients when one address holds many
  requests in progress; only when every slot carries a request in progress is a new connection
  answered 503;
* a reply is written at the client's pace from the job's buffer: a client that takes no bytes
  for ``send_timeout`` seconds is dropped, and a stream whose unsent output outgrows
  ``max_output_buffer`` is dropped at once and its generation stopped (a whole, non-streamed reply
  is at most one context of tokens, and waits whole).  A client that half-closes
  after its request (``shutdown(SHUT_WR)``) still gets its answer; a client that disconnects
  mid-stream stops the decoding (its next write fails and the job is cancelled).

Everything else a hostile client may try is answered too: the server binds 127.0.0.1 unless told
otherwise; an API key (``--api-key`` or ``EDGELLAMA_API_KEY``) is compared in constant time; on a
loopback address the ``Host`` header must name this machine (DNS rebinding); cross-origin browsers
get no CORS headers unless their origin is listed, and credentials are never allowed; a browser's
POST from an origin not listed is refused (403: a page cannot make the model work for it); bodies must
declare their length, which is capped (413); every field is checked against its range before it
reaches the model (a 400 naming the field); a failure while tokenizing or generating is a JSON
error too (400 when the request caused it, else 500), even an exception that is not an
``Exception`` (as a Rust extension's panic is), and the worker goes on.  Every error is an
OpenAI-style JSON object and the server keeps serving.  No endpoint touches files.

A one-model server answers whatever ``model`` a request names (as llama.cpp's server does: apps
with a hard-coded model name work unchanged); replies name the served model.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable, Iterator

from ._validate import ParameterError, is_int, is_number
from .chat import ChatTemplateError
from .generate import MAX_STOP_CHARS, Chunk
from .sampling import MAX_LOGPROBS, SAMPLING_OPTIONS, Sampler

__all__ = ["ServerConfig", "Engine", "SlotEngine", "Job", "Server", "make_server", "serve"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_STOP_STRINGS = 4             # as OpenAI (the Python API takes generate.MAX_STOP_STRINGS)
COMPLETIONS_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_HEAD_BYTES = 32 * 1024       # request line + headers (431 beyond)
MAX_HEADERS = 100
WRITE_HIGH_WATER = 64 * 1024     # bytes handed to a connection's transport before waiting for the client
MAX_INT = 2 ** 63 - 1            # integer fields beyond int64 are refused (400), never overflow later


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str = ""               # the id /v1/models lists; default: the file name without .gguf
    api_key: str | None = None
    max_queue: int = 8                 # requests waiting for the model beyond the one running
    max_body_bytes: int = 1 << 20
    allowed_hosts: tuple[str, ...] = ()   # extra Host names accepted ("*": any)
    cors_origins: tuple[str, ...] = ()    # origins whose browsers may read responses ("*": any)
    request_timeout: float = 60.0      # seconds from a request's first byte to the end of its body
    idle_timeout: float = 60.0         # seconds a connection may wait with no request under way
    send_timeout: float = 30.0         # seconds a client may take no bytes of its reply before it is dropped
    max_output_buffer: int = 4 << 20   # bytes of a stream generated but not yet sent (then dropped)
    max_connections: int = 1024        # open connections (a new one closes the oldest unfinished request)
    max_connections_per_client: int = 256  # open connections from one client address (IPv6: one /64)
    socket_send_buffer: int = 0        # SO_SNDBUF of client sockets (0: the kernel's own sizing)
    parallel: int = 1                  # slots: requests generated at once (each with n_ctx / parallel positions)
    batch_size: int | None = None      # with parallel > 1: tokens per step (default batch.DEFAULT_BATCH_ROWS)


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


SHUTDOWN_GRACE = 1.0  # seconds a stopping server gives its answers in progress to say that it stops
STREAM_END = b"data: [DONE]\n\n"  # a stream's last event


def _busy(message: str) -> APIError:
    return APIError(503, message, kind="server_error", code="server_busy", headers={"Retry-After": "1"})


# ----- request fields -------------------------------------------------------------------------------

_MISSING = object()
_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *,
           nullable: bool = True, param: str | None = None) -> Any:
    """body[name] if it has one of ``kinds`` (JSON true/false are not numbers), else a 400.
    Numbers must be finite and integers within int64."""
    param = param or name
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    if isinstance(value, bool) and bool not in kinds:
        value = _MISSING  # a bool where a number is wanted
    elif float in kinds and is_int(value):
        value = float(value) if abs(value) <= 2 ** 1000 else math.inf
    if value is _MISSING or not isinstance(value, kinds):
        want = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise APIError(400, f"'{param}' must be {want}", param=param)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{param}' must be a finite number", param=param)
    if is_int(value) and not -MAX_INT - 1 <= value <= MAX_INT:
        raise APIError(400, f"'{param}' is out of range (a 64-bit integer)", param=param)
    return value


def _int_field(body: dict, name: str, default: Any, lo: int, hi: int = MAX_INT) -> Any:
    value = _field(body, name, (int,), default)
    if value is not default and not lo <= value <= hi:
        where = f"at least {lo}" if hi == MAX_INT else f"in [{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be an integer {where}, got {value}", param=name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                            f"non-empty strings of at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stop)


_TOKEN_ID = re.compile(r"-?[0-9]{1,20}")


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float] | None:
    bias = _field(body, "logit_bias", (dict,))
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key):
            raise APIError(400, f"'logit_bias' keys must be token ids, got {key[:40]!r}", param="logit_bias")
        token = int(key)
        if not 0 <= token < n_vocab:
            raise APIError(400, f"'logit_bias' token id {token} is outside the vocabulary [0, {n_vocab})",
                           param="logit_bias")
        if not is_number(value) or not -100 <= value <= 100:
            raise APIError(400, "'logit_bias' values must be numbers in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


# a Sampler setting or generation option (a ParameterError's param) -> the request field that sets
# it: OpenAI's names, and llama.cpp's for its own settings (repeat_last_n)
_FIELD_NAMES = {**{name: name for name in SAMPLING_OPTIONS}, "penalty_last_n": "repeat_last_n",
                "logit_bias": "logit_bias", "max_tokens": "max_tokens", "stop": "stop"}
_DEFAULTS = {"temperature": 1.0}  # OpenAI's default; every other setting defaults as the Sampler does


def _parameter_error(e: ParameterError, default: str | None, **fields: str) -> APIError:
    """A 400 naming the request field behind ``e.param`` (``default`` when no field sets it;
    ``fields`` override the mapping)."""
    field = fields.get(e.param) or _FIELD_NAMES.get(e.param) or default
    if e.expected and field:
        return APIError(400, f"'{field}' must be {e.expected}, got {_shown(e.value)}", param=field)
    return APIError(400, str(e)[:1000], param=field)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sampler(body: dict, n_vocab: int, top_logprobs: int | None, logprobs_param: str) -> Sampler:
    """The sampler a request asks for: every Sampler setting from its field (OpenAI's, plus llama.cpp's
    top_k, min_p, typical_p, repeat_penalty, repeat_last_n), typed here, ranged by the Sampler."""
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    options = {}
    for name, option in SAMPLING_OPTIONS.items():
        if name == "logprobs":
            continue  # from logprobs / top_logprobs, checked by the caller
        options[name] = _field(body, _FIELD_NAMES[name], (option.kind,), _DEFAULTS.get(name, option.default))
    try:
        return Sampler(**options, logit_bias=_logit_bias(body, n_vocab), logprobs=top_logprobs, n_vocab=n_vocab)
    except ParameterError as e:
        raise _parameter_error(e, None, logprobs=logprobs_param) from None


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


def _prompt(body: dict, n_vocab: int) -> str | list[int]:
    prompt = body.get("prompt", _MISSING)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
        if bad is not None:
            shown = str(bad) if abs(bad) < 10 ** 30 else f"{str(bad)[:20]}..."
            raise APIError(400, f"token id {shown} is outside the vocabulary [0, {n_vocab})", param="prompt")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request is supported", param="prompt")
    raise APIError(400, "'prompt' must be a non-empty string or array of token ids", param="prompt")


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


@dataclass
class Completion:
    """A checked /v1/chat/completions or /v1/completions request, ready for the model."""

    chat: bool
    messages: list[dict] | None
    prompt: str | list[int] | None
    max_tokens: int
    sampler: Sampler
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    special: bool = False              # /v1/completions: control-token text in the prompt is parsed

    @property
    def param(self) -> str:
        """The field a failure of tokenization or evaluation is blamed on."""
        return "messages" if self.chat else "prompt"


def parse_completion(body: dict, chat: bool, n_vocab: int, n_ctx: int) -> Completion:
    """Every field of a completion request checked (a 400 naming the field otherwise)."""
    model = _field(body, "model", (str,))  # any name: a one-model server serves it (as llama.cpp's)
    del model
    _unsupported(body)
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    include_usage = bool(_field(options, "include_usage", (bool,), False, param="stream_options.include_usage"))
    messages = prompt = None
    special = False
    if chat:
        messages = _messages(body)
        top = _int_field(body, "top_logprobs", 0, 0, MAX_LOGPROBS)  # (checked even where logprobs is off)
        top = top if _field(body, "logprobs", (bool,), False) else None
        max_tokens = _max_tokens(body, None, "max_completion_tokens", "max_tokens")
    else:
        prompt = _prompt(body, n_vocab)
        special = _field(body, "special", (bool,), False)
        top = _int_field(body, "logprobs", None, 0, MAX_LOGPROBS)
        max_tokens = _max_tokens(body, COMPLETIONS_DEFAULT_TOKENS, "max_tokens")
    sampler = _sampler(body, n_vocab, top, "top_logprobs" if chat else "logprobs")
    stop = _stop_strings(body)
    # one reply is at most one context of tokens (a chat's reply may shift the context, so an
    # unbounded one could run on forever)
    max_tokens = n_ctx if max_tokens is None else min(max_tokens, n_ctx)
    return Completion(chat, messages, prompt, max_tokens, sampler, stop, stream, include_usage, special)


MAX_EMBEDDING_INPUTS = 2048  # as OpenAI
# The most numbers one embeddings reply holds (inputs x the model's width): its JSON is ~20 bytes a
# number, held until a client reads it, however slowly (2048 inputs of a 4096-wide model: 170 MB).
MAX_EMBEDDING_VALUES = 1 << 19


@dataclass
class Embedding:
    """A checked /v1/embeddings request."""

    inputs: list[str | list[int]]
    base64: bool                       # encoding_format "base64": little-endian float32 bytes


def parse_embedding(body: dict, n_vocab: int, dim: int = 1) -> Embedding:
    """Every field of an embeddings request checked (OpenAI's shape: ``input`` a string, an array of
    strings, an array of token ids or an array of arrays of them; a 400 naming the field otherwise)."""
    _field(body, "model", (str,))  # any name: a one-model server serves it
    if body.get("dimensions") is not None:
        raise APIError(400, "'dimensions' is not supported (the model's embeddings have one size)", param="dimensions")
    fmt = _field(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
    value = body.get("input", _MISSING)
    if isinstance(value, str) or (isinstance(value, list) and value and all(is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a non-empty string or array of strings or token-id arrays", param="input")
    most = max(1, min(MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_VALUES // max(dim, 1)))
    if len(value) > most:
        raise APIError(400, f"'input' has {len(value)} items, at most {most} are accepted (embeddings of "
                            f"{dim} numbers each)",
                       param="input")
    inputs: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            inputs.append(item)
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            if not all(0 <= t < n_vocab for t in item):
                raise APIError(400, f"input[{i}] has a token id outside the vocabulary [0, {n_vocab})", param="input")
            inputs.append([int(t) for t in item])
        else:
            raise APIError(400, f"input[{i}] must be a non-empty string or array of token ids", param="input")
    return Embedding(inputs, fmt == "base64")


def run_embedding(engine, request: Embedding, job: Job) -> None:
    """Embeddings on the worker: tokenize, evaluate every input together, answer in OpenAI's shape."""
    import base64

    import numpy as np

    model = engine.model
    ids = [model.tokenize(x) if isinstance(x, str) else x for x in request.inputs]
    def between_passes() -> None:
        job.check()  # a client that went away stops it (JobStopped)
        engine.between_passes()  # (with parallel slots: the streams go on meanwhile)

    vectors = model.embed(ids, check=between_passes)
    data = []
    for i, vec in enumerate(vectors):
        if request.base64:
            value: Any = base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode("ascii")
        else:
            value = [float(v) for v in vec]
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(x) for x in ids)
    body = {"object": "list", "data": data, "model": engine.name, "usage": {"prompt_tokens": n, "total_tokens": n}}
    job.respond(200, dict(_JSON), json.dumps(body).encode())


# ----- the model worker -------------------------------------------------------------------------------

class JobStopped(Exception):
    """Raised on the worker when its job was cancelled (client gone) or its buffer overflowed."""


class Job:
    """One request's work for the model's worker, and its way back to the connection.

    The worker runs ``work(job)``, which answers through the job: ``respond`` once (status,
    headers and, for a whole reply, the body), then for a stream ``put`` pieces of the body.  The
    pieces wait in a buffer of at most ``max_buffer`` bytes until the connection's coroutine takes
    them (``take``) at the client's pace.  ``check``/``put`` raise JobStopped once the job is
    cancelled (``cancel``: the client is gone) or its buffer overflowed, so the generation ends at
    once.  The worker wakes the coroutine through the event loop (``call_soon_threadsafe``).
    """

    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop, max_buffer: int,
                 param: str | None = None, client: str = ""):
        self.work = work
        self.param = param               # the request field failures are blamed on
        self.client = client             # the client address's key (a share of the line is its own)
        self.max_buffer = max_buffer
        self.status: int | None = None   # set by respond
        self.headers: dict[str, str] = {}
        self.body: bytes | None = None   # a whole reply; None for a stream
        self.done = False                # the worker has finished with this job
        self.cancelled = False
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None  # called on the loop when the buffer overflows
        self.completion: Completion | None = None  # a completion a SlotEngine runs in a slot (else: work)
        self.seq = None                  # its batch.Sequence, once in a slot
        self.reply: Reply | None = None  # and its reply in the making
        self._pieces: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self._lock = threading.Lock()
        self._loop = loop
        self._wake = asyncio.Event()
        self._wake_pending = False

    # --- the worker's side ---

    def check(self) -> None:
        if self.cancelled or self.overflowed:
            raise JobStopped()

    def respond(self, status: int, headers: dict[str, str], body: bytes | None = None) -> None:
        self.check()
        self.status, self.headers, self.body = status, headers, body
        self._notify()

    def put(self, data: bytes) -> None:
        self.check()
        with self._lock:
            self._pieces.append(data)
            self.buffered += len(data)
            if self.buffered > self.max_buffer:
                self.overflowed = True
        self._notify()
        self.check()

    def fail(self, error: APIError) -> None:
        """Answer with an error: a JSON reply, or an error event if the stream has begun."""
        if self.cancelled or self.overflowed:
            return
        body = json.dumps(error.body()).encode()
        if self.status is None:
            self.status, self.headers, self.body = error.status, {"Content-Type": "application/json",
                                                                  **error.headers}, body
        elif self.body is None:
            with self._lock:
                self._pieces.append(b"data: " + body + b"\n\n")
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._woken)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    # --- the connection's side (on the event loop) ---

    def _woken(self) -> None:
        with self._lock:
            self._wake_pending = False
        if self.overflowed and self.on_overflow is not None:
            self.on_overflow()
        self._wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()

    def take(self) -> bytes | None:
        """The next piece of the body, if one is ready."""
        with self._lock:
            if not self._pieces:
                return None
            data = self._pieces.popleft()
            self.buffered -= len(data)
            return data

    async def news(self) -> None:
        """Wait until the worker has done something since the last call (or the job was cancelled)."""
        await self._wake.wait()
        self._wake.clear()


def _make_room(line: collections.deque[Job], job: Job) -> Job | None:
    """A full line: the newest waiting job of the client that holds the most places, taken out of
    the line for ``job`` when that client holds at least two more than ``job``'s (so that one
    client cannot keep the line full and every other client at 503); None otherwise (``job`` gets
    the 503, as from a full line of its own client's requests)."""
    counts = collections.Counter(j.client for j in line)
    client, most = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
    if most < counts.get(job.client, 0) + 2:
        return None
    victim = next(j for j in reversed(line) if j.client == client)
    line.remove(victim)
    return victim


def _bumped(victim: Job | None) -> None:
    if victim is not None:
        victim.fail(_busy("the server is busy: this request's place in line went to a request from another "
                          "client (each client gets a share of the line); retry later"))
        victim.finish()


class Engine:
    """The model and its worker thread: one generation at a time, in arrival order, at most
    ``max_queue`` jobs waiting behind the running one."""

    def __init__(self, model, name: str, max_queue: int = 8,
                 on_fatal: Callable[[BaseException], None] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.name = name
        self.created = int(time.time())
        self.max_queue = max_queue
        self.running: Job | None = None
        self.finished = 0                       # jobs the worker is done with (served, failed or skipped)
        self.fatal: BaseException | None = None  # what stopped the worker (KeyboardInterrupt, SystemExit)
        self._on_fatal = on_fatal
        self._line: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="edgellama-model", daemon=True)
        self._thread.start()

    n_slots = 1

    @property
    def n_ctx(self) -> int:
        """The context one request gets."""
        return self.model.n_ctx

    def between_passes(self) -> None:
        """Called by long work on the worker between its passes (embeddings): nothing else runs here."""

    @property
    def waiting(self) -> int:
        return len(self._line)

    def idle(self) -> bool:
        with self._cond:
            return self.running is None and not self._line

    def status(self) -> list[dict]:
        """The one slot: whether a request runs, and how many tokens the cache holds."""
        running = self.running
        return [{"id": 0, "n_ctx": self.n_ctx, "state": "idle" if running is None else "processing",
                 "n_cached": len(self.model.state.tokens)}]

    def submit(self, job: Job) -> None:
        """Put a job in line, or fail with 503 (the line is full)."""
        with self._cond:
            if self._closed or self.fatal is not None:
                raise _busy("the server is shutting down")
            victim = None
            if len(self._line) + (self.running is not None) > self.max_queue:
                victim = _make_room(self._line, job)
                if victim is None:
                    raise _busy("the server is busy: too many requests are waiting; retry later")
                self.finished += 1
            self._line.append(job)
            self._cond.notify()
        _bumped(victim)

    def discard(self, job: Job) -> None:
        """Take a cancelled job out of the line (if the worker has not begun it)."""
        with self._cond:
            try:
                self._line.remove(job)
            except ValueError:
                return
            self.finished += 1
            self._cond.notify_all()
        job.finish()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every job and stop the worker."""
        with self._cond:
            self._closed = True
            for job in [*self._line, *([self.running] if self.running else [])]:
                job.cancelled = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._line and not self._closed:
                    self._cond.wait()
                if not self._line:
                    return
                job = self._line.popleft()
                self.running = job
            try:
                if not job.cancelled:
                    self._run(job)
            except BaseException as e:  # KeyboardInterrupt, SystemExit, GeneratorExit: the worker stops
                self.fatal = e
                if self._on_fatal is not None:
                    self._on_fatal(e)
                return
            finally:
                with self._cond:
                    self.running = None
                    self.finished += 1
                    self._cond.notify_all()
                job.finish()

    def _run(self, job: Job) -> None:
        try:
            job.work(job)
        except JobStopped:
            pass
        except BaseException as e:  # noqa: B036 (PanicException and its kind are BaseExceptions)
            error = _generation_error(e, job.param)
            if error.status >= 500:
                print(f"edgellama serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                self.model.reset()  # a failure mid-evaluation may leave the cache half-written
            job.fail(error)
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise


class SlotEngine:
    """The model with ``n_slots`` parallel slots (``edgellama serve --parallel N``): one worker thread
    owns the model and a ``batch.Batch``; between two steps of the batch it starts waiting requests in
    free slots (a request goes to the free slot holding the longest prefix of its prompt: a chat's next
    turn finds its context there) and drops the ones whose client left; each step evaluates one token
    of every generating request and the next prompt tokens of the others (a long prompt advances a
    piece at a time, so that it never stalls the streams for long); each request's chunks stream into
    its own job's buffer.  Beyond the slots, ``max_queue`` requests may wait (503 beyond them).
    Other model work (embeddings) runs on the worker between two steps, and takes a step of the
    slots between its own passes (``between_passes``).  A request's reply is the
    same whatever runs beside it (batch invariance: edgellama.batch)."""

    def __init__(self, model, name: str, n_slots: int, max_queue: int = 8, n_ctx: int | None = None,
                 n_batch: int | None = None, on_fatal: Callable[[BaseException], None] | None = None):
        from .batch import Batch

        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.name = name
        self.created = int(time.time())
        self.max_queue = max_queue
        self.batch = Batch(model, n_slots=n_slots, n_ctx=n_ctx, n_batch=n_batch)
        self.n_slots = n_slots
        self.running: list[Job] = []             # jobs in a slot (or a plain job being run)
        self.finished = 0
        self.fatal: BaseException | None = None
        self._on_fatal = on_fatal
        self._line: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._status = self.batch.status()
        self._thread = threading.Thread(target=self._work, name="edgellama-model", daemon=True)
        self._thread.start()

    @property
    def n_ctx(self) -> int:
        return self.batch.n_ctx

    @property
    def waiting(self) -> int:
        return len(self._line)

    def idle(self) -> bool:
        with self._cond:
            return not self.running and not self._line

    def status(self) -> list[dict]:
        """Each slot's state after the last step (no contents of anyone's prompt)."""
        return self._status

    def warm_up(self) -> None:
        """Compile (or load) the batched kernel before the first request: one token in a slot."""
        self.batch.rows.forward([self.model.tokenizer.bos_id or 0], [0], [0], [0])

    def submit(self, job: Job) -> None:
        """Put a job in line, or fail with 503 (every slot is busy and the line is full)."""
        with self._cond:
            if self._closed or self.fatal is not None:
                raise _busy("the server is shutting down")
            victim = None
            if len(self._line) + len(self.running) >= self.n_slots + self.max_queue:
                victim = _make_room(self._line, job)
                if victim is None:
                    raise _busy("the server is busy: too many requests are waiting; retry later")
                self.finished += 1
            self._line.append(job)
            self._cond.notify()
        _bumped(victim)

    def discard(self, job: Job) -> None:
        """A cancelled job: out of the line at once; a running one leaves its slot before the next step."""
        with self._cond:
            try:
                self._line.remove(job)
            except ValueError:
                self._cond.notify()
                return
            self.finished += 1
            self._cond.notify_all()
        job.finish()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            for job in [*self._line, *self.running]:
                job.cancelled = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the worker ---

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._line and not self.running:
                        self._cond.wait()
                    if self._closed:
                        return
                    free = self.batch.free_slots()
                    starting = []
                    while self._line and (self._line[0].completion is None or free > 0):
                        job = self._line.popleft()
                        if job.completion is not None:
                            free -= 1
                        self.running.append(job)
                        starting.append(job)
                for job in starting:
                    self._start(job)
                self._drop_stopped()
                if self.batch.active:
                    self._step()
                self._status = self.batch.status()
        except BaseException as e:  # KeyboardInterrupt, SystemExit: the worker stops
            self.fatal = e
            for job in list(self.running):
                job.fail(_busy("the server is shutting down"))
                self._done(job)
            if self._on_fatal is not None:
                self._on_fatal(e)

    def _done(self, job: Job) -> None:
        with self._cond:
            # the slot's state first: whoever sees the job gone (idle()) also sees its slot free in /slots
            self._status = self.batch.status()
            if job in self.running:
                self.running.remove(job)
            self.finished += 1
            self._cond.notify_all()
        job.finish()

    def _fail(self, job: Job, e: BaseException) -> None:
        error = _generation_error(e, job.param)
        if error.status >= 500:
            print(f"edgellama serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exception(e, file=sys.stderr)
        job.fail(error)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise e

    def _start(self, job: Job) -> None:
        """Into a slot (a completion), or run now (other work); errors answered as JSON."""
        request = job.completion
        if job.cancelled:
            self._done(job)
            return
        try:
            if request is None:
                job.work(job)
                self._done(job)
                return
            if request.chat:
                seq = self.batch.add_chat(request.messages, request.max_tokens, sampler=request.sampler,
                                          stop=request.stop, tag=job)
            else:
                seq = self.batch.add(request.prompt, request.max_tokens, sampler=request.sampler, stop=request.stop,
                                     add_bos=None if isinstance(request.prompt, str) else False,
                                     special=request.special, tag=job)
            job.seq = seq
            job.reply = Reply(self, request, job)
        except JobStopped:
            self._done(job)
        except BaseException as e:  # noqa: B036 (a tokenizer's PanicException is a BaseException)
            self._fail(job, e)
            self._done(job)

    def between_passes(self) -> None:
        """Called by other work on the worker (embeddings) between its passes: one step of the slots,
        so that their streams go on instead of waiting for the whole of it (a 1 MB request of token
        ids is minutes of work).  No job starts here."""
        self._drop_stopped()
        if self.batch.active:
            self._step()
        self._status = self.batch.status()

    def _drop_stopped(self) -> None:
        """Jobs whose client left (or whose buffer overflowed) leave their slot now."""
        for job in list(self.running):
            seq = job.seq
            if seq is not None and (job.cancelled or job.overflowed):
                self.batch.remove(seq)
                self._done(job)

    def _step(self) -> None:
        try:
            events = self.batch.step()
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: B036  a failure of the model: every running request gets the error
            for job in list(self.running):
                seq = job.seq
                if seq is not None:
                    self.batch.remove(seq)
                    self._fail(job, e)
                    self._done(job)
            return
        for seq, chunk in events:
            job = seq.tag
            if job.done:
                continue
            try:
                job.reply.add(chunk)
                if chunk.finish_reason is not None:
                    job.reply.finish()
                    self._done(job)
            except JobStopped:
                self.batch.remove(seq)
                self._done(job)
        for job in list(self.running):  # sequences that failed on their own (their sampler)
            seq = job.seq
            if seq is not None and seq.error is not None and not job.done:
                self._fail(job, seq.error)
                self._done(job)


def _generation_error(e: BaseException, param: str | None) -> APIError:
    """The JSON error for a failure of tokenization or generation: 400 when the request caused it
    (a bad template input, a prompt beyond the context, a tokenizer refusal), else 500."""
    from .model import ContextOverflowError

    if isinstance(e, APIError):
        return e
    if isinstance(e, ChatTemplateError):
        return APIError(400, f"the chat template failed: {e}", param="messages")
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, ParameterError):  # SamplingError, GenerationError: a setting the request chose
        return _parameter_error(e, param)
    if isinstance(e, ValueError):  # TokenizerError, UnicodeError, token ids
        return APIError(400, str(e)[:1000], param=param)
    return APIError(500, f"internal error: {type(e).__name__}", kind="server_error")


# ----- replies (made on the worker) ---------------------------------------------------------------------

_FINGERPRINT = "edgellama"
_JSON = {"Content-Type": "application/json"}


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    data = tokenizer.token_bytes(token)
    return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}


def _chat_logprobs(tokenizer, chunks: list[Chunk]) -> dict | None:
    """The chat logprobs object of the chunks that carry a token's log-probability (None if none do)."""
    content = [{**_token_entry(tokenizer, c.token, c.logprob),
                "top_logprobs": [_token_entry(tokenizer, t.token, t.logprob) for t in c.top_logprobs or []]}
               for c in chunks if c.token is not None and c.logprob is not None]
    return {"content": content} if content else None


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


def _usage(chunk: Chunk) -> dict:
    u = chunk.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def run_completion(engine: Engine, request: Completion, job: Job) -> None:
    """A completion on the worker: tokenize, evaluate the prompt, generate into the job."""
    model = engine.model
    if request.chat:
        chunks = model.chat(request.messages, max_tokens=request.max_tokens, sampler=request.sampler,
                            stop=request.stop)
    else:
        chunks = model.generate(request.prompt, max_tokens=request.max_tokens, sampler=request.sampler,
                                stop=request.stop, add_bos=None if isinstance(request.prompt, str) else False,
                                special=request.special)
    chunks = iter(chunks)
    try:
        first = next(chunks)  # the prompt is evaluated here: its errors are still a JSON status
        reply = Reply(engine, request, job)
        for chunk in _all_chunks(job, first, chunks):
            reply.add(chunk)
        reply.finish()
    finally:
        if hasattr(chunks, "close"):
            chunks.close()


def _all_chunks(job: Job, first: Chunk, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """first, then the rest; between tokens, stop if the job was cancelled."""
    yield first
    for chunk in chunks:
        job.check()
        yield chunk


class Reply:
    """A completion's answer, made from its chunks as they come: a whole JSON reply at the end, or
    server-sent events as it goes (the status and the role event with the first chunk)."""

    def __init__(self, engine, request: Completion, job: Job):
        self.engine, self.request, self.job = engine, request, job
        self.tokenizer = engine.model.tokenizer
        self.text: list[str] = []
        self.logprobs: list[Chunk] = []
        self.last: Chunk | None = None
        self.ended = False             # a stream has sent its last text event
        self.ident, self.created = _new_id(request.chat), int(time.time())

    def add(self, chunk: Chunk) -> None:
        if self.last is None and self.request.stream:
            self.job.respond(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            if self.request.chat:
                self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        self.last = chunk
        if not self.request.stream:
            self.text.append(str(chunk))
            if chunk.logprob is not None:
                self.logprobs.append(chunk)
            return
        if self.ended:
            return
        if chunk.token is None:
            self.ended = True
            if str(chunk):  # the held-back end of the text
                self._event([self._choice(chunk)])
        elif str(chunk) or chunk.logprob is not None:
            self._event([self._choice(chunk)])

    def finish(self) -> None:
        """After the last chunk: the whole reply, or the stream's closing events."""
        request, job, last, tok = self.request, self.job, self.last, self.tokenizer
        if not request.stream:
            if request.chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                          "logprobs": _chat_logprobs(tok, self.logprobs), "finish_reason": last.finish_reason}
            else:
                choice = {"index": 0, "text": "".join(self.text), "logprobs": _completion_logprobs(tok, self.logprobs),
                          "finish_reason": last.finish_reason}
            body = {"id": self.ident, "object": "chat.completion" if request.chat else "text_completion",
                    "created": self.created, "model": self.engine.name, "choices": [choice], "usage": _usage(last),
                    "system_fingerprint": _FINGERPRINT}
            job.respond(200, dict(_JSON), json.dumps(body).encode())
            return
        end = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        end.update({"delta": {}} if request.chat else {"text": ""})
        self._event([end])
        if request.include_usage:
            self._event([], _usage(last))
        job.put(STREAM_END)

    def _event(self, choices: list, usage: dict | None = None) -> None:
        payload = {"id": self.ident, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                   "created": self.created, "model": self.engine.name, "system_fingerprint": _FINGERPRINT,
                   "choices": choices}
        if self.request.include_usage:
            payload["usage"] = usage
        self.job.put(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _choice(self, chunk: Chunk) -> dict:
        tok = self.tokenizer
        if self.request.chat:
            return {"index": 0, "delta": {"content": str(chunk)}, "logprobs": _chat_logprobs(tok, [chunk]),
                    "finish_reason": None}
        return {"index": 0, "text": str(chunk),
                "logprobs": _completion_logprobs(tok, [chunk] if chunk.logprob is not None else []),
                "finish_reason": None}


# ----- HTTP on an event loop -------------------------------------------------------------------------------

class _HTTPError(Exception):
    """A request that cannot be parsed: answered with this status, then the connection closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Stalled(Exception):
    """The client took no bytes of its reply for send_timeout seconds."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes | None = None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return self.version == "HTTP/1.1" and "close" not in tokens


_TOKEN_CHARS = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _parse_head(data: bytes) -> Request:
    """Request line and headers (``data`` ends with the blank line)."""
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN_CHARS.fullmatch(parts[0]) or not parts[1]:
        raise _HTTPError(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not re.fullmatch(r"HTTP/1\.[0-9]", version):  # a later 1.x is read as 1.1 (RFC 9110)
        raise _HTTPError(400, f"unsupported protocol {version[:20]!r} (HTTP/1.1 is spoken here)")
    version = "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"
    if len(lines) - 1 > MAX_HEADERS:
        raise _HTTPError(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_CHARS.fullmatch(name):  # also folded lines and spaces before the colon
            raise _HTTPError(400, "malformed header line")
        key, text = name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host", "transfer-encoding"):
                raise _HTTPError(400, f"more than one {name.decode('latin-1')} header")
            text = headers[key] + ", " + text
        headers[key] = text
    return Request(method, target, version, headers)


def _head(status: int, headers: dict[str, str]) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    lines = [f"HTTP/1.1 {status} {phrase}", "Server: edgellama", f"Date: {formatdate(usegmt=True)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _log(conn: "_Connection", request: Request, status: int, note: str = "") -> None:
    """One access-log line on stderr (the path escaped: a client cannot write to the terminal)."""
    path = request.path[:100].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    print(f"{conn.client} - \"{request.method} {path}\" {status}{note}", file=sys.stderr)


def _client_key(peer) -> str:
    """The address a connection counts against: the IP, or for IPv6 its /64 network."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Connection:
    __slots__ = ("reader", "writer", "peer", "client", "open", "_closed")

    def __init__(self, reader, writer, peer, client):
        self.reader, self.writer, self.peer, self.client = reader, writer, peer, client
        self.open = True
        self._closed: asyncio.Future | None = None

    def abort(self) -> None:
        self.writer.transport.abort()

    def closed(self) -> asyncio.Future:
        """Done when the connection is closed: one watcher for the connection's life, which each
        request's delivery hooks into.  (A watcher per request, cancelled after it, cancelled the
        stream's own close-waiter future with it: every later request on a keep-alive connection
        then found it done at once, took its client for gone and got no answer.)"""
        if self._closed is None:
            self._closed = asyncio.ensure_future(self.writer.wait_closed())
        return self._closed

    def forget(self) -> None:
        if self._closed is not None:
            self._closed.cancel()


# How much lower (in nice steps) the event loop's thread runs than the model's threads.  Linux
# schedules threads, not processes: while a step computes, its OpenMP threads hold every core, and
# the event loop's turns (a socket write per stream and token) take a core from one of them, which
# stops the other at the loop's next barrier.  At nice +5 the loop still gets about a quarter of a
# core when it competes, and all of one otherwise.  Measured on a 2-core Xeon (2026-12-03, SmolLM2
# Q8_0, serve --parallel 4, four greedy streams, interleaved runs): -n 64: 274-317 -> 326-332
# tok/s aggregate; -n 128: 283-305 -> 297-321 (+10: 293-304).
LOOP_NICE = 5


def _lower_loop_priority() -> None:
    """The calling thread (serve_forever's event-loop thread) at LOOP_NICE above its priority,
    after starting the kernel thread, so that it and the OpenMP threads it starts keep theirs (a
    thread starts at the priority of the one that starts it).  Linux only (elsewhere a thread id is
    no process id); a failure changes nothing.  There is no way back without privileges, which is
    why the loop runs in a thread of its own: the thread that called serve_forever keeps its
    priority."""
    if not sys.platform.startswith("linux"):
        return
    from . import kernel_thread

    kernel_thread.start()
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + LOOP_NICE))
    except (AttributeError, OSError):
        pass


class Server:
    """The HTTP front end: one asyncio event loop for every connection, the model on its own worker.

    ``serve_forever()`` runs the loop until ``shutdown()`` (from another thread), in a thread of its
    own that the caller waits for (on Linux at ``LOOP_NICE`` above the caller's priority: see
    ``_lower_loop_priority``); ``server_close()`` frees the socket and stops the worker.
    """

    def __init__(self, model, config: ServerConfig):
        _check_config(config)
        self.config = config
        name = config.model_name or os.path.basename(str(model.path)).removesuffix(".gguf")
        if config.parallel > 1:
            self.engine = SlotEngine(model, name, config.parallel, config.max_queue,
                                     n_ctx=model.n_ctx // config.parallel, n_batch=config.batch_size,
                                     on_fatal=self._fatal)
        else:
            self.engine = Engine(model, name, config.max_queue, on_fatal=self._fatal)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((config.host, config.port))
            self.socket.listen(min(socket.SOMAXCONN, 4096))
        except BaseException:
            self.socket.close()
            self.engine.close()
            raise
        self.server_address = self.socket.getsockname()
        # connections by client address; the ones waiting for (or reading) a request, oldest first
        self._connections: dict[_Connection, None] = {}
        self._handlers: set[asyncio.Task] = set()  # each connection's coroutine, ended before the loop
        self._delivering: dict[Job, asyncio.Task] = {}  # the jobs whose replies connections wait for or send
        self._closing = False  # the loop is stopping: answers in progress end saying so
        self._per_client: dict[str, int] = collections.Counter()
        self._waiting: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._waiting_of: dict[str, collections.OrderedDict[_Connection, None]] = {}
        self.counts: collections.Counter[str] = collections.Counter()  # evicted, refused, timeouts, ...
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.ready = threading.Event()              # set once connections are accepted
        self.on_ready: Callable[[], None] | None = None  # called (on the loop) at that moment
        self._stopped = threading.Event()
        self._stopped.set()

    # --- running ---

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (from another thread) or Ctrl-C (KeyboardInterrupt, raised here
        once the loop has stopped).  The event loop runs in a thread of its own at LOOP_NICE, which
        this thread waits for: its priority stays as it was."""
        self._stopped.clear()
        failed: list[BaseException] = []
        finished = threading.Event()

        def run_loop() -> None:
            _lower_loop_priority()
            try:
                asyncio.run(self._main())
            except BaseException as e:  # noqa: B036  (raised again in the waiting thread)
                failed.append(e)
            finally:
                finished.set()

        # The loop's end is waited for on an Event, not with Thread.join: a Ctrl-C that interrupts
        # join() makes CPython (before 3.13) take the thread for finished while it still runs
        # (threading's bpo-45274 handling), and the socket would be closed under a running loop.
        # Ctrl-C is held back until the thread has started: interrupting Thread.start() leaves
        # nothing to tell whether the loop will run.
        masking = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masking else None
        try:
            try:
                threading.Thread(target=run_loop, name="edgellama-http", daemon=True).start()
            except BaseException:
                if masking:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                raise
            try:
                if masking:  # (a Ctrl-C held back is raised here)
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                finished.wait()
            except BaseException:  # Ctrl-C while waiting: stop the loop (once it runs), then raise it
                while not finished.wait(0.05):
                    self._request_stop()
                raise
        finally:
            self._stopped.set()
        if failed:
            raise failed[0]

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve_connection, sock=self.socket, limit=MAX_HEAD_BYTES,
                                            backlog=min(socket.SOMAXCONN, 4096))
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self._stop.wait()
        finally:
            self.ready.clear()
            self._closing = True
            server.close()
            self.engine.close(timeout=0)  # every job cancelled: the worker stops at its next token
            # a stream in progress ends with an error event saying why, a request still waiting is
            # answered 503 (not cut off like a finished stream, or left without an answer): each
            # delivery is woken and given a moment to write that
            deliveries = list(self._delivering.items())
            for job, _ in deliveries:
                job.cancel()
            if deliveries:
                await asyncio.wait([task for _, task in deliveries], timeout=SHUTDOWN_GRACE)
            for conn in list(self._connections):
                conn.abort()
            # each connection's coroutine ends on its aborted socket (not cancelled by asyncio.run,
            # which printed a CancelledError traceback per open connection)
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=2.0)

    def shutdown(self) -> None:
        """Stop serve_forever (call from another thread) and wait until it has returned."""
        while not self._stopped.is_set():  # (a loop still starting is asked again until it stops)
            self._request_stop()
            self._stopped.wait(0.05)

    def _request_stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has closed
                pass

    def server_close(self) -> None:
        self.socket.close()
        self.engine.close()

    def _fatal(self, error: BaseException) -> None:
        print(f"edgellama serve: the model worker stopped: {type(error).__name__}", file=sys.stderr)
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass

    # --- connection slots ---

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def _admit(self, reader, writer) -> _Connection | None:
        """Register a new connection, closing the oldest unfinished request if there is no room;
        None when every slot (of this client, or of the server) carries a request in progress."""
        peer = writer.get_extra_info("peername")
        client = _client_key(peer)
        if self._per_client[client] >= self.config.max_connections_per_client:
            victim = next(iter(self._waiting_of.get(client) or ()), None)
        elif len(self._connections) >= self.config.max_connections:
            victim = next(iter(self._waiting), None)
        else:
            victim = _MISSING
        if victim is None:
            self.counts["refused"] += 1
            return None
        if victim is not _MISSING:
            self.counts["evicted"] += 1
            self._forget(victim)
            victim.abort()
        conn = _Connection(reader, writer, peer, client)
        self._connections[conn] = None
        self._per_client[client] += 1
        sock = writer.get_extra_info("socket")
        if self.config.socket_send_buffer and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_send_buffer)
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=0)
        return conn

    def _set_waiting(self, conn: _Connection, waiting: bool) -> None:
        """A connection waiting for (or reading) a request may be closed to make room."""
        if not conn.open:
            return
        mine = self._waiting_of.setdefault(conn.client, collections.OrderedDict())
        if waiting:
            self._waiting[conn] = None
            mine[conn] = None
        else:
            self._waiting.pop(conn, None)
            mine.pop(conn, None)
            if not mine:
                del self._waiting_of[conn.client]

    def _forget(self, conn: _Connection) -> None:
        if not conn.open:
            return
        self._set_waiting(conn, False)
        conn.open = False
        del self._connections[conn]
        self._per_client[conn.client] -= 1
        if not self._per_client[conn.client]:
            del self._per_client[conn.client]

    # --- one connection ---

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve_admitted(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve_admitted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self._admit(reader, writer)
        if conn is None:
            error = APIError(503, "too many open connections; retry later", kind="server_error", code="server_busy")
            data = json.dumps(error.body()).encode()
            writer.write(_head(503, {**_JSON, "Content-Length": str(len(data)), "Retry-After": "1",
                                     "Connection": "close"}) + data)
            writer.close()  # a few hundred bytes: the kernel takes them at once
            return
        try:
            while conn.open and not self._closing:
                request = await self._read_request(conn)
                if request is None or not await self._respond(conn, request):
                    break
            if conn.open:
                await self._flush(conn, everything=True)
                writer.close()
        except (_Stalled, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            conn.abort()
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception as e:  # a bug in the front end: this connection only
            print(f"edgellama serve: connection from {conn.client} failed: {e!r}", file=sys.stderr)
            conn.abort()
        finally:
            conn.forget()
            self._forget(conn)

    async def _read_request(self, conn: _Connection) -> Request | None:
        """The next request, head and body within request_timeout of its first byte; None when the
        client has closed or stayed idle for idle_timeout, or when the request was refused (answered)."""
        self._set_waiting(conn, True)
        try:
            try:
                first = await asyncio.wait_for(self._first_byte(conn.reader), self.config.idle_timeout)
            except asyncio.TimeoutError:
                self.counts["idle_closed"] += 1
                return None
            if not first:
                return None
            try:
                request, error = await asyncio.wait_for(self._read_rest(conn, first), self.config.request_timeout)
            except asyncio.TimeoutError:
                self.counts["request_timeouts"] += 1
                request, error = None, APIError(408, "the request did not arrive within "
                                                     f"{self.config.request_timeout:g} s")
            if error is None:
                return request
            await self._send_error(conn, request, error, close=True)  # the rest of the request is unread
            return None
        finally:
            self._set_waiting(conn, False)

    @staticmethod
    async def _first_byte(reader: asyncio.StreamReader) -> bytes:
        first = await reader.read(1)
        while first in (b"\r", b"\n"):  # blank lines before a request are allowed
            first = await reader.read(1)
        return first

    async def _read_rest(self, conn: _Connection, first: bytes) -> tuple[Request | None, APIError | None]:
        """Head and body after the first byte: (request, None), or what to refuse it with."""
        try:
            head = first + await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return None, APIError(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
        try:
            request = _parse_head(head)
        except _HTTPError as e:
            return None, APIError(e.status, e.message)
        try:
            length = self._check_request(request)
        except APIError as e:
            return request, e
        if length is not None:
            if "100-continue" in request.headers.get("expect", "").lower():
                conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.body = await conn.reader.readexactly(length)
        return request, None

    def _check_request(self, request: Request) -> int | None:
        """Host, key and framing, checked before the body is read; the body's length (None: none)."""
        self._check_host(request)
        if request.method != "OPTIONS" and request.path != "/health":
            self._check_key(request)
        if request.method == "POST":
            self._check_origin(request)
        if "transfer-encoding" in request.headers:
            raise APIError(411, "chunked request bodies are not accepted: send Content-Length")
        length = request.headers.get("content-length")
        if length is None:
            if request.method == "POST":
                raise APIError(411, "a request body with Content-Length is required")
            return None
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise APIError(400, f"bad Content-Length {length[:40]!r}")
        n = int(length)
        if n > self.config.max_body_bytes:
            raise APIError(413, f"the request body of {n} bytes is larger than the {self.config.max_body_bytes} "
                                "accepted", code="request_too_large")
        return n

    async def _respond(self, conn: _Connection, request: Request) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        try:
            keep = await self._route(conn, request)
        except APIError as e:
            return await self._send_error(conn, request, e)
        return keep and request.keep_alive

    async def _send_error(self, conn: _Connection, request: Request | None, e: APIError, close: bool = False) -> bool:
        headers = dict(e.headers)
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        keep = not close and not self._closing and request is not None and request.keep_alive
        await self._send(conn, request, e.status, e.body(), headers, keep)
        return keep

    async def _send(self, conn: _Connection, request: Request | None, status: int, body: dict | bytes | None,
                    headers: dict[str, str] | None = None, keep: bool = True) -> None:
        """A whole reply; waits until the client has taken it (or send_timeout without progress)."""
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        all_headers = dict(_JSON) if isinstance(body, dict) else {}
        all_headers.update(headers or {})
        all_headers["Content-Length"] = str(len(data))
        all_headers.update(self._cors_headers(request))
        if not keep:
            all_headers["Connection"] = "close"
        head_only = request is not None and request.method == "HEAD"
        conn.writer.write(_head(status, all_headers) + (b"" if head_only else data))
        if request is not None:
            _log(conn, request, status)
        await self._flush(conn, everything=True)

    async def _flush(self, conn: _Connection, everything: bool = False) -> None:
        """Wait until the transport holds at most WRITE_HIGH_WATER bytes (or none): the client takes
        them at its pace, but one that takes nothing for send_timeout seconds is dropped."""
        transport, writer = conn.writer.transport, conn.writer
        if everything:
            transport.set_write_buffer_limits(high=0, low=0)
        try:
            last, since = transport.get_write_buffer_size(), time.monotonic()
            poll = min(1.0, self.config.send_timeout / 4)
            while True:
                try:
                    await asyncio.wait_for(writer.drain(), poll)
                    return
                except asyncio.TimeoutError:
                    size, now = transport.get_write_buffer_size(), time.monotonic()
                    if size < last:
                        last, since = size, now
                    elif now - since >= self.config.send_timeout:
                        self.counts["send_stalls"] += 1
                        raise _Stalled() from None
        finally:
            if everything and not transport.is_closing():
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=0)

    # --- checks ---

    def _cors_headers(self, request: Request | None) -> dict[str, str]:
        origin = request.headers.get("origin") if request is not None else None
        allowed = self.config.cors_origins
        if not origin or not allowed:
            return {}
        if "*" in allowed:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in allowed else {}

    def _check_host(self, request: Request) -> None:
        """On a loopback address (or when names are configured) the Host header must name us: a
        web page whose DNS name was rebound to 127.0.0.1 cannot reach the model."""
        allowed = self.config.allowed_hosts
        if "*" in allowed:
            return
        if not allowed and self.config.host not in LOOPBACK_NAMES and not self.config.host.startswith("127."):
            return
        host = request.headers.get("host", "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name not in LOOPBACK_NAMES | {self.config.host.lower()} | {h.lower() for h in allowed}:
            raise APIError(403, f"Host {host[:80]!r} is not allowed (use --allowed-host)", code="host_not_allowed",
                           kind="permission_error")

    def _check_origin(self, request: Request) -> None:
        """A browser's POST from a page of another origin runs only when that origin is listed
        (--cors-origin): a page may send a "simple" request (text/plain, no preflight) that it cannot
        read the answer of, but that would still occupy the model.  Clients other than browsers send
        no Origin; a page of this server's own origin may post."""
        origin = request.headers.get("origin")
        if origin is None:
            return
        allowed = self.config.cors_origins
        if "*" in allowed or origin in allowed:
            return
        host = request.headers.get("host", "").strip().lower()
        if host and origin.strip().lower() == f"http://{host}":
            return
        raise APIError(403, f"requests from the web page origin {origin[:80]!r} are not allowed (use --cors-origin)",
                       code="origin_not_allowed", kind="permission_error")

    def _check_key(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # header bytes were read as latin-1: encoding them back gives the bytes the client sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    # --- routes ---

    async def _route(self, conn: _Connection, request: Request) -> bool:
        method, path = request.method, request.path
        if method == "OPTIONS":
            headers = self._cors_headers(request)
            if headers:
                headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                           "Access-Control-Allow-Headers": "Authorization, Content-Type",
                           "Access-Control-Max-Age": "600"}
            await self._send(conn, request, 204, None, headers, request.keep_alive)
            return True
        if method not in ("GET", "HEAD", "POST"):
            raise APIError(405, f"{method[:20]} is not allowed here", headers={"Allow": "GET, HEAD, POST, OPTIONS"})
        if method in ("GET", "HEAD"):
            if path == "/health":
                body = self._health()
            elif path == "/slots":
                body = self.engine.status()
            elif path == "/v1/models":
                body = {"object": "list", "data": [self._model_card()]}
            elif path == f"/v1/models/{self.engine.name}":
                body = self._model_card()
            elif path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                raise APIError(405, f"use POST for {path}", headers={"Allow": "POST"})
            else:
                raise APIError(404, f"no such endpoint: {path[:100]}", code="not_found")
            await self._send(conn, request, 200, body, None, request.keep_alive)
            return True
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            raise APIError(404, f"no such endpoint: {path[:100]}", code="not_found")
        model = self.engine.model
        loop = asyncio.get_running_loop()
        if path == "/v1/embeddings":
            embedding = parse_embedding(_json_body(request.body or b""), model.args.n_vocab, model.args.dim)
            job = Job(lambda job: run_embedding(self.engine, embedding, job), loop, self.config.max_output_buffer,
                      param="input", client=conn.client)
        else:
            completion = parse_completion(_json_body(request.body or b""), path == "/v1/chat/completions",
                                          model.args.n_vocab, self.engine.n_ctx)
            job = Job(lambda job: run_completion(self.engine, completion, job), loop, self.config.max_output_buffer,
                      param=completion.param, client=conn.client)
            job.completion = completion
        self.engine.submit(job)
        return await self._deliver(conn, request, job)

    def _health(self) -> dict:
        """{"status": "ok"}; with parallel slots also how many are idle or busy, and the line."""
        if self.engine.n_slots == 1:
            return {"status": "ok"}
        states = [slot["state"] for slot in self.engine.status()]
        idle = states.count("idle")
        return {"status": "ok", "slots_idle": idle, "slots_processing": len(states) - idle,
                "requests_waiting": self.engine.waiting}

    def _model_card(self) -> dict:
        m = self.engine.model
        return {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "edgellama",
                "meta": {"n_ctx": self.engine.n_ctx, "n_vocab": m.args.n_vocab, "n_parallel": self.engine.n_slots}}

    async def _deliver(self, conn: _Connection, request: Request, job: Job) -> bool:
        """The job's reply, at the client's pace; a lost connection cancels the job."""

        def overflowed() -> None:  # an overflowing stream is dropped at once
            self.counts["overflows"] += 1
            conn.abort()

        job.on_overflow = overflowed

        def lost(closed: asyncio.Future) -> None:
            if not closed.cancelled():
                closed.exception()  # retrieved: a reset connection is no error of ours
            job.cancel()
            self.engine.discard(job)

        watch = conn.closed()
        watch.add_done_callback(lost)
        self._delivering[job] = asyncio.current_task()
        try:
            while job.status is None and not job.done and not job.cancelled:
                await job.news()
            if job.status is None:  # cancelled (the client gone, or the server stopping), or the worker stopped
                if job.cancelled and not self._closing:
                    return False
                raise _busy("the server is shutting down")
            if job.body is not None:  # a whole reply (or an error)
                await self._send(conn, request, job.status, job.body, job.headers, request.keep_alive)
                return True
            # a stream: the end of the stream is the end of the connection
            headers = {**job.headers, **self._cors_headers(request), "Connection": "close"}
            conn.writer.write(_head(job.status, headers))
            _log(conn, request, job.status, " (stream)")
            ended = False  # the stream's end event written (a stop then adds nothing)
            while True:
                if conn.writer.transport.is_closing():
                    raise ConnectionResetError("the connection is closed")
                done = job.done  # (read before take: the worker's last pieces are in before it is set)
                piece = job.take()
                if piece is not None:
                    conn.writer.write(piece)
                    ended = piece == STREAM_END
                    await self._flush(conn)
                elif job.overflowed:
                    raise ConnectionResetError("the reply outgrew max_output_buffer")
                elif job.cancelled and self._closing:  # (its pieces written): the reason it ends, unless it had
                    if not (done or ended):  # (the worker marks a job done a moment after its end event)
                        conn.writer.write(b"data: " + json.dumps(_busy("the server is shutting down").body()).encode()
                                          + b"\n\n")
                        await self._flush(conn)
                    return False
                elif job.cancelled:
                    raise ConnectionResetError("the client is gone")
                elif done:
                    return False
                else:
                    await job.news()
        finally:
            self._delivering.pop(job, None)
            watch.remove_done_callback(lost)
            if not job.done:
                job.cancel()
                self.engine.discard(job)


def _json_body(data: bytes) -> dict:
    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _check_config(config: ServerConfig) -> None:
    if config.max_body_bytes <= 0 or config.max_connections <= 0 or config.max_connections_per_client <= 0:
        raise ValueError(f"max_body_bytes, max_connections and max_connections_per_client must be positive, got "
                         f"{config.max_body_bytes}, {config.max_connections} and {config.max_connections_per_client}")
    for name in ("request_timeout", "idle_timeout", "send_timeout"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if config.max_output_buffer <= 0 or config.socket_send_buffer < 0:
        raise ValueError(f"max_output_buffer must be positive and socket_send_buffer >= 0, got "
                         f"{config.max_output_buffer} and {config.socket_send_buffer}")
    if not 1 <= config.parallel <= 256 or (config.batch_size is not None and config.batch_size < config.parallel):
        raise ValueError(f"parallel must be in [1, 256] and batch_size >= parallel, got {config.parallel} and "
                         f"{config.batch_size}")


def make_server(model, config: ServerConfig) -> Server:
    """A server bound to config.host:config.port (port 0: any free one); call serve_forever()."""
    return Server(model, config)


def _raise_file_limit(config: ServerConfig) -> None:
    """Room for max_connections sockets: raise the soft limit on open files (up to the hard one)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    need = config.max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
        if soft < need:
            config.max_connections = max(1, soft - 64)
            print(f"edgellama serve: warning: the open-file limit ({soft}) allows {config.max_connections} "
                  "connections", file=sys.stderr)


def serve(model, config: ServerConfig) -> int:
    _raise_file_limit(config)
    server = make_server(model, config)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    if not config.api_key and config.host not in LOOPBACK_NAMES and not config.host.startswith("127."):
        print("edgellama serve: warning: listening beyond this machine without --api-key", file=sys.stderr)

    if config.parallel > 1:  # the batched kernel is compiled (or loaded) before the first request
        from .kernel_cache import CompileProgress

        with CompileProgress(None, sys.stderr, prefix="edgellama serve"):
            server.engine.warm_up()
    slots = f"{config.parallel} slots of {server.engine.n_ctx}" if config.parallel > 1 else f"n_ctx {model.n_ctx}"
    server.on_ready = lambda: print(f"edgellama serve: {server.engine.name} ({slots}, "
                                    f"{model.threads} threads) listening on http://{shown}:{port}/v1",
                                    file=sys.stderr, flush=True)
    def terminated(signum, frame):  # SIGTERM (a service manager, docker stop): as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
    if server.engine.fatal is not None and not isinstance(server.engine.fatal, KeyboardInterrupt):
        return 1
    return 0
