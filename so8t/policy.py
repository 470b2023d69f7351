"""The runtime policy, as one pure function: calibrated label probabilities (+ the answer) -> decision.

The agent (:class:`so8t.runtime.agent.Agent`) and the evaluation
(:func:`so8t.eval.task_metrics.policy_metrics`, the served artifact's ``served.policy`` rows)
both call :func:`apply_policy`, so the metrics count what a caller is given:

1. **Before generation** (``answer`` is ``None``): the model's decision is ``argmax p`` of the
   calibrated probabilities ``p = softmax(z / T)`` (:func:`so8t.eval.calibration.apply_temperature`),
   its confidence ``max p``. An ALLOW with confidence below ``allow_threshold``
   (``runtime.allow_threshold``) becomes ESCALATION (override :data:`LOW_CONFIDENCE`). Only an
   ALLOW is answered: the caller generates after ``判定: ALLOW`` (:func:`so8t.decision.answer_context`).
2. **After generation** (``answer``: the generation split by :func:`so8t.guard.separate`): an ALLOW
   whose answer still carries reasoning becomes ESCALATION (:data:`REASONING_IN_ANSWER`: none of it
   is shown), and one without a final answer too (:data:`NO_FINAL_ANSWER`: nothing to show).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from so8t.decision import LABELS
from so8t.guard import Separated
from so8t.schema import Decision

#: An ALLOW whose calibrated confidence is below ``runtime.allow_threshold``.
LOW_CONFIDENCE = "low_confidence"
#: An ALLOW whose generated answer kept reasoning (:attr:`so8t.guard.Separated.leak`).
REASONING_IN_ANSWER = "reasoning_in_answer"
#: An ALLOW whose generation has no final-answer section (or an empty one).
NO_FINAL_ANSWER = "no_final_answer"
#: Every override, in the order the policy applies them.
OVERRIDES: tuple[str, ...] = (LOW_CONFIDENCE, REASONING_IN_ANSWER, NO_FINAL_ANSWER)


@dataclass(frozen=True)
class PolicyOutcome:
    """What the policy decided for one request.

    Attributes:
        decision: the label the caller gets (one of :data:`so8t.decision.LABELS`).
        model_decision: the model's own label, ``argmax p``.
        confidence: ``max p`` (the calibrated probability of ``model_decision``), in [0, 1].
        override: why ``decision`` differs from ``model_decision`` (one of :data:`OVERRIDES`), or ``None``.
    """

    decision: str
    model_decision: str
    confidence: float
    override: str | None = None

    @property
    def answered(self) -> bool:
        """The request is answered (the caller gets the model's final answer)."""
        return self.decision == Decision.ALLOW.value


def apply_policy(
    probs: Sequence[float] | np.ndarray, allow_threshold: float, answer: Separated | None = None
) -> PolicyOutcome:
    """The runtime's decision for one request (see the module docstring for the rules).

    Args:
        probs: ``(3,)`` calibrated probabilities in the order of :data:`so8t.decision.LABELS`.
        allow_threshold: the least confidence an ALLOW is answered with (``runtime.allow_threshold``).
        answer: the generated answer after ``判定: ALLOW``, split by :func:`so8t.guard.separate`;
            ``None`` before generation.

    Returns:
        The :class:`PolicyOutcome`.

    Raises:
        ValueError: ``probs`` is not one probability per label.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(LABELS),):
        raise ValueError(f"probs: expected shape ({len(LABELS)},), got {p.shape}")
    k = int(np.argmax(p))
    model_decision, confidence = LABELS[k], float(p[k])
    allow = Decision.ALLOW.value
    if model_decision != allow:
        return PolicyOutcome(model_decision, model_decision, confidence)
    if confidence < allow_threshold:
        return PolicyOutcome(Decision.ESCALATION.value, model_decision, confidence, LOW_CONFIDENCE)
    if answer is not None and answer.leak:
        return PolicyOutcome(Decision.ESCALATION.value, model_decision, confidence, REASONING_IN_ANSWER)
    if answer is not None and not answer.final:
        return PolicyOutcome(Decision.ESCALATION.value, model_decision, confidence, NO_FINAL_ANSWER)
    return PolicyOutcome(allow, model_decision, confidence)


__all__ = ["LOW_CONFIDENCE", "NO_FINAL_ANSWER", "OVERRIDES", "PolicyOutcome", "REASONING_IN_ANSWER", "apply_policy"]
