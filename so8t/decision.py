"""The decision format: the ``判定: X`` line that starts every assistant turn, defined once.

Every assistant turn the model is trained on (``so8t.data.think_format``) starts with one line
``判定: X`` (X one of :data:`LABELS`), then the reasoning and the final answer. The same line is

* written by :func:`decision_line` (training targets, the runtime's answer context),
* read back by :func:`parse_decision` / :func:`strip_decision_lines` (generated turns, users'
  data) with :data:`DECISION_LINE`, the one pattern of a full decision line,
* spotted inside untrusted text by :data:`DECISION_MARKER` (the ``判定:`` marker with any
  spacing and a full-width colon; :mod:`so8t.guard`, :mod:`so8t.data.grounding`,
  :mod:`so8t.runtime.redteam`),
* scored label by label (:func:`so8t.inference.scoring.score_labels`): the log-likelihood of
  each label's tokens after the longest token prefix the three full lines share
  (:func:`common_prefix_length`), which is also where the trainer puts the label loss
  (``so8t.model.batching.decision_line_copies``).

This module sits at the bottom of the package (it imports only :mod:`so8t.schema`), so
``data/``, ``model/``, ``eval/`` and ``runtime/`` all import it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from so8t.schema import DECISIONS, IGNORE_INDEX, Decision

#: The decision labels in score order: index ``k`` of every ``(n, 3)`` logit or probability array.
LABELS: tuple[str, ...] = DECISIONS

#: Index of ALLOW in :data:`LABELS` (column of ``p_ALLOW``).
ALLOW_INDEX: int = LABELS.index(Decision.ALLOW.value)

#: The parseable decision line that starts every assistant turn: ``判定: ESCALATION``.
DECISION_PREFIX = "判定: "

#: The decision marker without its trailing space (a stop string that ends a generation before the label).
DECISION_MARKER_TEXT = DECISION_PREFIX.strip()

#: A full decision line as written or generated: ``判定``, an ASCII or full-width colon, any spacing,
#: one of :data:`LABELS` (group 1).
DECISION_LINE = re.compile(r"判定\s*[:：]\s*(" + "|".join(map(re.escape, LABELS)) + r")\b")

#: The ``判定:`` marker alone, spaced or not, with an ASCII or full-width colon: what untrusted text
#: (a user's turn, a retrieved passage, a generated answer) must not carry as if it were a decision.
DECISION_MARKER = re.compile(r"判\s*定\s*[:：]")


def decision_line(decision: str) -> str:
    """The first line of every assistant turn: ``判定: X`` and a newline.

    Raises:
        ValueError: ``decision`` is not one of :data:`LABELS`.
    """
    if decision not in LABELS:
        raise ValueError(f"decision {decision!r}: use one of {list(LABELS)}")
    return f"{DECISION_PREFIX}{decision}\n"


def parse_decision(text: str) -> str | None:
    """The label of the first decision line in ``text`` (:data:`DECISION_LINE`), or ``None``."""
    found = DECISION_LINE.search(text)
    return found.group(1) if found else None


def strip_decision_lines(text: str, count: int = 0) -> str:
    """``text`` without its decision lines (the first ``count`` of them; ``0``: all)."""
    return DECISION_LINE.sub("", text, count=count)


def label_index(decision: str | None) -> int:
    """Index of ``decision`` in :data:`LABELS`; ``None`` (a benign task: QA, math) is ALLOW, as its turn states.

    Raises:
        ValueError: an unknown label.
    """
    return LABELS.index(decision or Decision.ALLOW.value)


def answer_context(prompt_text: str) -> str:
    """Where an allowed request's answer is generated from: the rendered prompt and the ``判定: ALLOW`` line."""
    return prompt_text + decision_line(Decision.ALLOW.value)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all ``seqs`` share (0 for none or no sequence).

    Applied to the tokenisations of ``判定: ALLOW`` / ``判定: ESCALATION`` / ``判定: DENY`` (after
    one context), it is the position of the first label token: where scoring starts
    (:func:`so8t.inference.scoring.label_requests`) and where the trainer's label loss starts.
    """
    if not seqs:
        return 0
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def label_positions(labels: Sequence[int]) -> np.ndarray:
    """Positions ``t`` whose next label ``labels[t + 1]`` is not ``IGNORE_INDEX`` (-100): ``(k,)`` int32.

    These are the positions whose logits predict a supervised token (Hugging Face's causal-LM
    loss shifts labels by one the same way).
    """
    lab = np.asarray(labels)
    return (np.nonzero(lab[1:] != IGNORE_INDEX)[0]).astype(np.int32)


__all__ = [
    "ALLOW_INDEX",
    "DECISION_LINE",
    "DECISION_MARKER",
    "DECISION_MARKER_TEXT",
    "DECISION_PREFIX",
    "LABELS",
    "answer_context",
    "common_prefix_length",
    "decision_line",
    "label_index",
    "label_positions",
    "parse_decision",
    "strip_decision_lines",
]
