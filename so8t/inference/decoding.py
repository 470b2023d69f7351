"""The greedy decoding rules both backends follow: stop strings, the repetition penalty, one sequence's state.

**Greedy decoding with the CTRL repetition penalty** (Keskar et al. 2019,
https://arxiv.org/abs/1909.05858, section 4.1): every token id already in the
context, prompt included, has its logit ``z`` replaced by ``z / p`` if ``z > 0``
and ``z * p`` otherwise (:func:`penalize`); the next token is the argmax. Hugging Face's
``RepetitionPenaltyLogitsProcessor`` implements exactly this over ``input_ids``;
:class:`so8t.inference.llamacpp.LlamaCppBackend` applies it itself to llama.cpp's logits
(llama.cpp's own sampler would see only the generated tokens). Generation stops at an
end-of-generation token, a stop string (:func:`cut_at_stop`), or the token budget
(:class:`_Sequence`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` before the earliest stop string, and that string (``None`` when none occurs)."""
    cut, hit = len(text), None
    for s in stops:
        i = text.find(s)
        if 0 <= i < cut:
            cut, hit = i, s
    return text[:cut], hit


def log_softmax_rows(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a ``(n, V)`` array, in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    m = rows.max(-1, keepdims=True)
    return rows - (m + np.log(np.exp(rows - m).sum(-1, keepdims=True)))


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """The CTRL repetition penalty (Keskar et al. 2019) on the ids in ``seen``, in place; returns ``logits``.

    Args:
        logits: ``(V,)`` float logits of the next token.
        seen: int ids already in the context (prompt and generated).
        penalty: ``p >= 1`` (1 = off): ``z -> z / p`` for ``z > 0``, ``z -> z * p`` otherwise.
    """
    if penalty != 1.0 and len(seen):
        z = logits[seen]
        logits[seen] = np.where(z > 0, z / penalty, z * penalty)
    return logits


class _Sequence:
    """Greedy decoding state of one sequence: ids seen, text so far, and why it ended."""

    def __init__(self, prompt: list[int], stops: Sequence[str], max_new_tokens: int) -> None:
        self.prompt_len = len(prompt)
        self.seen = np.unique(np.asarray(prompt, dtype=np.int64))
        self.tokens: list[int] = []
        self.raw = b""
        self.text = ""
        self.emitted = 0
        self.stops = stops
        self.budget = max_new_tokens
        self.stop: str | None = None
        self.done = max_new_tokens <= 0

    def push(self, token: int, piece: bytes, is_eog: bool) -> str:
        """Accept ``token``; returns the text that became final (see :meth:`_flush`)."""
        if is_eog:
            self.done = True
            return self._flush()
        self.tokens.append(token)
        if token not in self.seen:
            self.seen = np.append(self.seen, token)
        self.raw += piece
        text = self.raw.decode("utf-8", errors="ignore")
        cut, hit = cut_at_stop(text, self.stops)
        if hit is not None:
            self.stop, self.done = hit, True
            text = cut
        if len(self.tokens) >= self.budget:
            self.done = True
        self.text = text
        return self._flush()

    def _flush(self) -> str:
        """New text that can no longer change: all of it once done, else all but a possible start of a stop string."""
        end = len(self.text)
        if not self.done:
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        new = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return new


__all__ = ["cut_at_stop", "log_softmax_rows", "penalize"]
