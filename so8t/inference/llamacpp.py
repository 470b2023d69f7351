"""A GGUF file in llama.cpp, where the quantised model is served: :class:`LlamaCppBackend` and :class:`GreedyBatch`.

Several sequences share one context (``n_seq_max``, a unified KV cache) and are decoded
together in one ``llama_batch``; logits are computed only at the positions that are read
(``batch.logits[i]``), never for a whole prompt. Generation is greedy under the rules of
:mod:`so8t.inference.decoding` (the CTRL repetition penalty is applied here to llama.cpp's
logits, since llama.cpp's own sampler would see only the generated tokens), continuously
batched by :class:`GreedyBatch`. Scoring (:meth:`LlamaCppBackend.score`) evaluates each
prefix once and its continuations in sequences that share the prefix's cells; perplexity
(:meth:`LlamaCppBackend.token_logprobs`) decodes in chunks of :data:`~so8t.inference.types.CHUNK`
tokens so at most ``CHUNK x V`` floats exist at once.
"""

from __future__ import annotations

import collections
import ctypes
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from so8t.inference.decoding import _Sequence, log_softmax_rows, penalize
from so8t.inference.types import (
    CHUNK,
    MAX_SEQ_PER_TOKEN,
    SCORE_TOKENS,
    Generation,
    InferenceError,
    Progress,
    Throughput,
)


class GreedyBatch:
    """Greedy decoding of sequences that join and leave between steps (continuous batching).

    Made by :meth:`LlamaCppBackend.greedy_batch`. Each :meth:`step` is one ``llama_decode`` pass
    (or a few, when prompts exceed ``n_batch`` tokens) with one token of every running sequence,
    plus the whole prompt of each waiting sequence that found a free slot: a sequence that ends
    (end-of-generation token, stop string, its budget, a full context, :meth:`cancel`) frees its
    cells, and the next waiting prompt is prefilled into its slot in the same call, so the batch
    stays full and no sequence is decoded past its end. While nothing waits, the last sequences
    move down to the lowest free slots (a cross-stream copy of the cache), since llama.cpp
    evaluates sequences with non-consecutive ids in separate passes over the weights. This is the
    scheme of llama.cpp's own server (``tools/server``: slots, one batch per step).

    Not thread-safe: one thread owns the batch (and its backend) and calls :meth:`add`,
    :meth:`cancel` and :meth:`step`.
    """

    def __init__(self, backend, ctx, n_slots: int, n_ctx_seq: int, stops: Sequence[str], repetition_penalty: float,
                 prefill_tokens: int | None = None):
        self.backend, self.ctx, self.n_ctx_seq = backend, ctx, n_ctx_seq
        #: Prompt tokens admitted per step (at least one prompt; ``None``: every waiting prompt that
        #: finds a slot). A server caps it so one step never holds other work up for long.
        self.prefill_tokens = prefill_tokens
        self.stops, self.repetition_penalty = tuple(stops), repetition_penalty
        self.slots: list[object | None] = [None] * n_slots
        self.waiting: collections.deque = collections.deque()  # (key, prompt, max_new_tokens), first in first out
        self.states: dict[object, _Sequence] = {}
        self.pending: dict[int, int] = {}  # slot -> token to feed next
        self._ready: list[tuple[object, str, _Sequence]] = []  # ended without a decode (zero budget, cancelled)

    @property
    def idle(self) -> bool:
        """Nothing waits, runs or has an event to report."""
        return not self.waiting and not self.pending and not self._ready

    def add(self, key, prompt: list[int], max_new_tokens: int) -> None:
        """Queue ``prompt`` (token ids) under ``key`` (any hashable, unique among running ones).

        Raises:
            InferenceError: an empty prompt, or one that does not fit the context.
        """
        self.backend.check_prompt(prompt)
        if len(prompt) >= self.n_ctx_seq:
            raise InferenceError(f"prompt of {len(prompt)} tokens does not fit the batch's {self.n_ctx_seq} tokens")
        self.waiting.append((key, prompt, max_new_tokens))

    def cancel(self, key) -> bool:
        """Stop ``key`` now (waiting or running); its state is reported by the next :meth:`step` with
        ``stop`` set to ``"cancelled"``. Returns whether it was found."""
        for item in list(self.waiting):
            if item[0] == key:
                self.waiting.remove(item)
                st = self.states[key] = _Sequence(item[1], self.stops, 0)
                st.stop = "cancelled"
                self._ready.append((key, "", st))
                return True
        for slot, k in enumerate(self.slots):
            if k == key:
                st = self.states[key]
                st.done, st.stop = True, "cancelled"
                self._free(slot)
                self._ready.append((key, "", st))
                return True
        return False

    def _free(self, slot: int) -> None:
        self.backend._llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot, -1, -1)
        self.slots[slot] = None
        self.pending.pop(slot, None)

    def step(self, admit: bool = True) -> list[tuple[object, str, _Sequence]]:
        """Admit waiting prompts into free slots (unless ``admit`` is false), decode one token of every
        running sequence.

        Returns:
            ``(key, new text, state)`` of every sequence with new final text or that ended
            (``state.done``); an ended key is forgotten.

        Raises:
            InferenceError: a failed decode.
        """
        b = self.backend
        events, self._ready = self._ready, []
        items: list[tuple[int, int, int, bool]] = []
        admitted = 0
        for slot in range(len(self.slots)):
            budget_left = self.prefill_tokens is None or admitted == 0 or (
                self.waiting and admitted + len(self.waiting[0][1]) <= self.prefill_tokens)
            if admit and self.slots[slot] is None and self.waiting and budget_left:
                key, p, budget = self.waiting.popleft()
                admitted += len(p)
                st = self.states[key] = _Sequence(p, self.stops, budget)
                if st.done:  # a zero budget
                    events.append((key, "", st))
                    continue
                self.slots[slot] = key
                items += [(t, j, slot, j == len(p) - 1) for j, t in enumerate(p)]
            elif slot in self.pending:
                st = self.states[self.slots[slot]]
                items.append((self.pending.pop(slot), st.prompt_len + len(st.tokens) - 1, slot, True))
        for s0 in range(0, len(items), b.n_batch):
            part = items[s0 : s0 + b.n_batch]
            b._decode(part, self.ctx)
            for j, (_, _, slot, wants) in enumerate(part):
                if not wants:
                    continue
                key = self.slots[slot]
                st = self.states[key]
                row = b._row(j, self.ctx).astype(np.float32)
                tok = int(np.argmax(penalize(row, st.seen, self.repetition_penalty)))
                new = st.push(tok, b._piece_bytes(tok), b._is_eog(tok))
                if not st.done and st.prompt_len + len(st.tokens) >= self.n_ctx_seq:
                    st.done = True  # the context is full: it ends like a generation that hit its budget
                    new += st._flush()
                if new or st.done:
                    events.append((key, new, st))
                if st.done:
                    self._free(slot)
                else:
                    self.pending[slot] = tok
        if not self.waiting:  # compact: the highest busy slots move into the lowest free ones
            while True:
                busy = [k for k in range(len(self.slots)) if self.slots[k] is not None]
                idle = [k for k in range(len(self.slots)) if self.slots[k] is None]
                if not busy or not idle or idle[0] > busy[-1]:
                    break
                src, dst = busy[-1], idle[0]
                b._llama_cpp.llama_memory_seq_cp(self.ctx.memory, src, dst, -1, -1)
                self.slots[dst] = self.slots[src]
                if src in self.pending:
                    self.pending[dst] = self.pending.pop(src)
                self._free(src)
        for key, _, st in events:
            if st.done:
                self.states.pop(key, None)
        return events


class LlamaCppBackend:
    """A GGUF file in llama.cpp, decoding several sequences per ``llama_decode`` call.

    Args:
        path: the ``.gguf`` file.
        n_ctx: context window of one sequence (tokens).
        n_threads: llama.cpp threads (keep at or below the free cores: an oversubscribed
            2-core machine drops to ~1 token/s).
        batch_size: sequences decoded together (prompts per batch; a scoring request
            takes one sequence plus one per continuation).
        n_gpu_layers: layers offloaded to a GPU when llama.cpp was built with one (0 = CPU; -1 = all
            layers when the build supports offloading, else none).
        flash_attn: let llama.cpp use flash attention (faster on long contexts and GPUs, but on
            CPU it accumulates in float16, so scores depend on the batch's composition).

    Raises:
        InferenceError: the file is missing or llama.cpp cannot load it.
    """

    kind = "gguf"

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 1024,
        n_threads: int = 1,
        batch_size: int = 8,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log lines only for errors
        self.path = Path(path)
        if not self.path.is_file():
            raise InferenceError(f"{self.path}: GGUF file not found (run the quantize stage)")
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.batch_size = batch_size
        # A scoring request uses one sequence for its prefix and one per continuation (3 labels).
        self.n_seq = max(1, batch_size) * 4
        mparams = llama_cpp.llama_model_default_params()
        if n_gpu_layers < 0:  # all layers where the build can offload, none where it cannot
            n_gpu_layers = 999 if llama_cpp.llama_supports_gpu_offload() else 0
        mparams.n_gpu_layers = n_gpu_layers
        try:
            self.model = LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        except ValueError as e:
            raise InferenceError(f"{self.path}: llama.cpp cannot load it: {e}") from None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * max(1, batch_size) + 64 * self.n_seq
        cparams.n_batch = max(512, n_ctx)
        cparams.n_ubatch = 512
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = True  # continuations share their prefix's cells
        cparams.swa_full = True  # sequence copies and truncation work on sliding-window layers too
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # llama.cpp's CPU flash attention accumulates in float16: the same request then scored
        # ~2e-4 nats differently alone and in a batch (tiny Gemma 3, float32 GGUF); without it, 1e-7.
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = LlamaContext(model=self.model, params=cparams, verbose=False)
        self.n_vocab = self.model.n_vocab()
        self.n_batch = int(cparams.n_batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, MAX_SEQ_PER_TOKEN)
        self._llama_cpp = llama_cpp
        self._gen = None  # (n_seq, n_ctx_seq, context) of batched generation, made on first use
        self.stats = Throughput()
        self.metadata = self.model.metadata()

    # ---------------------------------------------------------------- tokens

    def tokenize(self, text: str) -> list[int]:
        """Token ids of (chat-template-rendered) text: control tokens parsed, no BOS added."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def special_tokens(self) -> dict[str, int]:
        """``{spelling: id}`` of every control, user-defined and unknown token of the vocabulary
        (``<start_of_turn>``, ``<unused12>``...): text that becomes one of them when control tokens are parsed."""
        lc = self._llama_cpp
        kinds = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_UNKNOWN
        ids = (t for t in range(self.n_vocab) if lc.llama_vocab_get_attr(self.model.vocab, t) & kinds)
        return {p: t for t in ids if (p := self.piece(t)).strip()}

    def piece(self, token: int, special: bool = True) -> str:
        """The text of one token (control tokens spelled out when ``special``)."""
        return self.model.token_to_piece(token, special=special).rstrip(b"\0").decode("utf-8", errors="replace")

    def _piece_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of a token as text (control tokens give ``b""``)."""
        buf = (ctypes.c_char * 64)()
        n = self._llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, 64, 0, False)
        return bytes(buf[: max(n, 0)])

    def _is_eog(self, token: int) -> bool:
        """An end-of-generation token of the vocabulary (EOS, end of turn)."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self.model.vocab, token))

    # ---------------------------------------------------------------- batches

    def _clear(self, ctx=None) -> None:
        self._llama_cpp.llama_memory_clear((ctx or self.ctx).memory, True)

    def _decode(self, items: list[tuple[int, int, int | tuple[int, ...], bool]], ctx=None) -> None:
        """Decode ``(token, position, sequence or sequences, wants_logits)`` items in one call (at most
        ``n_batch``) in ``ctx`` (default: the scoring context)."""
        b = self._batch
        for j, (tok, pos, seq, out) in enumerate(items):
            b.token[j] = tok
            b.pos[j] = pos
            if isinstance(seq, tuple):
                b.n_seq_id[j] = len(seq)
                for m, s in enumerate(seq):
                    b.seq_id[j][m] = s
            else:
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq
            b.logits[j] = out
        b.n_tokens = len(items)
        rc = self._llama_cpp.llama_decode((ctx or self.ctx).ctx, b)
        if rc != 0:
            raise InferenceError(f"{self.path.name}: llama_decode returned {rc} ({len(items)} tokens)")

    def _row(self, i: int, ctx=None) -> np.ndarray:
        """A view of the logits of batch item ``i`` of the last decode (valid until the next decode)."""
        ptr = self._llama_cpp.llama_get_logits_ith((ctx or self.ctx).ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # ---------------------------------------------------------------- generation

    def _generation_context(self, n_seq: int, n_ctx_seq: int):
        """The llama.cpp context of batched generation: ``n_seq`` sequences, each in its own KV stream.

        With ``kv_unified`` off every sequence has a cache of its own (``n_ctx_seq`` cells), so a
        generated token attends to its own sequence's cells only. In the unified scoring context
        each token's attention spans every cell in use (``n_kv`` is the highest used cell, over all
        sequences): 8 RAG answers of ~400 tokens made each token attend to ~3,200 cells, as much
        arithmetic as the rest of the decoder. The context is kept and reused while it is big enough.
        """
        n_ctx_seq = -(-n_ctx_seq // 256) * 256  # llama.cpp pads each stream to 256 cells
        if self._gen is not None and self._gen[0] >= n_seq and self._gen[1] >= n_ctx_seq:
            return self._gen[2], self._gen[1]
        from llama_cpp._internals import LlamaContext

        if self._gen is not None:
            self._gen[2].close()
            self._gen = None
        lc = self._llama_cpp
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False
        cparams.swa_full = True  # sequence removal and cross-stream copies on sliding-window layers
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = LlamaContext(model=self.model, params=cparams, verbose=False)
        self._gen = (n_seq, n_ctx_seq, ctx)
        return ctx, n_ctx_seq

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise :class:`InferenceError` for a prompt that cannot be generated from (empty, or ``>= n_ctx`` tokens)."""
        if not prompt:
            raise InferenceError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise InferenceError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")

    def greedy_batch(
        self, n_slots: int, n_ctx_seq: int, stops: Sequence[str] = (), repetition_penalty: float = 1.0,
        prefill_tokens: int | None = None,
    ) -> GreedyBatch:
        """A :class:`GreedyBatch` of ``n_slots`` sequences of up to ``n_ctx_seq`` tokens (prompt + answer).

        One slot decodes in the scoring context; more get the generation context (one KV stream per
        sequence, :meth:`_generation_context`). Scoring between two :meth:`GreedyBatch.step` calls is
        safe with several slots only (the contexts are then separate).
        """
        n_slots = max(1, n_slots)
        if n_slots == 1:
            ctx, n_ctx_seq = self.ctx, self.n_ctx
        else:
            ctx, n_ctx_seq = self._generation_context(n_slots, min(self.n_ctx, n_ctx_seq))
            n_ctx_seq = min(n_ctx_seq, self.n_ctx)
        self._clear(ctx)
        return GreedyBatch(self, ctx, n_slots, n_ctx_seq, stops, repetition_penalty, prefill_tokens)

    def _greedy(
        self, prompts: list[list[int]], max_new_tokens: int, stops: Sequence[str], repetition_penalty: float
    ) -> Iterator[tuple[int, str, _Sequence]]:
        """Greedy decoding of ``prompts`` with continuous batching; yields ``(index, new text, state)``.

        Up to ``batch_size`` sequences decode together (:class:`GreedyBatch`). Prompts start longest
        first (the longest-processing-time rule), which shortens the tail where the batch runs
        part-empty. Every sequence's tokens depend only on its own prompt: the batch changes
        rounding, not the algorithm.

        Raises:
            InferenceError: an empty prompt, one that does not fit ``n_ctx``, or a failed decode.
        """
        for p in prompts:
            self.check_prompt(p)
        if not prompts:
            return
        n_slots = max(1, min(self.batch_size, len(prompts)))
        batch = self.greedy_batch(n_slots, max(map(len, prompts)) + max_new_tokens + 1, stops, repetition_penalty)
        for i in sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)):
            batch.add(i, prompts[i], max_new_tokens)
        t0 = time.perf_counter()
        states: dict[int, _Sequence] = {}
        while not batch.idle:
            for i, new, st in batch.step():
                states[i] = st
                yield i, new, st
        self.stats.generated_tokens += sum(len(s.tokens) for s in states.values())
        self.stats.generation_seconds += time.perf_counter() - t0

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stops: Sequence[str] = (),
        repetition_penalty: float = 1.0,
        on_progress: Progress | None = None,
    ) -> list[Generation]:
        """Greedy continuations of token-id prompts, continuously batched (see :meth:`_greedy`).

        ``on_progress`` is called with 1 as each sequence ends. A generation's ``seconds`` is the
        call's wall time shared out by generated tokens.

        Raises:
            InferenceError: a prompt does not fit ``n_ctx``, or a decode fails.
        """
        t0 = time.perf_counter()
        states: dict[int, _Sequence] = {}
        for i, _, st in self._greedy(prompts, max_new_tokens, stops, repetition_penalty):
            if st.done and i not in states and on_progress is not None:
                on_progress(1)
            if st.done:
                states[i] = st
        seconds = time.perf_counter() - t0
        total = max(sum(len(s.tokens) for s in states.values()), 1)
        out = []
        for i, p in enumerate(prompts):
            st = states.get(i) or _Sequence(p, stops, 0)
            out.append(Generation(st.text, st.stop, len(st.tokens), seconds * len(st.tokens) / total, len(p)))
        return out

    def stream(
        self, prompt: list[int], max_new_tokens: int, stops: Sequence[str] = (), repetition_penalty: float = 1.0
    ) -> Iterator[str]:
        """The greedy continuation of one prompt as text pieces, as :meth:`generate` would produce it.

        The pieces join to :attr:`Generation.text` followed by the stop string that ended it, if
        any; text that might begin a stop string is held back until it is known not to.
        """
        state = None
        for _, new, state in self._greedy([prompt], max_new_tokens, stops, repetition_penalty):
            if new:
                yield new
        if state is not None and state.stop:
            yield state.stop

    # ---------------------------------------------------------------- scoring

    def _score_chunks(self, requests: list[tuple[list[int], list[list[int]]]]) -> Iterator[list]:
        """Consecutive groups of scoring requests: at most ``batch_size`` (and ``n_seq // 4``) requests
        holding at most :data:`SCORE_TOKENS` prefix tokens together (a longer request goes alone).
        The unified cache makes every token attend to all cells in use, so long prompts (retrieved
        passages) go a few at a time."""
        per = max(1, min(self.batch_size, self.n_seq // 4))
        chunk: list = []
        tokens = 0
        for r in requests:
            if chunk and (len(chunk) >= per or tokens + len(r[0]) > SCORE_TOKENS):
                yield chunk
                chunk, tokens = [], 0
            chunk.append(r)
            tokens += len(r[0])
        if chunk:
            yield chunk

    def score(self, requests: list[tuple[list[int], list[list[int]]]], on_progress: Progress | None = None):
        """Summed log-likelihoods (nats) of continuations after a shared prefix, per request.

        One decode call per group of requests (:meth:`_score_chunks`): each prefix token
        belongs to its request's sequence and to one sequence per continuation longer than
        one token (llama.cpp's shared-prefix cells), and the continuation tokens follow in
        their own sequences in the same call, so they attend to the prefix without a copy or a
        second pass over the weights. Logits are computed only at the prefix's last token and
        at the continuation tokens.

        Args:
            requests: ``(prefix ids, [continuation ids, ...])``; continuations non-empty.

        Returns:
            ``list[list[float]]``, one score per continuation.
        """
        out: list[list[float]] = []
        for chunk in self._score_chunks(requests):
            t0 = time.perf_counter()
            self._clear()
            pre, pre_tags, cont, cont_tags = [], [], [], []
            next_seq = 0
            for i, (prefix, sufs) in enumerate(chunk):
                if not prefix:
                    raise InferenceError("empty prompt")
                if len(prefix) >= self.n_ctx:
                    raise InferenceError(f"prompt of {len(prefix)} tokens does not fit the context of {self.n_ctx}")
                seqs = [next_seq]
                for k, suf in enumerate(sufs):
                    if len(suf) < 2:
                        continue
                    seq = next_seq + len(seqs)
                    seqs.append(seq)
                    cont += [(tok, len(prefix) + j, seq, True) for j, tok in enumerate(suf[:-1])]
                    cont_tags += [(i, k, suf[j + 1]) for j in range(len(suf) - 1)]
                if len(seqs) > MAX_SEQ_PER_TOKEN or next_seq + len(seqs) > self.n_seq:
                    raise InferenceError(f"too many continuations for n_seq_max={self.n_seq}")
                pre += [(t, j, tuple(seqs), j == len(prefix) - 1) for j, t in enumerate(prefix)]
                pre_tags.append((i, None, None))
                next_seq += len(seqs)
            items, tags = pre + cont, iter(pre_tags + cont_tags)
            scores = [[0.0] * len(sufs) for _, sufs in chunk]
            for s0 in range(0, len(items), self.n_batch):
                part = items[s0 : s0 + self.n_batch]
                self._decode(part)
                for r in (j for j, item in enumerate(part) if item[3]):
                    i, k, target = next(tags)
                    logp = log_softmax_rows(self._row(r)[None])[0]
                    if k is None:  # the prefix's last token: every continuation's first token
                        for kk, suf in enumerate(chunk[i][1]):
                            scores[i][kk] += float(logp[suf[0]])
                    else:
                        scores[i][k] += float(logp[target])
            out += scores
            self.stats.prompt_tokens += sum(len(p) for p, _ in chunk)
            self.stats.prompt_seconds += time.perf_counter() - t0
            self.stats.scored_requests += len(chunk)
            self.stats.scoring_seconds += time.perf_counter() - t0
            if on_progress is not None:
                on_progress(len(chunk))
        return out

    def logits_at(self, sequences: list[list[int]], positions: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Logits at chosen positions of each sequence, computed only there (LM head included).

        Each sequence is decoded from an empty cache in chunks of :data:`CHUNK` tokens,
        stopping after its last requested position.

        Args:
            sequences: token ids per example.
            positions: ascending int positions per example (row ``t`` predicts token ``t + 1``).

        Yields:
            ``(n, V)`` float32 logits of the requested positions of one chunk; over all steps,
            every requested position of every sequence in order. The array is a view of
            llama.cpp's buffer, valid until the next step.

        Raises:
            InferenceError: a sequence longer than the context, or a failed decode.
        """
        for e, (ids, pos) in enumerate(zip(sequences, positions)):
            if len(pos) == 0:
                continue
            if len(ids) > self.n_ctx:
                raise InferenceError(f"example {e}: {len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
            want = np.zeros(len(ids), dtype=bool)
            want[pos] = True
            self._clear()
            last = int(pos[-1])
            for start in range(0, last + 1, CHUNK):
                piece = ids[start : min(start + CHUNK, last + 1)]
                flags = want[start : start + len(piece)]
                self._decode([(t, start + j, 0, bool(flags[j])) for j, t in enumerate(piece)])
                n_out = int(flags.sum())
                if n_out:
                    # Requested rows are stored contiguously in batch order.
                    ptr = self._llama_cpp.llama_get_logits(self.ctx.ctx)
                    yield np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """``log p(ids[t] | ids[:t])`` for t = 1..n-1 (float64), from llama.cpp's own logits.

        Raises:
            InferenceError: the sequence exceeds ``n_ctx``.
        """
        positions = np.arange(len(ids) - 1)
        out = []
        start = 0
        for rows in self.logits_at([ids], [positions]):
            n = len(rows)
            targets = np.asarray(ids[start + 1 : start + 1 + n])
            m = rows.max(-1, keepdims=True)
            lse = m[:, 0].astype(np.float64) + np.log(np.exp(rows - m).sum(-1, dtype=np.float64))
            out.append(rows[np.arange(n), targets].astype(np.float64) - lse)
            start += n
        return np.concatenate(out) if out else np.zeros(0)

    def n_params(self) -> int:
        """Parameters of the model (llama.cpp's count)."""
        return int(self.model.n_params())

    def close(self) -> None:
        """Free the llama.cpp batch, context and model now (not at interpreter shutdown)."""
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._gen is not None:
            self._gen[2].close()
            self._gen = None
        self.ctx.close()
        self.model.close()


__all__ = ["GreedyBatch", "LlamaCppBackend"]
