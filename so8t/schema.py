"""Tables shared by every stage: decision labels, domains, tasks, the record schema
and the reasoning-section markers of each think-format style.

Defined once here (as enums and tables, in the manner of gguf-py's
``constants.py``) and imported everywhere else.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, get_args

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
    #: The user's own prompt/response, instruction/input/output or chat records.
    QA_USER = "qa_user"
    #: Template (or teacher) questions about sections of the user's documents.
    QA_DOCUMENT = "qa_document"
    #: Plain next-token prediction on held-in documents (no chat template, loss on every token);
    #: written by think-format from data/synth/lm_text.jsonl, never a synthesized record.
    LM_TEXT = "lm_text"


TASKS: tuple[str, ...] = tuple(t.value for t in Task)

#: Spellings of decision labels found in users' data -> :class:`Decision`. Keys are
#: compared after NFKC, stripping and case folding (``Escalate``, ``ＥＳＣＡＬＡＴＥ`` and
#: ``escalate`` are one key); anything else is an error that lists these keys.
DECISION_ALIASES: dict[str, Decision] = {
    "allow": Decision.ALLOW,
    "allowed": Decision.ALLOW,
    "approve": Decision.ALLOW,
    "approved": Decision.ALLOW,
    "accept": Decision.ALLOW,
    "permit": Decision.ALLOW,
    "許可": Decision.ALLOW,
    "承認": Decision.ALLOW,
    "回答可": Decision.ALLOW,
    "escalation": Decision.ESCALATION,
    "escalate": Decision.ESCALATION,
    "escalated": Decision.ESCALATION,
    "review": Decision.ESCALATION,
    "human_review": Decision.ESCALATION,
    "エスカレーション": Decision.ESCALATION,
    "エスカレート": Decision.ESCALATION,
    "要確認": Decision.ESCALATION,
    "要承認": Decision.ESCALATION,
    "deny": Decision.DENY,
    "denied": Decision.DENY,
    "refuse": Decision.DENY,
    "refused": Decision.DENY,
    "reject": Decision.DENY,
    "rejected": Decision.DENY,
    "block": Decision.DENY,
    "拒否": Decision.DENY,
    "拒絶": Decision.DENY,
    "却下": Decision.DENY,
    "不可": Decision.DENY,
}

#: Label id of positions that take no loss (Hugging Face / PyTorch ``ignore_index``).
IGNORE_INDEX = -100

#: The decision line itself (``判定: X``: its prefix, writer and parser) is :mod:`so8t.decision`.


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
    #: Policy category of a safety template (``weapon``, ``dual_use``, ...), for per-category metrics.
    category: str | None = None
    reason: str | None = None
    group: str
    source: str
    final_answer: str | None = None
    #: Generated from a user document: its id (``user:<folder>/<path>``) and the character
    #: offset of the passage the answer comes from, in the document text as collected.
    source_doc: str | None = None
    source_offset: int | None = Field(default=None, ge=0)


#: Reasoning layouts of the assistant turn (``think_format.style``); markers in :data:`THINK_MARKERS`.
ThinkStyle = Literal["markdown", "tags"]
THINK_STYLES: tuple[str, ...] = get_args(ThinkStyle)

#: GGUF types the quantize stage writes (llama.cpp names); file names and llama.cpp ftypes are in
#: :data:`so8t.model.quantize.GGUF_TYPES`.
QuantType = Literal["F16", "Q8_0", "Q4_K_M"]
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)

#: End-of-turn tokens of the chat templates of the supported families (Gemma, Qwen/ChatML, Llama 3,
#: Phi-3); the ones present in a tokenizer's vocabulary stop generation and end training targets.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


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
THINK_KIND: dict[Task, str] = {task: "safety" if task is Task.DECISION else "task" for task in Task}
