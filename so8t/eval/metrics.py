"""Evaluation metrics of scores: decision classification, bootstrap intervals, calibration and
perplexity. Metrics of generated text (overlap, keigo, math answers, repetition) are in
:mod:`so8t.eval.text_metrics`.

Conventions:

* ``probs`` is an ``(N, K)`` float array whose rows are probability vectors
  (non-negative, summing to 1 within ``1e-5``); ``labels`` is an ``(N,)``
  integer array of class indices in ``[0, K)``.
* Text-overlap scores follow their library's scale: chrF and BLEU are on
  0-100 (sacrebleu), ROUGE-L F1 is on 0-1 (rouge-score).
* Bad input raises ``ValueError`` saying which argument is wrong and what a
  valid value looks like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from so8t.schema import DECISIONS

#: Row sums of ``probs`` may differ from 1 by at most this much (float32
#: softmax outputs are off by ~1e-7).
PROB_SUM_ATOL = 1e-5

#: Probabilities are clipped to this floor before ``log`` in the NLL.
NLL_CLIP = 1e-12


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _as_labels(labels, n: int, n_classes: int, fn: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{fn}: labels must have shape ({n},) to match the {n} rows, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{fn}: labels must be integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(
            f"{fn}: labels must lie in [0, {n_classes}) for {n_classes} classes, "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64)


def _as_probs(probs, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{fn}: probs must be a 2-D (N, K) array, got shape {p.shape}")
    n, k = p.shape
    if n == 0:
        raise ValueError(f"{fn}: probs is empty (N = 0); need at least one row")
    if k < 2:
        raise ValueError(f"{fn}: probs needs K >= 2 classes, got K = {k}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{fn}: probs contains NaN or inf")
    if p.min() < 0.0 or p.max() > 1.0 + PROB_SUM_ATOL:
        raise ValueError(f"{fn}: probs must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROB_SUM_ATOL)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{fn}: each row of probs must sum to 1 (within {PROB_SUM_ATOL}); "
            f"{bad.size} rows do not, e.g. row {i} sums to {sums[i]:.6g}"
        )
    return p, _as_labels(labels, n, k, fn)


def _as_logits(logits, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"{fn}: logits must be a 2-D (N, K) array, got shape {z.shape}")
    n, k = z.shape
    if n == 0:
        raise ValueError(f"{fn}: logits is empty (N = 0); need at least one row")
    if k < 2:
        raise ValueError(f"{fn}: logits needs K >= 2 classes, got K = {k}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{fn}: logits contains NaN or inf ({int(np.sum(~np.isfinite(z)))} entries)")
    return z, _as_labels(labels, n, k, fn)


def check_positive_int(value, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# Decision classification
# ---------------------------------------------------------------------------


def classification_report(y_true, y_pred, labels: Sequence[str] = DECISIONS) -> dict:
    """Accuracy, macro-F1, per-class scores and the confusion matrix.

    Computed with scikit-learn (``zero_division=0``: a precision or recall
    whose denominator is 0 counts as 0, and so does the F1 of a class that is
    neither present nor predicted; macro-F1 averages over *all* ``labels``).

    Args:
        y_true: ``(N,)`` true labels, str (or str-valued Enum such as
            :class:`so8t.schema.Decision`).
        y_pred: ``(N,)`` predicted labels, same kinds.
        labels: the class list, in the order used for per-class scores and
            the confusion matrix. Default ``("ALLOW", "ESCALATION", "DENY")``.

    Returns:
        ``{"accuracy": float, "macro_f1": float, "labels": [str],
        "per_class": {label: {"precision", "recall", "f1": float, "support": int}},
        "confusion_matrix": [[int]]}`` where ``confusion_matrix[i][j]`` counts
        samples of true class ``labels[i]`` predicted as ``labels[j]``.

    Raises:
        ValueError: empty or unequal-length inputs, duplicate labels, or a
            label outside ``labels``.
    """
    fn = "classification_report"
    labels = [getattr(x, "value", x) for x in labels]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"{fn}: labels must be a non-empty list of distinct class names, got {labels}")
    if isinstance(y_true, str) or isinstance(y_pred, str):
        raise ValueError(f"{fn}: y_true and y_pred must be sequences of labels, not a single string")
    yt = [x.value if isinstance(x, Enum) else x for x in y_true]
    yp = [x.value if isinstance(x, Enum) else x for x in y_pred]
    if not yt:
        raise ValueError(f"{fn}: y_true is empty; need at least one sample")
    if len(yt) != len(yp):
        raise ValueError(f"{fn}: y_true has {len(yt)} samples but y_pred has {len(yp)}")
    allowed = set(labels)
    for name, seq in (("y_true", yt), ("y_pred", yp)):
        unknown = sorted({str(x) for x in seq if x not in allowed})
        if unknown:
            raise ValueError(f"{fn}: {name} has labels {unknown} outside the class list {labels}")

    precision, recall, f1, support = precision_recall_fscore_support(
        yt, yp, labels=labels, zero_division=0
    )
    macro_f1 = f1_score(yt, yp, labels=labels, average="macro", zero_division=0)
    cm = confusion_matrix(yt, yp, labels=labels)
    return {
        "accuracy": float(accuracy_score(yt, yp)),
        "macro_f1": float(macro_f1),
        "labels": list(labels),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }


def bootstrap_interval(
    statistic, n: int, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` paired examples.

    Resamples example indices with replacement (scipy's ``stats.bootstrap``, percentile
    method; Efron and Tibshirani 1993, ch. 13), so every metric of the same examples
    (macro-F1 of labels and predictions, ECE of probabilities and labels) keeps its rows paired.

    Args:
        statistic: a function of an ``(m,)`` int array of row indices returning a float.
        n: number of examples.
        confidence: the interval's coverage, e.g. 0.95.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 examples.
    """
    from scipy.stats import bootstrap

    if n < 2:
        return math.nan, math.nan
    res = bootstrap(
        (np.arange(n),),
        lambda idx: statistic(np.asarray(idx, dtype=np.int64)),
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def macro_f1_indices(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(DECISIONS)):
    """``statistic(idx)`` for :func:`bootstrap_interval`: macro-F1 over all ``n_classes`` of rows ``idx``."""
    labels = list(range(n_classes))
    return lambda idx: float(f1_score(y_true[idx], y_pred[idx], labels=labels, average="macro", zero_division=0))


# ---------------------------------------------------------------------------
# Calibration and proper scoring rules
# ---------------------------------------------------------------------------


def _bin_stats(probs, labels, n_bins: int, fn: str):
    p, y = _as_probs(probs, labels, fn)
    n_bins = check_positive_int(n_bins, "n_bins", fn)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-inclusive bins (lo, hi]: the bin index is the number of inner edges
    # strictly below the confidence; confidence 0 falls in the first bin.
    bin_idx = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(bin_idx, minlength=n_bins)
    acc_sum = np.bincount(bin_idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bin_idx, weights=confidence, minlength=n_bins)
    return edges, counts, acc_sum, conf_sum, p.shape[0]


def reliability_bins(probs, labels, n_bins: int = 15) -> list[dict]:
    """Per-bin accuracy and mean confidence for a reliability diagram.

    Binning as in :func:`expected_calibration_error`: ``n_bins`` equal-width
    bins over the top-label confidence ``max_k p_k``, right-inclusive
    ``(lo, hi]``, with confidence exactly 0 placed in the first bin.

    Args:
        probs: ``(N, K)`` float probabilities (rows sum to 1).
        labels: ``(N,)`` int true class indices in ``[0, K)``.
        n_bins: number of bins (positive int).

    Returns:
        ``n_bins`` dicts in increasing order, each ``{"lower": float,
        "upper": float, "count": int, "accuracy": float | None,
        "confidence": float | None}``; accuracy (share of argmax predictions
        that are correct, ties broken toward the lower class index) and mean
        confidence are ``None`` for an empty bin.

    Raises:
        ValueError: bad shapes, probabilities outside [0, 1] or not summing
            to 1, labels outside ``[0, K)``, or ``n_bins < 1``.
    """
    edges, counts, acc_sum, conf_sum, _ = _bin_stats(probs, labels, n_bins, "reliability_bins")
    bins = []
    for b in range(len(counts)):
        c = int(counts[b])
        bins.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": c,
                "accuracy": float(acc_sum[b] / c) if c else None,
                "confidence": float(conf_sum[b] / c) if c else None,
            }
        )
    return bins


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error (ECE) with equal-width bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where ``B_b`` holds the
    samples whose top-label confidence ``max_k p_k`` falls in bin ``b``,
    ``acc`` is the share of correct argmax predictions and ``conf`` the mean
    confidence in the bin (Guo et al. 2017, "On Calibration of Modern Neural
    Networks", eq. 3, https://arxiv.org/abs/1706.04599; Naeini et al. 2015,
    "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI).
    Bins are ``(0, 1/n_bins], ..., ((n_bins-1)/n_bins, 1]`` (right-inclusive,
    confidence 0 goes to the first bin); empty bins contribute 0.

    Args:
        probs: ``(N, K)`` float probabilities (rows sum to 1).
        labels: ``(N,)`` int true class indices in ``[0, K)``.
        n_bins: number of bins (positive int, default 15 as in Guo et al.).

    Returns:
        ECE in ``[0, 1]`` (float).

    Raises:
        ValueError: bad shapes, probabilities outside [0, 1] or not summing
            to 1, labels outside ``[0, K)``, or ``n_bins < 1``.
    """
    _, counts, acc_sum, conf_sum, n = _bin_stats(probs, labels, n_bins, "expected_calibration_error")
    # |B_b|/N * |acc_b - conf_b| = |sum correct - sum confidence| / N per bin.
    return float(np.sum(np.abs(acc_sum - conf_sum)) / n)


def brier_score(probs, labels) -> float:
    """Multi-class Brier score.

    ``Brier = 1/N sum_i sum_k (p_ik - y_ik)^2`` with ``y_i`` the one-hot true
    label (Brier 1950, "Verification of Forecasts Expressed in Terms of
    Probability", Monthly Weather Review 78(1)).

    Args:
        probs: ``(N, K)`` float probabilities (rows sum to 1).
        labels: ``(N,)`` int true class indices in ``[0, K)``.

    Returns:
        Brier score in ``[0, 2]`` (float); lower is better.

    Raises:
        ValueError: bad shapes, invalid probabilities or labels.
    """
    p, y = _as_probs(probs, labels, "brier_score")
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def negative_log_likelihood(probs, labels) -> float:
    """Mean negative log-likelihood of the true class, in nats.

    ``NLL = -1/N sum_i log max(p_{i, y_i}, 1e-12)``; the clip keeps a
    zero-probability true class finite (contributes ``-log 1e-12 ~ 27.6``).

    Args:
        probs: ``(N, K)`` float probabilities (rows sum to 1).
        labels: ``(N,)`` int true class indices in ``[0, K)``.

    Returns:
        Mean NLL in nats (float, >= 0).

    Raises:
        ValueError: bad shapes, invalid probabilities or labels.
    """
    p, y = _as_probs(probs, labels, "negative_log_likelihood")
    p_true = np.clip(p[np.arange(p.shape[0]), y], NLL_CLIP, 1.0)
    return float(-np.mean(np.log(p_true)))


def nll_from_logits(logits, labels) -> float:
    """Mean negative log-likelihood of ``softmax(logits)`` at the true class.

    ``NLL = -1/N sum_i log_softmax(z_i)[y_i]``, computed with a stable
    log-softmax (no clipping needed).

    Args:
        logits: ``(N, K)`` float unnormalised scores, all finite.
        labels: ``(N,)`` int true class indices in ``[0, K)``.

    Returns:
        Mean NLL in nats (float, >= 0).

    Raises:
        ValueError: bad shapes, non-finite logits, labels outside ``[0, K)``.
    """
    z, y = _as_logits(logits, labels, "nll_from_logits")
    logp = log_softmax(z, axis=1)
    return float(-np.mean(logp[np.arange(z.shape[0]), y]))


def perplexity(total_nll_nats: float, n_tokens: int) -> float:
    """Perplexity from a summed token negative log-likelihood.

    ``PPL = exp(total_nll_nats / n_tokens)``, the exponentiated mean
    per-token cross-entropy in nats (Jelinek et al. 1977). Pass the sum of
    ``-log p(token)`` over all scored tokens and their count; ``inf`` is
    returned when the mean is too large for a float.

    Args:
        total_nll_nats: summed NLL in nats (finite, >= 0).
        n_tokens: number of scored tokens (positive int).

    Returns:
        Perplexity (float, >= 1).

    Raises:
        ValueError: non-finite or negative total, or ``n_tokens < 1``.
    """
    n_tokens = check_positive_int(n_tokens, "n_tokens", "perplexity")
    total = float(total_nll_nats)
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"perplexity: total_nll_nats must be finite and >= 0, got {total_nll_nats!r}")
    try:
        return math.exp(total / n_tokens)
    except OverflowError:
        return math.inf
