"""The ``edgellama`` command: run | chat | serve | info | bench | perplexity.

Options have llama.cpp's names and meanings (-m, -p, -n, -c, -t, -s, --temp, --top-k, --top-p,
--min-p, --repeat-penalty, --keep, ...).  A usage error (an unknown option, a malformed or
out-of-range value) prints one line naming the option as it was typed, then "see 'edgellama CMD
--help'", and exits with status 2; other user errors (a missing or malformed file, a prompt longer
than the context, not enough memory) print one line and exit with status 1; only bugs show a
traceback.

Models are loaded by ``load_model``: where the kernel cache is cold for this CPU it says so on
stderr at once, shows the compilation's progress and compiles every kernel before anything is timed.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import math
import os
import re
import sys
import threading
import time
import warnings
from typing import NamedTuple

from ._validate import ParameterError
from .gguf import GGUFFile, ModelFormatError


class UsageError(ValueError):
    """A command-line option is wrong: one line, then a pointer to the command's --help (exit 2)."""


class _ParseError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


# ----- option values: each type names the rule it enforces ---------------------------------------

def _integer(low: int, rule: str | None = None, high: float = math.inf):
    """argparse type: an integer in [low, high] (``rule``: how errors state the accepted values)."""
    def integer(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {rule or f'>= {low}'}, got {value}")
        return value

    return integer


def _number(low: float = 0.0, high: float = math.inf, rule: str | None = None, open_low: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] with open_low)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high and not (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"must be {rule or f'>= {low:g}'}, got {text}")
        return value

    return number


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default == [] or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Errors become _ParseError (main prints them: one line naming the option as typed, then a
    pointer to --help); an unknown option is reported before anything else, with the close one."""

    argv: list[str] = []  # the command line being parsed (set by main)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # (the top-level parser leaves options to the commands)
        unknown = None if hasattr(self, "commands") else _unknown_option(self, self.argv)
        raise _ParseError(self.prog, unknown or _as_typed(message, self.argv))


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+(e[-+]?\d+)?$", re.I)


def _unknown_option(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """'unknown option X (did you mean Y?)' for the first option in argv this parser does not know
    (by name, or as an unambiguous abbreviation); None if it knows them all."""
    known = _option_strings(parser)
    if not known:
        return None
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or _NUMBER.match(arg):
            continue
        name = arg.split("=", 1)[0]
        if name in known or (name.startswith("--") and sum(k.startswith(name) for k in known) == 1):
            continue
        if len(name) > 2 and not name.startswith("--") and name[:2] in known and _takes(parser, name[:2], name[2:]):
            continue  # -n5: a short option with its value attached (but -ngl is not -n "gl")
        # (a short option is no suggestion for a long name: -ngl is not a misspelt -n)
        close = difflib.get_close_matches(name, [k for k in known if len(k) > 2 or len(name) <= 2], n=1, cutoff=0.6)
        return f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else "")
    return None


def _takes(parser: argparse.ArgumentParser, option: str, value: str) -> bool:
    """Whether ``option`` accepts ``value`` (written attached to it, as in -n5)."""
    action = parser._option_string_actions.get(option)
    if action is None or action.nargs == 0:
        return False
    try:
        (action.type or str)(value)
        return True
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False


def _typed(options: list[str], argv: list[str]) -> str:
    """The spelling of an option the user typed (the last one in argv), else its first name (-c, -n)."""
    for arg in reversed(argv):
        name = arg.split("=", 1)[0]
        if name in options or (name.startswith("--") and any(o.startswith(name) for o in options)):
            return name
    return options[0]


def _as_typed(message: str, argv: list[str]) -> str:
    """argparse's 'argument -n/--n-predict: must be ...' -> '-n must be ...' (as the user typed it)."""
    m = re.match(r"argument (\S+): (.*)", message, re.S)
    if not m:
        return message
    if m.group(1) == "command":
        choice = re.match(r"invalid choice: '([^']*)' \(choose from (.*)\)", m.group(2))
        if choice:
            commands = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), commands, n=1)
            return f"unknown command {choice.group(1)!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        return m.group(2)
    flag, rest = _typed(m.group(1).split("/"), argv), m.group(2)
    return f"{flag} {rest}" if rest.startswith(("must", "expects")) else f"{flag}: {rest}"


def _flag(args, dest: str) -> str:
    """How the user wrote (or would write) the option behind ``args.<dest>``, for error messages."""
    parser = getattr(args, "_parser", None)
    for action in (parser._actions if parser else []):
        if action.dest == dest and action.option_strings:
            return _typed(action.option_strings, getattr(args, "_argv", []))
    return "--" + dest.replace("_", "-")


def _memory_size(text: str) -> int:
    """argparse type: a memory size (8G, 3.5G, 7500M) in bytes."""
    from .info import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----- options ------------------------------------------------------------------------------------

CTX_HELP = "context size in tokens (default: min(the model's trained context, 4096); 0: the trained context)"


def _add_model_options(p: argparse.ArgumentParser, runtime: bool = True, threads: bool = True,
                       ctx_help: str = CTX_HELP) -> None:
    p.add_argument("-m", "--model", required=True, help="path of a GGUF model file")
    if runtime:
        if threads:
            p.add_argument("-t", "--threads", type=_integer(1, "an integer in [1, 1024]", 1024), default=None,
                           help="threads (default: the physical cores)")
        p.add_argument("-c", "--ctx", "--ctx-size", type=_integer(0, ">= 0 (0: the model's trained context)"),
                       default=None, help=ctx_help)
        p.add_argument("--cache-type", choices=("f16", "f32", "q8_0"), default="f16",
                       help="KV cache precision (default f16, as llama.cpp)")


# Sampler setting -> its flags (llama.cpp's names); the dest is the setting's name, and the accepted
# values, defaults and help come from sampling.SAMPLING_OPTIONS
SAMPLING_FLAGS = {
    "temperature": ("--temp",), "top_k": ("--top-k",), "top_p": ("--top-p",), "min_p": ("--min-p",),
    "typical_p": ("--typical",), "repeat_penalty": ("--repeat-penalty",), "presence_penalty": ("--presence-penalty",),
    "frequency_penalty": ("--frequency-penalty",), "penalty_last_n": ("--repeat-last-n",), "seed": ("-s", "--seed"),
}
# flags that also take -1 (the Sampler itself takes no -1): what their rule adds, and their help
_MINUS_ONE = {"penalty_last_n": ("-1 (the whole context) or ", "tokens the penalties look back over (-1: the whole "
                                                               "context)"),
              "seed": ("-1 (random) or ", "random seed for sampling (-1: random)")}
# a ParameterError's param -> the dest of the option that sets it, where the names differ
_PARAM_DESTS = {"max_tokens": "n_predict", "n_keep": "keep"}


def _add_sampling_options(p: argparse.ArgumentParser, chat: bool) -> None:
    """The sampler's options, made from sampling.SAMPLING_OPTIONS.  run's defaults are the Sampler's
    (greedy); chat's for CHAT_DEFAULTS' settings are None, resolved after loading by
    chat_repl.chat_sampling: the model's general.sampling.* recommendation, else llama.cpp's."""
    from .chat_repl import CHAT_DEFAULTS, SAMPLING_KEYS
    from .sampling import SAMPLING_OPTIONS

    for name, flags in SAMPLING_FLAGS.items():
        option = SAMPLING_OPTIONS[name]
        default, text = option.default, option.help
        if name in _MINUS_ONE:
            rule, text = _MINUS_ONE[name]
            kind = _integer(-1, rule + option.rule, option.high)
            default = -1 if default is None else default
            if chat and name == "seed":
                text = "random seed for sampling (-1: random, printed at the start)"
        elif option.kind is int:
            kind = _integer(int(option.low), option.rule, option.high)
        else:
            kind = _number(option.low, option.high, option.rule, option.open_low)
        if chat and name in CHAT_DEFAULTS:
            default = None
            text += f" (default: {CHAT_DEFAULTS[name]}, or the model's {SAMPLING_KEYS[name]})"
        p.add_argument(*flags, dest=name, type=kind, default=default, help=text)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop " + ("a reply" if chat else "generating") + " at this text (repeatable)")


def sampler_from_args(args, model, **settings):
    """The Sampler the parsed sampling options ask for, for ``model``; ``settings`` replace options
    (chat's resolved defaults, its printed seed).  --repeat-last-n -1 is the whole context, --seed
    -1 a seed from the operating system."""
    from .sampling import Sampler

    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    values.update(settings)
    if values["penalty_last_n"] == -1:
        values["penalty_last_n"] = model.n_ctx
    if values["seed"] == -1:
        values["seed"] = None
    return Sampler(**values, n_vocab=model.args.n_vocab)


def _param_flag(args, param: str | None) -> str | None:
    """The option (as typed) behind a ParameterError's ``param``; None if no option sets it."""
    dest = _PARAM_DESTS.get(param, param)
    parser = getattr(args, "_parser", None)
    if param is None or parser is None or not any(a.dest == dest and a.option_strings for a in parser._actions):
        return None
    return _flag(args, dest)


class VersionAction(argparse.Action):
    """``--version``: prints "PROG VERSION" and exits, as argparse's own action does, but reads the
    version only then (importlib.metadata costs about 0.1 s at every start otherwise)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        parser._print_message(f"{parser.prog.split()[0]} {__version__}\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellama", description="Run LLaMA-family GGUF models on the CPU.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # command name -> its parser

    run = sub.add_parser("run", help="generate text from a prompt (streams to stdout)",
                         description="Generate text from a prompt: the text streams to stdout, speeds to stderr.")
    _add_model_options(run)
    run.add_argument("-p", "--prompt", required=True, help="the prompt text")
    run.add_argument("-n", "--n-predict", "--predict", dest="n_predict", default=64,
                     type=_integer(-1, "-1 (until the end of the text or of the context) or a number of tokens >= 0"),
                     help="tokens to generate (-1: until the end of the text or of the context)")
    _add_sampling_options(run, chat=False)
    run.add_argument("--context-shift", action="store_true",
                     help="when the context is full, drop old tokens and go on instead of stopping")
    run.add_argument("--keep", type=_integer(0), default=4,
                     help="tokens kept at the start by a context shift or --truncate")
    run.add_argument("--truncate", action="store_true",
                     help="a prompt longer than the context loses its middle instead of being an error")
    run.add_argument("--special", action="store_true", help="parse special-token text in the prompt")

    chat = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit, Ctrl-C stops a reply)",
                          description="Chat in the terminal with the model's chat template: /reset starts over, "
                                      "/exit or Ctrl-D quits, Ctrl-C stops a reply.  Samples as llama.cpp does by "
                                      "default, or as the model file recommends.")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("-n", "--n-predict", "--predict", dest="n_predict", default=-1,
                      type=_integer(-1, "-1 (until the end of the turn) or a number of tokens >= 0"),
                      help="most tokens per reply (-1: until the end of the turn)")
    _add_sampling_options(chat, chat=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=_integer(0), default=8080, help="port (0: any free one)")
    serve.add_argument("--api-key", default=os.environ.get("EDGELLAMA_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $EDGELLAMA_API_KEY)")
    serve.add_argument("--model-name", "--alias", dest="model_name", default="",
                       help="the model id /v1/models lists (default: the file name); requests may name any model")
    serve.add_argument("--max-queue", type=_integer(0), default=8, help="requests that may wait for the model "
                                                                       "(then 503)")
    serve.add_argument("--max-body", type=_integer(1), default=1 << 20,
                       help="largest request body in bytes (then 413)")
    serve.add_argument("--max-connections", type=_integer(1), default=1024,
                       help="open connections at most; when full, the oldest connection without a complete "
                            "request is closed, and only if every one has a request in progress: 503")
    serve.add_argument("--max-connections-per-client", type=_integer(1), default=256,
                       help="open connections from one client address (IPv6: one /64)")
    serve.add_argument("--request-timeout", type=_number(0.0, rule="> 0 (seconds)", open_low=True), default=60.0,
                       help="seconds from a request's first byte to the end of its body (then 408)")
    serve.add_argument("--idle-timeout", type=_number(0.0, rule="> 0 (seconds)", open_low=True), default=60.0,
                       help="seconds a connection may stay open without a request")
    serve.add_argument("--send-timeout", type=_number(0.0, rule="> 0 (seconds)", open_low=True), default=30.0,
                       help="seconds a client may take no bytes of its reply before it is dropped")
    serve.add_argument("--max-output-buffer", type=_integer(1), default=4 << 20,
                       help="bytes of a stream generated but not yet taken by its client; beyond them the client "
                            "is dropped and the generation stopped")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a further Host name clients may use (repeatable; '*': any)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="an origin whose web pages may call the API (repeatable; '*': any)")
    serve.add_argument("-np", "--parallel", type=_integer(1, "an integer in [1, 256]", 256), default=1,
                       help="requests generated at once, in slots of -c / N positions each (batched: the weights "
                            "are read once per step for all of them)")
    serve.add_argument("-b", "--batch-size", type=_integer(1), default=None,
                       help="with --parallel: tokens evaluated per step, generated ones first, prompt pieces in "
                            "the rest (default: 64, at least --parallel)")

    info = sub.add_parser("info", help="describe a GGUF model file and the memory a run needs (no kernel is compiled)",
                          description="Describe a GGUF model file, the memory a run at this context needs "
                                      "(weights as held, KV cache, buffers, runtime) and whether it fits: the "
                                      "largest context that does, or which smaller type of the model would.")
    _add_model_options(info, threads=False)
    info.add_argument("--ram", type=_memory_size, default=None, metavar="SIZE",
                      help="memory to fit the run in, e.g. 3.5G or 7500M (default: what this machine has "
                           "available now)")

    bench = sub.add_parser("bench", help="llama-bench style speed test")
    _add_model_options(bench, ctx_help="context size in tokens (default: -d + -p + -n + 16, rounded up to 256; "
                                        "0: the model's trained context)")
    bench.add_argument("-p", "--n-prompt", type=_integer(0), default=256, help="prompt tokens (pp; 0 skips it)")
    bench.add_argument("-n", "--n-gen", type=_integer(0), default=128, help="generated tokens (tg; 0 skips it)")
    bench.add_argument("-d", "--n-depth", type=_integer(0), default=0,
                       help="tokens already in the KV cache when pp and tg start (llama-bench's -d)")
    bench.add_argument("-r", "--repetitions", type=_integer(1), default=3, help="runs per test (median reported)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    ppl = sub.add_parser("perplexity", help="perplexity on a text file, as llama-perplexity measures it")
    _add_model_options(ppl, ctx_help="context size and chunk length in tokens (default: 512, as llama-perplexity; "
                                     "0: the model's trained context)")
    ppl.set_defaults(ctx=512)
    ppl.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    for name in ("run", "chat", "info", "bench", "perplexity"):  # llama.cpp's help style: -n N, --temp X
        for action in parser.commands[name]._actions:
            if action.metavar is None and getattr(action.type, "__name__", "") in ("integer", "number"):
                action.metavar = "N" if action.type.__name__ == "integer" else "X"
    return parser


# ----- loading ------------------------------------------------------------------------------------

class Loaded(NamedTuple):
    model: object           # edgellama.model.Model
    seconds: float          # loading, compilation excluded
    compile_seconds: float  # compiling kernels (a cold cache; 0 otherwise)


def open_model_file(path: str) -> GGUFFile:
    return GGUFFile(path, keep_header=True)  # a missing file is a ModelFileNotFoundError


def load_model(args, stream=None, prompt_path=True) -> Loaded:
    """Load ``args.model`` with ``args.ctx``, ``args.threads``, ``args.cache_type`` for a command.

    In order: the file is checked, a context beyond the trained one is warned about, the memory
    needed is compared with the memory available (MemoryLimitError before anything is allocated);
    then, if Numba's cache has no kernels for this CPU, a line on ``stream`` (stderr) says so at
    once, and the loading and a warm-up of every kernel show the compilation's progress.  The
    kernels are ready (compiled, or loaded from the cache) before the command times anything;
    ``seconds`` counts their loading, not their compilation.  ``prompt_path``: whether the prompt
    path's kernels are needed too (a callable: asked with the model's tokenizer and file), or only the
    one-token path's (a short prompt: the first token comes sooner).
    """
    stream = sys.stderr if stream is None else stream
    t0 = time.perf_counter()
    f = open_model_file(args.model)
    from .info import ContextLengthWarning, check_memory, resolve_n_ctx
    from .kernel_cache import (TOKENIZER_FUNCTIONS, CacheStatus, CompileProgress, cache_status, matrix_types,
                               plan_warm_up)
    from .hardware import default_threads, thread_warning
    from .model import DEFAULT_MAX_CTX, Model, ModelArgs

    model_args = ModelArgs.from_gguf(f)
    n_ctx = resolve_n_ctx(args.ctx, model_args.max_ctx, DEFAULT_MAX_CTX)
    threads = getattr(args, "threads", None) or default_threads()
    too_many = getattr(args, "threads", None) and thread_warning(threads)
    if too_many:
        print(f"edgellama {args.command}: warning: {_flag(args, 'threads')} {threads} {too_many}", file=stream,
              flush=True)
    if n_ctx > model_args.max_ctx:
        print(f"edgellama {args.command}: warning: {_flag(args, 'ctx')} {n_ctx} is beyond the {model_args.max_ctx} "
              f"tokens this model was trained on: expect worse output past them", file=stream, flush=True)
    tokenizer = None
    # one progress report for the whole load: the tokenizer's functions (compiled with its table on
    # a first run) and the kernels; where they are cached is known before the tokenizer is built
    # (a byte-level vocabulary's functions, cold on a first run, compile first)
    byte_level = f.metadata.get("tokenizer.ggml.model") == "gpt2"
    where = cache_status(["swiglu", *TOKENIZER_FUNCTIONS]) if byte_level else cache_status(["swiglu"])
    early = where and CacheStatus(where.cpu, where.directory, [n for n in where.cold if n in TOKENIZER_FUNCTIONS])
    with CompileProgress(early, stream) as progress, warnings.catch_warnings():
        if callable(prompt_path):  # decided by the tokenizer: build it once, for the model too
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_gguf(f)
            prompt_path = bool(prompt_path(tokenizer, f))
        status = plan_warm_up(matrix_types(f), prompt_path).status
        check_memory(f, model_args, n_ctx, args.cache_type, threads, compiling=bool(status and status.cold))
        progress.expect(status)
        warnings.simplefilter("ignore", ContextLengthWarning)  # (said above, in the command's terms)
        model = Model(f, n_ctx=n_ctx, threads=threads, cache_type=args.cache_type, check_memory=False,
                      tokenizer=tokenizer)
        # compiled, or loaded from the cache (a second or two), before the command times anything
        model.warm_up(prompt_path)
    if model.weights.pack_source == "saving":
        print(f"edgellama {args.command}: keeping the packed weights for faster loads "
              f"({_mib(model.weights.packed_bytes)} MiB in {model.weights.packed_folder}, written in the "
              f"background; EDGELLAMA_PACKED_CACHE=off turns this off)", file=stream, flush=True)
    return Loaded(model, time.perf_counter() - t0 - progress.seconds, progress.seconds)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


# ----- commands -----------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from .kernel_cache import CompileProgress

    from .info import weight_bytes_per_token
    from .model import decode_max_prompt

    loaded = load_model(args, prompt_path=lambda tok, f: len(tok.encode(args.prompt, special=args.special))
                        > decode_max_prompt(weight_bytes_per_token(f)))
    model = loaded.model
    ids = model.tokenize(args.prompt, special=args.special)
    if len(ids) > model.n_ctx and not args.truncate:
        raise ValueError(f"the prompt is {len(ids)} tokens but the context holds {model.n_ctx}: use a larger "
                         f"{_flag(args, 'ctx')} (the model was trained on {model.args.max_ctx}), --truncate, or a "
                         "shorter prompt")
    if args.context_shift and args.keep >= model.n_ctx // 2:
        raise UsageError(f"{_flag(args, 'keep')} {args.keep} must be less than half the context "
                         f"({_flag(args, 'ctx')} {model.n_ctx}) with --context-shift")
    stream = model.generate(ids, None if args.n_predict == -1 else args.n_predict, sampler_from_args(args, model),
                            stop=args.stop, context_shift=args.context_shift, n_keep=args.keep, truncate=args.truncate)
    last, prompt_compile = None, None
    with CompileProgress(None, quiet=True) as late:  # a kernel first needed now (a context shift's)
        for chunk in stream:
            if prompt_compile is None:
                prompt_compile = late.seconds  # the first chunk comes right after the prompt's evaluation
            sys.stdout.write(chunk)
            sys.stdout.flush()
            last = chunk
    sys.stdout.write("\n")
    u = last.usage
    prompt_s = u.prompt_seconds - (prompt_compile or 0.0)
    gen_s = u.generation_seconds - (late.seconds - (prompt_compile or 0.0))
    evaluated = u.prompt_tokens - u.cached_tokens
    compiled = f" (+ {loaded.compile_seconds:.1f} s compiling kernels)" if loaded.compile_seconds else ""
    late_note = f" | {late.seconds:.1f} s of kernel compilation not counted" if late.seconds else ""
    print(f"\nload {loaded.seconds:.2f} s{compiled} | prompt {u.prompt_tokens} tokens, "
          f"{evaluated / prompt_s if prompt_s > 0 else 0.0:.1f} tok/s | generated {u.completion_tokens} tokens, "
          f"{u.completion_tokens / gen_s if gen_s > 0 else 0.0:.1f} tok/s | finish: {last.finish_reason}{late_note}",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    import secrets

    from .chat_repl import CHAT_DEFAULTS, chat_sampling, run_chat

    loaded = load_model(args)
    model = loaded.model
    settings, from_model = chat_sampling(model.file.metadata, **{name: getattr(args, name) for name in CHAT_DEFAULTS})
    seed = secrets.randbits(32) if args.seed == -1 else args.seed
    s = sampler_from_args(args, model, **settings, seed=seed)
    print(f"sampling: temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}, min-p {s.min_p:g}, "
          f"repeat penalty {s.repeat_penalty:g} over {s.penalty_last_n} tokens, seed {seed}"
          + (f" ({', '.join(from_model)} as the model file recommends)" if from_model else ""), file=sys.stderr)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return run_chat(model, system=args.system, max_tokens=None if args.n_predict == -1 else args.n_predict,
                    sampler=s, stop=args.stop)


def cmd_serve(args) -> int:
    if args.port > 65535:
        raise UsageError(f"{_flag(args, 'port')} must be in [0, 65535], got {args.port}")
    print(f"edgellama serve: loading {args.model} ...", file=sys.stderr, flush=True)
    from .server import ServerConfig, serve

    config = ServerConfig(host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key or None,
                          max_queue=args.max_queue, max_body_bytes=args.max_body,
                          max_connections=args.max_connections,
                          max_connections_per_client=args.max_connections_per_client,
                          request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                          send_timeout=args.send_timeout, max_output_buffer=args.max_output_buffer,
                          allowed_hosts=tuple(args.allowed_host), cors_origins=tuple(args.cors_origin),
                          parallel=args.parallel, batch_size=args.batch_size)
    if args.batch_size is not None and args.batch_size < args.parallel:
        raise UsageError(f"{_flag(args, 'batch_size')} {args.batch_size} must be at least {_flag(args, 'parallel')} "
                         f"{args.parallel}")
    # the kernels are ready (compiled or loaded, with progress on a first run) before it listens
    model = load_model(args).model
    if model.n_ctx // args.parallel < 16:
        raise UsageError(f"{_flag(args, 'ctx')} {model.n_ctx} leaves fewer than 16 positions to each of "
                         f"{_flag(args, 'parallel')} {args.parallel} slots")
    return serve(model, config)


def _json_number(x: float) -> float | None:
    """x, or null where it is not finite (JSON has no NaN or Infinity: strict parsers refuse them)."""
    return x if math.isfinite(x) else None


def cmd_perplexity(args) -> int:
    import json
    import stat
    from pathlib import Path

    from .kernel_cache import CompileProgress
    from .perplexity import perplexity
    from .tokenizer import MAX_INPUT_CHARS

    if 0 < args.ctx < 4:
        raise UsageError(f"{_flag(args, 'ctx')} must be 0 (the model's trained context) or at least 4, got {args.ctx}")
    path = Path(args.file)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: " + ("is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"))
    if st.st_size > 4 * MAX_INPUT_CHARS:
        raise ValueError(f"{path}: {st.st_size} bytes is more text than one run takes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    loaded = load_model(args)
    model = loaded.model
    ids = model.tokenize(text)
    if len(ids) < model.n_ctx:
        raise ValueError(f"{path} is {len(ids)} tokens: perplexity needs at least one chunk of "
                         f"{_flag(args, 'ctx')} {model.n_ctx} tokens (use a longer text or a smaller {_flag(args, 'ctx')})")

    def progress(chunk, n_chunks, running):
        print(f"[{chunk}]{running:.4f}", end="," if chunk < n_chunks else "\n", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with CompileProgress(None, quiet=True) as late:
        r = perplexity(model, ids, model.n_ctx, progress=None if args.json else progress)
    seconds = time.perf_counter() - t0 - late.seconds
    compile_seconds = loaded.compile_seconds + late.seconds
    if args.json:
        print(json.dumps({"model": args.model, "file": str(path), "n_ctx": r.n_ctx, "tokens": len(ids),
                          "chunks": r.n_chunks, "scored": r.n_scored, "ppl": _json_number(r.ppl),
                          "ppl_stderr": _json_number(r.ppl_stderr),
                          "cache_type": model.cache_type, "seconds": seconds, "load_seconds": loaded.seconds,
                          "compile_seconds": compile_seconds}))
    else:
        print(f"{len(ids)} tokens, {r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored "
              f"({r.n_chunks * r.n_ctx / seconds:.0f} tok/s"
              + (f"; {compile_seconds:.1f} s compiling kernels not counted" if compile_seconds else "") + ")",
              file=sys.stderr)
        print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")
    return 0


def cmd_info(args) -> int:
    from .info import describe

    print(describe(open_model_file(args.model), n_ctx=args.ctx, cache_type=args.cache_type, ram=args.ram))
    return 0


def cmd_bench(args) -> int:
    from .bench import check_args, run_bench

    try:
        check_args(args.n_prompt, args.n_gen, args.repetitions, args.threads, args.ctx, args.n_depth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return run_bench(args)


def _memory_message(e, args) -> str:
    from .info import describe_smaller, size

    ctx = _flag(args, "ctx")
    what = f"{ctx} {e.n_ctx}" if getattr(args, "ctx", None) else f"this model (with a context of {e.n_ctx} tokens)"
    fits = (f"the largest context that fits is {ctx} {e.max_n_ctx}" if e.max_n_ctx
            else "it does not fit even with a small context"
            + (f"; {describe_smaller(e.smaller)}" if getattr(e, "smaller", None) else ""))
    return f"{what} needs {e.needed.describe()} but {size(e.available)} of memory is available: {fits}"


def _warning_printer(command: str):
    def show(message, category, filename, lineno, file=None, line=None):  # one line, no source line
        print(f"edgellama {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    from .info import MemoryLimitError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _Parser.argv = argv
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            command = parser.commands[args.command]
            raise _ParseError(command.prog, _unknown_option(command, extras)
                              or f"unexpected argument {extras[0]!r}")
    except _ParseError as e:
        print(f"{e.prog}: error: {e.message}\nsee '{e.prog} --help'", file=sys.stderr)
        return 2
    args._argv = argv
    args._parser = parser.commands[args.command]
    handlers = {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "bench": cmd_bench,
                "perplexity": cmd_perplexity}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command)
            return handlers[args.command](args)
    except UsageError as e:
        print(f"edgellama {args.command}: error: {e}\nsee 'edgellama {args.command} --help'", file=sys.stderr)
        return 2
    except MemoryLimitError as e:
        print(f"edgellama {args.command}: error: {_memory_message(e, args)}", file=sys.stderr)
        return 1
    except ParameterError as e:  # a sampler setting or generation option an option set: named as typed
        flag = _param_flag(args, e.param)
        if flag is None:
            print(f"edgellama {args.command}: error: {e}", file=sys.stderr)
            return 1
        shown = repr(e.value) if len(repr(e.value)) <= 60 else repr(e.value)[:57] + "..."
        message = f"{flag} must be {e.expected}, got {shown}" if e.expected else f"{flag}: {e}"
        print(f"edgellama {args.command}: error: {message}\nsee 'edgellama {args.command} --help'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # what reads the output went away (`| head`): stop quietly, as cat does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the final flush goes there)
        except (OSError, ValueError):
            pass
        return 141  # the shell's code for a process that SIGPIPE ended
    except (ModelFormatError, ValueError, OSError) as e:
        print(f"edgellama {args.command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # (what a limit checked before allocating names, or numpy's refusal)
        print(f"edgellama {args.command}: error: out of memory" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``edgellama`` command: ``main``, then leave without the interpreter's teardown of its
    modules (about 0.15 s once Numba's are loaded, a tenth of a short run).  What the teardown
    would have done that matters is done first: other threads (a packed-weights writer) are waited
    for, exit handlers run, and the output is flushed; where flushing fails (a closed pipe) the
    usual exit reports it."""
    rc = main()
    try:
        from . import packed_cache

        try:
            packed_cache.wait_for_writes()
        except KeyboardInterrupt:  # Ctrl-C while a packed copy is being written: not kept
            packed_cache.abandon_writes()
            print("\nedgellama: interrupted: the packed weights were not kept", file=sys.stderr)
            rc = 130
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(rc)
    os._exit(0 if rc is None else int(rc))


if __name__ == "__main__":
    console_main()
