"""The LLaMA decoder: weights, the KV cache and buffers, forward -> logits (its hyper-parameters,
``ModelArgs``, are read and validated by edgellama.config).

Weights keep their GGUF names (``token_embd``, ``blk.{i}.attn_q`` ... ``output``); a missing
``output.weight`` means the output projection is tied to ``token_embd.weight``.  Float matrices
stay read-only views into the memory map; quantized ones are repacked once at load into the
kernels' layout (still quantized: see edgellama.kernels.layout) and the file's pages released.

The forward pass lives in two places that compute the same thing: ``Model._prefill`` (a prompt:
matrix kernels over many tokens) and ``kernels.decode_token`` (one token, one compiled call); its
plain-numpy twin is tests/reference.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np

from . import kernel_thread, kernels as K
from ._validate import is_int
from .config import DEFAULT_MAX_CTX, ModelArgs  # ModelArgs lives in config (no Numba); re-exported here
from .gguf import GGUFFile, ModelFormatError
from .kernel_cache import DECODE_PIECES_CHILD, DECODE_PIECES_HERE, CompileChild, compile_for, matrix_types, \
    plan_warm_up
from .hardware import physical_cores  # the default thread count (big physical cores)
from .memory import lazy_zeros, trim_heap
from .kernels.cache import LAYOUT_FILES, package_stamp
from .packed_cache import packed_sections, resolve_folder, side_folder
from .quants import KV_CACHE_TYPES, RUNTIME_QUANTIZED, RUNTIME_TYPES, GGMLType, dequantize, type_name

LAYER_MATRICES = K.LAYER_MATRICES  # slot i of a layer: the kernels address matrices by these slots
MAX_THREADS = 1024  # (per-thread buffers are sized by it: a count beyond any machine is a mistake)


def rope_tables(args: ModelArgs, n_ctx: int, freq_factors: np.ndarray | None):
    """cos/sin tables (n_ctx, rope_dim/2) for the adjacent-pair rotation.

    theta(p, i) = p / rope_scale * rope_theta^(-2i / rope_dim) / freq_factor[i]; Llama 3.1's
    frequency-dependent scaling is exactly the ``rope_freqs.weight`` factors.
    """
    half = args.rope_dim // 2
    inv_freq = args.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / args.rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    angles = np.outer(np.arange(n_ctx, dtype=np.float64) / args.rope_scale, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Weight:
    """One weight matrix: its (n_out, row_bytes) uint8 view into the file, its ggml type id and,
    for quantized types, the packed copy the kernels read (see kernels.pack_rows)."""

    __slots__ = ("name", "rows", "qtype", "n_out", "n_in", "packed")

    def __init__(self, f: GGUFFile, name: str, shape: tuple[int, int]):
        info = f.tensor(name)
        if info.shape != shape:
            raise ModelFormatError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected {shape}")
        if info.qtype not in RUNTIME_TYPES:
            raise ModelFormatError(f"{f.path}: tensor {name!r} has type {type_name(info.qtype)}, which "
                                   f"edgellama cannot compute with (supported: "
                                   f"{', '.join(sorted(GGMLType(t).name for t in RUNTIME_TYPES))})")
        self.name = name
        self.rows = f.rows(name)
        self.qtype = int(info.qtype)
        self.n_out, self.n_in = shape
        self.packed = None

    @property
    def quantized(self) -> bool:
        return self.qtype in RUNTIME_QUANTIZED

    def kernel_view(self) -> np.ndarray:
        """What the kernels read: the packed groups of a quantized weight, the file rows of a float one."""
        return self.packed if self.quantized else self.rows

    def rows_between(self, start: int, stop: int, lanes: int) -> "Weight":
        """Output rows start..stop-1 as a weight of their own: views of this one's rows and packed
        groups of ``lanes`` rows (kernels.packing), ``start`` a multiple of ``lanes``."""
        part = object.__new__(Weight)
        part.name, part.qtype, part.n_in, part.n_out = self.name, self.qtype, self.n_in, stop - start
        part.rows = self.rows[start:stop]
        part.packed = None
        if self.packed is not None:
            assert start % lanes == 0, "a packed weight is cut at whole groups of rows"
            part.packed = self.packed[start // lanes:-(-stop // lanes)]
        return part


PACK_CHUNK_BYTES = 4 << 20  # file bytes packed between two releases of their pages


def _pack(f: GGUFFile, sections: list[list[Weight]], packed_cache=None,
          threads: int | None = None) -> tuple[list[np.ndarray], str]:
    """Pack quantized weights, one new read-only buffer per section (each weight's ``packed``
    becomes a view of its section's buffer).  The buffers are mapped from the packed cache of an
    earlier load of this file (edgellama.packed_cache; ``packed_cache``: None = its default folder,
    False = none, or a folder), else packed in memory (and written to that cache, in a thread, for
    the next load); while packing,
    the file's pages of what is packed are dropped from this process a few MB at a time, so that
    the weights are resident once, even while loading.  The file stays untouched and remains the
    source of every float tensor.  Also returns where the buffers come from (packed_sections)."""
    lanes, unsigned_q8 = K.packing()
    shapes = [[(-(-w.n_out // lanes), K.group_bytes(w.qtype, w.n_in, lanes)) for w in weights]
              for weights in sections]  # per weight: (groups, group bytes)
    sizes = [sum(groups * size for groups, size in s) for s in shapes]
    layout = {"target": {"lanes": int(lanes), "unsigned_q8": bool(unsigned_q8)},
              "kernels": package_stamp(LAYOUT_FILES),
              "sections": [[(w.name, w.qtype, w.n_out, w.n_in, f.tensor(w.name).offset) for w in weights]
                           for weights in sections]}

    def views(buffers):
        for weights, s, buf in zip(sections, shapes, buffers):
            offset = 0
            for w, (groups, size) in zip(weights, s):
                w.packed = buf[offset:offset + groups * size].reshape(groups, size)
                offset += groups * size

    def fill(buffers):  # zeroed, writable
        views(buffers)
        for weights in sections:
            for w in weights:
                step = max(1, PACK_CHUNK_BYTES // (lanes * w.rows.shape[1]))  # groups per chunk
                for g in range(0, w.packed.shape[0], step):
                    rows = slice(g * lanes, (g + step) * lanes)
                    K.pack_rows(w.rows[rows], w.qtype, lanes, unsigned_q8, w.packed[g:g + step])
                    f.release(w.name, rows.start, rows.stop)
            for w in weights:  # what the kernel's fault-around brought in of a tensor while packing its neighbour
                f.release(w.name)

    buffers, source = packed_sections(resolve_folder(packed_cache), f.path, f.stat, f.pread, layout, sizes,
                                      lambda buffers: kernel_thread.run(fill, buffers, threads=threads))
    views(buffers)  # read-only views now (one kernel signature for every weight)
    if source == "mapped":  # nothing packed, but reading the norms faulted in their neighbours' pages
        for weights in sections:
            for w in weights:
                f.release(w.name)
    return buffers, source


FORMATS_ENV = "EDGELLAMA_KERNEL_FORMATS"  # "all": compile the tiles of every packed type (one set for all models)


def kernel_formats(qtypes) -> "K.Formats":
    """The packed types whose int8 tiles the product kernels compile for a model with matrices of
    these ggml types (kernels.Formats: compiled once per set and cached); every packed type with
    EDGELLAMA_KERNEL_FORMATS=all, so that one compilation serves models of any types (the tests
    use it: their models have many sets)."""
    if os.environ.get(FORMATS_ENV, "").strip().lower() == "all":
        return K.ALL_FORMATS
    return K.Formats(int(t) for t in qtypes)


def _vector(f: GGUFFile, name: str, n: int) -> np.ndarray:
    """A 1-D float tensor (norm weights, rope factors) as float32."""
    info = f.tensor(name)
    if info.shape != (n,):
        raise ModelFormatError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected ({n},)")
    if info.qtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        raise ModelFormatError(f"{f.path}: tensor {name!r} must be F32/F16/BF16, got {type_name(info.qtype)}")
    return dequantize(f.raw(name), info.qtype, (n,))  # numpy: loading a Numba kernel costs more here


def _offset_in(view: np.ndarray, base: np.ndarray) -> int:
    """Byte offset of a view inside the buffer it views."""
    return view.__array_interface__["data"][0] - base.__array_interface__["data"][0]


class Weights:
    """All tensors of a llama GGUF file, named as in the file."""

    def __init__(self, f: GGUFFile, args: ModelArgs, packed_cache=None, threads: int | None = None):
        a = args
        self.token_embd = Weight(f, "token_embd.weight", (a.n_vocab, a.dim))
        # a missing output.weight means the projection is tied to the embedding table; it gets its
        # own Weight (its own packed copy), which then serves the embedding lookups too
        tied = "output.weight" not in f.tensors
        self.output = Weight(f, "token_embd.weight" if tied else "output.weight", (a.n_vocab, a.dim))
        self.output_norm = _vector(f, "output_norm.weight", a.dim)
        shapes = {"attn_q": (a.dim, a.dim), "attn_k": (a.kv_dim, a.dim), "attn_v": (a.kv_dim, a.dim),
                  "attn_output": (a.dim, a.dim), "ffn_gate": (a.ffn_dim, a.dim),
                  "ffn_up": (a.ffn_dim, a.dim), "ffn_down": (a.dim, a.ffn_dim)}
        self.layers = [{m: Weight(f, f"blk.{i}.{m}.weight", shapes[m]) for m in LAYER_MATRICES}
                       for i in range(a.n_layers)]
        # norms: (n_layers, 2, dim) = (attn_norm, ffn_norm) per layer
        self.norms = np.stack([np.stack([_vector(f, f"blk.{i}.attn_norm.weight", a.dim),
                                         _vector(f, f"blk.{i}.ffn_norm.weight", a.dim)])
                               for i in range(a.n_layers)])
        self.rope_freqs = (_vector(f, "rope_freqs.weight", a.rope_dim // 2)
                           if "rope_freqs.weight" in f.tensors else None)
        for vectors in (self.norms, self.output_norm):  # weights are read-only, as the file's are
            vectors.setflags(write=False)
        # quantized matrices are packed once (kernels.pack_rows); for the decode kernel the layers'
        # matrices are then the rows of mat_table, in slot order (layer * N_LAYER_MATRICES + slot),
        # each the MAT_* columns of its view into the packed buffer (quantized types) or into the
        # mapped file (float types)
        matrices = [layer[m] for layer in self.layers for m in LAYER_MATRICES]
        self.blob = np.asarray(f.buf)
        tail = [self.output] if self.output.quantized else []  # its own buffer, kept alive by output.packed
        # pack_source: "mapped" (the packed cache of an earlier load), "saving" (packed now and being
        # written to that cache) or "memory" (packed now)
        sections, self.pack_source = _pack(f, [[w for w in matrices if w.quantized], tail], packed_cache,
                                           threads)
        self.packed = sections[0]
        self.packed_bytes = sum(s.nbytes for s in sections)
        self.packed_folder = resolve_folder(packed_cache)
        self.mat_table = np.zeros((len(matrices), 5), np.int64)
        for i, w in enumerate(matrices):
            view = w.kernel_view()
            row = self.mat_table[i]
            row[K.MAT_OFFSET] = _offset_in(view, self.packed if w.quantized else self.blob)
            row[K.MAT_ROWS], row[K.MAT_ROW_BYTES] = view.shape
            row[K.MAT_TYPE], row[K.MAT_OUT] = w.qtype, w.n_out
        # embeddings: (table, type, packed?); a tied packed table serves them, so that none of the
        # file's table pages come back into memory as tokens are looked up
        if tied and self.output.quantized:
            self.embedding = (self.output.packed, self.output.qtype, True)
        else:
            self.embedding = (self.token_embd.rows, self.token_embd.qtype, False)
        embd, embd_type, embd_packed = self.embedding
        # the packed types the products meet: the kernels compile their int8 tiles only
        self.formats = kernel_formats(w.qtype for w in [*matrices, self.output])
        self.decode = K.DecodeWeights(embd, int(embd_type), bool(embd_packed), self.blob, self.packed,
                                      self.mat_table, self.norms, self.output_norm, self.output.kernel_view(),
                                      int(self.output.qtype), self.formats)


class State:
    """Every buffer a forward pass needs, allocated once; nothing is allocated per token."""

    def __init__(self, args: ModelArgs, n_ctx: int, n_threads: int, cache_type: str = "f16"):
        a = args
        f32 = np.float32
        # KV cache: (n_layers, n_kv_heads, n_ctx, row) of the cache type's element (quants.KV_CACHE_TYPES:
        # float32, IEEE half bit patterns, or Q8_0 blocks); its pages cost memory as they are written
        # (4 KB at a time: memory.lazy_zeros)
        kind = KV_CACHE_TYPES[cache_type]
        shape = (a.n_layers, a.n_kv_heads, n_ctx, kind.row_length(a.head_dim))
        self.k_cache = lazy_zeros(shape, kind.dtype)
        self.v_cache = lazy_zeros(shape, kind.dtype)
        self.kv = K.KVCache(self.k_cache, self.v_cache)
        self.xb = np.zeros(a.dim, f32)                 # normed / projected activation (dim,)
        self.qx = K.activation_room(a.dim)             # xb (or att) quantized to int8 blocks (dim,)
        # one-token attention: per (span, KV head) job a row and the group's scores; per span partials
        n_spans = -(-n_ctx // K.ATTN_SPAN)
        group = a.n_heads // a.n_kv_heads
        self.prompt_work = np.zeros((max(n_threads, 1), K.prompt_work_size(a.head_dim)), f32)  # per worker
        self.logits = np.zeros(a.n_vocab, f32)         # (n_vocab,)
        self.decode = K.DecodeBuffers(
            x=np.zeros(a.dim, f32),                    # residual stream (dim,)
            xb=self.xb,
            qx=self.qx,
            q=np.zeros(a.dim, f32),                    # query (n_heads * head_dim,)
            k=np.zeros(a.kv_dim, f32),                 # key (n_kv_heads * head_dim,)
            v=np.zeros(a.kv_dim, f32),                 # value (n_kv_heads * head_dim,)
            att=np.zeros(a.dim, f32),                  # attention output (dim,)
            hb=np.zeros(a.ffn_dim, f32),               # gate, then silu(gate) * up (ffn,)
            hb2=np.zeros(a.ffn_dim, f32),              # up (ffn,)
            qh=K.activation_room(a.ffn_dim),           # hb quantized (ffn,)
            attn_scratch=np.zeros((n_spans * a.n_kv_heads, a.head_dim + group * K.ATTN_SPAN), f32),
            attn_partial=np.zeros((n_spans, a.n_heads, a.head_dim + 2), f32),
            logits=self.logits)
        self.n_past = 0                                # positions 0..n_past-1 hold valid K/V
        self.tokens: list[int] = []                    # the tokens behind those positions


class PromptBuffers:
    """The rows a prompt chunk of up to ``n_rows`` tokens passes through (Model._prefill), made at
    the first prompt and kept, as llama.cpp keeps its compute buffers: nothing is allocated per
    layer or per prompt (freed arrays of a few MB used to stay in the C heap, 20 MB of a 1B
    model's), and the feed-forward's gate and up rows, the largest, are made ``cols`` columns at a
    time (info.prompt_ffn_columns; Model._feed_forward).  info.prompt_buffers counts these bytes."""

    def __init__(self, args: ModelArgs, weights: Weights, n_rows: int):
        from .info import prompt_ffn_columns

        f32 = np.float32
        downs = [layer["ffn_down"] for layer in weights.layers]
        self.cols = prompt_ffn_columns(args.ffn_dim, n_rows, all(w.quantized for w in downs))
        # per layer, the pieces of columns: (c0, c1, gate rows c0..c1-1, up rows c0..c1-1)
        lanes, ffn = K.packing()[0], args.ffn_dim
        self.pieces = [[(c0, min(c0 + self.cols, ffn), *(layer[m].rows_between(c0, min(c0 + self.cols, ffn), lanes)
                                                          for m in ("ffn_gate", "ffn_up")))
                        for c0 in range(0, ffn, self.cols)] for layer in weights.layers]
        self.x = np.zeros((n_rows, args.dim), f32)      # residual stream (T, dim)
        self.xb = np.zeros((n_rows, args.dim), f32)     # normed rows, then the attention's output (T, dim)
        self.y = np.zeros((n_rows, args.dim), f32)      # queries, then each projection's output (T, dim)
        self.k = np.zeros((n_rows, args.kv_dim), f32)   # keys (T, kv_dim)
        self.v = np.zeros((n_rows, args.kv_dim), f32)   # values (T, kv_dim)
        self.gate = np.zeros(n_rows * self.cols, f32)   # gate, then silu(gate) * up: (T, <= cols) at the front
        self.up = np.zeros(n_rows * self.cols, f32)     # up: (T, <= cols) at the front
        reading_dim = K.Formats(w.qtype for layer in weights.layers for m, w in layer.items()
                                if m != "ffn_down" and w.quantized)
        reading_ffn = K.Formats(w.qtype for w in downs if w.quantized)
        self.qx = K.activation_room(args.dim, n_rows, reading_dim)      # xb or the attention quantized (T, dim)
        self.qh = K.activation_room(args.ffn_dim, n_rows, reading_ffn)  # silu(gate) * up quantized (T, ffn)
        # a piece of columns quantized, then copied into its columns of qh: (T, <= cols) at the front
        self.qc = K.activation_room(n_rows * self.cols, None, reading_ffn) if self.cols < args.ffn_dim else None


def first_rows(room: "K.Activation", n: int) -> "K.Activation":
    """The first n rows of an Activation of rows (both forms)."""
    return K.Activation(*(K.Q8Activation(*(a[:n] for a in form)) for form in room))


def _flat_rows(room: "K.Activation", n: int, width: int) -> "K.Activation":
    """n rows of ``width`` values at the front of a flat Activation (C-contiguous, as the kernels
    take them; width a multiple of 32)."""
    def form(f):
        sizes = (width, width // K.QK, width // K.QK, width // 16) if f.q.size else (0, 0, 0, 0)
        return K.Q8Activation(*(a[:n * m].reshape(n, m) for a, m in zip(f, sizes)))

    return K.Activation(*(form(f) for f in room))


def _put_columns(whole: "K.Activation", piece: "K.Activation", c0: int, c1: int) -> None:
    """Copy a quantized piece of columns c0..c1-1 (multiples of 256) into its place in ``whole``."""
    for into, part in zip(whole, piece):
        if into.q.size and part.q.size:
            for a, b, per in zip(into, part, (1, K.QK, K.QK, 16)):
                a[:, c0 // per:c1 // per] = b


class Model:
    """A loaded model: weights, tokenizer, one evaluation state (KV cache + buffers).

    ``logits(ids)`` evaluates from an empty cache; ``generate``/``chat`` reuse the cached prefix.
    """

    def __init__(self, f: GGUFFile, n_ctx: int | None = None, threads: int | None = None, n_batch: int = 256,
                 cache_type: str = "f16", check_memory: bool = True, tokenizer=None, packed_cache=None):
        """``n_ctx``: None = min(the trained context, 4096), 0 = the trained context (llama.cpp's
        meaning); beyond the trained context a ContextLengthWarning is issued.  Before anything is
        allocated, the weights + KV cache + buffers are compared with the available memory
        (``check_memory``): MemoryLimitError names the figures and the largest context that fits.
        ``packed_cache``: where the packed weights are kept for the next load (edgellama.packed_cache):
        None = its default folder (EDGELLAMA_PACKED_CACHE, else ~/.cache/edgellama/packed), False =
        pack in memory only, or a folder."""
        import warnings

        from .info import ContextLengthWarning, resolve_n_ctx
        from .info import check_memory as memory_check
        from .info import weight_bytes_per_token
        from .tokenizer import Tokenizer  # the tokenizer is independent of Numba

        self.file = f
        self.path = f.path
        self.args = ModelArgs.from_gguf(f)
        self.n_ctx = resolve_n_ctx(n_ctx, self.args.max_ctx, DEFAULT_MAX_CTX)
        if self.n_ctx > self.args.max_ctx:
            warnings.warn(f"n_ctx={self.n_ctx} is beyond the {self.args.max_ctx} tokens this model was trained "
                          f"on: expect worse output past {self.args.max_ctx}", ContextLengthWarning, stacklevel=3)
        if n_batch <= 0:
            raise ValueError(f"n_batch must be positive, got {n_batch}")
        self.n_batch = int(n_batch)
        if threads is not None and not (is_int(threads) and 0 <= threads <= MAX_THREADS):  # (0: as None)
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
        self.threads = int(threads or physical_cores())
        if cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {cache_type!r}")
        self.cache_type = cache_type
        self.args.check_cache_type(cache_type, f.path)
        if check_memory:  # before any allocation: a context that cannot fit fails now, in one line
            memory_check(f, self.args, self.n_ctx, cache_type, self.threads, self.n_batch)
        # the tokenizer first: what building it frees goes back to the system before the weights
        # are packed on top of it
        # (``tokenizer``: one already built from this file's metadata, e.g. to size a prompt first)
        if tokenizer is None:
            with side_folder(resolve_folder(packed_cache)):  # (its kept tables where the weights are kept)
                tokenizer = Tokenizer.from_gguf(f)
        self.tokenizer = tokenizer
        trim_heap()
        self.weights = Weights(f, self.args, packed_cache, self.threads)
        self.rope = K.RopeTables(*rope_tables(self.args, self.n_ctx, self.weights.rope_freqs))
        self.dims = K.Dims(np.float32(self.args.norm_eps), self.args.n_heads, self.args.n_kv_heads,
                           self.args.head_dim)
        self.state = State(self.args, self.n_ctx, self.threads, cache_type)
        self.n_evaluated = 0  # tokens run through the network since load (prompt-cache accounting)
        self.n_shifted = 0    # tokens dropped from the cache by context shifts
        self._blas = None
        self._prompt = None  # PromptBuffers, made at the first prompt of more than decode_max_prompt tokens
        self.decode_max_prompt = decode_max_prompt(weight_bytes_per_token(f))  # prompts up to this long go token by token
        f.release_header()  # read: the tokenizer and the weights are built

    @classmethod
    def load(cls, path, n_ctx: int | None = None, threads: int | None = None, **kwargs) -> "Model":
        folder = resolve_folder(kwargs.get("packed_cache"))
        with side_folder(folder):  # (the parsed header kept where the weights are kept)
            f = GGUFFile(path, keep_header=folder is not None)
        return cls(f, n_ctx=n_ctx, threads=threads, **kwargs)

    # ----- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids, special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    # ----- evaluation -----------------------------------------------------------------------------

    def shift_context(self, n_keep: int, n_discard: int) -> None:
        """Make room in a full cache without re-evaluating anything.

        Positions n_keep .. n_keep+n_discard-1 are dropped; the later entries move down by
        n_discard slots, and their keys are rotated back by n_discard positions (RoPE makes the
        attention score depend only on the distance between positions, so the moved keys are what
        they would have been, had those tokens been evaluated at their new positions).
        """
        s = self.state
        if not (is_int(n_keep) and is_int(n_discard)):
            raise TypeError(f"n_keep and n_discard must be integers, got {n_keep!r} and {n_discard!r}")
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= s.n_past):
            raise ValueError(f"cannot discard {n_discard} tokens after keeping {n_keep} of {s.n_past}")
        src, dst = slice(n_keep + n_discard, s.n_past), slice(n_keep, s.n_past - n_discard)
        s.k_cache[:, :, dst] = s.k_cache[:, :, src]
        s.v_cache[:, :, dst] = s.v_cache[:, :, src]
        kernel_thread.run(K.rerotate_keys, s.k_cache, n_keep, s.n_past - n_discard, self.rope.cos[n_discard],
                          -self.rope.sin[n_discard], self.args.head_dim, threads=self.threads)
        s.n_past -= n_discard
        del s.tokens[n_keep:n_keep + n_discard]
        self.n_shifted += n_discard

    def warm_up(self, prompt_path: bool = True) -> None:
        """Load (or, the first time on a machine, compile) the kernels of the one-token path and,
        with ``prompt_path``, of the prompt path (prompts of more than decode_max_prompt tokens), so
        that the first real request does not wait for them; the cache is left empty."""
        token = self.tokenizer.bos_id or 0
        prompt = [token] * min(self.decode_max_prompt + 1, self.n_ctx)
        prompt_path = prompt_path and len(prompt) > self.decode_max_prompt
        # a first run on a machine with cores to spare compiles in two processes at once
        # (kernel_cache.plan_warm_up, CompileChild): the prompt path's kernels in a forked child
        # while this process compiles the decode step, or, the decode step alone being needed, some
        # of its helper functions there and the others here, then the step itself
        plan = plan_warm_up(matrix_types(self.file), prompt_path)
        child = None
        started = time.perf_counter()

        def child_timeout():  # a child that outlasts this is killed (its work is then done here)
            return 60 + 3 * (time.perf_counter() - started)

        if plan.prompt_child:
            ids = self._check_ids(prompt)

            def compile_prompt_path():
                self.reset()
                self._prefill(ids[:self.n_batch], False)  # (a chunk, as eval makes them)

            child = kernel_thread.run(CompileChild.start, compile_prompt_path, SHARED_WITH_DECODE)
        elif plan.split_decode:
            pieces = self._decode_step_pieces()

            def compile_pieces(names):
                for name in names:
                    compile_for(*pieces[name])

            def split():
                forked = CompileChild.start(lambda: compile_pieces(DECODE_PIECES_CHILD))
                try:
                    compile_pieces(DECODE_PIECES_HERE)
                except BaseException:
                    if forked is not None:
                        forked.finish(timeout=0)  # killed and reaped
                    raise
                return forked

            child = kernel_thread.run(split)
            if child is not None:  # the step itself once the child's pieces are in the cache
                child.finish(child_timeout())
                child = None
        self.reset()
        try:
            # the one-token step loaded (or compiled), not run: running it would cost a decode
            # step (0.2 s on an 8B model) before the first real one
            w, s = self.weights, self.state
            kernel_thread.run(compile_for, K.decode_token, token, 0, w.decode, self.dims, self.rope, s.kv, s.decode,
                              K.HALF_TABLES)
        finally:
            if child is not None:
                child.finish(child_timeout())
        if prompt_path:
            self.reset()
            self.eval(prompt)
        self.reset()

    def _decode_step_pieces(self) -> dict:
        """The decode step's larger helper functions (kernel_cache.DECODE_PIECES_*) as
        ``(dispatcher, *arguments)``, the arguments of the types decode_token gives them, so that
        compiling them apart (kernel_cache.compile_for) gives the code decode_token links."""
        w, d, b, kv, t = self.weights.decode, self.dims, self.state.decode, self.state.kv, K.HALF_TABLES
        return {
            "embed_row": (K.embed_row, w.embd, w.embd_type, w.embd_packed, 0, b.x, t.f16, t.bf16),
            "_quantize": (K.decode._quantize, b.xb, b.qx, w, 0, 3),
            "rmsnorm": (K.rmsnorm, b.x, w.norms[0, 0], d.eps, b.xb),
            "rope": (K.rope, b.q, d.n_heads, d.head_dim, self.rope.cos[0], self.rope.sin[0]),
            "_swiglu_inplace": (K.ops._swiglu_inplace, b.hb, b.hb2),
            "_layer_matvec": (K.decode._layer_matvec, w, 0, b.xb, b.qx, b.q, t),
            "_byte_shares": (K.decode._byte_shares, 0, 0, w.packed, w.mat_table, 0, 0, b.qx, (b.q, b.k, b.v), 1,
                             w.formats),
            "attention_one": (K.attention_one, b.q.reshape(d.n_heads, d.head_dim), kv.k[0], kv.v[0], 1,
                              b.attn_scratch, b.attn_partial, b.att.reshape(d.n_heads, d.head_dim)),
        }

    def reset(self) -> None:
        """Forget the cached context (the KV cache contents become unused)."""
        self.truncate(0)

    @property
    def n_cached(self) -> int:
        """Tokens in the cached context (positions 0..n_cached-1 of the KV cache)."""
        return self.state.n_past

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens and forget the rest: the next ``eval`` continues at
        position n, as if only those tokens had been evaluated (a chat rewound to an earlier turn, a
        benchmark back to its starting depth).  Nothing is recomputed."""
        s = self.state
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= s.n_past:
            raise ValueError(f"truncate: n must be an integer from 0 to the {s.n_past} cached tokens, got {n!r}")
        s.n_past = int(n)
        del s.tokens[s.n_past:]

    def logits(self, ids) -> np.ndarray:
        """Logits for every position of ``ids``, evaluated from an empty cache: (len(ids), n_vocab)."""
        ids = self._check_ids(ids)
        self.reset()
        out = np.empty((len(ids), self.args.n_vocab), dtype=np.float32)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            out[start:start + len(chunk)] = self.eval(chunk, all_logits=True)
        return out

    def eval(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the cached context; logits of the last token (or of all, (T, n_vocab))."""
        ids = self._check_ids(ids)
        s = self.state
        if s.n_past + len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{s.n_past} cached + {len(ids)} new tokens exceed the context of "
                                       f"{self.n_ctx} tokens")
        return kernel_thread.run(self._evaluate, ids, all_logits, threads=self.threads)

    def _evaluate(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """eval's work, on the kernel thread (edgellama.kernel_thread)."""
        if len(ids) <= self.decode_max_prompt and not all_logits:
            # up to decode_max_prompt tokens: the decode kernel alone (this also spares a fresh
            # process from loading the prefill kernels before its first token)
            for i, token in enumerate(ids):
                if i:
                    kernel_thread.adapt()
                logits = self._decode(int(token))
        else:
            if all_logits and len(ids) > self.n_batch:
                raise ValueError("all_logits over more than n_batch tokens: use Model.logits")
            for start in range(0, len(ids), self.n_batch):
                if start:
                    kernel_thread.adapt()
                logits = self._prefill(ids[start:start + self.n_batch], all_logits)
        return logits

    def eval_prompt(self, ids) -> tuple[np.ndarray, int]:
        """Evaluate a prompt, reusing the longest cached prefix; (last logits, reused token count)."""
        ids = [int(t) for t in self._check_ids(ids)]
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} "
                                       "(load the model with a larger n_ctx, or shorten the prompt)")
        s = self.state
        common = 0
        for a, b in zip(s.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token is always evaluated: we need its logits
        self.truncate(common)
        return self.eval(ids[common:]), common

    def generate(self, prompt: str | list[int], max_tokens: int | None = 64, sampler=None, *, stop=(), stop_ids=(),
                 add_bos: bool | None = None, special: bool = False, context_shift: bool = False, n_keep: int = 4,
                 truncate: bool = False, **sampling):
        """Stream generated text: yields ``Chunk`` strings (the last one carries finish_reason).

        Sampling: ``sampler`` (a ``sampling.Sampler``, or any callable logits -> token id), or the
        Sampler's settings as keywords (``temperature=0.0, seed=None, top_k, top_p, min_p, typical_p,
        repeat_penalty, presence_penalty, frequency_penalty, penalty_last_n, logit_bias, logprobs``),
        from which one Sampler is made, before tokenizing (bad settings fail at once); not both.
        ``stop``: strings that end the text (at most generate.MAX_STOP_STRINGS of MAX_STOP_CHARS
        characters), ``stop_ids``: tokens that do (besides the vocabulary's end-of-generation ones).
        With ``context_shift`` a full cache drops the oldest half of its tokens after the first
        ``n_keep`` (see ``shift_context``) and generation goes on; without it, generation ends
        with finish_reason "length" at the end of the context.  A prompt longer than the context
        is an error (ContextOverflowError), or with ``truncate`` loses its middle: its first
        ``n_keep`` tokens and its end are kept, leaving min(max_tokens, n_ctx/4) (at most n_ctx/2,
        at least 1) positions for the reply.  A text prompt is tokenized with special-token text
        left as text unless ``special=True`` (then ``<|im_start|>`` and the like written in it
        become control tokens: only for prompts you wrote yourself).  Bad settings raise
        ``SamplingError``, bad generation options ``GenerationError``; both name the parameter
        in ``param``.
        """
        from .generate import check_generation, check_n_keep, generate_tokens, truncate_prompt
        from .sampling import make_sampler

        sampler = make_sampler(sampler, sampling, self.args.n_vocab)
        check_n_keep(n_keep, self.n_ctx, context_shift=context_shift, truncate=truncate)
        check_generation(self.tokenizer, max_tokens, sampler, stop_ids, stop)  # (before truncating by max_tokens)
        ids = self.tokenize(prompt, add_bos=add_bos, special=special) if isinstance(prompt, str) \
            else self._check_ids(prompt).tolist()
        if truncate:
            want = self.n_ctx // 4 if max_tokens is None else max_tokens
            ids = truncate_prompt(ids, self.n_ctx, n_keep, room=max(1, min(want, self.n_ctx // 2)))
        return generate_tokens(self, ids, max_tokens, sampler, stop_ids, stop=stop,
                               n_keep=n_keep if context_shift else None)

    def _check_ids(self, ids) -> np.ndarray:
        """Token ids as an int64 array: integers (a float or a string is a TypeError, not truncated
        or parsed), each in the vocabulary (a ValueError naming the first that is not)."""
        n_vocab = self.args.n_vocab
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
            flat = ids.reshape(-1)
            values = flat[(flat < 0) | (flat >= n_vocab)][:1].tolist()  # the first outside, if any
            arr = flat.astype(np.int64)
        else:
            if isinstance(ids, (str, bytes, bytearray, memoryview, set, frozenset, dict)) or not isinstance(ids, Iterable):
                # (bytes would be their byte values, a set in no order, a dict its keys)
                raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
            values = list(ids.reshape(-1)) if isinstance(ids, np.ndarray) else list(ids)
            wrong = next((t for t in values if not is_int(t)), None)
            if wrong is not None:
                raise TypeError(f"token ids must be integers, got {wrong!r}")
            values = [int(t) for t in values]
            arr = None
        outside = next((t for t in values if not 0 <= t < n_vocab), None)
        if outside is not None:
            raise ValueError(f"token id {outside} is outside the vocabulary [0, {n_vocab})")
        if arr is None:
            arr = np.array(values, dtype=np.int64)
        if arr.size == 0:
            raise ValueError("no tokens to evaluate")
        return arr

    def _decode(self, token: int) -> np.ndarray:
        """One token at position n_past through the fused decode kernel -> (n_vocab,) logits."""
        w, s = self.weights, self.state
        K.decode_token(token, s.n_past, w.decode, self.dims, self.rope, s.kv, s.decode, K.HALF_TABLES)
        s.n_past += 1
        s.tokens.append(token)
        self.n_evaluated += 1
        return s.logits

    @contextmanager
    def _blas_threads(self):
        """BLAS (float weights in prefill only) uses the model's thread count."""
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        with self._blas.limit(limits=self.threads, user_api="blas"):
            yield

    def _linear(self, x: np.ndarray, *weights: Weight) -> list[np.ndarray]:
        """x: (T, n_in) -> [x @ W.T for each W], all W reading the same input, in new arrays."""
        outputs = [np.empty((x.shape[0], w.n_out), np.float32) for w in weights]   # (T, n_out) each
        self._project(x, self._quantized(x, weights), zip(weights, outputs))
        return outputs

    @staticmethod
    def _quantized(x: np.ndarray, weights, room: "K.Activation | None" = None) -> "K.Activation | None":
        """x (T, n_in) quantized to Q8 blocks in the forms the quantized ones of ``weights`` take
        (into the first T rows of ``room``, else new arrays); None if none is quantized."""
        types = [w.qtype for w in weights if w.quantized]
        if not types:
            return None
        blocks, supers = any(not K.is_k_quant(t) for t in types), any(K.is_k_quant(t) for t in types)
        n_tok, n_in = x.shape
        qx = K.activation_room(n_in, n_tok, K.Formats(types)) if room is None else first_rows(room, n_tok)
        if blocks:
            K.quantize_q8_rows(x, *qx.blocks)
        if supers:
            K.quantize_q8k_rows(x, *qx.supers)
        return qx

    def _project(self, x: np.ndarray, qx: "K.Activation | None", pairs) -> None:
        """out = x @ W.T for each (W, out) of ``pairs``; quantized W read x as qx (Model._quantized),
        through the int8 tile kernels (the same numbers as decoding token by token)."""
        for w, out in pairs:
            if w.quantized:
                a = qx.supers if K.is_k_quant(w.qtype) else qx.blocks
                K.matmul_packed(w.packed, w.qtype, w.n_out, *a, out, self.weights.formats)
            else:
                self._float_linear(x, w, out)

    def _float_linear(self, x: np.ndarray, w: Weight, out: np.ndarray) -> None:
        """out = x @ W.T for an F32 / F16 / BF16 weight through BLAS; 16-bit rows are widened to
        float32 in tiles of TILE_ELEMENTS."""
        with self._blas_threads():
            if w.qtype == K.T_F32:
                np.matmul(x, w.rows.view(np.float32).T, out=out)
                return
            tile_rows = max(1, min(w.n_out, TILE_ELEMENTS // w.n_in))
            tile = np.empty((tile_rows, w.n_in), np.float32)                   # (tile rows, n_in)
            for r0 in range(0, w.n_out, tile_rows):
                r1 = min(r0 + tile_rows, w.n_out)
                K.dequantize_rows(w.rows[r0:r1], w.qtype, tile[:r1 - r0], K.F16_TABLE, K.BF16_TABLE)
                out[:, r0:r1] = x @ tile[:r1 - r0].T

    def _prefill(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """Evaluate T tokens at positions n_past.. with matrix kernels; logits (T, V) or (V,)."""
        a, w, s = self.args, self.weights, self.state
        n_tok, start = len(ids), s.n_past
        rows = min(self.n_batch, self.n_ctx)
        if self._prompt is None or len(self._prompt.x) != rows:  # (the first prompt, or n_batch changed since)
            self._prompt = PromptBuffers(a, w, rows)
        b = self._prompt
        if n_tok > len(b.x):  # (eval cuts prompts into chunks of n_batch: the kernels write T rows)
            raise ValueError(f"a prompt chunk of {n_tok} tokens is longer than n_batch ({len(b.x)})")
        positions = np.arange(start, start + n_tok, dtype=np.int64)
        x, xb, y = b.x[:n_tok], b.xb[:n_tok], b.y[:n_tok]      # residual, normed, projected (T, dim)
        k, v = b.k[:n_tok], b.v[:n_tok]                          # (T, kv_dim)
        K.embed_rows(ids, *w.embedding, x, K.F16_TABLE, K.BF16_TABLE)
        for l, layer in enumerate(w.layers):
            # attention block: q/k/v for all tokens, rotate, append to the cache, causal attention
            K.rmsnorm_rows(x, w.norms[l, 0], self.dims.eps, xb)
            qkv = (layer["attn_q"], layer["attn_k"], layer["attn_v"])
            self._project(xb, self._quantized(xb, qkv, b.qx), zip(qkv, (y, k, v)))
            K.rope_rows(y, positions, a.n_heads, a.head_dim, self.rope.cos, self.rope.sin)
            K.rope_rows(k, positions, a.n_kv_heads, a.head_dim, self.rope.cos, self.rope.sin)
            K.store_kv(s.k_cache[l], start, k)
            K.store_kv(s.v_cache[l], start, v)
            att = xb  # (the normed rows are in qx now: xb takes the attention's output)
            K.attention(y.reshape(n_tok, a.n_heads, a.head_dim), s.k_cache[l], s.v_cache[l], start, s.prompt_work,
                        att.reshape(n_tok, a.n_heads, a.head_dim))
            o = (layer["attn_output"],)
            self._project(att, self._quantized(att, o, b.qx), zip(o, (y,)))
            x += y
            # feed-forward block
            K.rmsnorm_rows(x, w.norms[l, 1], self.dims.eps, xb)
            self._feed_forward(l, xb, b, y)
            x += y
        s.n_past += n_tok
        s.tokens.extend(int(t) for t in ids)
        self.n_evaluated += n_tok
        if not all_logits:
            # only the last position's logits are needed: one row through the decode matvec
            K.rmsnorm(x[-1], w.output_norm, self.dims.eps, s.xb)
            K.quantize_activation(s.xb, s.qx, w.formats, K.activation_forms_of(w.output.qtype))
            K.matvec(w.output.kernel_view(), w.output.qtype, a.n_vocab, s.xb, s.qx, s.logits,
                     K.F16_TABLE, K.BF16_TABLE, w.formats)
            return s.logits
        K.rmsnorm_rows(x, w.output_norm, self.dims.eps, xb)
        return self._linear(xb, w.output)[0]

    def _feed_forward(self, l: int, xb: np.ndarray, b: "PromptBuffers", out: np.ndarray) -> None:
        """out = down(silu(gate(xb)) * up(xb)) for T rows of layer l.  The gate and up rows are
        made b.cols columns at a time (whole row groups of the packed matrices and whole 256-value
        blocks of the down projection's quantized input, so that every number is what one piece
        would give): quantized into their columns of b.qh, they are not needed in float32 all at
        once."""
        n_tok, ffn = len(xb), self.args.ffn_dim
        down_w = self.weights.layers[l]["ffn_down"]
        qx = self._quantized(xb, (self.weights.layers[l]["ffn_gate"], self.weights.layers[l]["ffn_up"]), b.qx)
        qh = first_rows(b.qh, n_tok) if down_w.quantized else None
        for c0, c1, gate_w, up_w in b.pieces[l]:
            width = c1 - c0
            gate, up = b.gate[:n_tok * width].reshape(n_tok, width), b.up[:n_tok * width].reshape(n_tok, width)
            self._project(xb, qx, ((gate_w, gate), (up_w, up)))
            K.swiglu(gate, up)
            if qh is None:  # a float down projection reads the float rows (one piece: PromptBuffers)
                self._float_linear(gate, down_w, out)
                return
            if width == ffn:
                self._quantized(gate, (down_w,), qh)
            else:
                _put_columns(qh, self._quantized(gate, (down_w,), _flat_rows(b.qc, n_tok, width)), c0, c1)
        self._project(None, qh, ((down_w, out),))

    def chat(self, messages, max_tokens: int | None = None, sampler=None, *, template: str | None = None, stop=(),
             **sampling):
        """Stream the assistant's reply to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        The conversation is rendered with the file's ``tokenizer.chat_template`` (or ``template``:
        a template text or a built-in name, ``chatml``/``llama2``/``llama3``; without either, the
        built-in the vocabulary suggests).  The reply ends at the template's end-of-turn token
        (``chat.end_of_turn_ids``).  The cached prefix is reused, so a follow-up turn evaluates only
        what is new.  A reply that fills the context shifts it (keeping the system prompt) instead
        of stopping.  ``stop``: strings that end the reply (the text before one is kept).
        ``sampler`` or the sampling settings as keywords: as for ``generate``.
        """
        ids, n_keep, stop_ids = self.chat_prompt(messages, template, self.n_ctx)
        return self.generate(ids, max_tokens=max_tokens, sampler=sampler, stop=stop, stop_ids=stop_ids,
                             context_shift=True, n_keep=n_keep, **sampling)

    def chat_prompt(self, messages, template: str | None, n_ctx: int) -> tuple[list[int], int, frozenset[int]]:
        """A conversation as ``chat`` runs it in a context of ``n_ctx``: (prompt ids, the tokens a
        context shift keeps: at least the system prompt, the template's end-of-turn ids)."""
        from .chat import chat_prompt_ids, end_of_turn_ids, template_for

        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise TypeError(f"template must be a template text or a built-in name (chatml, llama2, llama3), got "
                            f"{template!r:.80}")
        template = template_for(self.tokenizer, self.file.get("tokenizer.chat_template") if template is None
                                else template)
        ids = chat_prompt_ids(self.tokenizer, messages, template)
        # a long conversation shifts the context instead of ending; the system prompt stays
        n_keep = 4
        if messages and messages[0].get("role") == "system":
            n_keep = max(n_keep, len(chat_prompt_ids(self.tokenizer, messages[:1], template)))
        return ids, min(n_keep, n_ctx // 2 - 1), frozenset(end_of_turn_ids(self.tokenizer, template))

    # ----- several sequences at once (edgellama.batch) ----------------------------------------------

    def batch(self, n_slots: int = 4, n_ctx: int | None = None, n_batch: int | None = None):
        """A ``batch.Batch`` of ``n_slots`` sequences (KV cache regions of ``n_ctx`` positions each,
        default the model's) evaluated together: ``add``, ``step``, ``remove``."""
        from .batch import Batch

        return Batch(self, n_slots=n_slots, n_ctx=n_ctx, n_batch=n_batch)

    def generate_many(self, prompts, max_tokens: int | None = 64, *, parallel: int = 4, **options):
        """Generate for every prompt, ``parallel`` at a time in one batch; a list of ``batch.Generated``
        texts (with ``.chunks``, ``.tokens``, ``.finish_reason``, ``.usage``), each exactly what the
        prompt gets alone.  Options as ``generate``'s (sampling settings as keywords)."""
        from .batch import generate_many

        if isinstance(prompts, (str, bytes)):  # (not its characters, one prompt each)
            raise TypeError("generate_many takes a list of prompts; for one prompt, use generate")
        return generate_many(self, prompts, max_tokens, parallel=parallel, **options)

    def embed(self, texts, add_bos: bool | None = None, normalize: bool = True, check=None) -> np.ndarray:
        """Embeddings (len(texts), dim) float32: the mean over each text's tokens of the last layer's
        output after the final norm, L2-normalized (llama.cpp's ``--embedding --pooling mean``).
        A text is a string or a list of token ids; texts are evaluated together (edgellama.embed),
        adding at most one more context's KV cache; ``check`` (optional) is called between passes,
        and what it raises stops the call."""
        from .embed import embed

        return embed(self, texts, add_bos=add_bos, normalize=normalize, check=check)

DECODE_MAX_PROMPT = 8    # prompts up to this many tokens go token by token through the decode kernel (small models)
# the weight bytes a memory bus reads while a fresh process loads the prompt path's kernels from
# the cache (60-70 ms on a 2-core Zen 4, 2026-12-05, at a conservative 20 GB/s): see decode_max_prompt
SHORT_PROMPT_BYTES = 1_300_000_000


def decode_max_prompt(weight_bytes: int) -> int:
    """The longest prompt a model reading ``weight_bytes`` a token evaluates token by token through
    the decode kernel.  Token by token, a prompt of n tokens reads every weight n times; the prompt
    kernels read them once but compute at least one tile of 8 tokens, about two passes' time (a
    2-token prompt: 34 ms against 15-21 ms a token on the 1B shape at Q4_0, 200 against 82-130 ms
    on the 8B shape; 6 tokens: 36 against 129 ms and 210 against 780 ms), and a fresh process first
    loads them (60-70 ms).  So prompts of up to 2 tokens go token by token, and longer ones where
    their passes cost less than that load: 2 + SHORT_PROMPT_BYTES / (the bytes a token reads), at
    most DECODE_MAX_PROMPT (8 on SmolLM2, 3 on the 1B shape at Q4_0, 2 at Q8_0 and on larger
    models).  Fixed per model, so that a prompt's numbers depend on the prompt alone."""
    return max(1, min(DECODE_MAX_PROMPT, 2 + SHORT_PROMPT_BYTES // max(int(weight_bytes), 1)))


# the prompt path's kernels whose helper functions the decode step compiles too: a compile child
# leaves them to its second pass, by when this process has cached those helpers
SHARED_WITH_DECODE = ("embed_rows", "matvec", "rmsnorm", "quantize_activation")
TILE_ELEMENTS = 1 << 22  # dequantized weight tile for prefill: 16 MB of float32


class ContextOverflowError(ValueError):
    """More tokens than the context (n_ctx) holds."""
