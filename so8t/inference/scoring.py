"""What the stages and the runtime call: a backend for a path, decision scoring, perplexity.

**Continuation scoring** (:meth:`Backend.score <so8t.inference.types.Backend.score>`): for a
prefix ``x`` and continuations ``y^(k)``, ``sum_t log p(y_t | x, y_<t)`` in nats. The prefix is
evaluated once per request; each continuation reuses its KV cache. :func:`score_labels` builds the
requests of a decision (``...判定: L`` for each label ``L`` of :data:`so8t.decision.LABELS`, after
the token prefix the alternatives share, :func:`so8t.decision.common_prefix_length`); the runtime
and the calibrate/evaluate stages all call it.

**Perplexity** (:func:`perplexity_of`): ``exp`` of the mean negative log-likelihood of
:meth:`Backend.token_logprobs <so8t.inference.types.Backend.token_logprobs>` over token windows
(:func:`perplexity_windows`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from so8t.decision import DECISION_PREFIX, LABELS, common_prefix_length, label_index
from so8t.inference.hf import HFBackend
from so8t.inference.llamacpp import LlamaCppBackend
from so8t.inference.types import Backend, InferenceError, Progress
from so8t.schema import END_OF_TURN_TOKENS


def open_backend(
    path: str | Path,
    n_ctx: int = 1024,
    n_threads: int | None = None,
    batch_size: int = 8,
    n_gpu_layers: int = 0,
    hf_batch_size: int | None = None,
) -> Backend:
    """:class:`LlamaCppBackend` for a ``.gguf`` file, :class:`HFBackend` for a folder with ``config.json``.

    Args:
        n_threads: llama.cpp threads; ``None`` = the cores idle right now (:func:`so8t.console.free_cores`).
        batch_size: llama.cpp sequences per multi-sequence batch.
        hf_batch_size: HF sequences per padded batch (``None``: ``batch_size``).

    Raises:
        InferenceError: neither exists.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return HFBackend(path, batch_size=hf_batch_size or batch_size)
    if path.suffix == ".gguf":
        if n_threads is None:
            from so8t.console import free_cores

            n_threads = free_cores()
        return LlamaCppBackend(path, n_ctx, n_threads, batch_size, n_gpu_layers)
    raise InferenceError(f"{path} is neither a .gguf file nor a Hugging Face folder with config.json")


def stop_strings(backend: Backend) -> list[str]:
    """End-of-turn strings (:data:`so8t.schema.END_OF_TURN_TOKENS`) that are single tokens of the backend."""
    return [t for t in END_OF_TURN_TOKENS if len(backend.tokenize(t)) == 1]


# --------------------------------------------------------------------------- decisions


def label_requests(backend: Backend, contexts: list[str], labels: Sequence[str] = LABELS):
    """Scoring requests for ``context + "判定: " + label``: the shared token prefix, then each label's tokens."""
    requests = []
    for context in contexts:
        fulls = [backend.tokenize(context + DECISION_PREFIX + label) for label in labels]
        start = common_prefix_length(fulls)
        if start == 0 or any(len(f) == start for f in fulls):
            raise InferenceError("decision labels must differ after a non-empty shared prefix")
        requests.append((fulls[0][:start], [f[start:] for f in fulls]))
    return requests


def score_labels(
    backend: Backend, contexts: list[str], labels: Sequence[str] = LABELS, on_progress: Progress | None = None
) -> np.ndarray:
    """Decision logits: the log-likelihood (nats) of each ``判定: L`` after each context.

    ``z_L = sum_t log p(token_t | context, tokens_<t)`` over the tokens of
    ``context + "判定: " + L`` after the longest token prefix the labels share. The
    context is the rendered prompt (the assistant turn states its decision first), so
    ``z`` measures the model's uncertainty about the request itself. These are the
    logits temperature scaling calibrates; the runtime applies the fitted temperature
    to exactly these numbers.

    Returns:
        ``(N, K)`` float64.
    """
    return np.asarray(backend.score(label_requests(backend, contexts, labels), on_progress), dtype=np.float64)


def score_decisions(backend: Backend, examples: list[dict], on_progress: Progress | None = None) -> list[dict]:
    """Decision logits of formatted decision examples: the labels scored right after the prompt.

    Args:
        examples: rows with ``prompt_text`` (chat-template text), ``id``, ``decision`` (``None``:
            a benign task, ALLOW) and, when present, ``domain`` and ``category``.
        on_progress: called with the number of examples done.

    Returns:
        One dict per example: ``id``, ``label`` (index into :data:`so8t.decision.LABELS`), ``logits`` (3
        log-likelihoods, nats), ``pred``, ``domain``, ``category``.
    """
    logits = score_labels(backend, [ex["prompt_text"] for ex in examples], on_progress=on_progress)
    return [
        {
            "id": ex["id"],
            # A non-decision example (QA, math) is benign help: ALLOW, as its training turn states.
            "label": label_index(ex.get("decision")),
            "logits": [float(v) for v in z],
            "pred": int(np.argmax(z)),
            "domain": ex.get("domain"),
            "category": ex.get("category"),
        }
        for ex, z in zip(examples, logits)
    ]


# --------------------------------------------------------------------------- perplexity


def perplexity_windows(tokenizer, texts: list[str], max_tokens: int, window: int) -> list[list[int]]:
    """Token windows for perplexity: each text tokenised with BOS, cut into ``window``-token pieces.

    Stops once ``max_tokens`` tokens are collected; pieces shorter than 2 tokens are dropped.
    """
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids), window):
            piece = ids[i : i + window]
            if len(piece) < 2:
                continue
            piece = piece[: max_tokens - total] if total + len(piece) > max_tokens else piece
            if len(piece) >= 2:
                windows.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return windows
    return windows


def perplexity_of(backend: Backend, windows: list[list[int]]) -> dict[str, float]:
    """Perplexity ``exp(sum NLL / N)`` over all predicted tokens of the windows (Jelinek et al. 1977).

    The first token of every window is context only, so ``N = sum(len(w) - 1)``.

    Returns:
        ``{"perplexity", "nll_per_token" (nats), "tokens", "seconds"}``.
    """
    nll = 0.0
    n = 0
    t0 = time.perf_counter()
    for w in windows:
        lp = backend.token_logprobs(w)
        nll -= float(lp.sum())
        n += len(lp)
    return {
        "perplexity": math.exp(nll / n) if n else math.nan,
        "nll_per_token": nll / n if n else math.nan,
        "tokens": n,
        "seconds": time.perf_counter() - t0,
    }


__all__ = [
    "label_requests",
    "open_backend",
    "perplexity_of",
    "perplexity_windows",
    "score_decisions",
    "score_labels",
    "stop_strings",
]
