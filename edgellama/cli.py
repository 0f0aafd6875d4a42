"""The ``edgellama`` command: run | chat | serve | info | bench | perplexity.

User errors (bad paths, malformed files, out-of-range options) print one line to stderr and exit
with status 1; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .gguf import GGUFFile, ModelFormatError


def _add_model_options(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("-m", "--model", required=True, help="path of a GGUF model file")
    if runtime:
        p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
        p.add_argument("-c", "--ctx", type=int, default=None,
                       help="context size in tokens (default: min(model context, 4096))")
        p.add_argument("--cache-type", choices=("f16", "f32", "q8_0"), default="f16",
                       help="KV cache precision (default f16, as llama.cpp)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellama", description="Run LLaMA-family GGUF models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text from a prompt (streams to stdout)")
    _add_model_options(run)
    run.add_argument("-p", "--prompt", required=True, help="the prompt text")
    run.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (-1: until the end)")
    run.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    run.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    run.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling (-1: random)")
    run.add_argument("--typical", type=float, default=1.0, help="locally typical sampling threshold")
    run.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize repeated tokens (1 = off)")
    run.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalties look back over")
    run.add_argument("--presence-penalty", type=float, default=0.0, help="presence penalty")
    run.add_argument("--frequency-penalty", type=float, default=0.0, help="frequency penalty")
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--context-shift", action="store_true",
                     help="when the context is full, drop old tokens and go on instead of stopping")
    run.add_argument("--keep", type=int, default=4,
                     help="tokens kept at the start by a context shift or --truncate")
    run.add_argument("--truncate", action="store_true",
                     help="a prompt longer than the context loses its middle instead of being an error")
    run.add_argument("--special", action="store_true", help="parse special-token text in the prompt")

    chat = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit, Ctrl-C stops a reply)")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("-n", "--n-predict", type=int, default=-1,
                      help="most tokens per reply (-1: until the end of the turn)")
    chat.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    chat.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    chat.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    chat.add_argument("--seed", type=int, default=None, help="random seed for sampling")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    serve.add_argument("--api-key", default=os.environ.get("EDGELLAMA_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $EDGELLAMA_API_KEY)")
    serve.add_argument("--model-name", "--alias", dest="model_name", default="",
                       help="the model id /v1/models lists (default: the file name); requests may name any model")
    serve.add_argument("--max-queue", type=int, default=8,
                       help="requests that may wait for the model (then 503; default 8)")
    serve.add_argument("--max-body", type=int, default=1 << 20,
                       help="largest request body in bytes (then 413; default 1048576)")
    serve.add_argument("--max-connections", type=int, default=1024,
                       help="open connections at most (default 1024; when full, the oldest connection without a "
                            "complete request is closed, and only if every one has a request in progress: 503)")
    serve.add_argument("--max-connections-per-client", type=int, default=256,
                       help="open connections from one client address (an IPv6 /64; default 256)")
    serve.add_argument("--request-timeout", type=float, default=60.0,
                       help="seconds from a request's first byte to the end of its body (then 408; default 60)")
    serve.add_argument("--idle-timeout", type=float, default=60.0,
                       help="seconds a connection may wait without a request (default 60)")
    serve.add_argument("--send-timeout", type=float, default=30.0,
                       help="seconds a client may take no bytes of its reply before it is dropped (default 30)")
    serve.add_argument("--max-output-buffer", type=int, default=4 << 20,
                       help="bytes of a stream generated but not yet taken by the client; beyond them the client "
                            "is dropped and the generation stopped (default 4194304)")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a further Host name clients may use (repeatable; '*': any)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="an origin whose web pages may call the API (repeatable; '*': any)")

    info = sub.add_parser("info", help="describe a GGUF model file")
    _add_model_options(info)

    bench = sub.add_parser("bench", help="llama-bench style speed test")
    _add_model_options(bench)
    bench.add_argument("-p", "--n-prompt", type=int, default=256, help="prompt tokens (pp)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg)")
    bench.add_argument("-r", "--repetitions", type=int, default=3, help="runs per test (median reported)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    ppl = sub.add_parser("perplexity", help="perplexity on a text file, as llama-perplexity measures it")
    _add_model_options(ppl)
    ppl.set_defaults(ctx=512)
    ppl.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def cmd_run(args) -> int:
    import edgellama

    t0 = time.perf_counter()
    model = edgellama.load(args.model, n_ctx=args.ctx, threads=args.threads, cache_type=args.cache_type)
    load_s = time.perf_counter() - t0
    ids = model.tokenize(args.prompt, special=args.special)
    max_tokens = None if args.n_predict < 0 else args.n_predict
    last = None
    seed = None if args.seed is not None and args.seed < 0 else args.seed
    for chunk in model.generate(ids, max_tokens=max_tokens, temperature=args.temp, seed=seed,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, stop=args.stop,
                                typical_p=args.typical, repeat_penalty=args.repeat_penalty,
                                penalty_last_n=args.repeat_last_n, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty, context_shift=args.context_shift,
                                n_keep=args.keep, truncate=args.truncate):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    u = last.usage
    print(f"\nload {load_s:.2f} s | prompt {u.prompt_tokens} tokens, {u.prompt_tokens_per_second:.1f} tok/s | "
          f"generated {u.completion_tokens} tokens, {u.generation_tokens_per_second:.1f} tok/s | "
          f"finish: {last.finish_reason}", file=sys.stderr)
    from .bench import numba_cache_counts

    if numba_cache_counts()[1]:
        print("(first run on this machine: the timings include compiling the kernels, which are cached "
              "for the next runs)", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    import edgellama
    from .chat_repl import run_chat

    if args.n_predict < -1:
        raise ValueError(f"-n must be -1 or a non-negative number of tokens, got {args.n_predict}")
    model = edgellama.load(args.model, n_ctx=args.ctx, threads=args.threads, cache_type=args.cache_type)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return run_chat(model, system=args.system, max_tokens=None if args.n_predict < 0 else args.n_predict,
                    temperature=args.temp, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p)


def cmd_serve(args) -> int:
    import edgellama
    from .server import ServerConfig, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    for flag in ("max_body", "max_connections", "max_connections_per_client", "max_output_buffer"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("request_timeout", "idle_timeout", "send_timeout"):
        if not 0 < getattr(args, flag) < float("inf"):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of seconds, "
                             f"got {getattr(args, flag)}")
    config = ServerConfig(host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key or None,
                          max_queue=args.max_queue, max_body_bytes=args.max_body,
                          max_connections=args.max_connections,
                          max_connections_per_client=args.max_connections_per_client,
                          request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                          send_timeout=args.send_timeout, max_output_buffer=args.max_output_buffer,
                          allowed_hosts=tuple(args.allowed_host), cors_origins=tuple(args.cors_origin))
    print(f"edgellama serve: loading {args.model} ...", file=sys.stderr, flush=True)
    model = edgellama.load(args.model, n_ctx=args.ctx, threads=args.threads, cache_type=args.cache_type)
    model.warm_up()  # the first request must not wait for the kernels to load (or compile)
    return serve(model, config)


def cmd_perplexity(args) -> int:
    import json
    from pathlib import Path

    import edgellama
    from .perplexity import perplexity
    from .tokenizer import MAX_INPUT_CHARS

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size > 4 * MAX_INPUT_CHARS:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is more text than one run takes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model = edgellama.load(args.model, n_ctx=args.ctx, threads=args.threads, cache_type=args.cache_type)
    ids = model.tokenize(text)
    t0 = time.perf_counter()

    def progress(chunk, n_chunks, running):
        print(f"[{chunk}]{running:.4f}", end="," if chunk < n_chunks else "\n", file=sys.stderr, flush=True)

    r = perplexity(model, ids, args.ctx, progress=None if args.json else progress)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": args.model, "file": str(path), "n_ctx": r.n_ctx, "tokens": len(ids),
                          "chunks": r.n_chunks, "scored": r.n_scored, "ppl": r.ppl, "ppl_stderr": r.ppl_stderr,
                          "cache_type": model.cache_type, "seconds": seconds}))
    else:
        print(f"{len(ids)} tokens, {r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored "
              f"({r.n_chunks * r.n_ctx / seconds:.0f} tok/s)", file=sys.stderr)
        print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")
    return 0


def cmd_info(args) -> int:
    from .info import describe

    print(describe(GGUFFile(args.model), n_ctx=args.ctx, cache_type=args.cache_type))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "bench": cmd_bench,
                "perplexity": cmd_perplexity}
    try:
        return handlers[args.command](args)
    except (ModelFormatError, ValueError, OSError) as e:
        print(f"edgellama {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
