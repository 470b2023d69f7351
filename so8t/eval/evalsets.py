"""What every artifact is evaluated on: the eval sets and the example selection behind them.

* :func:`balanced_decisions`, :func:`first_of_task`: stable example samples (balanced over the
  decision labels and spread over templates; the first examples of a task by id), used by the
  evaluate and calibrate stages, the training hook (:func:`so8t.eval.evaluation.decision_eval`)
  and distillation.
* :class:`EvalSets` / :func:`build_eval_sets`: the test decisions, a train sample, the benign
  prompts, math, FAQ and reference QA, the held-out perplexity windows, and their versions with
  retrieved passages (:func:`grounded_rows`); :func:`sets_for` trims them for the rows outside
  ``evaluate.extra_artifacts``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from so8t.eval.artifacts import Artifact
from so8t.schema import DECISIONS, Task

# --------------------------------------------------------------------------- example selection


def balanced_decisions(rows: list[dict], n: int | None) -> list[dict]:
    """Decision examples: every one (``n`` is ``None``), or ``n // 3`` per label spread over templates.

    Within a label a sample is taken round-robin over the label's templates (``group``),
    in a stable order, so it spans as many templates as it can: one template never fills it.
    """
    decisions = [r for r in rows if r["task"] == Task.DECISION.value]
    if n is None:
        return sorted(decisions, key=lambda r: r["id"])
    by_label = {label: [r for r in decisions if r["decision"] == label] for label in DECISIONS}
    per = max(1, n // len(DECISIONS))
    out = []
    for label in DECISIONS:
        groups: dict[str, list[dict]] = {}
        for r in sorted(by_label[label], key=lambda r: r["id"]):
            groups.setdefault(r.get("group") or r["id"], []).append(r)
        queues = [groups[g] for g in sorted(groups)]
        picked: list[dict] = []
        depth = 0
        while len(picked) < per and any(depth < len(q) for q in queues):
            picked += [q[depth] for q in queues if depth < len(q)][: per - len(picked)]
            depth += 1
        out += picked
    return out


def first_of_task(rows: list[dict], task: Task, n: int | None) -> list[dict]:
    """The first ``n`` examples of ``task`` by id (stable across runs; ``None`` = all)."""
    return sorted((r for r in rows if r["task"] == task.value), key=lambda r: r["id"])[:n]


# --------------------------------------------------------------------------- the eval sets


@dataclass
class EvalSets:
    """What every artifact is evaluated on.

    Attributes:
        decisions: every test decision (scored, no generation).
        train_decisions: a sample of train decisions, spread over templates (to see over-fitting).
        benign: the test split's other prompts (QA, math): all benign, so ALLOW is right.
        maths, faqs: test examples whose answers are generated and scored.
        windows: held-out text windows for perplexity.
    """

    decisions: list[dict]
    train_decisions: list[dict]
    benign: list[dict]
    maths: list[dict]
    faqs: list[dict]
    windows: list[list[int]]
    #: The same requests with retrieved passages before the question (the runtime's prompt):
    #: decisions (a balanced sample), FAQ and reference QA; each row's ``passages`` lists its doc ids.
    decisions_rag: list[dict] = field(default_factory=list)
    faqs_rag: list[dict] = field(default_factory=list)
    refs: list[dict] = field(default_factory=list)
    refs_rag: list[dict] = field(default_factory=list)

    def steps(self) -> int:
        """Progress steps per artifact: scored prompts, generations (the decisions' ``判定`` lines too)
        and the stability run."""
        scored = len(self.decisions) + len(self.train_decisions) + len(self.benign) + len(self.decisions_rag)
        generated = len(self.maths) + len(self.faqs) + len(self.faqs_rag) + len(self.refs) + len(self.refs_rag)
        generated += len(self.decisions)
        return scored + len(self.faqs_rag) + generated + (1 if self.faqs else 0)


def grounded_rows(rows: list[dict], grounder, tokenizer) -> list[dict]:
    """``rows`` with retrieved passages before each question, rendered as the runtime renders them.

    The passages are what the runtime's retriever returns for the question (nothing is left
    out: at serving time the answer is not known); ``passages`` keeps their doc ids.
    """
    from so8t.data.grounding import grounded_prompt
    from so8t.data.think_format import render

    out = []
    for r in rows:
        passages = grounder.relevant(r["prompt"])
        prompt_text = render(tokenizer, grounded_prompt(r["prompt"], passages), None)
        out.append(r | {"prompt_text": prompt_text, "passages": [d for d, _, _ in passages]})
    return out


def build_eval_sets(params, test: list[dict], train: list[dict], heldout: list[str], tokenizer, grounder) -> EvalSets:
    """Every test decision, a train sample, the benign test prompts, math, FAQ and reference QA, the
    held-out windows, and (with a ``grounder``) their grounded versions (``evaluate.rag_decision_sample``)."""
    from so8t.inference import perplexity_windows

    e, m = params.evaluate, params.metrics
    faqs = first_of_task(test, Task.QA_FAQ, e.max_faq_examples)
    refs = first_of_task(test, Task.QA_REFERENCE, e.max_faq_examples)
    sets = EvalSets(
        decisions=balanced_decisions(test, None),
        train_decisions=balanced_decisions(train, e.train_decision_sample) if e.train_decision_sample else [],
        benign=[r for r in test if r["task"] != Task.DECISION.value],
        maths=first_of_task(test, Task.MATH, e.max_math_examples),
        faqs=faqs,
        windows=perplexity_windows(tokenizer, heldout, m.perplexity_max_tokens, m.perplexity_window),
        refs=refs,
    )
    if grounder is not None:
        sets.decisions_rag = grounded_rows(balanced_decisions(test, e.rag_decision_sample), grounder, tokenizer)
        sets.faqs_rag = grounded_rows(faqs, grounder, tokenizer)
        sets.refs_rag = grounded_rows(refs, grounder, tokenizer)
    return sets


def sets_for(art: Artifact, sets: EvalSets, extra_artifacts: list[str] | None) -> EvalSets:
    """What ``art`` is evaluated on: all of ``sets`` for the rows in ``extra_artifacts`` (``None``:
    every row), else the core set without the train sample and the with-passages sets."""
    if extra_artifacts is None or art.name in extra_artifacts:
        return sets
    return dataclasses.replace(sets, train_decisions=[], decisions_rag=[], faqs_rag=[], refs_rag=[])


__all__ = [
    "EvalSets",
    "balanced_decisions",
    "build_eval_sets",
    "first_of_task",
    "grounded_rows",
    "sets_for",
]
