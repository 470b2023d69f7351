"""The runtime path on the served artifact (:mod:`so8t.eval.served`): the policy after generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from so8t.eval.served import allow_requests, served_policy
from so8t.inference import Generation

ANSWER = "# 思考ステップ\n考えます。\n# 最終回答\napt を使います。"
NO_FINAL = "# 思考ステップ\n考えるだけで終わります。"


class ScriptedBackend:
    """Characters as tokens; label scores and answers scripted per prompt (the prompt's first character)."""

    def __init__(self, scores: dict[str, list[float]], answers: dict[str, str]) -> None:
        self.scores, self.answers, self.generated = scores, answers, []

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def score(self, requests, on_progress=None):
        out = []
        for prefix, _ in requests:
            out.append(self.scores[chr(prefix[0])])
        return out

    def generate(self, prompts, max_new_tokens, stops, penalty, on_progress=None):
        self.generated.append((len(prompts), max_new_tokens, penalty))
        return [Generation(self.answers[chr(p[0])], None, 10, 0.1) for p in prompts]


PARAMS = SimpleNamespace(
    runtime=SimpleNamespace(allow_threshold=0.6, max_new_tokens=64),
    generation=SimpleNamespace(repetition_penalty=1.1),
    metrics=SimpleNamespace(confidence=0.95),
)


def test_the_overrides_after_generation_are_counted():
    rows = [{"id": k, "prompt_text": k} for k in "abcd"]
    backend = ScriptedBackend(
        # a: confident ALLOW, answered; b: confident ALLOW, no final answer; c: ALLOW below the
        # threshold (never generated); d: decided DENY.
        {"a": [0.0, -5.0, -5.0], "b": [0.0, -5.0, -5.0], "c": [0.0, -0.5, -0.5], "d": [-5.0, -5.0, 0.0]},
        {"a": ANSWER, "b": NO_FINAL},
    )
    flat, details = served_policy(backend, rows, 1.0, PARAMS, "markdown")
    assert backend.generated == [(2, 64, 1.1)]  # only the two allowed requests generate, with the runtime's budget
    assert flat["served.policy.allow_n"] == 4
    assert flat["served.policy.allow_recall_before"] == pytest.approx(2 / 4)
    assert flat["served.policy.allow_recall"] == pytest.approx(1 / 4)
    assert flat["served.policy.allow_recall_ci_low"] < 0.25 < flat["served.policy.allow_recall_ci_high"]
    assert flat["served.policy.override.no_final_answer"] == 1
    assert flat["served.policy.override.low_confidence"] == 1
    assert flat["served.policy.override.reasoning_in_answer"] == 0
    rows_out = {r["id"]: r for r in details["rows"]}
    assert rows_out["a"]["answer"] == "apt を使います。" and rows_out["b"]["decision"] == "ESCALATION"
    assert rows_out["d"]["decision"] == "DENY" and rows_out["d"]["override"] is None


def test_allow_requests_are_the_gold_allow_decisions():
    rows = [
        {"id": 1, "task": "decision", "decision": "ALLOW"},
        {"id": 2, "task": "decision", "decision": "DENY"},
        {"id": 3, "task": "qa_faq", "decision": None},
    ]
    assert [r["id"] for r in allow_requests(rows)] == [1]
