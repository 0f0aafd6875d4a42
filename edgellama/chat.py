"""Chat templates: turn a list of messages into the prompt a model was trained on.

Templates come from model files (``tokenizer.chat_template``) and are untrusted code; message
contents come from users (or from web pages an app summarizes) and are untrusted text.

**Rendering.**  Templates are rendered as Hugging Face transformers renders them (jinja2,
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not HTML-escape, a ``{% generation %}`` block), but only
inside jinja2's ``ImmutableSandboxedEnvironment`` and under a budget (``_Budget``) that every
operation the template can perform passes through *before* it allocates:

* no attribute starting with "_" (``''.__class__.__mro__`` fails), no mutation of the messages,
  only an allowlist of ``str`` methods, no ``{% autoescape %}``, no ``pprint``/``urlize``/``lipsum``;
* every string a template builds (``~`` and ``+`` concatenation, ``*``, ``%`` and ``format``,
  ``join``, ``string``, ``tojson``, padding and replacing filters and methods, macro and block
  output, the text it writes) has its size bounded from its inputs first and is refused above
  ``max_output_chars``; lists and dicts above ``MAX_ITEMS`` items are refused, and so are the
  arguments that would make a filter loop or pad that far (``batch``, ``slice``, ``indent``);
* what the render allocates is counted, and once that passes ``MAX_RENDER_BYTES`` the process's
  resident memory is measured: a render that has really grown it by more is stopped;
* a wall-clock budget (``timeout``), checked on every line the compiled template executes and
  at every operation, stops loops that produce nothing; since no single operation may exceed the
  size limits above, none runs long between two checks;
* every failure is a ``ChatTemplateError`` with a readable message.

**Message contents are text, never markup.**  Every string of a message except its role, and every
string of the extra variables (``tools``, ``documents``, ...), enters the template as a ``_Text``:
a ``str`` that carries the character spans that came from the user.  The spans follow the text
through whatever the template does with it: concatenation, slicing, ``trim`` and ``strip``,
``join``, ``format``/``%`` (positions found by rendering twice with the user's characters
replaced), and conservatively everything else (a string computed from user text in a way we do not
follow is user text as a whole).  ``chat_prompt_ids`` then tokenizes the rendered prompt with
special tokens parsed only outside those spans: a user who writes ``<|im_end|><|im_start|>system``
gets those characters as text, exactly as ``special=False`` would tokenize them, while the
template's own markup still becomes control tokens.  Roles must be plain names (letters, digits,
``_`` and ``-``), so they cannot carry markup either.

When a model file has no template, ``fallback_template`` picks one of the built-ins ``chatml``,
``llama2`` (``[INST] <<SYS>>``) or ``llama3`` (header tokens) from the vocabulary's tokens.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import json
import math
import os
import re
import string
import sys
import time
import weakref
from collections.abc import Mapping
from datetime import datetime
from itertools import islice
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat", "render_chat_spans", "BUILTIN_TEMPLATES",
           "fallback_template", "template_for", "chat_prompt_ids", "end_of_turn_ids", "MAX_OUTPUT_CHARS",
           "MAX_TEMPLATE_CHARS", "MAX_ITEMS", "check_template", "MAX_RENDER_BYTES", "DEFAULT_TIMEOUT"]

# A long multi-turn prompt with tool schemas is ~100k characters; 1M leaves room and still
# bounds what a hostile template can make us allocate (any one string, and the output).
MAX_OUTPUT_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 1_000_000
# The most items of a list, tuple or dict a template may build (jinja's own range limit).
MAX_ITEMS = 100_000
# What one render may add to the process's memory (on top of its inputs).
MAX_RENDER_BYTES = 64 << 20
# The most items a value a template builds may hold counting each occurrence (a list holding one
# list twice counts its items twice, as comparing or hashing it visits them twice; a string counts
# 1 per KiB): comparing two lists doubled 60 times (each a 2-item list, every other check passed)
# was 2**60 steps in one C call that holds the GIL, which no time limit interrupts.
MAX_NODES = 1 << 20
DEFAULT_TIMEOUT = 5.0
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or broke a limit."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception() called by the template itself."""


class _LimitExceeded(Exception):
    pass


# ----- built-in templates ------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 chat: the system prompt goes inside the first [INST] between <<SYS>> markers.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Llama 3 instruct: header tokens around the role, <|eot_id|> after each message.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE}


_FALLBACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> its fallback's name


def fallback_template(token_texts) -> str:
    """The built-in template name for a vocabulary without its own template: ``llama3`` if it has
    Llama 3's header tokens, ``chatml`` if it has ``<|im_start|>``/``<|im_end|>``, else ``llama2``.
    ``token_texts``: a container of token strings, or a Tokenizer (whose answer is kept: looking
    through a vocabulary read in place decodes every token, and every chat request asks)."""
    if hasattr(token_texts, "token_texts") and hasattr(token_texts, "n_vocab"):  # a Tokenizer
        name = _FALLBACKS.get(token_texts)
        if name is None:
            name = _FALLBACKS[token_texts] = _fallback(_token_text_set(token_texts))
        return name
    return _fallback(_token_text_set(token_texts))


def _fallback(texts: set[str]) -> str:
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= texts:
        return "llama3"
    if {"<|im_start|>", "<|im_end|>"} <= texts:
        return "chatml"
    return "llama2"


def template_for(tokenizer, chat_template: str | None) -> str:
    """The template to use: the model file's own, else the built-in chosen from the vocabulary."""
    if isinstance(chat_template, str) and chat_template.strip():
        return chat_template
    return BUILTIN_TEMPLATES[fallback_template(tokenizer)]


END_OF_TURN_PROBE = "edgellama-end-of-turn-probe"


def end_of_turn_ids(tokenizer, template: str | None) -> frozenset[int]:
    """The token a template closes an assistant message with (``<|im_end|>``, ``<|eot_id|>``,
    ``</s>``, ``<end_of_turn>``, ...), as a set of ids: it ends a reply even where the vocabulary
    does not mark it as an end of generation.

    A probe conversation (a user turn, then an assistant turn whose content is a marker) is rendered
    and the text after the marker tokenized with special tokens parsed; its first token counts if
    it is a control token or looks like one (``<...>``).  Empty when the template writes plain text
    after a turn, or rejects the probe: the vocabulary's end-of-generation tokens still stop a reply.
    ``template``: as for ``render_chat`` (source, a built-in name, or None for chatml)."""
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    try:
        probe = render_chat(template, [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": END_OF_TURN_PROBE}],
                            add_generation_prompt=False, bos_token=bos, eos_token=eos)
        tail = probe.partition(END_OF_TURN_PROBE)[2].lstrip()
        first = tokenizer.encode(tail, add_bos=False, add_eos=False, special=True)[:1] if tail else []
    except ValueError:  # ChatTemplateError, TokenizerError: no end-of-turn token from this template
        return frozenset()
    found = set()
    for t in first:
        text = tokenizer.token_text(t)
        if tokenizer.is_control(t) or (len(text) > 2 and text[0] == "<" and text[-1] == ">"):
            found.add(t)
    return frozenset(found)


def _token_text_set(token_texts) -> set[str]:
    if hasattr(token_texts, "token_texts") and hasattr(token_texts, "n_vocab"):  # a Tokenizer
        return set(token_texts.token_texts())
    return set(token_texts)


# ----- text that came from a user ------------------------------------------------------------------

Spans = tuple[tuple[int, int], ...]


def _spans_of(x: Any) -> Spans:
    return x.spans if isinstance(x, _Text) else ()


def _shift(spans: Spans, by: int) -> list[tuple[int, int]]:
    return [(a + by, b + by) for a, b in spans]


def _clip(spans: Spans, start: int, stop: int) -> list[tuple[int, int]]:
    """The spans within [start, stop), relative to start."""
    return [(max(a, start) - start, min(b, stop) - start) for a, b in spans if a < stop and b > start]


def _merge(spans) -> Spans:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _text(s: str, spans) -> str:
    """s with these user spans (a plain str when there are none)."""
    spans = _merge(spans)
    if not spans:
        return str.__str__(s) if type(s) is not str else s
    t = _Text(s)
    t.spans = spans
    return t


def _user(s: str) -> str:
    """s, all of it from a user."""
    return _text(s, ((0, len(s)),))


def _mask_spans(mask) -> Spans:
    spans, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return tuple(spans)


class _Text(str):
    """A string with the (start, end) spans of its characters that came from a user.

    The operations that Python code (jinja's filters, our hooks) applies most keep the spans
    exactly: concatenation, slicing, iteration, repetition and stripping.  ``str()`` of it is
    itself, so jinja's output keeps it too."""

    spans: Spans = ()

    def __str__(self) -> str:
        return self

    def __repr__(self) -> str:
        return str.__repr__(self)

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return _text(str.__add__(self, other), self.spans + tuple(_shift(_spans_of(other), len(self))))

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return _text(str.__add__(other, self), _spans_of(other) + tuple(_shift(self.spans, len(other))))

    def __mul__(self, n):
        if not isinstance(n, int):
            return NotImplemented
        n = max(n, 0)
        size = len(self)
        return _text(str.__mul__(self, n), [(a + k * size, b + k * size) for k in range(n) for a, b in self.spans])

    __rmul__ = __mul__

    def __getitem__(self, key):
        value = str.__getitem__(self, key)
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return _text(value, _clip(self.spans, start, max(start, stop)))
            mask = _user_mask(self)
            return _text(value, _mask_spans([mask[i] for i in range(start, stop, step)]))
        i = key + len(self) if key < 0 else key
        return _user(value) if any(a <= i < b for a, b in self.spans) else value

    def __iter__(self):
        mask = _user_mask(self)
        for ch, m in zip(str.__iter__(self), mask):
            yield _user(ch) if m else ch

    def _stripped(self, chars, left: bool, right: bool):
        plain = str.__str__(self)
        start = len(plain) - len(plain.lstrip(chars)) if left else 0
        stop = len(plain.rstrip(chars)) if right else len(plain)
        return self[start:max(start, stop)]

    def strip(self, chars=None):
        return self._stripped(chars, True, True)

    def lstrip(self, chars=None):
        return self._stripped(chars, True, False)

    def rstrip(self, chars=None):
        return self._stripped(chars, False, True)

    def __reduce__(self):
        return (_text, (str.__str__(self), self.spans))


def _user_mask(t: _Text) -> bytearray:
    mask = bytearray(len(t))
    for a, b in t.spans:
        mask[a:b] = b"\x01" * (b - a)
    return mask


def _taint_deep(x: Any, depth: int = 0) -> Any:
    """x with every string in it marked as a user's."""
    if depth > 64:
        raise _LimitExceeded("chat messages are nested more than 64 levels deep")
    if isinstance(x, str):
        return _user(x)
    if isinstance(x, Mapping):
        return {k: _taint_deep(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_taint_deep(v, depth + 1) for v in x]
    return x


def _tainted(x: Any, budget: "_Budget", depth: int = 0) -> bool:
    """Whether x holds any user text (strings, and the lists, tuples and dicts around them)."""
    if isinstance(x, _Text):
        return True
    if isinstance(x, (str, int, float, bool, type(None))):
        return False
    if isinstance(x, (list, tuple, dict)):
        key = id(x)
        hit = budget.taint_memo.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        if depth > 200:
            raise _LimitExceeded("chat template values are nested more than 200 levels deep")
        items = x.items() if isinstance(x, dict) else x
        if isinstance(x, dict):
            result = any(_tainted(k, budget, depth + 1) or _tainted(v, budget, depth + 1) for k, v in items)
        else:
            result = any(_tainted(v, budget, depth + 1) for v in items)
        budget.taint_memo[key] = (x, result)
        return result
    if isinstance(x, jinja2.utils.Namespace):
        return _tainted(dict(x._Namespace__attrs), budget, depth + 1)  # type: ignore[attr-defined]
    return False


def _substitute(x: Any, ch: str, depth: int = 0) -> Any:
    """x with every user character replaced by ch (lengths kept)."""
    if isinstance(x, _Text):
        chars = list(str.__str__(x))
        for a, b in x.spans:
            chars[a:b] = ch * (b - a)
        return "".join(chars)
    if depth > 200:
        raise _LimitExceeded("chat template values are nested more than 200 levels deep")
    if isinstance(x, dict):
        return {_substitute(k, ch, depth + 1): _substitute(v, ch, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_substitute(v, ch, depth + 1) for v in x)
    return x


def _mark_result(result: Any, user_input: bool, recompute=None) -> Any:
    """The result of an operation on the template's values, with its user spans.

    A result that already carries spans (our own operations made it) is kept.  Otherwise, if any
    input held user text: a format-like operation (``recompute`` given: it evaluates the same
    operation with every user character replaced by a given letter) marks the characters that
    change between two such evaluations; anything else is user text as a whole."""
    if not user_input or isinstance(result, _Text):
        return result
    if isinstance(result, str):
        if recompute is not None:
            try:
                rx, ry = recompute("X"), recompute("Y")
            except Exception:
                rx = ry = None
            if isinstance(rx, str) and isinstance(ry, str) and len(rx) == len(ry) == len(result):
                return _text(result, _mask_spans([a != b for a, b in zip(rx, ry)]))
        return _user(result)
    if isinstance(result, list):
        return [_mark_result(v, True) if isinstance(v, str) and not isinstance(v, _Text) else v for v in result]
    if isinstance(result, tuple):
        return tuple(_mark_result(v, True) if isinstance(v, str) and not isinstance(v, _Text) else v
                     for v in result)
    return result


# ----- the budget of one render -----------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Budget:
    """Limits shared by every hook during one render."""

    def __init__(self, max_chars: int, timeout: float, max_bytes: int | None = None):
        self.max_chars = max_chars
        self.max_items = min(MAX_ITEMS, max_chars)
        self.max_bytes = MAX_RENDER_BYTES if max_bytes is None else max_bytes
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.ticks = 0
        self.charged = 0          # bytes of values built since the last memory measurement
        self.rss_start = _rss_bytes()
        self.taint_memo: dict[int, tuple[Any, bool]] = {}
        self.size_memo: dict[tuple[int, str], tuple[Any, int]] = {}
        self.node_memo: dict[int, tuple[Any, int]] = {}

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks & 63 == 0 and time.monotonic() > self.deadline:
            raise _LimitExceeded(f"chat template took longer than {self.timeout:g} s")

    def need_chars(self, n: int, what: str) -> None:
        """Refuse a string of n characters before it is built."""
        if n > self.max_chars:
            raise _LimitExceeded(f"chat template {what} would make {n} characters, more than the "
                                 f"limit of {self.max_chars}")

    def need_count(self, n: Any, what: str) -> None:
        """Refuse a count (a width, a repetition, a number of items) before it is used."""
        if isinstance(n, bool) or not isinstance(n, int):
            return
        if n > self.max_chars:
            raise _LimitExceeded(f"chat template {what} asks for {n}, more than the limit of "
                                 f"{self.max_chars}")

    def need_items(self, n: int, what: str) -> None:
        if n > self.max_items:
            raise _LimitExceeded(f"chat template {what} would have {n} items, more than the limit of "
                                 f"{self.max_items}")

    def charge(self, value: Any, what: str) -> Any:
        """Account for a value an operation has just built (and check what could not be checked
        before: the sizes of lists and numbers)."""
        self.tick()
        if isinstance(value, str):
            if len(value) > self.max_chars:
                raise _LimitExceeded(f"chat template {what} has {len(value)} characters, more than the "
                                     f"limit of {self.max_chars}")
            nbytes = sys.getsizeof(value)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            self.need_items(len(value), what)
            self.check_nodes(value, what)
            nbytes = sys.getsizeof(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > 4096:
                raise _LimitExceeded(f"chat template {what} is an integer of {value.bit_length()} bits")
            return value
        else:
            return value
        self.charged += nbytes
        if self.charged > self.max_bytes:
            self._measure()
        return value

    def _measure(self) -> None:
        """The render has built more than max_bytes: see how much of it is still held."""
        rss = _rss_bytes()
        if rss is None or self.rss_start is None:
            if self.charged > 4 * self.max_bytes:  # no way to measure: count everything, generously
                raise _LimitExceeded(f"chat template built more than {4 * self.max_bytes >> 20} MB")
            return
        grown = rss - self.rss_start
        if grown > self.max_bytes:
            raise _LimitExceeded(f"chat template grew memory by {grown >> 20} MB, more than the limit "
                                 f"of {self.max_bytes >> 20} MB")
        self.charged = max(0, grown)

    # --- the work of comparing or hashing a value ---

    def nodes(self, x: Any, depth: int = 0) -> int:
        """Items of ``x`` counting every occurrence (what ==, <, in, hash and sorting may visit), each
        container memoized (so computing it is linear in the distinct containers); stops counting
        once over MAX_NODES.  Namespaces count 1: they compare and hash by identity."""
        if isinstance(x, str):
            return 1 + (len(x) >> 10)
        if not isinstance(x, (list, tuple, dict, set, frozenset)):
            return 1
        hit = self.node_memo.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if depth > 200:
            raise _LimitExceeded("chat template values are nested more than 200 levels deep")
        total = 1
        for item in (itertools.chain.from_iterable(x.items()) if isinstance(x, dict) else x):
            total += self.nodes(item, depth + 1)
            if total > MAX_NODES:
                break
        self.node_memo[id(x)] = (x, total)
        return total

    def check_nodes(self, x: Any, what: str) -> None:
        if self.nodes(x) > MAX_NODES:
            raise _LimitExceeded(f"chat template {what} holds more than {MAX_NODES} items counting repeats "
                                 "(comparing or hashing it would take too long)")

    # --- sizes of text before it is made ---

    def text_size(self, x: Any, mode: str = "str", indent: int = 0, depth: int = 0) -> int:
        """An upper bound of len(str(x)) (mode "str"), len(repr(x)) ("repr") or of x as JSON
        ("json", with ``indent``), computed without building it; stops once over the limit."""
        if isinstance(x, str):
            n = len(x)
            if mode == "str":
                return n
            if mode == "repr":
                return n + 2 + x.count("\\") + x.count("'") if x.isprintable() else 10 * n + 2
            return n + 2 + x.count("\\") + x.count('"') if x.isascii() and x.isprintable() else 6 * n + 2
        if x is None or isinstance(x, bool):
            return 5
        if isinstance(x, int):
            return x.bit_length() * 10 // 33 + 2
        if isinstance(x, float):
            return 32
        if isinstance(x, jinja2.runtime.Undefined):
            return 0
        if isinstance(x, jinja2.utils.Namespace):
            return 12 + self.text_size(dict(x._Namespace__attrs), "repr", 0, depth + 1)  # type: ignore[attr-defined]
        if isinstance(x, (list, tuple, dict, set, frozenset)):
            key = (id(x), f"{mode}{indent}")
            hit = self.size_memo.get(key)
            if hit is not None and hit[0] is x:
                return hit[1]
            if depth > 200:
                raise _LimitExceeded("chat template values are nested more than 200 levels deep")
            inner = "json" if mode == "json" else "repr"
            per_item = 2 + (indent * (depth + 1) + 1 if indent else 0)
            total = 2 + (indent * depth + 1 if indent else 0)
            items = x.items() if isinstance(x, dict) else ((None, v) for v in x)
            for k, v in items:
                total += per_item + self.text_size(v, inner, indent, depth + 1)
                if k is not None:
                    total += 2 + self.text_size(k if isinstance(k, str) or mode != "json" else str(k),
                                                inner, indent, depth + 1)
                if total > self.max_chars:
                    break
            self.size_memo[key] = (x, total)
            return total
        return 256  # jinja's own objects (loops, macros, cyclers): short reprs

    def check_text(self, x: Any, what: str, mode: str = "str", indent: int = 0) -> int:
        n = self.text_size(x, mode, indent)
        self.need_chars(n, what)
        return n


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edgellama_chat_budget",
                                                                         default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # a hook reached outside render_chat (jinja folding a constant): bounded anyway
        b = _Budget(MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT)
    return b


# ----- bounds of the operations that can make text ----------------------------------------------------

def _format_fields(fmt: str) -> int:
    """How many replacement fields a str.format string has (each may insert any argument)."""
    try:
        return sum(1 for _, name, _, _ in string.Formatter().parse(fmt) if name is not None)
    except ValueError:
        return 0


def _percent_fields(fmt: str) -> int:
    return fmt.count("%")


# a % conversion whose width or precision is an argument: '%*d', '%-*.*f', '%(name)*s'
_PERCENT_STAR = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(?:\*|\d*\.\*)")


def _check_widths(b: _Budget, fmt: str, what: str, style: str) -> None:
    """Refuse format strings with absurd widths or precisions ('%999999999d', '{:>99999999}'), and
    widths or precisions taken from the arguments ('%*d', '{0:{1}}': the string would be made at
    that size before anything could measure it), which no chat template needs."""
    for m in re.finditer(r"\d{7,}", fmt):
        b.need_count(int(m.group()), what)
    if style == "%":
        dynamic = _PERCENT_STAR.search(fmt.replace("%%", "")) is not None
    else:
        try:
            dynamic = any(spec and "{" in spec for _, _, spec, _ in string.Formatter().parse(fmt))
        except ValueError:  # (str.format refuses it too)
            dynamic = False
    if dynamic:
        raise _LimitExceeded(f"chat template {what} takes a width or precision from its arguments "
                             "(not available in chat templates)")


def _bound_format(b: _Budget, fmt: str, args, kwargs, style: str, what: str) -> None:
    """Refuse what formatting ``fmt`` (``style`` "%" or "{}") with these arguments could make too
    long, before it is made."""
    _check_widths(b, fmt, what, style)
    fields = _percent_fields(fmt) if style == "%" else _format_fields(fmt)
    widest = max([b.text_size(a, "repr") for a in args] + [b.text_size(v, "repr") for v in kwargs.values()]
                 + [0])
    b.need_chars(len(fmt) + fields * widest, what)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _items(b: _Budget, value: Any, what: str) -> list:
    """A template iterable as a list, refusing more than max_items (generators are finite here:
    they come from bounded lists, strings and ranges)."""
    if isinstance(value, (str, list, tuple, dict)):
        b.need_items(len(value), what)
        return list(value)
    items = list(islice(value, b.max_items + 1))
    b.need_items(len(items), what)
    return items


def _join(b: _Budget, sep: Any, items: list, what: str) -> str:
    """sep.join(map(str, items)), bounded first and with the user spans of every piece."""
    sep = sep if isinstance(sep, str) else str(sep)
    b.need_chars(sum(b.text_size(x) for x in items) + len(sep) * max(len(items) - 1, 0), what)
    parts = [x if isinstance(x, str) else _as_text(x, b) for x in items]
    spans: list[tuple[int, int]] = []
    at = 0
    for k, p in enumerate(parts):
        if k:
            spans.extend(_shift(_spans_of(sep), at))
            at += len(sep)
        spans.extend(_shift(_spans_of(p), at))
        at += len(p)
    return _text(str.join(str.__str__(sep), map(str.__str__, parts)), spans)


def _as_text(x: Any, b: _Budget) -> str:
    """str(x) for the template's output and joins; text made from user values is theirs."""
    if isinstance(x, str):
        return x
    text = str(x)
    return _user(text) if _tainted(x, b) else text


# ----- the environment ----------------------------------------------------------------------------------------

_STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "find", "format", "format_map", "index",
    "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric",
    "isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip", "partition",
    "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition", "rsplit",
    "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper", "zfill",
})
_PAD_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})
_CASE_METHODS = frozenset({"capitalize", "casefold", "lower", "swapcase", "title", "upper"})
_REMOVED_FILTERS = ("pprint", "urlize")


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja's compiler, with ``~`` concatenation through the budgeted join and no autoescape."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_EvalContextModifier(self, node, frame) -> None:
        raise jinja2.exceptions.TemplateSyntaxError("autoescape is not supported in chat templates",
                                                    node.lineno)

    # list, tuple and dict literals: each value built is checked (_Budget.check_nodes)
    def visit_List(self, node, frame) -> None:
        self.write("environment.built(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx != "load":  # an assignment's target
            return super().visit_Tuple(node, frame)
        self.write("environment.built(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_Dict(self, node, frame) -> None:
        self.write("environment.built(")
        super().visit_Dict(node, frame)
        self.write(")")


def _concat_parts(parts) -> str:
    """Macro bodies, {% set %} and {% filter %} blocks: their output pieces joined."""
    b = _budget()
    items = list(parts)
    b.need_items(len(items), "block output")
    return b.charge(_join(b, "", items, "block output"), "block output")


class _SafeEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with size, memory and time checks on every hook, and user spans kept."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})
    concat = staticmethod(_concat_parts)

    @staticmethod
    def built(value):
        """A list, tuple or dict literal's value (see _CodeGenerator)."""
        b = _budget()
        b.tick()
        b.check_nodes(value, "value")
        return value

    @staticmethod
    def concat_values(values) -> str:
        b = _budget()
        return b.charge(_join(b, "", list(values), "~ concatenation"), "~ concatenation")

    def is_safe_attribute(self, obj, attr, value) -> bool:
        if isinstance(obj, str) and callable(value) and attr not in _STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context, operator, left, right):
        b = _budget()
        b.tick()
        if operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                b.need_chars(len(left) + len(right), "concatenation")
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                b.need_items(len(left) + len(right), "concatenation")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                    b.need_count(len(seq) * n, "repetition")
                    if not isinstance(seq, str):
                        b.need_items(len(seq) * n, "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                raise _LimitExceeded(f"chat template power {left} ** {right} is too large")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            kwargs = right if isinstance(right, Mapping) else {}
            _bound_format(b, left, args, kwargs, "%", "% format")
        result = super().call_binop(context, operator, left, right)
        if operator == "%" and isinstance(left, str):
            user = _tainted(left, b) or _tainted(right, b)
            result = _mark_result(result, user, lambda ch: _substitute(left, ch) % _substitute(right, ch))
        return b.charge(result, "value")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        b = _budget()
        b.tick()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        name = getattr(method, "__name__", "")
        recompute = None
        if isinstance(owner, str):
            if name not in _STR_METHODS:
                raise jinja2.exceptions.SecurityError(f"str.{name} is not available in chat templates")
            values = list(args) + list(kwargs.values())
            if name in _PAD_METHODS:
                for a in values:
                    b.need_count(a, f"str.{name}")
            elif name in ("format", "format_map"):
                mapping = args[0] if name == "format_map" and args else kwargs
                _bound_format(b, owner, args if name == "format" else (), mapping if isinstance(mapping, Mapping)
                              else {}, "{}", "format string")

                def recompute(ch, owner=owner, name=name):
                    # the same call through the sandbox (its formatter checks every field)
                    method = __self.getattr(_substitute(owner, ch), name)
                    return ImmutableSandboxedEnvironment.call(__self, __context, method,
                                                              *_substitute(list(args), ch),
                                                              **_substitute(dict(kwargs), ch))
            elif name == "replace" and args:
                b.need_chars(_replace_size(owner, *args[:3]), "str.replace")
            elif name == "join" and args:
                return b.charge(_join(b, owner, _items(b, args[0], "str.join"), "str.join"), "str.join")
            elif name in _CASE_METHODS:
                b.need_chars(3 * len(owner), f"str.{name}")
        user = (isinstance(owner, str) and _tainted(owner, b)) or any(_tainted(a, b) for a in args) \
            or any(_tainted(v, b) for v in kwargs.values())
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(__obj, jinja2.runtime.Macro):
            return b.charge(result, "macro output")  # made by our own hooks: its spans are right
        return b.charge(_mark_result(result, user, recompute), "value")

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)


def _finalize(value):
    """Every ``{{ expression }}``: bounded before it becomes text; user values stay user text."""
    b = _BUDGET.get()
    if b is None:  # jinja finalizing a constant while compiling
        return value
    b.tick()
    if isinstance(value, str):
        return value
    b.check_text(value, "output")
    return b.charge(_as_text(value, b), "output")


def _filter_bounds(b: _Budget, name: str, values: list, kwargs: dict) -> None:
    """What a filter would build, refused before it runs."""
    value = values[0] if values else None
    args = values[1:]

    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "truncate"):
        b.need_count(arg(0, "width" if name == "center" else "length", 0), f"filter {name}")
    elif name == "indent":
        width = arg(0, "width", 4)
        w = len(width) if isinstance(width, str) else width
        b.need_count(w, "filter indent")
        if isinstance(value, str) and isinstance(w, int):
            b.need_chars(len(value) + w * (value.count("\n") + 1), "filter indent")
    elif name == "wordwrap":
        wrap = arg(2, "wrapstring", "\n")
        wrap_len = len(wrap) if isinstance(wrap, str) else 1
        if isinstance(value, str):
            b.need_chars(len(value) * (1 + wrap_len) + wrap_len, "filter wordwrap")
    elif name == "format" and isinstance(value, str):
        _bound_format(b, value, args, kwargs, "%", "format string")
    elif name == "replace" and len(values) >= 3:
        b.need_chars(_replace_size(*values[:3], *values[3:4]), "filter replace")
    elif name == "string" and value is not None:
        b.check_text(value, "filter string")
    elif name == "list" and isinstance(value, (str, list, tuple, dict)):
        b.need_items(len(value), "filter list")
    elif name == "tojson":
        indent = arg(1, "indent", None)  # our tojson(x, ensure_ascii=False, indent=None, ...)
        b.need_count(indent, "filter tojson indent")
        b.check_text(value, "filter tojson", "json", indent if isinstance(indent, int) and indent > 0 else 0)
    elif name in ("escape", "e", "forceescape", "xmlattr"):
        b.need_chars(6 * b.text_size(value), f"filter {name}")
    elif name == "urlencode":
        b.need_chars(12 * b.text_size(value), "filter urlencode")
    elif name in ("upper", "lower", "title", "capitalize"):
        b.need_chars(3 * b.text_size(value), f"filter {name}")
    elif name in ("batch", "slice"):
        n = arg(0, "linecount" if name == "batch" else "slices", 1)
        b.need_count(n, f"filter {name}")
        if isinstance(n, int):
            b.need_items(n, f"filter {name}")
    elif name == "sum" and not isinstance(arg(1, "start", 0), (int, float)):
        total = sum(len(x) for x in _items(b, value, "filter sum") if isinstance(x, (str, list, tuple)))
        b.need_items(total, "filter sum")


def _guard_filter(name: str, func):
    """A jinja filter with the same checks as the sandbox hooks (filters are called directly)."""

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        b = _BUDGET.get()
        if b is None:  # jinja folding a constant while compiling: do it at render time instead
            raise _LimitExceeded("not at compile time")
        b.tick()
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                         jinja2.nodes.EvalContext))]
        _filter_bounds(b, name, values, kwargs)
        if name == "join" and values:
            sep = values[1] if len(values) > 1 else kwargs.get("d", "")
            attribute = values[2] if len(values) > 2 else kwargs.get("attribute")
            if attribute is None:
                items = _items(b, values[0], "filter join")
                return b.charge(_join(b, sep, items, "filter join"), "filter join")
        user = any(_tainted(v, b) for v in values) or any(_tainted(v, b) for v in kwargs.values())
        result = func(*args, **kwargs)
        recompute = None
        if name == "format" and values:
            def recompute(ch):
                return func(*_substitute(list(args), ch), **_substitute(dict(kwargs), ch))
        return b.charge(_mark_result(result, user, recompute), f"filter {name} result")

    return guarded


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it):
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, keeps non-ASCII text as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    fmt = str(fmt)
    _budget().need_chars(len(fmt) * 64, "strftime_now")
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> _SafeEnvironment:
    env = _SafeEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                           extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    for name in _REMOVED_FILTERS:
        env.filters.pop(name, None)
    for name in list(env.filters):
        env.filters[name] = _guard_filter(name, env.filters[name])
    env.globals.pop("lipsum", None)  # writes megabytes on request, and no template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _check_length(template: str) -> None:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template of {len(template)} characters is longer than the "
                                f"{MAX_TEMPLATE_CHARS} we accept")


def _compile_checked(template: str) -> jinja2.Template:
    try:
        return _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def check_template(template: str) -> None:
    """Raise ChatTemplateError where rendering would refuse ``template`` before running it: too
    long, or not compiling (what the quantizer checks before writing a template into a file)."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    _check_length(template)
    token = _BUDGET.set(_Budget(MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT))
    try:
        _compile_checked(template)
    finally:
        _BUDGET.reset(token)


# ----- rendering --------------------------------------------------------------------------------

def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", *, max_output_chars: int = MAX_OUTPUT_CHARS,
                timeout: float = DEFAULT_TIMEOUT, **extra) -> str:
    """Render ``messages`` (a list of {"role": ..., "content": ...}) with a chat template.

    ``template``: jinja source (e.g. GGUF ``tokenizer.chat_template``), a built-in name
    ("chatml", "llama2", "llama3"), or None for chatml.  ``extra`` goes to the template as further
    variables (``tools``, ``documents``, ``date_string``, ...), as transformers passes them.
    """
    text, _ = render_chat_spans(template, messages, add_generation_prompt, bos_token, eos_token,
                                max_output_chars=max_output_chars, timeout=timeout, **extra)
    return text


def render_chat_spans(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                      bos_token: str = "", eos_token: str = "", *, max_output_chars: int = MAX_OUTPUT_CHARS,
                      timeout: float = DEFAULT_TIMEOUT, **extra) -> tuple[str, tuple[tuple[int, int], ...]]:
    """``render_chat``, and the (start, end) spans of the prompt that came from the messages'
    contents and the extra variables (user text), sorted and disjoint."""
    if template is None:
        template = CHATML_TEMPLATE
    elif not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    elif template in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[template]
    _check_length(template)
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not _ROLE.fullmatch(role):
            raise ChatTemplateError(f"message {i} needs a 'role' made of letters, digits, '_' and '-' "
                                    f"(at most 64), got {str(role)[:40]!r}")
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
        if not isinstance(value, str):
            raise ChatTemplateError(f"{name} must be a string, got {type(value).__name__}")
    if isinstance(max_output_chars, bool) or not (isinstance(max_output_chars, int) and max_output_chars > 0):
        raise ChatTemplateError(f"max_output_chars must be a positive int, got {max_output_chars!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ChatTemplateError(f"timeout must be a positive number of seconds, got {timeout!r}")

    budget = _Budget(max_output_chars, timeout)
    token = _BUDGET.set(budget)
    try:
        compiled = _compile_checked(template)
        # user text enters as _Text; roles are the template's vocabulary
        context = {k: _taint_deep(v) for k, v in extra.items()}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        context.update(messages=[{k: (v if k == "role" else _taint_deep(v)) for k, v in m.items()}
                                 for m in messages],
                       add_generation_prompt=bool(add_generation_prompt),
                       bos_token=bos_token, eos_token=eos_token)
        return _render_limited(compiled, context, budget)
    except ChatTemplateError:
        raise
    except _LimitExceeded as e:
        raise ChatTemplateError(str(e)) from None
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template raised an error: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateError("chat template ran out of memory") from None
    except Exception as e:  # the template's own bugs (TypeError, KeyError, ...) are its errors
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(token)


def _render_limited(compiled: jinja2.Template, context: dict, budget: _Budget) -> tuple[str, Spans]:
    """Render, counting output characters and collecting user spans, with a line tracer on the
    template's own compiled code so that loops that call nothing still meet the time limit."""
    code_file = compiled.root_render_func.__code__.co_filename

    def trace_lines(frame, event, arg):
        if event == "line":
            budget.tick()
        return trace_lines

    def trace_calls(frame, event, arg):
        return trace_lines if frame.f_code.co_filename == code_file else None

    old_trace = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        size = 0
        for chunk in compiled.generate(**context):
            if size + len(chunk) > budget.max_chars:
                raise _LimitExceeded(f"chat template output is longer than the limit of "
                                     f"{budget.max_chars} characters")
            spans.extend(_shift(_spans_of(chunk), size))
            size += len(chunk)
            parts.append(str.__str__(chunk))
        return "".join(parts), _merge(spans)
    finally:
        sys.settrace(old_trace)


def chat_prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, **extra) -> list[int]:
    """Render a conversation with the model's template (or the built-in fallback) and tokenize it:
    the template's markup with special tokens parsed, the messages' text without (it cannot
    become control tokens, whatever it contains).  As llama.cpp does, a BOS the template writes
    itself is removed when the tokenizer adds one anyway (no double BOS)."""
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    text, spans = render_chat_spans(template_for(tokenizer, chat_template), messages, add_generation_prompt,
                                    bos_token=bos, eos_token=eos, **extra)
    if tokenizer.add_bos and bos and text.startswith(bos) and not (spans and spans[0][0] < len(bos)):
        text = text[len(bos):]
        spans = tuple(_shift(spans, -len(bos)))
    if not spans:
        return tokenizer.encode(text, special=True)
    return tokenizer.encode(text, special=True, plain_spans=spans)
