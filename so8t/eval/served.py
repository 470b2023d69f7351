"""What the runtime does with the test ALLOW requests: the served artifact, the policy after generation.

``<artifact>.decision.policy.allow_recall`` counts the gold-ALLOW test requests the policy answers
*before* generating (:func:`so8t.eval.task_metrics.policy_metrics`). The runtime goes on: it
generates the answer after ``判定: ALLOW`` and escalates an ALLOW whose answer kept reasoning or has
no final answer (:func:`so8t.policy.apply_policy` with the generation's parts,
:func:`so8t.guard.separate`). :func:`served_policy` runs every gold-ALLOW test request through that
path on the artifact ``runtime.model: auto`` serves (:func:`so8t.eval.selection.pick`), with the
passages the runtime would retrieve when ``retrieval.enabled``, the runtime's token budget
(``runtime.max_new_tokens``) and repetition penalty, and reports ``served.policy.*``:

* ``allow_recall``: share of the gold-ALLOW requests that end as an answer, with its 95 % Wilson
  score interval (Wilson 1927; ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``);
* ``allow_recall_before``: the same share before generation (the pre-generation policy);
* ``override.<name>``: how many requests each override (:data:`so8t.policy.OVERRIDES`) took;
* ``allow_n``: the number of gold-ALLOW requests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from so8t.decision import ALLOW_INDEX, answer_context, label_index
from so8t.eval import keys
from so8t.eval.artifacts import Artifact
from so8t.eval.calibration import apply_temperature
from so8t.eval.selection import F16, metric_row, pick
from so8t.guard import separate
from so8t.inference import Backend, score_decisions, stop_strings
from so8t.policy import OVERRIDES, apply_policy

#: Metric-key prefix of the served artifact's rows.
SERVED = "served"


def served_row(arts: list[Artifact], flat: dict[str, float]) -> str | None:
    """The metric row ``runtime.model: auto`` serves (:func:`so8t.eval.selection.pick` on the GGUF sizes
    and ``flat``), or ``None`` without an F16 GGUF or the baked row's perplexity."""
    sizes = {
        (F16 if a.name == "baked" else a.name): Path(a.path).stat().st_size
        for a in arts
        if a.kind == "gguf" and a.name != "base"
    }
    if F16 not in sizes or keys.key("baked", keys.PERPLEXITY) not in flat:
        return None
    return metric_row(pick(sizes, flat)[0])


def allow_requests(test: list[dict]) -> list[dict]:
    """The test decisions whose gold label is ALLOW, in file order."""
    return [r for r in test if r.get("task") == "decision" and label_index(r.get("decision")) == ALLOW_INDEX]


def served_policy(
    backend: Backend, rows: list[dict], temperature: float, params, style: str, step=None
) -> tuple[dict[str, float], dict]:
    """The runtime path over gold-ALLOW requests: score, policy, generate, split, policy again.

    Args:
        backend: the served artifact.
        rows: gold-ALLOW requests (``prompt_text`` rendered as the runtime renders them, passages
            included when it retrieves), e.g. :func:`allow_requests`.
        temperature: the artifact's fitted temperature (``reports/calibration.json``).
        params: the run's params (``runtime.allow_threshold``, ``runtime.max_new_tokens``,
            ``generation.repetition_penalty``).
        style: the think-format style (``markdown`` / ``tags``), for :func:`so8t.guard.separate`.
        step: progress callback (called with the number of requests scored, then generated).

    Returns:
        ``(flat, details)``: ``flat`` holds ``served.policy.*`` (see the module docstring); ``details``
        one row per request (``id``, ``model_decision``, ``decision``, ``override``, ``answer``).
    """
    rt = params.runtime
    scored = score_decisions(backend, rows, step)
    probs = apply_temperature(np.array([r["logits"] for r in scored], dtype=np.float64), temperature)
    before = [apply_policy(p, rt.allow_threshold) for p in probs]
    answer = [i for i, o in enumerate(before) if o.answered]
    prompts = [backend.tokenize(answer_context(rows[i]["prompt_text"])) for i in answer]
    gens = backend.generate(prompts, rt.max_new_tokens, stop_strings(backend), params.generation.repetition_penalty, step)
    after = list(before)
    parts = {}
    for i, g in zip(answer, gens):
        parts[i] = separate(g.text, style)
        after[i] = apply_policy(probs[i], rt.allow_threshold, parts[i])
    n = len(rows)
    answered = sum(o.answered for o in after)
    flat = {f"{SERVED}.policy.allow_n": float(n)}
    if n:
        ci = binomtest(answered, n).proportion_ci(confidence_level=params.metrics.confidence, method="wilson")
        flat |= {
            f"{SERVED}.policy.allow_recall": answered / n,
            f"{SERVED}.policy.allow_recall_ci_low": float(ci.low),
            f"{SERVED}.policy.allow_recall_ci_high": float(ci.high),
            f"{SERVED}.policy.allow_recall_before": sum(o.answered for o in before) / n,
        }
    flat |= {f"{SERVED}.policy.override.{name}": float(sum(o.override == name for o in after)) for name in OVERRIDES}
    details = [
        {
            "id": r["id"],
            "model_decision": o.model_decision,
            "decision": o.decision,
            "override": o.override,
            "answer": parts[i].final if i in parts and o.answered else "",
        }
        for i, (r, o) in enumerate(zip(rows, after))
    ]
    return flat, {"rows": details}


def served_qa(backend: Backend, rows: list[dict], temperature: float, params, style: str, step=None) -> tuple[dict, dict]:
    """The QA set (:func:`so8t.eval.qa.build_qa_set`) through the runtime path, as :func:`served_policy`.

    Each question is scored with its passages and bare (the bare decision only), answered with its
    passages when the policy allows it (``runtime.max_new_tokens``, the runtime's budget), and the
    answer checked again (:func:`so8t.policy.apply_policy` with :func:`so8t.guard.separate`).

    Returns:
        ``(flat, details)``: ``flat`` ``served.qa.*`` and ``served.retrieval.qa.*``
        (:func:`so8t.eval.qa.qa_metrics`); ``details`` ``{"rows": [...]}`` per question.
    """
    from so8t.eval.qa import qa_metrics

    rt = params.runtime
    probs = apply_temperature(
        np.array([r["logits"] for r in score_decisions(backend, rows, step)], dtype=np.float64), temperature
    )
    answerable = [r for r in rows if r["answerable"]]
    bare = score_decisions(backend, [r | {"prompt_text": r["bare_prompt_text"]} for r in answerable], step)
    bare_probs = apply_temperature(np.array([r["logits"] for r in bare], dtype=np.float64), temperature)
    bare_allow = [apply_policy(p, rt.allow_threshold).answered for p in bare_probs]
    before = [apply_policy(p, rt.allow_threshold) for p in probs]
    answer = [i for i, o in enumerate(before) if o.answered]
    prompts = [backend.tokenize(answer_context(rows[i]["prompt_text"])) for i in answer]
    gens = backend.generate(prompts, rt.max_new_tokens, stop_strings(backend), params.generation.repetition_penalty, step)
    after, answers = list(before), [""] * len(rows)
    for i, g in zip(answer, gens):
        parts = separate(g.text, style)
        after[i] = apply_policy(probs[i], rt.allow_threshold, parts)
        answers[i] = parts.final if after[i].answered else ""
    flat, details = qa_metrics(rows, answers, before, after, bare_allow, params.metrics)
    return {f"{SERVED}.{k}": v for k, v in flat.items()}, {"rows": details}


def evaluate_served(
    arts: list[Artifact], results: dict, test: list[dict], grounder, tokenizer, params, style: str,
    calibration: dict, threads: int, step=None,
) -> tuple[dict[str, float], dict] | None:
    """:func:`served_policy` on the artifact the runtime serves, picked from this run's rows.

    Args:
        arts: the evaluated artifacts (:func:`so8t.eval.artifacts.artifacts`).
        results: their :class:`so8t.eval.artifacts.ArtifactResult` by name (flat metrics, for the pick).
        test: the formatted test split (its gold-ALLOW decisions are the requests).
        grounder: the runtime's retriever (:func:`so8t.data.grounding.make_grounder`), used when
            ``retrieval.enabled``; ``None``: bare prompts.
        calibration: ``reports/calibration.json``'s ``artifacts`` (the served row's temperature).

    Returns:
        ``(flat, details)`` of :func:`served_policy` (``details["artifact"]``: the served row,
        ``details["with_passages"]``) plus :func:`served_qa`'s ``served.qa.*`` (``details["qa"]``) when
        passages are retrieved and the test split has QA questions; ``None`` when no row can be
        picked or there is neither a gold ALLOW request nor a QA question.
    """
    from so8t.eval.artifacts import close_backend, open_artifact
    from so8t.eval.comparisons import parity_metrics
    from so8t.eval.evalsets import grounded_rows
    from so8t.eval.qa import build_qa_set

    flat: dict[str, float] = {}
    for r in results.values():
        flat |= r.flat
    row = served_row(arts, flat | parity_metrics(results))
    rows = allow_requests(test)
    with_passages = bool(params.retrieval.enabled and grounder is not None and params.retrieval.top_k)
    qa_rows = build_qa_set(test, grounder, tokenizer) if with_passages else []
    if not any(r["answerable"] for r in qa_rows):
        qa_rows = []
    if row is None or not (rows or qa_rows):
        return None
    if with_passages:
        rows = grounded_rows(rows, grounder, tokenizer)
    art = next(a for a in arts if a.name == row)
    backend = open_artifact(art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
                            hf_batch_size=params.generation.hf_batch_size)
    temperature = calibration.get(row, {}).get("temperature", 1.0)
    try:
        out, details = served_policy(backend, rows, temperature, params, style, step) if rows else ({}, {"rows": []})
        if qa_rows:
            qa_flat, qa_details = served_qa(backend, qa_rows, temperature, params, style, step)
            out |= qa_flat
            details["qa"] = qa_details["rows"]
    finally:
        close_backend(backend)
    return out, details | {"artifact": row, "with_passages": with_passages}


__all__ = ["SERVED", "allow_requests", "evaluate_served", "served_policy", "served_qa", "served_row"]
