"""Chat templates: turn a list of messages into the prompt text a model was trained on.

Templates come from model files (``tokenizer.chat_template``) and are untrusted code.  They are
rendered the way Hugging Face transformers renders them (jinja2, ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a
``tojson`` that does not HTML-escape, a ``{% generation %}`` block), but only inside jinja2's
``ImmutableSandboxedEnvironment`` and under limits:

* no attribute starting with "_" (``''.__class__.__mro__`` fails), no mutation of the messages;
* every string, list or number the template builds, every argument it passes and the output are
  capped (``max_output_chars``); repetition (``'x' * n``), padding (``center``, ``ljust``, format
  widths), ``replace`` and huge powers are checked *before* they allocate;
* a wall-clock budget (``timeout``), checked on every line the compiled template executes, stops
  loops that produce nothing;
* every failure is a ``ChatTemplateError`` with a readable message.

When a model file has no template, ``fallback_template`` picks one of the built-ins ``chatml``,
``llama2`` (``[INST] <<SYS>>``) or ``llama3`` (header tokens) from the vocabulary's tokens.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat", "BUILTIN_TEMPLATES", "fallback_template",
           "template_for", "chat_prompt_ids", "MAX_OUTPUT_CHARS", "MAX_TEMPLATE_CHARS"]

# A long multi-turn prompt with tool schemas is ~100k characters; 1M leaves room and still
# bounds what a hostile template can make us allocate.
MAX_OUTPUT_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 1_000_000
DEFAULT_TIMEOUT = 5.0


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


def fallback_template(token_texts) -> str:
    """The built-in template name for a vocabulary without its own template: ``llama3`` if it has
    Llama 3's header tokens, ``chatml`` if it has ``<|im_start|>``/``<|im_end|>``, else ``llama2``.
    ``token_texts``: a container of token strings, or a Tokenizer."""
    texts = _token_text_set(token_texts)
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


def _token_text_set(token_texts) -> set[str]:
    if hasattr(token_texts, "_texts") and hasattr(token_texts, "n_vocab"):  # a Tokenizer
        return set(token_texts._texts)
    return set(token_texts)


# ----- limits shared by the hooks of one render ------------------------------------------------------

class _Limits:
    def __init__(self, max_chars: int, timeout: float):
        self.max_chars = max_chars
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks & 63 == 0 and time.monotonic() > self.deadline:
            raise _LimitExceeded(f"chat template took longer than {self.timeout:g} s")

    def check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            if len(value) > self.max_chars:
                raise _LimitExceeded(f"chat template {what} has {len(value)} items/characters, "
                                     f"more than the limit of {self.max_chars}")
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
            raise _LimitExceeded(f"chat template {what} is an integer of {value.bit_length()} bits")
        return value

    def check_count(self, n: Any, what: str) -> None:
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_chars:
            raise _LimitExceeded(f"chat template {what} asks for {n}, more than the limit of "
                                 f"{self.max_chars}")

    def check_format(self, fmt: Any, what: str) -> None:
        """Refuse format strings with absurd widths or precisions ('%999999999d', '{:>99999999}')."""
        if isinstance(fmt, str):
            for m in re.finditer(r"\d{7,}", fmt):
                self.check_count(int(m.group()), what)


_LIMITS: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("edgellama_chat_limits",
                                                                         default=None)


def _limits() -> _Limits:
    lim = _LIMITS.get()
    if lim is None:  # a template object used outside render_chat: still bounded
        lim = _Limits(MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT)
        _LIMITS.set(lim)
    return lim


_PAD_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


class _SafeEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with size and time checks on every hook jinja gives a sandbox."""

    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

    def call_binop(self, context, operator, left, right):
        lim = _limits()
        lim.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    lim.check_count(len(seq) * n, "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                raise _LimitExceeded(f"chat template power {left} ** {right} is too large")
        elif operator == "%":
            lim.check_format(left, "format string")
        return lim.check_size(super().call_binop(context, operator, left, right), "value")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        lim = _limits()
        lim.tick()
        for a in args:
            lim.check_size(a, "argument")
        for a in kwargs.values():
            lim.check_size(a, "argument")
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        name = getattr(method, "__name__", "")
        if isinstance(owner, str):
            if name in _PAD_METHODS:
                for a in list(args) + list(kwargs.values()):
                    lim.check_count(a, f"str.{name}")
            elif name in ("format", "format_map"):
                lim.check_format(owner, "format string")
            elif name == "replace" and args:
                lim.check_count(_replace_size(owner, *args[:3]), "str.replace")
        return lim.check_size(super().call(__context, __obj, *args, **kwargs), "value")

    def getattr(self, obj, attribute):
        lim = _limits()
        lim.tick()
        return lim.check_size(super().getattr(obj, attribute), "value")

    def getitem(self, obj, argument):
        lim = _limits()
        lim.tick()
        return lim.check_size(super().getitem(obj, argument), "value")


def _guard_filter(name: str, func):
    """Wrap a jinja filter with the same checks (filters are called without a sandbox hook)."""

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        lim = _limits()
        lim.tick()
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment))]
        if name in ("center", "indent", "wordwrap", "truncate"):
            for a in values[1:] + list(kwargs.values()):
                lim.check_count(a, f"filter {name}")
        elif name == "format" and values:
            lim.check_format(values[0], "format string")
        elif name == "replace" and len(values) >= 3:
            lim.check_count(_replace_size(*values[:3], *values[3:4]), "filter replace")
        return lim.check_size(func(*args, **kwargs), f"filter {name} result")

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
    return datetime.now().strftime(str(fmt))


@functools.lru_cache(maxsize=1)
def _environment() -> _SafeEnvironment:
    env = _SafeEnvironment(trim_blocks=True, lstrip_blocks=True,
                           extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    for name in list(env.filters):
        env.filters[name] = _guard_filter(name, env.filters[name])
    env.globals.pop("lipsum", None)  # writes megabytes on request, and no template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


# ----- rendering --------------------------------------------------------------------------------

def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", *, max_output_chars: int = MAX_OUTPUT_CHARS,
                timeout: float = DEFAULT_TIMEOUT, **extra) -> str:
    """Render ``messages`` (a list of {"role": ..., "content": ...}) with a chat template.

    ``template``: jinja source (e.g. GGUF ``tokenizer.chat_template``), a built-in name
    ("chatml", "llama2", "llama3"), or None for chatml.  ``extra`` goes to the template as further
    variables (``tools``, ``documents``, ``date_string``, ...), as transformers passes them.
    """
    if template is None:
        template = CHATML_TEMPLATE
    elif not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    elif template in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[template]
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template of {len(template)} characters is longer than the "
                                f"{MAX_TEMPLATE_CHARS} we accept")
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} has no string 'role'")
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
        if not isinstance(value, str):
            raise ChatTemplateError(f"{name} must be a string, got {type(value).__name__}")
    if not (isinstance(max_output_chars, int) and max_output_chars > 0):
        raise ChatTemplateError(f"max_output_chars must be a positive int, got {max_output_chars!r}")

    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None

    context = dict(extra)
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    context.update(messages=list(messages), add_generation_prompt=bool(add_generation_prompt),
                   bos_token=bos_token, eos_token=eos_token)
    limits = _Limits(max_output_chars, timeout)
    token = _LIMITS.set(limits)
    try:
        return _render_limited(compiled, context, limits)
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
        _LIMITS.reset(token)


def _render_limited(compiled: jinja2.Template, context: dict, limits: _Limits) -> str:
    """Render, counting output characters, with a line tracer on the template's own compiled code
    so that loops that call nothing still meet the time limit."""
    code_file = compiled.root_render_func.__code__.co_filename

    def trace_lines(frame, event, arg):
        if event == "line":
            limits.tick()
        return trace_lines

    def trace_calls(frame, event, arg):
        return trace_lines if frame.f_code.co_filename == code_file else None

    old_trace = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        parts = []
        size = 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > limits.max_chars:
                raise _LimitExceeded(f"chat template output is longer than the limit of "
                                     f"{limits.max_chars} characters")
            parts.append(chunk)
        return "".join(parts)
    finally:
        sys.settrace(old_trace)


def chat_prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, **extra) -> list[int]:
    """Render a conversation with the model's template (or the built-in fallback) and tokenize it
    with special tokens parsed.  As llama.cpp does, a BOS the template writes itself is removed
    when the tokenizer adds one anyway (no double BOS)."""
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    text = render_chat(template_for(tokenizer, chat_template), messages, add_generation_prompt,
                       bos_token=bos, eos_token=eos, **extra)
    if tokenizer.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return tokenizer.encode(text, special=True)
