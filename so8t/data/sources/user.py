"""``qa_user`` and ``decision`` records from the user's own records (user.jsonl and hf.jsonl items)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from so8t.schema import Decision, Task

#: Answers of user decision records that carry a label but no response.
DECISION_RESPONSES: dict[Decision, str] = {
    Decision.ALLOW: "ご依頼の内容には対応できます。",
    Decision.ESCALATION: "この依頼は権限のある担当者の確認が必要なため、担当者に引き継ぎます。",
    Decision.DENY: "この依頼にはお応えできません。",
}


def build_user_records(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``qa_user`` records from ``pair`` items and ``decision`` records from ``decision`` items.

    Each record is its own group. A decision item without a response gets the label's
    stock answer (:data:`DECISION_RESPONSES`); its reason and reasoning are kept when given.
    """
    records = []
    for item in items:
        if item["kind"] not in ("pair", "decision"):
            continue
        base = {
            "id": item["id"],
            "prompt": item["prompt"],
            "thinking": item.get("thinking") or "",
            "group": item["id"],
            "source": item["source"],
        }
        if item["kind"] == "pair":
            records.append({**base, "task": Task.QA_USER.value, "response": item["response"]})
        elif item["kind"] == "decision":
            decision = Decision(item["decision"])
            records.append(
                {
                    **base,
                    "task": Task.DECISION.value,
                    "response": item.get("response") or DECISION_RESPONSES[decision],
                    "decision": decision.value,
                    "domain": item["domain"],
                    "reason": item.get("reason"),
                }
            )
    return records
