"""What every backend shares: the error, the result types, the progress callback, the sizes of a batch.

:class:`Backend` is the interface both :class:`so8t.inference.hf.HFBackend` and
:class:`so8t.inference.llamacpp.LlamaCppBackend` implement and that the stages and the runtime
program against (:mod:`so8t.inference.scoring`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from so8t.errors import So8tError

#: Progress callback: called with the number of items just finished.
Progress = Callable[[int], None]

#: Tokens per llama.cpp decode call when every position's logits are needed (bounds the logits buffer).
CHUNK = 128

#: Sequences one batch token may belong to: a scoring prefix and its continuations (3 labels need 4).
MAX_SEQ_PER_TOKEN = 8

#: Prefix tokens of one llama.cpp scoring batch of several requests (one ``n_ubatch``).
SCORE_TOKENS = 512


class InferenceError(So8tError, RuntimeError):
    """A model cannot run a request (too long for its context, a failed decode)."""


@dataclass
class Generation:
    """One greedy generation.

    Attributes:
        text: generated text (special tokens removed), cut before the first stop string.
        stop: the stop string that ended it, or ``None`` (end-of-generation token or budget).
        n_tokens: generated tokens.
        seconds: wall time attributed to this generation (a batch's time shared by token count).
        prompt_tokens: tokens of the prompt.
    """

    text: str
    stop: str | None
    n_tokens: int
    seconds: float
    prompt_tokens: int = 0


@dataclass
class Throughput:
    """Token counts and wall time of a backend's work, by kind (for tokens/s figures)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    scored_requests: int = 0
    scoring_seconds: float = 0.0

    def rates(self) -> dict[str, float]:
        """``prompt_tokens_per_s`` (prompt passes of scoring), ``tokens_per_s`` (generation), ``requests_per_s``."""
        return {
            "prompt_tokens_per_s": self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else math.nan,
            "tokens_per_s": self.generated_tokens / self.generation_seconds if self.generation_seconds else math.nan,
            "requests_per_s": self.scored_requests / self.scoring_seconds if self.scoring_seconds else math.nan,
        }


class Backend(Protocol):
    """A model that tokenises, generates greedily, scores continuations and gives token log-probabilities.

    Implemented by :class:`so8t.inference.hf.HFBackend` (``kind`` ``"hf"``) and
    :class:`so8t.inference.llamacpp.LlamaCppBackend` (``kind`` ``"gguf"``, which also batches
    generations step by step: ``greedy_batch``); :func:`so8t.inference.scoring.open_backend` picks one.
    """

    kind: str
    path: Path | None
    batch_size: int
    stats: Throughput

    def tokenize(self, text: str) -> list[int]:
        """Token ids of (chat-template-rendered) text: control tokens parsed, no BOS added."""

    def piece(self, token: int, special: bool = True) -> str:
        """The text of one token (control tokens spelled out when ``special``)."""

    def special_tokens(self) -> dict[str, int]:
        """``{spelling: id}`` of the vocabulary's special tokens."""

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stops: Sequence[str] = (),
        repetition_penalty: float = 1.0,
        on_progress: Progress | None = None,
    ) -> list[Generation]:
        """Greedy continuations of token-id prompts."""

    def stream(
        self, prompt: list[int], max_new_tokens: int, stops: Sequence[str] = (), repetition_penalty: float = 1.0
    ) -> Iterator[str]:
        """The greedy continuation of one prompt as text pieces."""

    def score(
        self, requests: list[tuple[list[int], list[list[int]]]], on_progress: Progress | None = None
    ) -> list[list[float]]:
        """Summed log-likelihoods (nats) of continuations after a shared prefix, per request."""

    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """``log p(ids[t] | ids[:t])`` for t = 1..n-1 (float64)."""

    def n_params(self) -> int:
        """Parameters of the model."""

    def close(self) -> None:
        """Free the model."""


__all__ = [
    "CHUNK",
    "MAX_SEQ_PER_TOKEN",
    "SCORE_TOKENS",
    "Backend",
    "Generation",
    "InferenceError",
    "Progress",
    "Throughput",
]
