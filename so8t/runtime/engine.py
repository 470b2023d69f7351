"""One model, many requests: a scheduler thread that batches the work of concurrent requests.

llama.cpp runs one ``llama_decode`` at a time per model, so concurrent requests must share
it. :class:`BatchingModel` wraps a :class:`so8t.runtime.model.BackendChatModel` and hands every
decision and every generation to one scheduler thread, which

* scores the decisions of waiting requests together (:func:`so8t.inference.scoring.score_labels`,
  several sequences per ``llama_decode``), first come first scored, a chunk of at most
  ``batch_size`` requests and :data:`PREFILL_TOKENS` prompt tokens at a time;
* runs the answers of all allowed requests in one :class:`so8t.inference.llamacpp.GreedyBatch`
  (continuous batching, as llama.cpp's own server does): a new answer joins at the next step
  (at most :data:`PREFILL_TOKENS` prompt tokens admitted per step), a finished or cancelled one
  leaves and frees its slot;
* alternates the two, a chunk of decisions then one generation step, so a DENY (scoring only)
  never waits for a long answer to finish, and answers keep moving while decisions arrive; a new
  answer's prompt pass waits until no decision does (decisions first).

Every wait of a request thread honours its :class:`Cancellation` (a deadline, or a client that
went away): the request's sequence is removed from the batch and :class:`RequestCancelled` is
raised in the request's thread. A Hugging Face backend (a model folder) has no step-level
batch: its answers run one at a time in the scheduler thread, decisions still batched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np

from so8t.errors import So8tError
from so8t.inference import InferenceError, score_labels
from so8t.runtime.model import ModelError

#: How often a waiting request thread looks at its cancellation (seconds).
POLL_S = 0.05
#: Prompt tokens a generation step admits (at least one prompt): a step that prefilled 8 new answers
#: at once (~2,000 tokens, ~6 s on 2 cores) held every waiting decision up that long.
PREFILL_TOKENS = 512


class EngineError(So8tError, RuntimeError):
    """The server's model failed or is shutting down (not the request's fault: a 503 over HTTP)."""


class RequestCancelled(So8tError, RuntimeError):
    """The request was stopped before it finished: ``reason`` is ``"timeout"`` or ``"disconnected"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Cancellation:
    """A request's deadline and cancel switch, checked by every wait of the request.

    Args:
        timeout_s: seconds from now until the request times out (``None``: never).
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str = "disconnected") -> None:
        """Stop the request (from any thread): its next wait raises :class:`RequestCancelled`."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel("timeout")
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`RequestCancelled` once cancelled or past the deadline."""
        if self.cancelled:
            if self.reason == "timeout":
                raise RequestCancelled("timeout", f"request timed out after {self.timeout_s:g} s "
                                                  "(runtime.server.request_timeout_s)")
            raise RequestCancelled(self.reason or "disconnected", "request cancelled: the client disconnected")


class _Job:
    """A unit of work for the scheduler: a decision (``context``) or a generation (``ids``)."""

    def __init__(self, kind: str, cancel: Cancellation | None, **kw) -> None:
        self.kind, self.cancel = kind, cancel
        self.future: Future = Future()  # decision: (3,) logits
        self.pieces: queue.Queue = queue.Queue()  # generation: str pieces, then None (end) or an exception
        self.__dict__.update(kw)


class BatchingModel:
    """A :class:`so8t.runtime.model.ChatModel` whose requests from many threads share one batch.

    Thread-safe: :meth:`decision_logits` and :meth:`generate` may be called from any number of
    threads at once (the agent then needs no lock of its own, :attr:`concurrent`).

    Args:
        model: a :class:`so8t.runtime.model.BackendChatModel`; its backend is used by the
            scheduler thread only from now on.
        batch_size: answers decoded together and decisions scored together (``generation.batch_size``).
        n_ctx_seq: tokens of one answer's sequence, prompt included (``runtime.n_ctx``).
    """

    concurrent = True

    def __init__(self, model, batch_size: int = 8, n_ctx_seq: int | None = None) -> None:
        self.inner = model
        self.backend = model.backend
        self.model_id, self.model_sha256, self.control_tokens = model.model_id, model.model_sha256, model.control_tokens
        self.batch_size = max(1, batch_size)
        self.n_ctx_seq = n_ctx_seq or getattr(self.backend, "n_ctx", 2048)
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._batch = None
        self._running: dict[int, _Job] = {}
        self._scores: list[_Job] = []
        self.stats = {"decisions": 0, "decision_batches": 0, "generations": 0, "steps": 0, "max_running": 0}
        self._thread = threading.Thread(target=self._loop, name="so8t-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ ChatModel (request threads)

    def render(self, messages: list[dict]) -> str:
        return self.inner.render(messages)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def decision_logits(self, context: str, cancel: Cancellation | None = None) -> np.ndarray:
        """``(3,)`` label log-likelihoods of ``context`` (see :meth:`BackendChatModel.decision_logits`),
        scored in one batch with the other waiting requests.

        Raises:
            ModelError: the context does not fit; RequestCancelled: ``cancel`` fired first;
            EngineError: the model failed or is shut down.
        """
        self._check_alive()  # before tokenising: a closed model's vocabulary is freed
        job = self._submit(_Job("decide", cancel, context=context, n_tokens=self.inner.count_tokens(context)))
        while True:
            try:
                return job.future.result(timeout=POLL_S)
            except TimeoutError:
                if cancel is not None and cancel.cancelled:
                    self._inbox.put(("cancel", job))
                    cancel.check()
                if not self._thread.is_alive():
                    raise EngineError("the model's scheduler stopped") from None

    def generate(self, prompt: str, max_new_tokens: int, cancel: Cancellation | None = None) -> Iterator[str]:
        """Greedy continuation pieces of ``prompt``, decoded in the shared batch.

        Closing the iterator early (or ``cancel`` firing) removes the sequence from the batch.

        Raises:
            ModelError: the prompt does not fit the context; RequestCancelled: ``cancel`` fired;
            EngineError: the model failed or is shut down.
        """
        self._check_alive()
        ids = self.backend.tokenize(prompt)
        if len(ids) + 8 > self.n_ctx_seq:
            raise ModelError(f"prompt of {len(ids)} tokens does not fit runtime.n_ctx={self.n_ctx_seq}")
        budget = min(max_new_tokens, self.n_ctx_seq - len(ids) - 1)
        job = self._submit(_Job("generate", cancel, ids=ids, budget=budget))
        finished = False
        try:
            while True:
                if cancel is not None:
                    cancel.check()
                try:
                    item = job.pieces.get(timeout=POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise EngineError("the model's scheduler stopped") from None
                    continue
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self._inbox.put(("cancel", job))

    def close(self) -> None:
        """Stop the scheduler (requests still waiting get an :class:`EngineError`) and free the model
        (only once the scheduler has left its last ``llama_decode``)."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self.inner.close()

    @property
    def alive(self) -> bool:
        """The scheduler thread runs (``/healthz`` reports it)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineError("the model is shut down")

    def _submit(self, job: _Job) -> _Job:
        self._check_alive()
        if job.cancel is not None:
            job.cancel.check()
        self._inbox.put(("job", job))
        return job

    # ------------------------------------------------------------ scheduler thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = bool(self._scores) or (self._batch is not None and not self._batch.idle)
                self._drain(block=not busy)
                if self._scores:
                    self._score_chunk()
                if self._batch is not None and not self._batch.idle:
                    # Decisions first: a new answer's prompt pass waits until no decision does (a
                    # DENY is scored and done; running answers still get their next token).
                    self._step(admit=not self._scores)
            except Exception as e:  # noqa: BLE001 - the thread must outlive any one failure
                self._fail_all(EngineError(f"the model failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineError("the server is shutting down"))
        while True:  # jobs that arrived meanwhile
            try:
                kind, job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "job":
                self._fail(job, EngineError("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        """Fail every waiting and running job; the next answer starts a new batch."""
        for job in self._scores + list(self._running.values()):
            self._fail(job, error)
        self._scores, self._running, self._batch = [], {}, None

    def _drain(self, block: bool) -> None:
        """Take every message of the inbox (waiting for the first one when ``block``)."""
        while True:
            try:
                kind, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "job" and job.kind == "decide":
                self._scores.append(job)
            elif kind == "job":
                self._start_generation(job)
            elif kind == "cancel":
                self._cancel(job)

    def _cancel(self, job: _Job) -> None:
        if job in self._scores:
            self._scores.remove(job)
        elif self._batch is not None and id(job) in self._running:
            self._batch.cancel(id(job))

    def _score_chunk(self) -> None:
        # First come, first scored: up to batch_size contexts of at most PREFILL_TOKENS together (at
        # least one), so a decision that arrives meanwhile waits for one short pass, not a long one.
        k, tokens = 0, 0
        while k < min(self.batch_size, len(self._scores)) and (k == 0 or tokens + self._scores[k].n_tokens <= PREFILL_TOKENS):
            tokens += self._scores[k].n_tokens
            k += 1
        chunk, self._scores = self._scores[:k], self._scores[k:]
        try:
            try:
                rows = score_labels(self.backend, [j.context for j in chunk])
            except InferenceError:  # find the request at fault: each alone
                for j in chunk:
                    try:
                        j.future.set_result(score_labels(self.backend, [j.context])[0])
                    except InferenceError as e:
                        j.future.set_exception(ModelError(f"decision context: {e}"))
                return
        except Exception as e:  # noqa: BLE001 - the chunk's requests get the error, the thread goes on
            for j in chunk:
                self._fail(j, EngineError(f"the model failed: {type(e).__name__}: {e}"))
            return
        self.stats["decisions"] += len(chunk)
        self.stats["decision_batches"] += 1
        for j, row in zip(chunk, rows):
            j.future.set_result(row)

    def _start_generation(self, job: _Job) -> None:
        inner = self.inner
        if not hasattr(self.backend, "greedy_batch"):  # Hugging Face: one answer at a time
            try:
                for piece in self.backend.stream(job.ids, job.budget, inner._stops, inner.repetition_penalty):
                    if job.cancel is not None and job.cancel.cancelled:
                        break
                    job.pieces.put(piece)
                job.pieces.put(None)
            except InferenceError as e:
                job.pieces.put(ModelError(str(e)))
            except Exception as e:  # noqa: BLE001
                job.pieces.put(EngineError(f"the model failed: {type(e).__name__}: {e}"))
            return
        try:
            if self._batch is None:
                # At least two slots: the answers then decode in their own context, and decisions can
                # be scored between two steps.
                self._batch = self.backend.greedy_batch(
                    max(2, self.batch_size), self.n_ctx_seq, inner._stops, inner.repetition_penalty, PREFILL_TOKENS
                )
            self._batch.add(id(job), job.ids, job.budget)
        except InferenceError as e:  # the prompt does not fit
            job.pieces.put(ModelError(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - e.g. no memory for the generation context
            job.pieces.put(EngineError(f"the model cannot start an answer: {type(e).__name__}: {e}"))
            return
        self._running[id(job)] = job
        self.stats["generations"] += 1

    def _step(self, admit: bool = True) -> None:
        try:
            events = self._batch.step(admit)
        except InferenceError as e:  # a failed decode: every running answer fails, the batch starts over
            for job in self._running.values():
                self._fail(job, EngineError(f"the model failed: {e}"))
            self._running.clear()
            self._batch = None
            return
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))
        for key, new, st in events:
            job = self._running.get(key)
            if job is None:
                continue
            if new:
                job.pieces.put(new)
            if st.done:
                if st.stop and st.stop != "cancelled":
                    job.pieces.put(st.stop)  # as LlamaCppBackend.stream: the stop string ends the text
                job.pieces.put(None)
                del self._running[key]

    @staticmethod
    def _fail(job: _Job, error: Exception) -> None:
        if job.kind == "decide":
            if not job.future.done():
                job.future.set_exception(error)
        else:
            job.pieces.put(error)
