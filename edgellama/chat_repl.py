"""``edgellama chat``: an interactive terminal chat over ``Model.chat``.

The conversation is kept as a list of messages; every turn renders the whole history with the
model's template, and the model's prompt cache re-evaluates only what is new since the previous turn
(the new user message and the template's framing; at most the reply's last token is evaluated twice).

Keys: ``/reset`` starts a new conversation, ``/exit`` or Ctrl-D quits, Ctrl-C during a reply stops
that reply (what was written stays in the history as the assistant's turn), Ctrl-C at the prompt
gives a new prompt and a second one in a row quits.
"""

from __future__ import annotations

import sys

PROMPT = "> "
HELP = "/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def run_chat(model, system: str | None = None, max_tokens: int | None = None, temperature: float = 0.0,
             seed: int | None = None, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             template: str | None = None, input_fn=input, out=sys.stdout) -> int:
    """Chat until /exit, EOF or two Ctrl-C in a row at the prompt; returns the exit status (0).

    ``input_fn(prompt)`` reads one line (raises EOFError at the end, KeyboardInterrupt on Ctrl-C);
    replies stream to ``out``.
    """
    from .sampling import Sampler

    # one sampler for the whole conversation: a seed fixes the session, not each reply
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write = _writer(out)
    write(f"{HELP}\n")
    interrupted_at_prompt = False
    while True:
        try:
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
        reply, error = _stream_reply(model, history, max_tokens, sampler, template, write)
        if error is not None:
            history.pop()  # the turn did not happen: the user can /reset or try a shorter message
            write(f"error: {error}\n")
            continue
        history.append({"role": "assistant", "content": reply})


def _stream_reply(model, history, max_tokens, sampler, template, write) -> tuple[str, str | None]:
    """Stream one reply; (reply text, None), or ("", error message) if no reply could start.

    Ctrl-C (KeyboardInterrupt) ends the reply where it is.  The model stays consistent: the cache
    only counts tokens whose evaluation finished, and the next prompt re-evaluates from there.
    """
    parts: list[str] = []
    last = None
    try:
        for chunk in model.chat(history, max_tokens=max_tokens, sampler=sampler, template=template):
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


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _writer(out):
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write
