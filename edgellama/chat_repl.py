"""``edgellama chat``: an interactive terminal chat over ``Model.chat``.

The conversation is kept as a list of messages; every turn renders the whole history with the
model's template, and the model's prompt cache re-evaluates only what is new since the previous turn
(the new user message and the template's framing; at most the reply's last token is evaluated twice).

Keys: ``/reset`` starts a new conversation, ``/exit`` or Ctrl-D quits, Ctrl-C during a reply stops
that reply (what was written stays in the history as the assistant's turn), Ctrl-C at the prompt
gives a new prompt and a second one in a row quits.

Ctrl-C is a signal that can arrive at any instant, so the loop decides where it lands (``_Interrupts``):
it interrupts only the prompt and a reply; one that arrives in between (while the loop records a
turn or prints) is held and acts on the next of them, instead of escaping from the loop.  At the
prompt a periodic no-op signal wakes the terminal read: CPython's ``input()`` looks at signals only
when its read is interrupted, so a Ctrl-C delivered just before the read started would otherwise
wait for the next key (python/cpython#112585).

Sampling, as llama.cpp's defaults (``CHAT_DEFAULTS``: temperature 0.8, top-k 40, top-p 0.95, min-p
0.05), unless the model file recommends its own (``general.sampling.*``, read by ``chat_sampling``);
the caller builds the ``Sampler`` from them and passes it to ``run_chat``.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

PROMPT = "> "
HELP = "/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply"

# llama.cpp's sampling defaults (common_params_sampling), for chat
CHAT_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
                 "penalty_last_n": 64}
# sampler setting -> the GGUF key a model file recommends it with (llama.cpp's general.sampling.*)
SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                 "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                 "repeat_penalty": "general.sampling.penalty_repeat",
                 "penalty_last_n": "general.sampling.penalty_last_n"}
KICK_SECONDS = 0.2  # period of the wake-up signal while the prompt waits for a key


def chat_sampling(metadata, **given) -> tuple[dict, list[str]]:
    """The chat's sampler settings (``CHAT_DEFAULTS``' names, which are ``Sampler``'s): each one
    given (not None), else the model's recommendation (``general.sampling.*`` in ``metadata``, where
    the Sampler accepts it), else ``CHAT_DEFAULTS``; with the names of the settings taken from the
    model."""
    from .sampling import SAMPLING_OPTIONS

    settings, from_model = {}, []
    for name, default in CHAT_DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = default
            recommended = metadata.get(SAMPLING_KEYS[name])
            option = SAMPLING_OPTIONS[name]
            if option.kind is int and isinstance(recommended, float) and recommended.is_integer():
                recommended = int(recommended)  # a count written as a float (64.0)
            if recommended is not None and option.accepts(recommended):
                value = option.kind(recommended)
                from_model.append(name)
        settings[name] = value
    return settings, from_model


def run_chat(model, system: str | None = None, max_tokens: int | None = None, sampler=None,
             template: str | None = None, input_fn=input, out=sys.stdout, *, stop=()) -> int:
    """Chat until /exit, EOF or two Ctrl-C in a row at the prompt; returns the exit status (0).

    ``sampler``: one sampler for the whole conversation (a seed fixes the session, not each reply);
    None: greedy.  ``input_fn(prompt)`` reads one line (raises EOFError at the end, KeyboardInterrupt
    on Ctrl-C); replies stream to ``out``.  ``stop``: strings that end a reply.
    """
    from .sampling import Sampler

    if sampler is None:
        sampler = Sampler(n_vocab=model.args.n_vocab)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write = _writer(out)
    write(f"{HELP}\n")
    interrupted_at_prompt = False
    with _Interrupts(wake_reads=input_fn is input and _stdin_is_terminal()) as interrupts:
        while True:
            try:
                with interrupts.prompt():
                    line = input_fn(PROMPT)
            except EOFError:
                write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted_at_prompt:
                    write("\n")
                    return 0
                interrupted_at_prompt = True
                write("\n(Ctrl-C again or /exit to quit)\n")
                continue
            interrupted_at_prompt = False
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history = list(start)
                model.reset()
                write("(conversation cleared)\n")
                continue
            if text in ("/help", "/?"):
                write(f"{HELP}\n")
                continue

            history.append({"role": "user", "content": line})
            reply, error = _stream_reply(model, history, max_tokens, sampler, template, stop, write, interrupts)
            if error is not None:
                history.pop()  # the turn did not happen: the user can /reset or try a shorter message
                write(f"error: {error}\n")
                continue
            history.append({"role": "assistant", "content": reply})


def _stream_reply(model, history, max_tokens, sampler, template, stop, write, interrupts) -> tuple[str, str | None]:
    """Stream one reply; (reply text, None), or ("", error message) if no reply could start.

    Ctrl-C (KeyboardInterrupt) ends the reply where it is.  The model stays consistent: the cache
    only counts tokens whose evaluation finished, and the next prompt re-evaluates from there.
    """
    parts: list[str] = []
    last = None
    try:
        with interrupts.reply():
            for chunk in model.chat(history, max_tokens=max_tokens, sampler=sampler, template=template, stop=stop):
                parts.append(chunk)
                write(chunk)
                last = chunk
    except KeyboardInterrupt:
        write("\n[interrupted]\n")
        return "".join(parts), None
    except ValueError as e:  # context overflow, template errors, bad messages
        if parts:
            write("\n")
            return "".join(parts), None
        return "", _one_line(e)
    write("\n")
    if last is not None and last.finish_reason == "length" and model.state.n_past >= model.n_ctx:
        write("[the context is full: /reset to start a new conversation]\n")
    return "".join(parts), None


class _Interrupts:
    """Where Ctrl-C (SIGINT) lands in the chat loop.

    Inside ``prompt()`` and ``reply()`` it raises KeyboardInterrupt, as usual; anywhere else it is
    held, and raised on entering the next of them (so it is never lost, and never escapes).  With
    ``wake_reads``, a no-op SIGALRM every KICK_SECONDS while the prompt waits interrupts the
    terminal read so that a pending Ctrl-C is seen within that time, whenever it arrived.  Signal
    handlers belong to the main thread: elsewhere (and where there is no SIGALRM) this does nothing
    and KeyboardInterrupt behaves as Python's default.
    """

    def __init__(self, wake_reads: bool = False):
        self.active = threading.current_thread() is threading.main_thread()
        self.wake_reads = wake_reads and self.active and hasattr(signal, "setitimer")
        self.armed = False     # inside prompt() or reply()
        self.pending = False   # a Ctrl-C arrived while not armed
        self._saved = {}

    def __enter__(self) -> "_Interrupts":
        if self.active:
            self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            if self.wake_reads:
                self._saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, _ignore)
        return self

    def __exit__(self, *exc) -> None:
        if self.wake_reads:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _on_sigint(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        self.pending = True

    @contextmanager
    def prompt(self):
        with self._armed():
            if self.wake_reads:
                signal.setitimer(signal.ITIMER_REAL, KICK_SECONDS, KICK_SECONDS)
            try:
                yield
            finally:
                if self.wake_reads:
                    signal.setitimer(signal.ITIMER_REAL, 0)

    @contextmanager
    def reply(self):
        with self._armed():
            yield

    @contextmanager
    def _armed(self):
        if not self.active:
            yield
            return
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def _ignore(signum, frame) -> None:
    """SIGALRM while the prompt waits: its only job is to interrupt the read (see _Interrupts)."""


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _writer(out):
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write
