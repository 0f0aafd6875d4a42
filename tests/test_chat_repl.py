"""model.chat, the chat loop (run_chat) and `edgellama chat` in a real terminal, on SmolLM2.

The terminal test runs the CLI under a pseudo-terminal (stdlib ``pty``): typed lines are echoed,
Ctrl-C is the byte 0x03 that the terminal turns into SIGINT, Ctrl-D (0x04) is end of input.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

import edgellama
from edgellama.chat import chat_prompt_ids
from edgellama.chat_repl import PROMPT, run_chat

ROOT = Path(__file__).resolve().parent.parent
# the template's default system prompt makes this 135M model answer this question in French
# nonsense; a short system prompt of our own gives the plain answer (checked fresh and cached)
SYSTEM = "You are a helpful AI assistant. Answer in one sentence."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model(smollm2_path):
    return edgellama.load(smollm2_path, n_ctx=1024, threads=2)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----- model.chat ---------------------------------------------------------------------------------

def test_model_chat_answers_and_stops_at_end_of_turn(model):
    model.reset()
    chunks = list(model.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                             max_tokens=48))
    reply, last = "".join(chunks), chunks[-1]
    assert "Paris" in reply
    assert last.finish_reason == "stop"
    assert last.usage.completion_tokens < 48
    # the end-of-turn token was sampled but is neither printed nor evaluated
    assert "<|im_end|>" not in reply
    assert model.tokenizer.token_text(model.state.tokens[-1]) != "<|im_end|>"


def test_model_chat_stops_at_the_templates_end_of_turn_token(model, monkeypatch):
    """The token after an assistant message in the template stops the reply, even when the
    vocabulary does not count it as end-of-generation; plain text after a turn adds nothing."""
    tok = model.tokenizer
    im_end, im_start = tok.encode("<|im_end|>", special=True), tok.encode("<|im_start|>", special=True)
    assert len(im_end) == 1 and len(im_start) == 1
    assert im_end[0] in tok.eog_ids and im_start[0] not in tok.eog_ids
    seen = {}
    monkeypatch.setattr(model, "generate", lambda ids, **kw: seen.update(kw, ids=ids) or iter(()))
    messages = [{"role": "user", "content": "hi"}]

    model.chat(messages)  # the file's own template (ChatML)
    assert set(seen["stop_ids"]) == set(im_end)
    assert tok.decode(seen["ids"], special=True).endswith("<|im_start|>assistant\n")
    model.chat(messages, template="llama2")  # closes a turn with eos_token (<|im_end|> here)
    assert set(seen["stop_ids"]) == set(im_end)
    odd = "{% for m in messages %}{{ m['content'] + '<|im_start|>' }}{% endfor %}"
    model.chat(messages, template=odd)
    assert set(seen["stop_ids"]) == set(im_start)
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}assistant: "
    model.chat(messages, template=plain)
    assert set(seen["stop_ids"]) == set()


# ----- run_chat, scripted -------------------------------------------------------------------------

class _Spy:
    """Wraps model.chat: records each turn's messages, the cache before it, and the last chunk."""

    def __init__(self, model, interrupt_after: dict[int, int] | None = None):
        self.model, self.orig, self.calls = model, model.chat, []
        self.interrupt_after = interrupt_after or {}  # turn index -> raise Ctrl-C after this many chunks

    def __call__(self, messages, **kw):
        turn = len(self.calls)
        call = {"messages": [dict(m) for m in messages], "kw": kw, "cache": list(self.model.state.tokens),
                "n_evaluated": self.model.n_evaluated, "last": None, "chunks": []}
        self.calls.append(call)
        stop_after = self.interrupt_after.get(turn)
        for i, chunk in enumerate(self.orig(messages, **kw)):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt  # as if Ctrl-C arrived while the next token was computed
            call["chunks"].append(chunk)
            if chunk.finish_reason is not None:
                call["last"] = chunk
            yield chunk


def _script(lines, record=None):
    it = iter(lines)

    def input_fn(prompt):
        assert prompt == PROMPT
        line = next(it, None)
        if line is None:
            raise EOFError
        if isinstance(line, type) and issubclass(line, BaseException):
            raise line
        if record is not None:
            record.append(line)
        return line

    return input_fn


class _Out:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


def _evaluated_by_reply(last) -> int:
    """Reply tokens the model evaluated: all of them when an end-of-turn token stopped it, all but
    the last when the length limit did (that token was never fed back)."""
    n = last.usage.completion_tokens
    return n if last.finish_reason == "stop" else max(n - 1, 0)


def test_run_chat_reuses_the_evaluated_history(model, monkeypatch):
    model.reset()
    spy = _Spy(model)
    monkeypatch.setattr(model, "chat", spy)
    out = _Out()
    status = run_chat(model, system=SYSTEM, max_tokens=32,
                      input_fn=_script([QUESTION, "And the capital of Germany?", "/reset", "What is 2+2?",
                                        "/exit", "never read"]),
                      out=out)
    assert status == 0
    assert len(spy.calls) == 3
    first, second, third = spy.calls
    tok = model.tokenizer
    template = model.file.get("tokenizer.chat_template")

    # turn 1 from an empty cache; the reply streams to the terminal
    p1 = chat_prompt_ids(tok, first["messages"], template)
    reply1 = "".join(first["chunks"])
    assert "Paris" in reply1 and reply1 in out.text
    assert first["last"].usage.cached_tokens == 0
    assert first["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

    # turn 2: the history holds turn 1's reply verbatim; its prompt starts with turn 1's prompt +
    # reply, and only the new suffix (+ at most the reply's last token) is evaluated again
    assert second["messages"][:3] == first["messages"] + [{"role": "assistant", "content": reply1}]
    p2 = chat_prompt_ids(tok, second["messages"], template)
    cache = second["cache"]
    assert len(cache) == len(p1) + _evaluated_by_reply(first["last"])
    assert cache[:len(p1)] == p1
    common = _common_prefix(cache, p2)
    assert common >= len(cache) - 1
    assert second["last"].usage.cached_tokens == common
    assert second["n_evaluated"] - first["n_evaluated"] == len(p1) + _evaluated_by_reply(first["last"])
    turn2_cost = third["n_evaluated"] - second["n_evaluated"]
    assert turn2_cost == (len(p2) - common) + _evaluated_by_reply(second["last"])
    assert turn2_cost < len(p2)  # far less than re-processing the whole conversation

    # /reset: history back to the system prompt, cache emptied, everything evaluated anew
    assert "(conversation cleared)" in out.text
    assert third["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}]
    assert third["cache"] == []
    assert third["last"].usage.cached_tokens == 0


def test_run_chat_ctrl_c_keeps_the_partial_reply_and_the_session(model, monkeypatch):
    model.reset()
    spy = _Spy(model, interrupt_after={0: 3})
    monkeypatch.setattr(model, "chat", spy)
    out = _Out()
    status = run_chat(model, system=SYSTEM, max_tokens=16,
                      input_fn=_script(["Count from 1 to 200.", KeyboardInterrupt, QUESTION,
                                        KeyboardInterrupt, KeyboardInterrupt, "never read"]),
                      out=out)
    assert status == 0  # two Ctrl-C in a row at the prompt quit
    assert len(spy.calls) == 2
    partial = "".join(spy.calls[0]["chunks"])
    assert len(spy.calls[0]["chunks"]) == 3
    assert "[interrupted]" in out.text
    assert "Ctrl-C again" in out.text
    # the interrupted reply is the assistant turn; the next turn still reuses the cache
    assert spy.calls[1]["messages"][-2:] == [{"role": "assistant", "content": partial},
                                            {"role": "user", "content": QUESTION}]
    p1 = chat_prompt_ids(model.tokenizer, spy.calls[0]["messages"], model.file.get("tokenizer.chat_template"))
    assert spy.calls[1]["last"].usage.cached_tokens >= len(p1)
    assert "Paris" in "".join(spy.calls[1]["chunks"])


class _InterruptingOut(_Out):
    """Output that delivers a real SIGINT to this process while one given text is written, i.e.
    while the loop is between a prompt and a reply, where Ctrl-C used to escape from the loop."""

    def __init__(self, when: str):
        super().__init__()
        self.when, self.sent = when, 0

    def write(self, s):
        super().write(s)
        if self.when in s:
            self.sent += 1
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, inside this method


def test_run_chat_holds_a_ctrl_c_that_arrives_between_states(model):
    model.reset()
    before = signal.getsignal(signal.SIGINT)
    out = _InterruptingOut("(conversation cleared)")
    lines = []
    status = run_chat(model, input_fn=_script(["/reset", "/help", "/reset", "/reset", "/exit"], lines), out=out)
    assert status == 0 and out.sent == 3
    # each Ctrl-C acted at the next prompt, as a Ctrl-C there (that prompt read no line)
    assert out.text.count("(Ctrl-C again or /exit to quit)") == 3
    assert lines == ["/reset", "/help", "/reset", "/reset", "/exit"]
    assert signal.getsignal(signal.SIGINT) is before  # restored

    # a Ctrl-C while the prompt's own message is written is the second one in a row: it quits
    out = _InterruptingOut("(Ctrl-C again")
    lines = []
    assert run_chat(model, input_fn=_script([KeyboardInterrupt, "never read"], lines), out=out) == 0
    assert out.sent == 1 and lines == []


def test_run_chat_passes_its_one_sampler_to_every_turn():
    """The caller builds the Sampler (cmd_chat: from the options and the model's recommendations);
    run_chat hands that same object to each turn, so a seed fixes the session, not each reply."""
    from types import SimpleNamespace

    from edgellama.generate import Chunk
    from edgellama.sampling import Sampler

    calls = []

    class FakeModel:
        n_ctx, state = 64, SimpleNamespace(n_past=0)

        def chat(self, messages, **kw):
            calls.append(kw)
            yield Chunk("ok", 5)
            yield Chunk("", None, "stop")

        def reset(self):
            pass

    sampler = Sampler(temperature=0.7, seed=1)
    out = _Out()
    assert run_chat(FakeModel(), sampler=sampler, input_fn=_script(["a", "/reset", "b", "/exit"]), out=out) == 0
    assert len(calls) == 2 and all(kw["sampler"] is sampler for kw in calls)
    assert out.text.count("ok\n") == 2


def test_run_chat_eof_and_context_overflow(model, monkeypatch):
    """Ctrl-D quits; a message that does not fit the context is one error line, not a crash."""
    model.reset()
    out = _Out()
    assert run_chat(model, input_fn=_script(["word " * 2000, "/exit"]), out=out) == 0
    errors = [line for line in out.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context" in errors[0]
    assert run_chat(model, input_fn=_script([]), out=_Out()) == 0


# ----- the real terminal ---------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class _Terminal:
    """``edgellama chat`` under a pseudo-terminal, read with timeouts."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb", PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "edgellama.cli", "chat", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: becomes the program (the pty is its controlling terminal)
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.buf = ""   # everything read, \r and escape sequences removed
        self.pos = 0    # where the next expect() starts looking
        self.status = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.buf += _ANSI.sub("", data.decode("utf-8", errors="replace").replace("\r", ""))
        return True

    def expect(self, pattern: str, timeout: float) -> str:
        """Wait for ``pattern`` (a regex) after the last match; the text up to and including it."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                text, self.pos = self.buf[self.pos:m.end()], m.end()
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {pattern!r}; "
                                     f"output so far:\n{self.buf[self.pos:][-2000:]}")
            try:
                self._read(min(left, 1.0))
            except EOFError:
                raise AssertionError(f"the program ended while we waited for {pattern!r}; output:\n"
                                     f"{self.buf[-2000:]}") from None

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def alive(self) -> bool:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.status = status
        return False

    def wait(self, timeout: float) -> int:
        """Exit status (drains the output meanwhile so the child never blocks on a full terminal)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return os.waitstatus_to_exitcode(self.status)
            try:
                self._read(0.1)
            except EOFError:
                pass
        raise AssertionError(f"the program did not exit within {timeout} s; output:\n{self.buf[-2000:]}")

    def close(self) -> None:
        if self.status is None and self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


PROMPT_RX = r"(?m)^> "   # the chat prompt at the start of a line


@pytest.fixture
def terminal():
    terms = []

    def start(*args):
        terms.append(_Terminal(*args))
        return terms[-1]

    yield start
    for t in terms:
        t.close()


def test_terminal_two_turns_reset_and_exit(smollm2_path, terminal):
    term = terminal("-m", str(smollm2_path), "-n", "24", "-t", "2", "-c", "1024", "--temp", "0", "--system", SYSTEM)
    term.expect(PROMPT_RX, timeout=120)  # loading (and compiling kernels, if not cached)
    term.send(QUESTION + "\r")
    answer = term.expect(PROMPT_RX, timeout=120)
    assert QUESTION in answer  # the terminal echoed the typed line
    assert "Paris" in answer.split(QUESTION, 1)[1]

    term.send("And what is the capital of Italy?\r")
    answer = term.expect(PROMPT_RX, timeout=120)
    assert "Rome" in answer.split("Italy?", 1)[1]

    term.send("/reset\r")
    term.expect(r"\(conversation cleared\)\n> ", timeout=30)
    # sent the instant the prompt shows, before the program may be reading (see the next test)
    term.send("\x03")  # Ctrl-C at the prompt: a new prompt line, the program stays
    term.expect(r"Ctrl-C again or /exit to quit\)\n> ", timeout=30)
    assert term.alive()
    term.send("/exit\r")
    assert term.wait(timeout=30) == 0


def test_terminal_ctrl_c_at_the_prompt_is_never_lost(smollm2_path, terminal):
    """The race of issue 12 (item 2): a Ctrl-C that reaches the program just before input() starts
    reading.  CPython sees signals only when its read is interrupted, so such a Ctrl-C used to wait
    for the next key; the chat loop wakes its read periodically.  Each Ctrl-C here is sent the
    instant the prompt appears, and each must be answered by the prompt's own message."""
    term = terminal("-m", str(smollm2_path), "-t", "1", "-c", "256")
    term.expect(PROMPT_RX, timeout=120)
    for _ in range(5):
        term.send("\x03")
        term.expect(r"\(Ctrl-C again or /exit to quit\)\n> ", timeout=30)
        term.send("/help\r")  # anything in between: the next Ctrl-C is a first one again
        term.expect(r"/reset starts over.*\n> ", timeout=30)
    assert term.alive()
    term.send("\x03")
    term.expect(r"\(Ctrl-C again or /exit to quit\)\n> ", timeout=30)
    term.send("\x03")  # twice in a row: quit
    assert term.wait(timeout=30) == 0


def test_terminal_ctrl_c_stops_a_long_reply(smollm2_path, terminal):
    term = terminal("-m", str(smollm2_path), "-n", "400", "-t", "2", "-c", "1024", "--temp", "0")
    term.expect(PROMPT_RX, timeout=120)
    term.send("Count from 1 to 200.\r")
    term.expect(r"Count from 1 to 200\.\n", timeout=30)
    term.expect(r"\d+\D+\d+\D+\d+", timeout=120)  # the reply is streaming
    term.send("\x03")
    stopped = term.expect(PROMPT_RX, timeout=30)
    assert "[interrupted]" in stopped
    assert term.alive()
    # the session goes on with the interrupted reply in its history
    term.send("What is 2+2?\r")
    term.expect(r"What is 2\+2\?\n", timeout=30)
    term.expect(PROMPT_RX, timeout=120)
    assert term.alive()
    term.send("\x04")  # Ctrl-D (end of input) quits too
    assert term.wait(timeout=30) == 0
