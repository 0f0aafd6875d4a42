"""Slow and hostile connections against the server's front end (issue 11, items 3 and 4).

Sockets that trickle a request, never finish one, or stop reading their reply must not keep other
clients out nor hold the model.  Deadlines are configured short (a second or less) and every test
waits for an observable state (a server counter, a closed socket, an idle engine), never for a
duration: the assertions are about outcomes.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

import edgellama
from edgellama.quants import GGMLType
from edgellama.server import _client_key
from test_server import HeldModel, Running, events, wait_until
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny512(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("slow") / "tiny512.gguf", GGMLType.Q8_0, ctx=512)
    return edgellama.load(path, n_ctx=512, threads=1)


def no_end(model) -> dict:
    """A logit_bias that bans the end-of-text tokens: the reply runs to max_tokens."""
    return {str(i): -100 for i in model.tokenizer.eog_ids}


def post_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the server closes; (data, closed cleanly): False when it was reset."""
    sock.settimeout(60)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, False
    return data, True


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(60)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def slow_reader(port: int) -> socket.socket:
    """A client socket with a small receive buffer (the server's side is small too: see the configs)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    return s


# ----- slow senders ---------------------------------------------------------------------------------

TRICKLE_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000


def trickler(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(TRICKLE_HEAD[:20])  # a request head that is never finished
    return s


def test_trickling_sockets_cannot_lock_others_out(tiny512):
    """The audit's attack: more trickling sockets than connection slots.  Every new connection
    closes the oldest one that has not delivered a request, so normal requests are all served."""
    s = Running(tiny512, max_connections=16, request_timeout=600)
    socks = []
    try:
        for _ in range(40):
            socks.append(trickler(s.port))
        wait_until(lambda: s.httpd.counts["evicted"] >= 24, "the oldest tricklers are closed")
        assert s.httpd.open_connections == 16
        statuses = []
        for i in range(20):
            socks.append(trickler(s.port))  # the attack goes on between the requests
            if i % 2:
                statuses.append(s.request("GET", "/health")[0])
            else:
                statuses.append(s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0])
        assert statuses == [200] * 20
        assert closed_by_server(socks[0])  # the first trickler was closed to make room
    finally:
        for sock in socks:
            sock.close()
        s.close()


def test_the_request_deadline_is_for_the_whole_request_not_per_byte(tiny512):
    s = Running(tiny512, request_timeout=1.0)
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sent, answer = 0, b""
        sock.settimeout(0.05)
        while not answer and sent < len(TRICKLE_HEAD):  # a byte every 50 ms: never silent for long
            sock.sendall(TRICKLE_HEAD[sent:sent + 1])
            sent += 1
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
        answer += read_all(sock)[0]
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert sent < len(TRICKLE_HEAD)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        # the body counts too: a complete head, then a body that never completes
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"pro")
        answer, _ = read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert s.httpd.counts["request_timeouts"] == 2
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
    finally:
        s.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(tiny512):
    s = Running(tiny512, idle_timeout=0.5)
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        assert closed_by_server(sock)
        sock.close()
        assert s.httpd.counts["idle_closed"] >= 1
    finally:
        s.close()


def test_one_address_gets_a_share_of_the_slots(tiny512):
    """127.0.0.1 fills its share with requests in progress: its next connection gets 503, while
    another address (127.0.0.2, also this machine) is still served."""
    other = socket.socket()
    try:
        other.bind(("127.0.0.2", 0))
    except OSError:
        other.close()
        pytest.skip("127.0.0.2 is not a local address here")
    s = Running(tiny512, max_connections=4, max_connections_per_client=2, max_queue=4)
    threads = []
    try:
        held = HeldModel(s.engine)
        for _ in range(2):  # two requests waiting for the model: not evictable
            t = threading.Thread(target=s.post, args=("/v1/completions", {"prompt": "hi", "max_tokens": 1}))
            t.start()
            threads.append(t)
        wait_until(lambda: s.engine.waiting == 2, "two requests wait")
        status, _, body = s.request("GET", "/health")
        assert status == 503 and body["error"]["code"] == "server_busy"
        other.settimeout(60)
        other.connect(("127.0.0.1", s.port))
        other.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_all(other)[0].startswith(b"HTTP/1.1 200")
        held.close()
        for t in threads:
            t.join(60)
    finally:
        other.close()
        s.close()


def test_client_addresses():
    assert _client_key(("127.0.0.1", 5)) == "127.0.0.1"
    assert _client_key(("::ffff:10.0.0.7", 5, 0, 0)) == "10.0.0.7"
    # an IPv6 client has a whole /64 to pick addresses from: it counts as one
    assert _client_key(("2001:db8:1:2::1", 5, 0, 0)) == _client_key(("2001:db8:1:2:ffff::9", 5, 0, 0))
    assert _client_key(("2001:db8:1:3::1", 5, 0, 0)) != _client_key(("2001:db8:1:2::1", 5, 0, 0))


# ----- slow readers ---------------------------------------------------------------------------------

def big_stream(model, max_tokens: int = 400) -> dict:
    """A stream of ~1.5 KB per token (20 log-probabilities each): hundreds of KB, far more than the
    socket buffers of the configs below hold."""
    return {"prompt": "hello", "max_tokens": max_tokens, "temperature": 1.0, "seed": 5, "stream": True,
            "logprobs": 20, "logit_bias": no_end(model)}


def stream_text(data: bytes) -> str:
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    return "".join(e["choices"][0]["text"] for e in events(body) if e != "[DONE]" and e["choices"])


def test_a_slow_reader_does_not_hold_the_model(tiny512):
    """The model finishes a stream whose client reads nothing, and serves the next request; the
    client then reads its whole reply, intact."""
    s = Running(tiny512, socket_send_buffer=4096, send_timeout=600)
    try:
        request = big_stream(tiny512)
        want = s.post("/v1/completions", {**request, "stream": False})[2]["choices"][0]["text"]
        finished = s.engine.finished
        reader = slow_reader(s.port)
        reader.sendall(post_bytes("/v1/completions", request))
        wait_until(lambda: s.engine.finished > finished, "the stream's generation has ended")
        status, _, body = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        data, clean = read_all(reader)  # now the slow reader takes its reply
        reader.close()
        assert clean and data.startswith(b"HTTP/1.1 200") and data.endswith(b"data: [DONE]\n\n")
        assert len(data) > 200_000  # far beyond what the socket buffers held: the rest waited in the job
        assert stream_text(data) == want
    finally:
        s.close()


def test_a_client_that_stops_reading_is_dropped(tiny512):
    s = Running(tiny512, socket_send_buffer=4096, send_timeout=0.5)
    try:
        reader = slow_reader(s.port)
        reader.sendall(post_bytes("/v1/completions", big_stream(tiny512)))
        wait_until(lambda: s.httpd.counts["send_stalls"] >= 1, "the stalled client is dropped")
        wait_until(s.engine.idle, "the model is free")
        data, _ = read_all(reader)
        reader.close()
        assert data.startswith(b"HTTP/1.1 200") and b"[DONE]" not in data
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    finally:
        s.close()


def test_an_overflowing_output_buffer_stops_the_generation_at_once(tiny512, monkeypatch):
    evaluated = []
    real_eval = tiny512.eval

    def counting_eval(ids, *a, **kw):
        evaluated.append(len(ids))
        return real_eval(ids, *a, **kw)

    s = Running(tiny512, socket_send_buffer=4096, send_timeout=600, max_output_buffer=32 * 1024)
    try:
        monkeypatch.setattr(tiny512, "eval", counting_eval)
        reader = slow_reader(s.port)
        reader.sendall(post_bytes("/v1/completions", big_stream(tiny512, max_tokens=500)))
        wait_until(lambda: s.httpd.counts["overflows"] >= 1, "the overflowing client is dropped")
        wait_until(s.engine.idle, "the model is free")
        assert len(evaluated) < 250, f"{len(evaluated)} tokens decoded for a client whose buffer overflowed"
        data, _ = read_all(reader)
        reader.close()
        assert b"[DONE]" not in data
        monkeypatch.setattr(tiny512, "eval", real_eval)
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    finally:
        s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_gets_its_answer(tiny512, stream):
    s = Running(tiny512)
    try:
        request = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": stream}
        want = s.post("/v1/completions", {**request, "stream": False})[2]["choices"][0]["text"]
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sock.sendall(post_bytes("/v1/completions", request))
        sock.shutdown(socket.SHUT_WR)  # nothing more to say, still listening
        data, clean = read_all(sock)
        sock.close()
        assert clean and data.startswith(b"HTTP/1.1 200")
        text = stream_text(data) if stream else json.loads(data.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"]
        assert text == want
    finally:
        s.close()


def test_keep_alive_and_pipelined_requests_then_half_close(tiny512):
    s = Running(tiny512)
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     + post_bytes("/v1/completions", {"prompt": "hi", "max_tokens": 1})
                     + b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data, clean = read_all(sock)
        sock.close()
        assert clean and data.count(b"HTTP/1.1 200 OK\r\n") == 3
    finally:
        s.close()


def test_a_client_gone_while_waiting_frees_its_place(tiny512):
    """A request that waits for the model and whose client resets the connection leaves the line."""
    s = Running(tiny512, max_queue=1)
    try:
        held = HeldModel(s.engine)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        sock.sendall(post_bytes("/v1/completions", {"prompt": "hi", "max_tokens": 1}))
        wait_until(lambda: s.engine.waiting == 1, "the request waits")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: a reset, which the server notices at once
        wait_until(lambda: s.engine.waiting == 0, "the abandoned request leaves the line")
        held.close()
        assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
    finally:
        s.close()
