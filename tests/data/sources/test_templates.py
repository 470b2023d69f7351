"""so8t.data.sources.templates: the safety-template schema and the decision records drawn from it."""

from collections import Counter

import pytest

from so8t.data.sources.templates import build_decision_records, load_safety_templates, placeholders
from so8t.io import DataError
from so8t.decision import DECISION_PREFIX
from so8t.schema import DECISIONS, Domain


@pytest.fixture(scope="module")
def templates():
    return load_safety_templates()


def test_templates_cover_every_domain_and_decision(templates):
    for domain, block in templates.domains.items():
        per_decision = Counter(templates.categories[t.category].decision.value for t in block.templates)
        assert set(per_decision) == set(DECISIONS), domain
        assert min(per_decision.values()) >= 4, (domain, per_decision)


def test_templates_validation_names_the_template():
    bad = """
phrasing: {prefix_rate: 0.1, prefixes: ["すみません、"]}
thinking: {ALLOW: a, ESCALATION: b, DENY: c}
categories: {public_info: {decision: ALLOW, clause: x, reason: y, response: z}}
domains:
  general:
    templates:
      - {id: general-ALLOW-01, category: nope, summary: s, requests: [r], response: x}
"""
    with pytest.raises(DataError, match=r"general-ALLOW-01.*unknown category 'nope'"):
        load_safety_templates(bad)


def test_decisions_come_from_every_template(templates):
    records = build_decision_records(templates, 6, ["defense", "aerospace", "transport", "general"], seed=7)
    per_template = Counter(r["group"] for r in records)
    ids = [t.id for block in templates.domains.values() for t in block.templates]
    assert set(per_template) == {f"safety-{i}" for i in ids} and set(per_template.values()) == {6}
    cells = Counter((r["domain"], r["decision"]) for r in records)
    assert len(cells) == 12 and min(cells.values()) >= 6 * 22
    assert len({r["prompt"] for r in records}) == len(records)
    for r in records:
        assert r["group"].startswith(f"safety-{r['domain']}-{r['decision']}-")
        assert r["category"] in templates.categories
        # The formatter writes the decision line; the texts must not carry a label.
        for text in (r["prompt"], r["response"], r["thinking"]):
            assert DECISION_PREFIX not in text and not any(d in text for d in DECISIONS)
        assert "{" not in r["prompt"] + r["thinking"] + r["response"]


def test_no_slot_vocabulary_belongs_to_one_decision(templates):
    """A slot (its values) used by one decision's templates only would teach a word cue, not the policy."""
    for domain, block in templates.domains.items():
        users: dict[str, set[str]] = {}
        for t in block.templates:
            for name in placeholders(t):
                if name not in t.slots and not any(name in c for c in t.cases):
                    users.setdefault(name, set()).add(templates.categories[t.category].decision.value)
        lonely = {name: d for name, d in users.items() if len(d) == 1}
        assert not lonely, f"{domain.value}: slots used by one decision only: {lonely}"


def test_decision_domain_subset(templates):
    records = build_decision_records(templates, 2, ["transport"], seed=1)
    assert {r["domain"] for r in records} == {"transport"}
    assert len(records) == 2 * len(templates.domains[Domain.TRANSPORT].templates)
