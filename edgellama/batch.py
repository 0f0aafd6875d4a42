"""Several sequences at once: slots with their own KV caches, evaluated together in batched steps.

``Batch(model, n_slots=4)`` holds ``n_slots`` KV cache regions (slots) of ``n_ctx`` positions each.
``add(prompt, ...)`` (or ``add_chat(messages, ...)``) puts a sequence into a free slot and returns
its ``Sequence``; each ``step()`` runs one pass of the model over a batch made of one token of every
sequence that is generating and the next prompt tokens of the others (at most ``n_batch`` rows),
and returns the ``(sequence, Chunk)`` pairs it produced; a finished sequence frees its slot, and
``remove(seq)`` frees it at once.  ``Model.generate_many(prompts, ...)`` runs a list of prompts
through a batch and returns their texts.

The weights are read once per step for every sequence in it: decoding being memory-bound, four
sequences decode at close to four times the speed of one (figures in BENCHMARKS.md).

**Results do not depend on the batch.**  A sequence's tokens and log-probabilities are bit-for-bit
the same whether it runs alone or alongside others, in whatever slot, with whatever batch size, and
however its prompt is cut into steps: every row of a step goes through the same per-row arithmetic
(edgellama.kernels.batch explains how, and tests/test_batch.py checks it).  A slot keeps the
context it last held: a sequence whose prompt begins with it (a chat's next turn) evaluates only the
rest, with the same results as from an empty slot (this is why a slot whose context was shifted
offers only its kept first tokens for reuse).  Prompt rows and generated rows share one arithmetic
(the one-token attention), so a batch's results are those of ``Model.generate`` for the prompts it
evaluates token by token (at most ``Model.decode_max_prompt`` tokens: 8 on small models, 2-3 on
1B and larger ones), and within rounding of them otherwise (whose prompts run through the prompt
kernels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from . import kernel_thread, kernels as K
from ._validate import is_int
from .generate import Chunk, Continuation, GenerationError, check_generation, check_n_keep, truncate_prompt
from .memory import lazy_zeros
from .model import first_rows
from .quants import KV_CACHE_TYPES

MAX_SLOTS = 256           # sequences in one batch at most (llama.cpp's LLAMA_MAX_SEQ)
DEFAULT_BATCH_ROWS = 64   # rows (tokens) per step: generated tokens first, prompt tokens fill the rest


class SlotsBusyError(RuntimeError):
    """No free slot for a new sequence."""


class Rows:
    """The buffers of a batched forward pass over up to ``n_rows`` rows in ``n_slots`` KV cache
    regions of ``n_ctx`` positions, logits for up to ``n_logits`` of them (default: one per slot),
    allocated once (the cache's pages cost memory when written)."""

    @staticmethod
    def eager_bytes(args, n_slots: int, n_ctx: int, n_rows: int) -> int:
        """About the bytes the buffers below take at once (the KV cache aside: its pages cost memory
        as they are written); quantized activations counted at 2.5 bytes a value (both forms)."""
        n_spans = -(-n_ctx // K.ATTN_SPAN)
        per_row = (4 * (5 * args.dim + 2 * args.kv_dim + 2 * args.ffn_dim) + 5 * (2 * args.dim + args.ffn_dim) // 2
                   + n_spans * (4 * args.n_heads * (args.head_dim + 2) + 8 * args.n_kv_heads))
        return n_rows * per_row + min(n_rows, n_slots) * 4 * args.n_vocab

    def __init__(self, model, n_slots: int, n_ctx: int, n_rows: int, n_logits: int | None = None):
        a = model.args
        f32 = np.float32
        self.model = model
        self.n_ctx, self.n_rows, self.n_slots = n_ctx, n_rows, n_slots
        kind = KV_CACHE_TYPES[model.cache_type]
        shape = (n_slots, a.n_layers, a.n_kv_heads, n_ctx, kind.row_length(a.head_dim))
        self.cache = K.SlotCache(lazy_zeros(shape, kind.dtype), lazy_zeros(shape, kind.dtype))  # (memory.lazy_zeros)
        n_spans = -(-n_ctx // K.ATTN_SPAN)
        group = a.n_heads // a.n_kv_heads
        formats = model.weights.formats
        self._x = np.zeros((n_rows, a.dim), f32)                      # residual stream (R, dim)
        self._xb = np.zeros((n_rows, a.dim), f32)                     # normed / projected (R, dim)
        self._qx = K.activation_room(a.dim, n_rows, formats)          # xb or att quantized (R, dim)
        self._q = np.zeros((n_rows, a.dim), f32)                      # queries (R, dim)
        self._k = np.zeros((n_rows, a.kv_dim), f32)                   # keys (R, kv_dim)
        self._v = np.zeros((n_rows, a.kv_dim), f32)                   # values (R, kv_dim)
        self._att = np.zeros((n_rows, a.dim), f32)                    # attention outputs (R, dim)
        self._hb = np.zeros((n_rows, a.ffn_dim), f32)                 # gate, then silu(gate) * up (R, ffn)
        self._hb2 = np.zeros((n_rows, a.ffn_dim), f32)                # up (R, ffn)
        self._qh = K.activation_room(a.ffn_dim, n_rows, formats)      # hb quantized (R, ffn)
        self._jobs = np.zeros(n_rows * n_spans * a.n_kv_heads, np.int64)  # attention job -> row
        self._first = np.zeros(n_rows, np.int64)                      # each row's first job
        # one scratch row per chunk of attention jobs: a few per thread balance uneven spans
        self._scratch = np.zeros((4 * max(model.threads, 1), a.head_dim + group * K.ATTN_SPAN), f32)
        self._partial = np.zeros((n_rows, n_spans, a.n_heads, a.head_dim + 2), f32)  # per row and span
        self._hidden = np.zeros((n_rows, a.dim), f32)                 # final normed hidden states (M, dim)
        self._qo = K.activation_room(a.dim, n_rows, formats)          # hidden quantized (M, dim)
        self._logits = np.zeros((min(n_rows, n_logits or n_slots), a.n_vocab), f32)  # (M, n_vocab)

    def forward(self, tokens, positions, slots, out_rows, want_logits: bool = True) -> np.ndarray:
        """Run the rows (token ids at positions in slots, written into those slots' caches); the
        logits (M, n_vocab) of ``out_rows`` (row indices), or their final normed hidden states
        (M, dim) without ``want_logits``.  The result is a view of a buffer the next call reuses."""
        n, m = len(tokens), len(out_rows)
        if not 0 < n <= self.n_rows or not 0 <= m <= (len(self._logits) if want_logits else n):
            raise ValueError(f"{n} rows and {m} outputs for room of {self.n_rows} rows and {len(self._logits)} logits")
        rows = K.BatchRows(np.asarray(tokens, np.int64), np.asarray(positions, np.int64),
                           np.asarray(slots, np.int64))
        if rows.positions.min() < 0 or rows.positions.max() >= self.n_ctx:
            raise ValueError(f"positions beyond the context of {self.n_ctx}")
        if rows.slots.min() < 0 or rows.slots.max() >= self.n_slots:
            raise ValueError(f"slots beyond the {self.n_slots} there are")
        buf = K.BatchBuffers(self._x[:n], self._xb[:n], first_rows(self._qx, n), self._q[:n], self._k[:n], self._v[:n],
                             self._att[:n], self._hb[:n], self._hb2[:n], first_rows(self._qh, n), self._jobs,
                             self._first[:n], self._scratch, self._partial[:n], np.asarray(out_rows, np.int64),
                             self._hidden[:m], first_rows(self._qo, m), self._logits[:m])
        model = self.model
        kernel_thread.run(K.forward_rows, rows, model.weights.decode, model.dims, model.rope, self.cache, buf,
                          K.HALF_TABLES, bool(want_logits), threads=model.threads)
        model.n_evaluated += n
        return buf.logits if want_logits else buf.hidden

    def shift(self, slot: int, n_past: int, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep .. n_keep+n_discard-1 of a slot's n_past (see Model.shift_context)."""
        k, v = self.cache.k[slot], self.cache.v[slot]
        src, dst = slice(n_keep + n_discard, n_past), slice(n_keep, n_past - n_discard)
        k[:, :, dst] = k[:, :, src]
        v[:, :, dst] = v[:, :, src]
        rope = self.model.rope
        kernel_thread.run(K.rerotate_keys, k, n_keep, n_past - n_discard, rope.cos[n_discard], -rope.sin[n_discard],
                          self.model.args.head_dim, threads=self.model.threads)


@dataclass(eq=False)
class Sequence:
    """One generation in a batch: its prompt, where it is, what it has produced."""

    prompt_ids: list[int]
    slot: int
    rules: Continuation
    cached: int                              # prompt tokens reused from the slot's context
    n_keep: int | None                       # context shift: tokens kept (None: a full slot ends it)
    pending: list[int] = field(default_factory=list)   # prompt tokens still to evaluate
    next_token: int | None = None            # the generated token to evaluate next
    chunks: list[Chunk] = field(default_factory=list)  # everything produced so far (the last ends it)
    done: bool = False
    started: float = 0.0                     # perf_counter at add
    prompt_done: float | None = None         # perf_counter when the prompt's logits were ready
    tag: object = None                       # the caller's own reference (the server's job)
    error: BaseException | None = None       # what ended it, if its own sampling failed

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].finish_reason if self.done and self.chunks else None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def tokens(self) -> list[int]:
        return [c.token for c in self.chunks if c.token is not None]

    @property
    def state(self) -> str:
        return "done" if self.done else "prompt" if self.pending else "generating"


class _Slot:
    __slots__ = ("index", "tokens", "shifted", "n_keep", "seq", "last_used")

    def __init__(self, index: int):
        self.index = index
        self.tokens: list[int] = []    # the tokens behind the cached positions 0..len-1
        self.shifted = False           # a context shift moved its keys: only n_keep are as fresh
        self.n_keep = 0
        self.seq: Sequence | None = None
        self.last_used = 0

    def reusable(self) -> int:
        """Leading cached positions holding what an evaluation from an empty slot would hold."""
        return min(self.n_keep, len(self.tokens)) if self.shifted else len(self.tokens)


class Batch:
    """``n_slots`` sequences evaluated together; see the module docstring.

    ``n_ctx``: positions per slot (default: the model's context); ``n_batch``: rows per step (at
    least n_slots; a long prompt advances by what the generating sequences leave of it, so that it
    never stalls them for long).  Not thread-safe: one thread drives a batch (the server's worker).
    """

    def __init__(self, model, n_slots: int = 4, n_ctx: int | None = None, n_batch: int | None = None):
        from .info import available_memory, size

        for name, value in (("n_slots", n_slots), ("n_ctx", n_ctx), ("n_batch", n_batch)):
            if value is not None and not is_int(value):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if not 1 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots must be in [1, {MAX_SLOTS}], got {n_slots}")
        n_ctx = model.n_ctx if n_ctx is None else int(n_ctx)
        n_batch = max(DEFAULT_BATCH_ROWS, n_slots) if n_batch is None else int(n_batch)
        if not 2 <= n_ctx <= model.n_ctx:
            raise ValueError(f"n_ctx per slot must be in [2, the model's {model.n_ctx}], got {n_ctx}")
        if n_batch < n_slots:
            raise ValueError(f"n_batch ({n_batch}) must be at least n_slots ({n_slots})")
        n_batch = min(n_batch, n_slots * n_ctx)  # (more rows than the slots hold are never used)
        eager, available = Rows.eager_bytes(model.args, n_slots, n_ctx, n_batch), available_memory()
        if available is not None and eager > available:  # before allocating
            raise MemoryError(f"a batch of {n_batch} rows needs about {size(eager)} of buffers; "
                              f"{size(available)} is available: use a smaller n_batch")
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.rows = Rows(model, n_slots, n_ctx, n_batch)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self._order: list[Sequence] = []       # running sequences, in the order they were added
        self._clock = 0

    # ----- sequences ----------------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> list[Sequence]:
        return list(self._order)

    def free_slots(self) -> int:
        return sum(s.seq is None for s in self.slots)

    def add(self, prompt: str | list[int], max_tokens: int | None = 64, sampler=None, *, stop=(), stop_ids=(),
            add_bos: bool | None = None, special: bool = False, context_shift: bool = False, n_keep: int = 4,
            truncate: bool = False, slot: int | None = None, tag=None, **sampling) -> Sequence:
        """Start a sequence in a free slot (``slot``, or the free slot holding the longest prefix of
        the prompt where that is at least half of the prompt or of what the slot holds, else the one
        unused the longest); its prompt is evaluated by the next steps.
        Options as ``Model.generate``'s, checked here (SlotsBusyError when no slot is free)."""
        from .sampling import make_sampler

        model = self.model
        sampler = make_sampler(sampler, sampling, model.args.n_vocab)
        max_tokens, end_ids, stops = check_generation(model.tokenizer, max_tokens, sampler, stop_ids, stop)
        check_n_keep(n_keep, self.n_ctx, context_shift=context_shift, truncate=truncate)
        ids = model.tokenize(prompt, add_bos=add_bos, special=special) if isinstance(prompt, str) \
            else model._check_ids(prompt).tolist()
        if truncate:
            want = self.n_ctx // 4 if max_tokens is None else max_tokens
            ids = truncate_prompt(ids, self.n_ctx, n_keep, room=max(1, min(want, self.n_ctx // 2)))
        return self._start(ids, max_tokens, sampler, end_ids, stops, n_keep if context_shift else None, slot, tag)

    def add_chat(self, messages, max_tokens: int | None = None, sampler=None, *, template: str | None = None,
                 stop=(), slot: int | None = None, tag=None, **sampling) -> Sequence:
        """Start the assistant's reply to ``messages``, as ``Model.chat`` does (the template's
        end-of-turn ends it; a full slot shifts its context, keeping the system prompt)."""
        from .sampling import make_sampler

        model = self.model
        sampler = make_sampler(sampler, sampling, model.args.n_vocab)
        ids, n_keep, eot = model.chat_prompt(messages, template, self.n_ctx)
        max_tokens, end_ids, stops = check_generation(model.tokenizer, max_tokens, sampler, eot, stop)
        return self._start(ids, max_tokens, sampler, end_ids, stops, n_keep, slot, tag)

    def _start(self, ids, max_tokens, sampler, end_ids, stops, n_keep, slot, tag) -> Sequence:
        from .model import ContextOverflowError

        ids = [int(t) for t in self.model._check_ids(ids)]
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but a slot's context holds {self.n_ctx}")
        chosen = self._choose(ids, slot)
        common = _common_prefix(chosen.tokens, ids, chosen.reusable())
        common = min(common, len(ids) - 1)  # the last prompt token is always evaluated: its logits are needed
        del chosen.tokens[common:]
        chosen.shifted = False
        seq = Sequence(ids, chosen.index, Continuation(self.model.tokenizer, ids, max_tokens, sampler, end_ids, stops),
                       common, n_keep, pending=ids[common:], started=time.perf_counter(), tag=tag)
        chosen.seq = seq
        self._clock += 1
        chosen.last_used = self._clock
        self._order.append(seq)
        return seq

    def choose_slot(self, ids: list[int]) -> int | None:
        """The slot ``add`` would pick for a prompt of these ids (None: none is free)."""
        free = [s for s in self.slots if s.seq is None]
        return self._choose(ids, None).index if free else None

    def _choose(self, ids: list[int], slot: int | None) -> _Slot:
        if slot is not None:
            if not (0 <= slot < len(self.slots)):
                raise GenerationError(f"slot must be in [0, {len(self.slots)}), got {slot!r}", param="slot")
            if self.slots[slot].seq is not None:
                raise SlotsBusyError(f"slot {slot} is busy")
            return self.slots[slot]
        free = [s for s in self.slots if s.seq is None]
        if not free:
            raise SlotsBusyError(f"all {len(self.slots)} slots are busy")
        # the longest reusable prefix where it is at least half of the prompt or of what the slot
        # holds (a chat's next turn, however long its new message), else the slot unused the
        # longest (as llama-server's slot_prompt_similarity, 0.5): a new chat sharing only the
        # template's first tokens with a conversation must not take its slot, and its context,
        # while an older slot is free
        def reuse(s: _Slot) -> int:
            common = _common_prefix(s.tokens, ids, s.reusable())
            return common if 2 * common >= min(len(ids), len(s.tokens)) else 0

        return max(free, key=lambda s: (reuse(s), -s.last_used))

    def remove(self, seq: Sequence) -> None:
        """Stop a sequence now and free its slot (what its slot has evaluated stays reusable)."""
        if seq.done:
            return
        seq.done = True
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        slot = self.slots[seq.slot]
        if slot.seq is seq:
            slot.seq = None
            self._clock += 1
            slot.last_used = self._clock
        if seq in self._order:
            self._order.remove(seq)

    # ----- stepping -----------------------------------------------------------------------------

    def step(self) -> list[tuple[Sequence, Chunk]]:
        """One pass over a batch of every generating sequence's next token and as many prompt tokens
        as fit in n_batch rows (sequences in the order they were added); the chunks it produced."""
        tokens, positions, slots, outputs = [], [], [], []
        for seq in self._order:
            if seq.next_token is not None:
                slot = self.slots[seq.slot]
                outputs.append((seq, len(tokens)))
                tokens.append(seq.next_token)
                positions.append(len(slot.tokens))
                slots.append(slot.index)
        room = self.n_batch - len(tokens)
        prompted = []
        for seq in self._order:
            if seq.pending and room > 0:
                take = seq.pending[:room]
                start = len(self.slots[seq.slot].tokens)
                tokens += take
                positions += range(start, start + len(take))
                slots += [seq.slot] * len(take)
                room -= len(take)
                prompted.append((seq, len(take)))
                if len(take) == len(seq.pending):
                    outputs.append((seq, len(tokens) - 1))
        if not tokens:
            return []
        out_rows = [row for _, row in outputs]
        logits = self.rows.forward(tokens, positions, slots, out_rows)
        # the slots now hold these tokens
        for seq in self._order:
            if seq.next_token is not None:
                self.slots[seq.slot].tokens.append(seq.next_token)
                seq.next_token = None
        for seq, n in prompted:
            self.slots[seq.slot].tokens += seq.pending[:n]
            del seq.pending[:n]
        events: list[tuple[Sequence, Chunk]] = []
        for i, (seq, _) in enumerate(outputs):
            try:
                self._advance(seq, logits[i], events)
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as e:  # noqa: B036  its sampler or detokenizer failed: it ends, the others go on
                seq.error = e
                seq.done = True
                self._release(seq)
        return events

    def _advance(self, seq: Sequence, logits: np.ndarray, events: list) -> None:
        """What a sequence does with the logits of its last evaluated token (generate_tokens' loop)."""
        now = time.perf_counter()
        if seq.prompt_done is None:
            seq.prompt_done = now
        rules = seq.rules
        chunk = rules.next(logits) if rules.room else None
        if chunk is not None:
            seq.chunks.append(chunk)
            events.append((seq, chunk))
            if not rules.stopped_by_string and self._room_after(seq) and rules.room:
                seq.next_token = chunk.token
                return
        last = rules.last(seq.cached, seq.prompt_done - seq.started, time.perf_counter() - seq.prompt_done)
        seq.chunks.append(last)
        events.append((seq, last))
        seq.done = True
        self._release(seq)

    def _room_after(self, seq: Sequence) -> bool:
        """Whether the slot has room for the next token: a full one shifts its context when the
        sequence asked for it, or ends the sequence."""
        slot = self.slots[seq.slot]
        n_past = len(slot.tokens)
        if n_past < self.n_ctx:
            return True
        if seq.n_keep is None:
            return False
        n_discard = (n_past - seq.n_keep) // 2
        self.rows.shift(slot.index, n_past, seq.n_keep, n_discard)
        del slot.tokens[seq.n_keep:seq.n_keep + n_discard]
        slot.shifted, slot.n_keep = True, seq.n_keep
        self.model.n_shifted += n_discard
        return True

    def stream(self) -> Iterator[tuple[Sequence, Chunk]]:
        """Step until every sequence has finished, yielding each chunk as it comes; a sequence whose
        sampling failed raises its error (after the others' chunks of that step)."""
        while self._order:
            running = list(self._order)
            yield from self.step()
            for seq in running:
                if seq.error is not None:
                    raise seq.error

    def status(self) -> list[dict]:
        """What each slot holds and does (no token contents)."""
        out = []
        for s in self.slots:
            seq = s.seq
            out.append({"id": s.index, "n_ctx": self.n_ctx, "n_cached": len(s.tokens),
                        "state": "idle" if seq is None else seq.state,
                        "n_prompt_tokens": len(seq.prompt_ids) if seq else 0,
                        "n_prompt_pending": len(seq.pending) if seq else 0,
                        "n_decoded": seq.rules.produced if seq else 0})
        return out


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b):
        if x != y:
            break
        n += 1
    return n


class Generated(str):
    """The text ``generate_many`` produced for one prompt, with its chunks (token ids, logprobs),
    finish_reason and usage."""

    chunks: list[Chunk]

    def __new__(cls, chunks: list[Chunk]):
        self = super().__new__(cls, "".join(chunks))
        self.chunks = chunks
        return self

    @property
    def tokens(self) -> list[int]:
        return [c.token for c in self.chunks if c.token is not None]

    @property
    def logprobs(self) -> list[float | None]:
        return [c.logprob for c in self.chunks if c.token is not None]

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].finish_reason

    @property
    def usage(self):
        return self.chunks[-1].usage


def generate_many(model, prompts: Iterable[str | list[int]], max_tokens: int | None = 64, *, parallel: int = 4,
                  n_ctx: int | None = None, n_batch: int | None = None, **options) -> list[Generated]:
    """Generate for every prompt, ``parallel`` (at most MAX_SLOTS) at a time in one batch (see Batch.add for the
    options; sampling settings make one Sampler per prompt, so a seed gives each prompt the draws
    it gets alone).  Results in the order of ``prompts``, each the same as the prompt run alone."""
    if not (is_int(parallel) and parallel >= 1):
        raise GenerationError(f"parallel must be an integer >= 1, got {parallel!r}", param="parallel")
    prompts = list(prompts)
    if "sampler" in options:
        raise GenerationError("generate_many makes one Sampler per prompt from the sampling settings: pass "
                              "them as keywords, not a sampler", param="sampler")
    results: list[Generated | None] = [None] * len(prompts)
    if not prompts:
        return []
    batch = Batch(model, n_slots=max(1, min(parallel, len(prompts), MAX_SLOTS)), n_ctx=n_ctx, n_batch=n_batch)
    waiting = list(enumerate(prompts))
    while waiting or batch.active:
        while waiting and batch.free_slots():
            index, prompt = waiting.pop(0)
            batch.add(prompt, max_tokens, tag=index, **options)
        running = batch.active
        for seq, chunk in batch.step():
            if seq.done:
                results[seq.tag] = Generated(seq.chunks)
        for seq in running:
            if seq.error is not None:
                raise seq.error
    return results  # type: ignore[return-value]
