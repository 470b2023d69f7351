"""The one inference layer: greedy generation, continuation scoring and perplexity, batched, in two backends.

Every stage that runs a model (calibrate, evaluate, distill, the teacher) and the runtime go
through this package, so a number measured in the pipeline is the number the served model
gives. It sits right above the core: it imports only top-level ``so8t`` modules (the decision
format is :mod:`so8t.decision`'s) and is imported by ``data/``, ``model/``, ``eval/``,
``distill/`` and ``runtime/``.

* :mod:`so8t.inference.types`: :class:`InferenceError`, :class:`Generation`,
  :class:`Throughput`, the :class:`Backend` interface and the batch sizes.
* :mod:`so8t.inference.decoding`: the greedy rules both backends follow (stop strings, the
  CTRL repetition penalty, one sequence's state).
* :mod:`so8t.inference.hf`: :class:`HFBackend`, a Hugging Face model folder (the base and the
  baked model), float32, batched with left padding and a KV cache.
* :mod:`so8t.inference.llamacpp`: :class:`LlamaCppBackend`, a GGUF file in llama.cpp, where the
  quantised model is served. Several sequences share one context (``n_seq_max``, a unified KV
  cache) and are decoded together in one ``llama_batch``; logits are computed only at the
  positions that are read (``batch.logits[i]``), never for a whole prompt.
  :class:`GreedyBatch` decodes sequences that join and leave between steps (continuous batching).
* :mod:`so8t.inference.scoring`: what the stages and the runtime call: :func:`open_backend`,
  :func:`score_labels` / :func:`score_decisions`, :func:`perplexity_of`.

Both backends tokenise with their own tokenizer (chat-template control tokens in
the text are parsed as special tokens; the quantize stage checks that the GGUF
and the Hugging Face tokenizer agree) and generate under one rule:

**Greedy decoding with the CTRL repetition penalty** (Keskar et al. 2019,
https://arxiv.org/abs/1909.05858, section 4.1): every token id already in the
context, prompt included, has its logit ``z`` replaced by ``z / p`` if ``z > 0``
and ``z * p`` otherwise; the next token is the argmax. Hugging Face's
``RepetitionPenaltyLogitsProcessor`` implements exactly this over ``input_ids``;
:class:`LlamaCppBackend` applies it itself to llama.cpp's logits (llama.cpp's own
sampler would see only the generated tokens). Generation stops at an end-of-
generation token, a stop string, or the token budget.

**Continuation scoring** (``score``): for a prefix ``x`` and continuations
``y^(k)``, ``sum_t log p(y_t | x, y_<t)`` in nats. The prefix is evaluated once per
request; each continuation reuses its KV cache (llama.cpp: sequences that share the
prefix's cells, one per continuation; Hugging Face: the cache repeated along the
batch). :func:`score_labels` builds the requests of a decision (``...判定: L`` for
each label ``L``, after the token prefix the alternatives share); the runtime and
the calibrate/evaluate stages all call it.

**Perplexity** (``token_logprobs``): ``log p(ids[t] | ids[:t])`` from logits
at every position, computed in chunks of :data:`CHUNK` tokens so at most
``CHUNK x V`` floats exist at once.
"""

from __future__ import annotations

from so8t.inference.decoding import cut_at_stop, log_softmax_rows, penalize
from so8t.inference.hf import HFBackend
from so8t.inference.llamacpp import GreedyBatch, LlamaCppBackend
from so8t.inference.scoring import (
    label_requests,
    open_backend,
    perplexity_of,
    perplexity_windows,
    score_decisions,
    score_labels,
    stop_strings,
)
from so8t.inference.types import (
    CHUNK,
    MAX_SEQ_PER_TOKEN,
    SCORE_TOKENS,
    Backend,
    Generation,
    InferenceError,
    Progress,
    Throughput,
)

__all__ = [
    "CHUNK",
    "MAX_SEQ_PER_TOKEN",
    "SCORE_TOKENS",
    "Backend",
    "Generation",
    "GreedyBatch",
    "HFBackend",
    "InferenceError",
    "LlamaCppBackend",
    "Progress",
    "Throughput",
    "cut_at_stop",
    "label_requests",
    "log_softmax_rows",
    "open_backend",
    "penalize",
    "perplexity_of",
    "perplexity_windows",
    "score_decisions",
    "score_labels",
    "stop_strings",
]
