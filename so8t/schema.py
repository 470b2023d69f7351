"""Tables shared by every stage: decision labels, domains, tasks, the record schema
and the reasoning-section markers of each think-format style.

Defined once here (as enums and tables, in the manner of gguf-py's
``constants.py``) and imported everywhere else.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Decision(str, Enum):
    """Safety decision of a request.

    ALLOW: public or general knowledge and benign help.
    ESCALATION: needs an authorised human (dual-use technical detail,
        safety-critical operational overrides, other people's personal data,
        acts with legal effect).
    DENY: clearly harmful or illegal (weapon construction, leaking classified
        information, sabotage of transport or aviation systems, evading export
        controls).
    """

    ALLOW = "ALLOW"
    ESCALATION = "ESCALATION"
    DENY = "DENY"


DECISIONS: tuple[str, ...] = tuple(d.value for d in Decision)


class Domain(str, Enum):
    DEFENSE = "defense"
    AEROSPACE = "aerospace"
    TRANSPORT = "transport"
    GENERAL = "general"


DOMAINS: tuple[str, ...] = tuple(d.value for d in Domain)

#: Japanese display names of the domains (used in prompts and reasoning).
DOMAIN_JA: dict[str, str] = {
    "defense": "防衛",
    "aerospace": "航空宇宙",
    "transport": "交通・運輸",
    "general": "一般",
}


class Task(str, Enum):
    DECISION = "decision"
    QA_FAQ = "qa_faq"
    QA_REFERENCE = "qa_reference"
    MATH = "math"


TASKS: tuple[str, ...] = tuple(t.value for t in Task)

#: The parseable decision line that ends every decision answer: ``判定: ESCALATION``.
DECISION_PREFIX = "判定: "


class Record(BaseModel):
    """One supervised example, as written by ``synthesize``.

    ``group`` keys the split: records sharing a group (one template, one source
    document, one FAQ entry, one GSM template) always land in the same split.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    task: Task
    prompt: str = Field(min_length=1)
    thinking: str = ""
    response: str = Field(min_length=1)
    decision: Decision | None = None
    domain: Domain | None = None
    reason: str | None = None
    group: str
    source: str
    final_answer: str | None = None


class ThinkStyle(str, Enum):
    MARKDOWN = "markdown"
    TAGS = "tags"


#: Section markers per style. ``think_open``/``think_close`` wrap the reasoning,
#: ``final_open``/``final_close`` wrap the answer shown to the caller. In the
#: tags style the reasoning tag is chosen per task (``<think-safety>`` for
#: decisions, ``<think-task>`` otherwise; ``<think-policy>`` carries the policy
#: clause of a decision).
THINK_MARKERS: dict[str, dict[str, str]] = {
    "markdown": {
        "think_open": "# 思考ステップ\n",
        "think_close": "\n",
        "final_open": "# 最終回答\n",
        "final_close": "",
    },
    "tags": {
        "think_open": "<think-{kind}>\n",
        "think_close": "\n</think-{kind}>\n",
        "final_open": "<final>\n",
        "final_close": "\n</final>",
    },
}

#: Reasoning tag kind per task in the tags style.
THINK_KIND: dict[str, str] = {
    "decision": "safety",
    "qa_faq": "task",
    "qa_reference": "task",
    "math": "task",
}
