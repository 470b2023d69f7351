"""Comparisons between evaluated rows, runtimes and baselines, paired on the same examples.

* Parity: :func:`parity` (share of identical greedy texts or decisions), :func:`parity_metrics`
  (every quantised GGUF against ``baked``, its F16 GGUF) and :func:`parity_sample` (the sample
  the transformers reference runs, :func:`so8t.eval.evaluation.reference_parity`).
* With and without retrieved passages: :func:`chrf_comparison` (paired chrF gain).
* The linear-probe baseline (stage ``probe``, :mod:`so8t.eval.probe`): :func:`load_probe`,
  :func:`probe_comparison` and the paired macro-F1 gain behind it (:func:`paired_gain`).

Every interval is a percentile bootstrap over examples (:func:`so8t.eval.metrics.bootstrap_interval`)
with the two sides of one example kept paired.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from so8t.decision import label_index
from so8t.eval import keys
from so8t.eval.artifacts import ArtifactResult
from so8t.eval.evalsets import EvalSets, balanced_decisions
from so8t.eval.metrics import bootstrap_interval, macro_f1_indices
from so8t.eval.text_metrics import chrf_indices
from so8t.io import DataError, read_json
from so8t.schema import DECISIONS

# --------------------------------------------------------------------------- parity


def parity(reference: dict[str, str], other: dict[str, str]) -> float:
    """Share of the ids in both whose values are identical (greedy texts or decisions)."""
    common = sorted(set(reference) & set(other))
    return float(np.mean([reference[i] == other[i] for i in common])) if common else float("nan")


def parity_metrics(results: dict[str, ArtifactResult]) -> dict[str, float]:
    """Greedy-text and decision agreement of every quantised GGUF with ``baked`` (its F16 GGUF) on
    every test example: what quantisation changes. (F16 against transformers:
    :func:`so8t.eval.evaluation.reference_parity`.)"""
    flat: dict[str, float] = {}
    ref = results.get("baked")
    if ref is None:
        return flat
    for name, r in results.items():
        if name not in ("base", "baked"):
            flat[keys.key(name, keys.PARITY_TEXT)] = parity(ref.texts, r.texts)
            flat[keys.key(name, keys.PARITY_DECISION)] = parity(ref.decisions, r.decisions)
    return flat


def parity_sample(sets: EvalSets, n_decisions: int, n_texts: int) -> tuple[list[dict], list[dict], list[dict]]:
    """The transformers reference sample: ``n_decisions`` test decisions (balanced over labels,
    spread over templates, :func:`so8t.eval.evalsets.balanced_decisions`), and the first ``n_texts``
    generation prompts, half math and half FAQ (all of one when the other runs out).

    Returns:
        ``(decisions, maths, faqs)``.
    """
    decisions = balanced_decisions(sets.decisions, n_decisions) if n_decisions else []
    n_math = min(len(sets.maths), n_texts // 2)
    n_faq = min(len(sets.faqs), n_texts - n_math)
    n_math = min(len(sets.maths), n_texts - n_faq)
    return decisions, sets.maths[:n_math], sets.faqs[:n_faq]


# --------------------------------------------------------------------------- with and without passages


def chrf_comparison(bare: list[str], rag: list[str], refs: list[str], m) -> dict[str, float]:
    """chrF of the same examples answered without and with passages, and the paired gain.

    Args:
        bare, rag: final answers, one per reference, without / with retrieved passages.
        refs: the reference answers.
        m: the ``metrics`` params section (bootstrap confidence and resamples).

    Returns:
        ``chrf``, ``chrf_rag`` and ``chrf_rag_gain`` (rag − bare, chrF points on 0-100), each
        with ``*_ci_low`` / ``*_ci_high``: percentile bootstrap over examples with the two answers
        of one example kept paired (:func:`so8t.eval.metrics.bootstrap_interval` of
        :func:`so8t.eval.text_metrics.chrf_indices`). A gain whose interval contains 0 is no difference.
    """
    stat_bare, stat_rag = chrf_indices(bare, refs), chrf_indices(rag, refs)
    n, out = len(refs), {}
    stats = {
        "chrf": stat_bare,
        "chrf_rag": stat_rag,
        "chrf_rag_gain": lambda idx: stat_rag(idx) - stat_bare(idx),
    }
    for name, stat in stats.items():
        out[name] = stat(np.arange(n))
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_interval(stat, n, m.confidence, m.bootstrap_resamples)
    return out


# --------------------------------------------------------------------------- the linear probe


def paired_gain(labels: np.ndarray, pred: np.ndarray, pred_ref: np.ndarray, m) -> dict[str, float]:
    """Macro-F1 of ``pred`` minus macro-F1 of ``pred_ref`` on the same examples, with a paired interval.

    Args:
        labels, pred, pred_ref: ``(N,)`` int label indices into ``DECISIONS`` (a prediction outside
            ``[0, 3)`` counts as wrong), one row per example, paired.
        m: the ``metrics`` params section (``confidence``, ``bootstrap_resamples``).

    Returns:
        ``{"gain", "ci_low", "ci_high"}`` in macro-F1 points (0-1 scale): the percentile bootstrap
        over examples (:func:`so8t.eval.metrics.bootstrap_interval`, Efron and Tibshirani 1993) where
        each resample scores both predictions on the same resampled indices, so the interval is that
        of the difference (Koehn 2004's paired bootstrap). A gain whose interval contains 0 is no
        difference; ``(nan, nan)`` for fewer than 2 examples.

    Raises:
        ValueError: the three arrays differ in length.
    """
    labels, pred, pred_ref = (np.asarray(x, dtype=np.int64) for x in (labels, pred, pred_ref))
    if not len(labels) == len(pred) == len(pred_ref):
        raise ValueError(f"paired_gain: {len(labels)} labels, {len(pred)} and {len(pred_ref)} predictions")
    f1, f1_ref = macro_f1_indices(labels, pred), macro_f1_indices(labels, pred_ref)

    def stat(idx):
        return f1(idx) - f1_ref(idx)

    lo, hi = bootstrap_interval(stat, len(labels), m.confidence, m.bootstrap_resamples)
    return {"gain": stat(np.arange(len(labels))) if len(labels) else float("nan"), "ci_low": lo, "ci_high": hi}


def load_probe(path: Path, enabled: bool) -> tuple[dict | None, str]:
    """The probe stage's result (``reports/probe.json``, :func:`so8t.eval.probe.run_probe`), or why not.

    Returns:
        ``(probe, "")`` with ``probe["predictions"]`` keyed by example id (``{id: {"label", "pred",
        "probs"}}``; the file holds them as a list), or ``(None, reason)`` when ``probe.enabled`` is
        false, the file is missing or it is the disabled marker.

    Raises:
        DataError: the file has no ``predictions`` list or ``probe.decision``, a prediction without
            ``id``, or an id twice (naming the file).
    """
    if not enabled:
        return None, "probe.enabled is false"
    if not path.is_file():
        return None, f"{path} is missing (run `dvc repro probe`)"
    probe = read_json(path)
    if not probe.get("enabled"):
        return None, f"{path} is the disabled marker (rerun `dvc repro probe`)"
    rows = probe.get("predictions")
    if not isinstance(rows, list) or "decision" not in probe.get(keys.PROBE, {}):
        raise DataError(f"{path}: no `predictions` list or `probe.decision` (rerun `dvc repro probe`)")
    by_id: dict[str, dict] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "id" not in r:
            raise DataError(f"{path}: predictions[{i}] has no `id` (rerun `dvc repro probe`)")
        if r["id"] in by_id:
            raise DataError(f"{path}: predictions list {r['id']!r} twice (rerun `dvc repro probe`)")
        by_id[r["id"]] = r
    return probe | {"predictions": by_id}, ""


def probe_comparison(results: dict[str, ArtifactResult], probe: dict, m, path: Path) -> tuple[dict, dict]:
    """Every row against the linear-probe baseline on the same test decisions.

    Args:
        results: the evaluated rows (their ``details["decision_rows"]``, scored test decisions).
        probe: :func:`load_probe`'s result (predictions keyed by id).
        m: the ``metrics`` params section.
        path: the probe file (named in errors).

    Returns:
        ``(flat, details)``: ``probe.decision.{n, macro_f1, macro_f1_ci_low, macro_f1_ci_high,
        accuracy, accuracy_ci_low, accuracy_ci_high}`` (the probe stage's test scores) and every row's
        ``<row>.decision.probe_gain`` with ``_ci_low`` / ``_ci_high`` (:func:`paired_gain` of the row's
        predictions and the probe's, paired by example id); details: the probe's chosen point.

    Raises:
        DataError: the probe has no prediction for a scored test decision, a prediction outside the
            labels, or a gold label that differs from the row's (a stale file).
    """
    preds = probe["predictions"]
    dec = probe[keys.PROBE]["decision"]
    flat = {keys.key(keys.PROBE, f"decision.{k}"): dec[k] for k in (
        "n", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    ) if k in dec}
    for name, r in results.items():
        rows = r.details["decision_rows"]
        missing = [x["id"] for x in rows if x["id"] not in preds]
        if missing:
            raise DataError(
                f"{path}: no probe prediction for {len(missing)} of the {len(rows)} test decisions "
                f"(e.g. {missing[:3]}); rerun `dvc repro probe`"
            )
        ref = []
        for x in rows:
            p = preds[x["id"]]
            if p.get("pred") not in DECISIONS or p.get("label") != DECISIONS[x["label"]]:
                raise DataError(
                    f"{path}: prediction of {x['id']!r} is {p.get('pred')!r} for gold {p.get('label')!r}, expected a "
                    f"label of {list(DECISIONS)} for gold {DECISIONS[x['label']]!r}; rerun `dvc repro probe`"
                )
            ref.append(label_index(p["pred"]))
        g = paired_gain([x["label"] for x in rows], [x["pred"] for x in rows], ref, m)
        flat[keys.key(name, keys.DECISION_PROBE_GAIN)] = g["gain"]
        flat[keys.key(name, keys.DECISION_PROBE_GAIN_CI_LOW)] = g["ci_low"]
        flat[keys.key(name, keys.DECISION_PROBE_GAIN_CI_HIGH)] = g["ci_high"]
    details = {"source": str(path), "decision": dec} | {
        k: probe.get(k) for k in ("layer", "pooling", "C", "C_at_bound", "val_macro_f1", "n_train", "n_val", "n_test")
    }
    return flat, details


__all__ = [
    "chrf_comparison",
    "load_probe",
    "paired_gain",
    "parity",
    "parity_metrics",
    "parity_sample",
    "probe_comparison",
]
