"""so8t.data.synthesize: balance, determinism, schema, dedup and held-out text of the whole synthesis.

The sources' own tests mirror :mod:`so8t.data.sources` under ``tests/data/sources/``.
"""

import json

import pytest

from so8t.data import collect
from so8t.data.dedup import exact_duplicates
from so8t.data.synthesize import synthesize
from so8t.params import SynthesizeParams
from so8t.schema import DECISIONS, Record

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
    # 40 documents, each with its title question and up to qa_per_document - 1 term questions
    assert stats["groups_by_task"]["qa_reference"] == 40
    assert 40 < stats["by_task"]["qa_reference"] <= 40 * 3
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
