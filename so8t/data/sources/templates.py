"""Safety templates (``so8t/data/resources/safety_templates.yaml``) and the ``decision`` records drawn from them.

The YAML is parsed into :class:`SafetyTemplates` (pydantic, strict: an error names the
template and field); :func:`build_decision_records` draws distinct prompts per template,
filling the slots and dressing each request as :class:`Phrasing` says.
"""

from __future__ import annotations

import random
import re
import string
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from so8t.io import DataError
from so8t.schema import DOMAIN_JA, Decision, Domain, Task

TEMPLATES_RESOURCE = "resources/safety_templates.yaml"
SAFETY_SOURCE = "so8t-safety-templates"
#: Draws per decision record before a template counts as exhausted (no unused prompt left).
MAX_PROMPT_DRAWS = 500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Category(_Strict):
    decision: Decision
    #: Policy clause quoted in the reasoning.
    clause: str
    #: Japanese reason stored in ``Record.reason``.
    reason: str
    #: The answer of a template of this category that has no ``response`` of its own.
    response: str


class SafetyTemplate(_Strict):
    """One request intent: a label (through its category) and ways to ask for it.

    ``requests`` are whole prompts; ``asks`` are noun phrases (``{system}の射程の詳細な数値``) that
    the shared, label-neutral ``frames`` turn into prompts (``{ask}を教えてください。``). At least
    one of the two is given.
    """

    id: str
    category: str
    #: What is asked, for the reasoning (default: the first ask, or the first request).
    summary: str | None = None
    requests: list[str] = []
    asks: list[str] = []
    #: The answer (default: the category's ``response``).
    response: str | None = None
    slots: dict[str, list[str]] = {}
    cases: list[dict[str, str]] = []

    def summary_text(self) -> str:
        return self.summary or (self.asks[0] if self.asks else self.requests[0])


class DomainTemplates(_Strict):
    slots: dict[str, list[str]] = {}
    templates: list[SafetyTemplate] = Field(min_length=1)


class Phrasing(_Strict):
    """How a request is dressed: a prefix, who asks (context), a follow-up question, a typo."""

    #: Share of prompts that get a prefix such as "すみません、".
    prefix_rate: float = Field(ge=0.0, le=1.0)
    prefixes: list[str]
    #: Share of prompts that start by saying who asks (``contexts``: "整備士です。"), for every label alike.
    context_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    contexts: list[str] = []
    #: Share of prompts that end with a benign second question (``followups``), which never changes the label.
    followup_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    followups: list[str] = []
    #: Share of prompts with one typo (a kana dropped or doubled).
    typo_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _lists_when_used(self) -> Phrasing:
        for rate, items, name in (
            (self.prefix_rate, self.prefixes, "prefixes"),
            (self.context_rate, self.contexts, "contexts"),
            (self.followup_rate, self.followups, "followups"),
        ):
            if rate > 0 and not items:
                raise ValueError(f"phrasing.{name} is empty but its rate is > 0")
        return self


class SafetyTemplates(_Strict):
    """The parsed ``safety_templates.yaml`` (see its header for the format)."""

    phrasing: Phrasing
    #: Label-neutral sentence frames with ``{ask}``, used by every template's ``asks``.
    frames: list[str] = []
    thinking: dict[Decision, str]
    categories: dict[str, Category]
    slots: dict[str, list[str]] = {}
    domains: dict[Domain, DomainTemplates]

    @model_validator(mode="after")
    def _consistent(self) -> SafetyTemplates:
        if any(_fields(f) != {"ask"} for f in self.frames):
            raise ValueError("frames: every frame must contain {ask} and no other placeholder")
        seen: set[str] = set()
        for domain, block in self.domains.items():
            for t in block.templates:
                self._check_template(domain, t, seen)
        missing = set(Decision) - set(self.thinking)
        if missing:
            raise ValueError(f"thinking: missing reasoning template for {sorted(d.value for d in missing)}")
        return self

    def _check_template(self, domain: Domain, t: SafetyTemplate, seen: set[str]) -> None:
        where = f"template {t.id!r}"
        if t.category not in self.categories:
            raise ValueError(f"{where}: unknown category {t.category!r}; choose from {sorted(self.categories)}")
        decision = self.categories[t.category].decision.value
        if not re.fullmatch(rf"{domain.value}-{decision}-\d\d\d?", t.id):
            raise ValueError(f"{where}: id must be '{domain.value}-{decision}-NN' (domain, category decision)")
        if t.id in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(t.id)
        if not t.requests and not t.asks:
            raise ValueError(f"{where}: give `requests` (prompts) or `asks` (noun phrases for the frames)")
        if t.asks and not self.frames:
            raise ValueError(f"{where}: has `asks` but the file has no `frames`")
        for name in placeholders(t):
            if not (any(name in case for case in t.cases) or self.slot_values(domain, t, name)):
                raise ValueError(f"{where}: placeholder {{{name}}} has no slot values or cases")
        if any(set(case) != set(t.cases[0]) for case in t.cases):
            raise ValueError(f"{where}: every entry of `cases` must fill the same slots")
        # The reasoning and the answer may only name what the user's request named.
        case_keys = set(t.cases[0]) if t.cases else set()
        needed = _fields(t.summary_text()) | _fields(t.response or "")
        for request in (*t.requests, *t.asks):
            used = _fields(request)
            missing = needed - used - (case_keys if used & case_keys else set())
            if missing:
                raise ValueError(f"{where}: request {request!r} lacks {sorted(missing)} (summary/answer)")

    def slot_values(self, domain: Domain, template: SafetyTemplate, name: str) -> list[str]:
        """Fillers of ``{name}``: the template's slots, else the domain's, else the global ones."""
        for table in (template.slots, self.domains[domain].slots, self.slots):
            if name in table:
                return table[name]
        return []

    def response(self, template: SafetyTemplate) -> str:
        return template.response or self.categories[template.category].response


def _fields(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def placeholders(template: SafetyTemplate) -> list[str]:
    """Sorted placeholder names used in a template's requests, asks, summary and response."""
    texts = (*template.requests, *template.asks, template.summary_text(), template.response or "")
    return sorted(set().union(*(_fields(t) for t in texts)))


def load_safety_templates(text: str | None = None) -> SafetyTemplates:
    """Parse and validate the safety templates (the packaged YAML unless ``text`` is given).

    Raises:
        DataError: naming the template and field that is wrong.
    """
    if text is None:
        text = resources.files("so8t.data").joinpath(TEMPLATES_RESOURCE).read_text(encoding="utf-8")
    try:
        return SafetyTemplates.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as e:
        raise DataError(f"so8t/data/{TEMPLATES_RESOURCE}: invalid safety templates: {e}") from None


_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa]")


def add_typo(text: str, rng: random.Random) -> str:
    """``text`` with one kana dropped or doubled (the kind of slip a quick typist makes)."""
    spots = [m.start() for m in _KANA.finditer(text)]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1 :] if rng.random() < 0.5 else text[: i + 1] + text[i:]



def _draw_decision(
    templates: SafetyTemplates, domain: Domain, t: SafetyTemplate, rng: random.Random, seen: set[str]
) -> tuple[str, dict[str, str]] | None:
    """A prompt not in ``seen`` and its slot filling, or None when the template is exhausted.

    The request is a whole ``requests`` entry or an ``asks`` entry in a random frame (each
    half the time when the template has both), then dressed by :class:`Phrasing`.
    """
    names = placeholders(t)
    ph = templates.phrasing
    for _ in range(MAX_PROMPT_DRAWS):
        use_frame = bool(t.asks) and (not t.requests or rng.random() < 0.5)
        if use_frame:
            request = rng.choice(templates.frames).replace("{ask}", rng.choice(t.asks))
        else:
            request = rng.choice(t.requests)
        values = dict(rng.choice(t.cases)) if t.cases else {}
        for name in names:
            if name not in values:
                values[name] = rng.choice(templates.slot_values(domain, t, name))
        prompt = request.format_map(values)
        if rng.random() < ph.prefix_rate:
            prompt = rng.choice(ph.prefixes) + prompt
        if rng.random() < ph.context_rate:
            prompt = rng.choice(ph.contexts) + prompt
        if rng.random() < ph.followup_rate:
            prompt = prompt + rng.choice(ph.followups)
        if rng.random() < ph.typo_rate:
            prompt = add_typo(prompt, rng)
        if prompt not in seen:
            return prompt, values
    return None


def build_decision_records(
    templates: SafetyTemplates, per_template: int, domains: list[str], seed: int
) -> list[dict[str, Any]]:
    """``per_template`` records (distinct prompts) from every template of ``domains``.

    Records of one template share the group ``safety-<id>``, so they land in one split.
    A template with fewer distinct prompts gives what it has.
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for domain_name in domains:
        domain = Domain(domain_name)
        for t in templates.domains[domain].templates:
            rng = random.Random(f"{seed}:decision:{t.id}")
            category = templates.categories[t.category]
            for k in range(per_template):
                drawn = _draw_decision(templates, domain, t, rng, seen)
                if drawn is None:
                    break
                prompt, values = drawn
                seen.add(prompt)
                thinking = templates.thinking[category.decision].format(
                    domain_ja=DOMAIN_JA[domain.value],
                    summary=t.summary_text().format_map(values),
                    clause=category.clause,
                )
                records.append(
                    {
                        "id": f"safety-{t.id}-{k:02d}",
                        "task": Task.DECISION.value,
                        "prompt": prompt,
                        "thinking": thinking,
                        "response": templates.response(t).format_map(values),
                        "decision": category.decision.value,
                        "domain": domain.value,
                        "category": t.category,
                        "reason": category.reason,
                        "group": f"safety-{t.id}",
                        "source": SAFETY_SOURCE,
                    }
                )
    return records
