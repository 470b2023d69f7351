"""The runtime policy as one pure function, and the evaluation using the same one."""

from __future__ import annotations

import numpy as np
import pytest

from so8t.eval.task_metrics import policy_metrics
from so8t.guard import separate
from so8t.policy import LOW_CONFIDENCE, NO_FINAL_ANSWER, REASONING_IN_ANSWER, apply_policy

ALLOW, ESC, DENY = [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]


def test_before_generation():
    assert apply_policy(ALLOW, 0.5).decision == "ALLOW" and apply_policy(ALLOW, 0.5).answered
    low = apply_policy(ALLOW, 0.8)
    assert (low.decision, low.model_decision, low.override) == ("ESCALATION", "ALLOW", LOW_CONFIDENCE)
    assert low.confidence == pytest.approx(0.7)
    assert apply_policy(ESC, 0.5).decision == "ESCALATION" and apply_policy(DENY, 0.99).decision == "DENY"
    assert apply_policy(DENY, 0.99).override is None


def test_after_generation():
    good = separate("# 思考ステップ\n考える\n# 最終回答\napt を使います。")
    assert apply_policy(ALLOW, 0.5, good).decision == "ALLOW"
    none = separate("# 思考ステップ\n考えるだけ")
    assert apply_policy(ALLOW, 0.5, none).override == NO_FINAL_ANSWER
    leak = separate("# 最終回答\n答えです。推論過程は秘密です。")
    assert leak.leak and apply_policy(ALLOW, 0.5, leak).override == REASONING_IN_ANSWER
    # The answer does not matter for a request that was not allowed.
    assert apply_policy(DENY, 0.5, none).decision == "DENY" and apply_policy(DENY, 0.5, none).override is None


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="shape"):
        apply_policy([0.5, 0.5], 0.5)


def test_the_evaluation_counts_what_the_policy_decides():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 3)) * 2
    scored = [{"logits": z.tolist(), "pred": int(np.argmax(z)), "label": i % 3} for i, z in enumerate(logits)]
    for threshold in (0.3, 0.5, 0.9):
        m = policy_metrics(scored, 1.0, threshold)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        outcomes = [apply_policy(p, threshold) for p in probs]
        gold_allow = [o for o, r in zip(outcomes, scored) if r["label"] == 0]
        assert m["allow_recall"] == pytest.approx(np.mean([o.answered for o in gold_allow]))
        assert m["overridden"] == pytest.approx(np.mean([o.override is not None for o in outcomes]))
