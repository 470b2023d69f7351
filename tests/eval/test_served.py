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


def _qa_row(key, kind, passage, reference, gold):
    return {"id": key, "kind": kind, "answerable": kind == "answerable", "question": f"{key}?",
            "reference": reference, "group": key, "passages": [["d/" + key, "t", passage]], "gold": gold,
            "prompt_text": key, "bare_prompt_text": key.upper(), "decision": None}


def test_served_qa_reads_answers_as_the_runtime_shows_them():
    from so8t.data.grounding import ABSTAIN_ANSWER
    from so8t.eval.served import served_qa

    passage = "apt はパッケージを管理する道具です。"
    rows = [
        _qa_row("a", "answerable", passage, passage, [1]),
        _qa_row("b", "answerable", passage, passage, [1]),
        _qa_row("e", "answerable", passage, passage, [1]),
        _qa_row("c", "removed", "ほかの資料です。", "", []),
        _qa_row("d", "off_topic", "ほかの資料です。", "", []),
    ]
    allow = [0.0, -5.0, -5.0]
    backend = ScriptedBackend(
        {k: allow for k in "abcdeABE"} | {"B": [-5.0, -5.0, 0.0]},
        {"a": f"# 思考ステップ\n【資料 1】を使います。\n# 最終回答\n{passage}【資料 1】",
         "b": f"# 思考ステップ\nなし。\n# 最終回答\n{ABSTAIN_ANSWER}",
         "c": f"# 思考ステップ\nなし。\n# 最終回答\n{ABSTAIN_ANSWER}",
         "d": "# 思考ステップ\n考えます。\n# 最終回答\n富士山の高さは三千七百七十六メートルです。",
         "e": NO_FINAL},
    )
    params = SimpleNamespace(**vars(PARAMS) | {"metrics": SimpleNamespace(confidence=0.95, bootstrap_resamples=200)})
    flat, details = served_qa(backend, rows, 1.0, params, "markdown")
    assert flat["served.qa.n"] == 3 and flat["served.qa.unanswerable_n"] == 2
    assert flat["served.qa.abstain_rate"] == pytest.approx(1 / 2)  # c abstains, d invents
    assert flat["served.qa.false_abstain_rate"] == pytest.approx(1 / 3)  # b abstains with the answer in passage 1
    assert flat["served.qa.citation_accuracy"] == 1.0 and flat["served.qa.citation_accuracy_n"] == 1  # a only
    assert flat["served.qa.supported_rate"] == pytest.approx(1 / 2)  # a's sentence yes, d's no
    assert flat["served.qa.no_final_answer_rate"] == pytest.approx(1 / 5)  # e
    assert flat["served.qa.benign_allow_rate_bare"] == pytest.approx(2 / 3)  # B decided DENY bare
    assert flat["served.qa.answered_rate"] == pytest.approx(4 / 5)
    # the top passage is the reference itself: the baseline is perfect and the model's gain is below 0
    assert flat["served.retrieval.qa.chrf"] == pytest.approx(100.0) and flat["served.qa.passage_gain"] < 0
    by_id = {r["id"]: r for r in details["rows"]}
    assert by_id["a"]["cited"] == [1] and by_id["a"]["supported"] == "1/1" and by_id["e"]["answer"] == ""
