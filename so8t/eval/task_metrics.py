"""Per-task metrics of one artifact: decisions, the runtime policy, math, FAQ, citation and stability.

* Decisions: :func:`decision_metrics` (quality and calibration of the scored labels, with
  bootstrap intervals) and its flat ``reports/metrics.json`` keys (:func:`decision_flat`); the
  runtime policy's labels beside the model's (:func:`policy_metrics`); the generated ``判定: X``
  lines (:func:`generated_decision_lines`) against the scored labels
  (:func:`generated_decision_metrics`); the grounded QA answers that cite their own document
  (:func:`cited`).
* Generated answers: :func:`math_metrics` (exact match of the final number) and
  :func:`faq_metrics` (chrF, BLEU, ROUGE-L, keigo rate).
* :func:`stability_metrics`: repetition in one long greedy generation.

The metric primitives are :mod:`so8t.eval.metrics` and :mod:`so8t.eval.calibration`; the decision
format is :mod:`so8t.decision`.
"""

from __future__ import annotations

import numpy as np

from so8t.data.think_format import parse_assistant
from so8t.decision import ALLOW_INDEX, answer_context, label_index
from so8t.eval import keys
from so8t.eval.calibration import apply_temperature, calibration_summary
from so8t.inference import Backend, Generation, stop_strings
from so8t.eval.metrics import (
    bootstrap_interval,
    classification_report,
    expected_calibration_error,
    macro_f1_indices,
    reliability_bins,
)
from so8t.eval.text_metrics import (
    bleu_ja,
    chrf,
    extract_final_number,
    keigo_rate,
    math_exact_match,
    repetition_stats,
    rouge_l_ja,
)
from so8t.policy import apply_policy
from so8t.schema import DECISIONS, Decision

# --------------------------------------------------------------------------- decisions


def decision_metrics(scored: list[dict], temperature: float, m) -> dict:
    """Decision quality and calibration of scored decisions, with bootstrap intervals.

    Args:
        scored: rows of :func:`so8t.inference.score_decisions`.
        temperature: the calibrated ``T`` of this artifact (1.0 when the fit failed).
        m: the ``metrics`` params section (ECE bins, bootstrap resamples, confidence).

    Returns:
        accuracy, macro-F1 and ECE (calibrated) with ``*_ci_low`` / ``*_ci_high`` (percentile
        bootstrap over examples, :func:`so8t.eval.metrics.bootstrap_interval`), per-class P/R,
        the confusion matrix, ECE / Brier / NLL before and after temperature scaling,
        reliability bins, and accuracy by domain and by policy category.
    """
    logits = np.array([r["logits"] for r in scored], dtype=np.float64)
    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    preds = np.array([r["pred"] for r in scored], dtype=np.int64)
    report = classification_report([DECISIONS[i] for i in labels], [DECISIONS[i] for i in preds])
    cal = calibration_summary(logits, labels, temperature, m.ece_bins)
    probs = apply_temperature(logits, temperature)
    ci = {"confidence": m.confidence, "n_resamples": m.bootstrap_resamples}

    def interval(stat) -> tuple[float, float]:
        return bootstrap_interval(stat, len(scored), m.confidence, m.bootstrap_resamples)

    f1_lo, f1_hi = interval(macro_f1_indices(labels, preds))
    acc_lo, acc_hi = interval(lambda idx: float(np.mean(labels[idx] == preds[idx])))
    ece_lo, ece_hi = interval(lambda idx: expected_calibration_error(probs[idx], labels[idx], m.ece_bins))
    return {
        "n": len(scored),
        "accuracy": report["accuracy"],
        "accuracy_ci_low": acc_lo,
        "accuracy_ci_high": acc_hi,
        "macro_f1": report["macro_f1"],
        "macro_f1_ci_low": f1_lo,
        "macro_f1_ci_high": f1_hi,
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "ece": cal["ece_before"],
        "brier": cal["brier_before"],
        "nll": cal["nll_before"],
        "ece_calibrated": cal["ece_after"],
        "ece_calibrated_ci_low": ece_lo,
        "ece_calibrated_ci_high": ece_hi,
        "brier_calibrated": cal["brier_after"],
        "nll_calibrated": cal["nll_after"],
        "temperature": temperature,
        "interval": ci,
        "reliability": reliability_bins(probs, labels, m.ece_bins),
        "by_domain": _accuracy_by(scored, "domain"),
        "by_category": _accuracy_by(scored, "category"),
    }


def _accuracy_by(scored: list[dict], field_name: str) -> dict[str, dict]:
    """``{value: {"n", "accuracy"}}`` of the rows grouped by ``field_name`` (rows without it left out)."""
    groups: dict[str, list[dict]] = {}
    for r in scored:
        if r.get(field_name):
            groups.setdefault(r[field_name], []).append(r)
    return {
        k: {"n": len(v), "accuracy": float(np.mean([r["label"] == r["pred"] for r in v]))} for k, v in sorted(groups.items())
    }


def decision_flat(artifact: str, dec: dict, at_bound: bool | None = None) -> dict[str, float]:
    """The flat ``reports/metrics.json`` keys of :func:`decision_metrics` for one artifact."""
    k = lambda name: keys.key(artifact, name)  # noqa: E731
    flat = {
        k(keys.DECISION_N): dec["n"],
        k(keys.DECISION_ACCURACY): dec["accuracy"],
        k(keys.DECISION_MACRO_F1): dec["macro_f1"],
        k(keys.DECISION_MACRO_F1_CI_LOW): dec["macro_f1_ci_low"],
        k(keys.DECISION_MACRO_F1_CI_HIGH): dec["macro_f1_ci_high"],
        k(keys.DECISION_ECE): dec["ece"],
        k(keys.DECISION_BRIER): dec["brier"],
        k(keys.DECISION_NLL): dec["nll"],
        k(keys.DECISION_ECE_CALIBRATED): dec["ece_calibrated"],
        k(keys.DECISION_ECE_CALIBRATED_CI_LOW): dec["ece_calibrated_ci_low"],
        k(keys.DECISION_ECE_CALIBRATED_CI_HIGH): dec["ece_calibrated_ci_high"],
        k(keys.DECISION_BRIER_CALIBRATED): dec["brier_calibrated"],
        k(keys.DECISION_NLL_CALIBRATED): dec["nll_calibrated"],
        k(keys.DECISION_TEMPERATURE): dec["temperature"],
    }
    if at_bound is not None:
        flat[k(keys.DECISION_TEMPERATURE_AT_BOUND)] = float(at_bound)
    for group in ("by_domain", "by_category"):
        for value, g in dec[group].items():
            flat[k(f"decision.{group}.{value}.accuracy")] = g["accuracy"]
    return flat


def policy_metrics(scored: list[dict], temperature: float, allow_threshold: float) -> dict:
    """The runtime policy's labels beside the model's: an ALLOW below ``allow_threshold`` becomes ESCALATION.

    The policy is the runtime's own function before generation (:func:`so8t.policy.apply_policy`
    without an answer): ``p = softmax(z / T)`` of the scored label log-likelihoods ``z``
    (:func:`so8t.eval.calibration.apply_temperature`), the model's label ``argmax p``, and an ALLOW
    with ``p_ALLOW < allow_threshold`` becomes ESCALATION. What the runtime does after generating
    (an ALLOW without a final answer becomes ESCALATION) is measured on the served artifact by
    :func:`so8t.eval.served.served_policy`.

    Returns:
        ``{"model": {label: rate}, "policy": {label: rate}, "policy_macro_f1", "overridden",
        "allow_recall", "allow_n"}``, so a calibration failure that turns every ALLOW into
        ESCALATION shows in the metrics. ``allow_recall``: share of the ``allow_n`` gold-ALLOW rows
        the policy answers (its label is ALLOW); NaN without a gold-ALLOW row.
    """
    probs = apply_temperature(np.array([r["logits"] for r in scored], dtype=np.float64), temperature)
    outcomes = [apply_policy(p, allow_threshold) for p in probs]
    model = [o.model_decision for o in outcomes]
    policy = [o.decision for o in outcomes]
    truth = [DECISIONS[r["label"]] for r in scored]
    rates = lambda labels: {d: float(np.mean([x == d for x in labels])) for d in DECISIONS}  # noqa: E731
    return {
        "model": rates(model),
        "policy": rates(policy),
        "policy_macro_f1": classification_report(truth, policy)["macro_f1"],
        "overridden": float(np.mean([a != b for a, b in zip(model, policy)])),
        "allow_recall": _allow_recall(truth, policy),
        "allow_n": sum(t == Decision.ALLOW.value for t in truth),
    }


def _allow_recall(truth: list[str], labels: list[str]) -> float:
    """Share of the gold-ALLOW rows whose label in ``labels`` is ALLOW (NaN without a gold ALLOW)."""
    hits = [x == Decision.ALLOW.value for t, x in zip(truth, labels) if t == Decision.ALLOW.value]
    return float(np.mean(hits)) if hits else float("nan")


def generated_decision_lines(
    backend: Backend, rows: list[dict], max_new_tokens: int, penalty: float, step=None
) -> list[Generation]:
    """The greedy first line of the assistant turn after each prompt: where the model writes ``判定: X``.

    Generation starts at the rendered prompt (``prompt_text``, the chat template's generation prompt)
    and stops at the first newline, an end-of-turn token or ``max_new_tokens`` tokens; the same
    greedy decoding and repetition penalty as every other generation. These short, prefill-bound
    generations are kept out of the backend's generation tokens/s (:attr:`Backend.stats`).
    """
    prompts = [backend.tokenize(r["prompt_text"]) for r in rows]
    stats = backend.stats
    kept = stats.generated_tokens, stats.generation_seconds
    try:
        return backend.generate(prompts, max_new_tokens, [*stop_strings(backend), "\n"], penalty, step)
    finally:
        stats.generated_tokens, stats.generation_seconds = kept


def generated_decision_metrics(texts: list[str], scored: list[dict], style: str) -> dict:
    """The generated ``判定: X`` lines against the scored labels and the gold ones.

    Each text's first line is parsed with :func:`so8t.data.think_format.parse_assistant` (its
    decision is :func:`so8t.decision.parse_decision`'s, the :data:`so8t.decision.DECISION_LINE`
    pattern the training data is written in); a line without a label has none.

    Args:
        texts: generated texts (:func:`generated_decision_lines`), one per scored row.
        scored: the same examples' rows of :func:`so8t.inference.score_decisions` (``label``:
            the gold index, ``pred``: argmax of the scored label log-likelihoods).
        style: ``think_format.style``.

    Returns:
        ``{"n", "agreement" (share whose generated label equals the scored one), "macro_f1" (of the
        generated labels against the gold ones over the 3 labels, sklearn ``zero_division=0``; a line
        without a label is wrong), "unparsed_rate" (share of lines without a label), "labels" ({id:
        label or None})}``; NaN rates for no rows.

    Raises:
        ValueError: ``texts`` and ``scored`` differ in length.
    """
    if len(texts) != len(scored):
        raise ValueError(f"generated_decision_metrics: {len(texts)} texts for {len(scored)} scored rows")
    parsed = [parse_assistant(t.split("\n", 1)[0], style)[2] for t in texts]
    n = len(parsed)
    if not n:
        return {"n": 0, "agreement": float("nan"), "macro_f1": float("nan"), "unparsed_rate": float("nan"), "labels": {}}
    generated = np.array([label_index(x) if x else len(DECISIONS) for x in parsed], dtype=np.int64)
    gold = np.array([r["label"] for r in scored], dtype=np.int64)
    pred = np.array([r["pred"] for r in scored], dtype=np.int64)
    return {
        "n": n,
        "agreement": float(np.mean(generated == pred)),
        "macro_f1": macro_f1_indices(gold, generated)(np.arange(n)),
        "unparsed_rate": float(np.mean(generated == len(DECISIONS))),
        "labels": {r["id"]: x for r, x in zip(scored, parsed)},
    }


def cited(rows: list[dict], scored: list[dict]) -> float:
    """Share of QA requests the runtime would answer (ALLOW) citing the question's own document
    (a retrieved passage from the record's ``group``: its FAQ entry or reference section)."""
    hits = [
        r["pred"] == ALLOW_INDEX and any(doc.endswith(f"#{row['group']}") for doc in row.get("passages", []))
        for row, r in zip(rows, scored)
    ]
    return float(np.mean(hits)) if hits else float("nan")


# --------------------------------------------------------------------------- generated answers


def math_metrics(examples: list[dict], gens: list[Generation], style: str) -> dict:
    """Exact match of the final number (``答え: N`` / ``#### N`` / last number) against the reference."""
    preds = []
    for g in gens:
        _, final, _ = parse_assistant(g.text, style)
        preds.append(extract_final_number(final or g.text) or "")
    refs = [ex["final_answer"] for ex in examples]
    return {"exact_match": math_exact_match(preds, refs), "n": len(examples), "predictions": preds}


def faq_metrics(examples: list[dict], gens: list[Generation], style: str) -> dict:
    """chrF, BLEU (ja-mecab), ROUGE-L (MeCab tokens) and keigo rate of the final answers vs the FAQ answers."""
    finals = [parse_assistant(g.text, style)[1] for g in gens]
    refs = [ex["response"] for ex in examples]
    answered = [f for f in finals if f.strip()]
    return {
        "chrf": chrf(finals, refs),
        "bleu": bleu_ja(finals, refs),
        "rouge_l": rouge_l_ja(finals, refs),
        "keigo_rate": keigo_rate(answered) if answered else 0.0,
        "answered_rate": float(np.mean([bool(f.strip()) for f in finals])),
        "n": len(examples),
    }


def stability_metrics(backend: Backend, example: dict, max_new_tokens: int) -> dict:
    """Repetition in one long greedy generation without any repetition penalty.

    Token-level statistics (the backend's token ids of the generated text) from
    :func:`so8t.eval.text_metrics.repetition_stats`: repeated 4-gram rate, longest
    repeated span (tokens) and the oscillation flag.
    """
    prompt = backend.tokenize(answer_context(example["prompt_text"]))
    (gen,) = backend.generate([prompt], max_new_tokens, stop_strings(backend), 1.0)
    ids = backend.tokenize(gen.text) or [0]
    return repetition_stats(ids, n=4) | {"text": gen.text, "tokens_per_s": gen.n_tokens / max(gen.seconds, 1e-9)}


__all__ = [
    "cited",
    "decision_flat",
    "decision_metrics",
    "faq_metrics",
    "generated_decision_lines",
    "generated_decision_metrics",
    "math_metrics",
    "policy_metrics",
    "stability_metrics",
]
