"""Evaluation metrics: decision classification, calibration, Japanese text
overlap, politeness (keigo), math answers and repetition.

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
import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal
from enum import Enum
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab
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


def _as_text_pairs(hypotheses, references, fn: str) -> tuple[list[str], list[str]]:
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(seq, str):
            raise ValueError(f"{fn}: {name} must be a sequence of strings, not a single string")
    hyps, refs = list(hypotheses), list(references)
    if not hyps:
        raise ValueError(f"{fn}: hypotheses is empty; need at least one (hypothesis, reference) pair")
    if len(hyps) != len(refs):
        raise ValueError(f"{fn}: got {len(hyps)} hypotheses but {len(refs)} references; need one reference each")
    for name, seq in (("hypotheses", hyps), ("references", refs)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise ValueError(f"{fn}: {name}[{i}] must be str, got {type(s).__name__}")
    return hyps, refs


def _check_positive_int(value, name: str, fn: str) -> int:
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
    n_bins = _check_positive_int(n_bins, "n_bins", fn)
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
    n_tokens = _check_positive_int(n_tokens, "n_tokens", "perplexity")
    total = float(total_nll_nats)
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"perplexity: total_nll_nats must be finite and >= 0, got {total_nll_nats!r}")
    try:
        return math.exp(total / n_tokens)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------
# Japanese text overlap
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _ja_mecab() -> TokenizerJaMecab:
    # sacrebleu's ja-mecab tokenizer: MeCab with the IPA dictionary (ipadic),
    # the same segmentation BLEU uses, so BLEU and ROUGE-L agree on words.
    return TokenizerJaMecab()


def _is_punct_or_symbol(token: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PSZ" for ch in token)


class MecabTokenizer(Tokenizer):
    """rouge-score tokenizer that splits Japanese into MeCab (ipadic) words.

    rouge-score's default tokenizer keeps only ``[a-z0-9]`` and so drops every
    Japanese character. Tokens made only of punctuation, symbols or spaces
    (``。``, ``、``, ``「``) are dropped, as the default tokenizer drops
    non-alphanumerics.
    """

    def tokenize(self, text: str) -> list[str]:
        return [t for t in _ja_mecab()(text).split() if not _is_punct_or_symbol(t)]


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF with sacrebleu defaults (character 6-grams, beta = 2).

    Character n-gram F-score (Popović 2015, "chrF: character n-gram F-score
    for automatic MT evaluation", WMT; sacrebleu, Post 2018). Needs no word
    tokenizer, so it works on Japanese as is.

    Args:
        hypotheses: ``N`` system outputs.
        references: ``N`` references, one per hypothesis.

    Returns:
        chrF on 0-100 (float).

    Raises:
        ValueError: empty or unequal-length inputs, non-str items.
    """
    hyps, refs = _as_text_pairs(hypotheses, references, "chrf")
    return float(CHRF().corpus_score(hyps, [refs]).score)


def chrf_indices(hypotheses: Sequence[str], references: Sequence[str]):
    """``statistic(idx)`` for :func:`bootstrap_interval`: corpus chrF (0-100) of rows ``idx``.

    Sums sacrebleu's per-sentence chrF sufficient statistics over the resampled rows and scores
    the sum, exactly as sacrebleu's own paired bootstrap does (``sacrebleu.significance``;
    Koehn 2004), so ``statistic(np.arange(N))`` equals :func:`chrf` of all ``N`` rows.

    Raises:
        ValueError: empty or unequal-length inputs, non-str items.
    """
    hyps, refs = _as_text_pairs(hypotheses, references, "chrf_indices")
    metric = CHRF()
    stats = np.asarray(metric._extract_corpus_statistics(hyps, [refs]))
    return lambda idx: float(metric._compute_score_from_stats(stats[idx].sum(0)).score)


def bleu_ja(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU over MeCab (ipadic) words.

    BLEU-4 with brevity penalty (Papineni et al. 2002) as computed by
    sacrebleu (Post 2018) with ``tokenize="ja-mecab"`` (needs
    ``sacrebleu[ja]``: mecab-python3 + ipadic; runs offline).

    Args:
        hypotheses: ``N`` system outputs.
        references: ``N`` references, one per hypothesis.

    Returns:
        BLEU on 0-100 (float).

    Raises:
        ValueError: empty or unequal-length inputs, non-str items.
    """
    hyps, refs = _as_text_pairs(hypotheses, references, "bleu_ja")
    return float(BLEU(tokenize="ja-mecab").corpus_score(hyps, [refs]).score)


def rouge_l_ja(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 over MeCab (ipadic) words.

    ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of
    Summaries"): with ``LCS`` the longest common subsequence of the word
    sequences, ``P = LCS/|hyp|``, ``R = LCS/|ref|``, ``F1 = 2PR/(P+R)``;
    computed by rouge-score's ``RougeScorer(["rougeL"])`` with
    :class:`MecabTokenizer`, then averaged over the ``N`` pairs.

    Args:
        hypotheses: ``N`` system outputs.
        references: ``N`` references, one per hypothesis.

    Returns:
        Mean ROUGE-L F1 on 0-1 (float).

    Raises:
        ValueError: empty or unequal-length inputs, non-str items.
    """
    hyps, refs = _as_text_pairs(hypotheses, references, "rouge_l_ja")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MecabTokenizer())
    # RougeScorer.score takes (target, prediction).
    return float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]))


# ---------------------------------------------------------------------------
# Politeness (keigo)
# ---------------------------------------------------------------------------

#: Polite (teineigo) sentence endings: the sentence, after trailing brackets
#: and sentence-final particles are removed, ends in one of these.
POLITE_ENDINGS: tuple[str, ...] = (
    "です",
    "ます",
    "でした",
    "ました",
    "でしょう",
    "ましょう",
    "ません",
    "ください",
    "ございます",
    "ませ",  # いらっしゃいませ, くださいませ
)

#: Sentence-final particles allowed after a polite ending (ですね, ますか, ですよね, ですが).
SENTENCE_FINAL_PARTICLES: tuple[str, ...] = ("ね", "よ", "か", "な", "わ", "が", "けど", "けれど", "けれども")

#: Honorific (sonkeigo) and humble (kenjougo) forms: a sentence containing one
#: is polite wherever it occurs. なさ is listed by its verb forms so that
#: adjective nouns like 少なさ are not counted.
HONORIFIC_FORMS: tuple[str, ...] = (
    "いらっしゃ",
    "おっしゃ",
    "なさる",
    "なさら",
    "なさい",
    "なさっ",
    "なされ",
    "ござい",
    "いたし",
    "致し",
    "申し",
    "伺",
    "存じ",
    "召し上が",
    "拝見",
)

#: Characters that end a sentence (the split points for keigo_rate).
SENTENCE_DELIMITERS = "。！？!?\r\n"

_TRAILING = "」』）)】〉》\"'”’…‥〜~ー・ 　"
_SENTENCE_SPLIT = re.compile(f"[{re.escape(SENTENCE_DELIMITERS)}]+")
_POLITE_END = re.compile(
    "(?:"
    + "|".join(map(re.escape, POLITE_ENDINGS))
    + ")(?:"
    + "|".join(map(re.escape, sorted(SENTENCE_FINAL_PARTICLES, key=len, reverse=True)))
    + ")*$"
)


def split_sentences(text: str) -> list[str]:
    """Split ``text`` on ``。！？!?`` and newlines; strip and drop empty pieces."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def is_polite_sentence(sentence: str) -> bool:
    """Whether one sentence is in polite Japanese (see :func:`keigo_rate`)."""
    if any(form in sentence for form in HONORIFIC_FORMS):
        return True
    return bool(_POLITE_END.search(sentence.rstrip(_TRAILING)))


def keigo_rate(texts: str | Sequence[str]) -> float:
    """Share of sentences written in polite Japanese (keigo).

    Each text is split into sentences on ``。！？!?`` and newlines (empty
    pieces ignored). A sentence counts as polite when either

    * after stripping trailing closing brackets, quotes, ``…``, ``〜``, ``ー``
      and spaces, it ends in a desu/masu form from :data:`POLITE_ENDINGS`,
      optionally followed by sentence-final particles
      (:data:`SENTENCE_FINAL_PARTICLES`, e.g. ですね, ますか, ですが); or
    * it contains an honorific or humble form from :data:`HONORIFIC_FORMS`
      (いらっしゃ, おっしゃ, なさる/なさい/..., ござい, いたし, 申し, 伺, ...).

    This is a surface heuristic, not a parser: a plain-form sentence quoting
    a polite one counts as polite.

    Args:
        texts: one string or a sequence of strings; sentences of all texts
            are pooled.

    Returns:
        polite sentences / all sentences, in ``[0, 1]`` (float).

    Raises:
        ValueError: no texts, a non-str item, or no sentence at all.
    """
    fn = "keigo_rate"
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise ValueError(f"{fn}: texts is empty; need at least one string")
    sentences = []
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise ValueError(f"{fn}: texts[{i}] must be str, got {type(t).__name__}")
        sentences.extend(split_sentences(t))
    if not sentences:
        raise ValueError(f"{fn}: the texts contain no sentence (only whitespace or delimiters)")
    return sum(map(is_polite_sentence, sentences)) / len(sentences)


# ---------------------------------------------------------------------------
# Math answers
# ---------------------------------------------------------------------------

# A number: optional minus (not after a letter or digit, so "3-5" gives 5),
# digits with optional comma thousands groups, optional decimals.
_NUMBER = r"(?:(?<![0-9A-Za-z])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"

#: Answer markers, most explicit first: GSM8K's ``#### N``, Japanese
#: ``答え: N``, LaTeX ``\boxed{N}``; the last number in the text is the fallback.
ANSWER_PATTERNS: tuple[re.Pattern, ...] = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"答え\s*:\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{[^{}]*?(" + _NUMBER + r")[^{}0-9]*\}"),
    re.compile("(" + _NUMBER + ")"),
)

# Minus-like characters NFKC leaves alone.
_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\uff0d": "-"})


def _normalize_number(s: str) -> str:
    d = Decimal(s.replace(",", ""))
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in a model's math output, normalised.

    The text is NFKC-normalised first (full-width digits, ``＃``, ``：``,
    ``，`` become ASCII). The first marker kind that matches wins, and within
    it the last occurrence: ``#### N`` (GSM8K, Cobbe et al. 2021), then
    ``答え: N`` / ``答え：N``, then ``\\boxed{N}``, else the last number in the
    text. Normalisation drops thousands commas, trailing decimal zeros
    (``72.0`` -> ``72``, ``2.50`` -> ``2.5``) and leading zeros; negatives
    and decimals are kept. Kanji numerals (三, 万) are not parsed.

    Args:
        text: model output (str).

    Returns:
        The number as a str (e.g. ``"-1234.5"``), or ``None`` if the text
        contains no number.

    Raises:
        ValueError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ValueError(f"extract_final_number: text must be str, got {type(text).__name__}")
    norm = unicodedata.normalize("NFKC", text).translate(_MINUS)
    for pattern in ANSWER_PATTERNS:
        matches = pattern.findall(norm)
        if matches:
            return _normalize_number(matches[-1])
    return None


def math_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose final number equals the reference's.

    Both sides go through :func:`extract_final_number`, so a reference may be
    a bare number (``"1,000"``) or a full GSM8K solution ending in ``#### N``.
    A prediction without a number counts as wrong.

    Args:
        predictions: ``N`` model outputs.
        references: ``N`` reference answers.

    Returns:
        Exact-match accuracy in ``[0, 1]`` (float).

    Raises:
        ValueError: empty or unequal-length inputs, non-str items, or a
            reference without a number.
    """
    preds, refs = _as_text_pairs(predictions, references, "math_exact_match")
    hits = 0
    for i, (p, r) in enumerate(zip(preds, refs)):
        gold = extract_final_number(r)
        if gold is None:
            raise ValueError(f"math_exact_match: references[{i}] contains no number: {r[:80]!r}")
        hits += extract_final_number(p) == gold
    return hits / len(preds)


# ---------------------------------------------------------------------------
# Repetition
# ---------------------------------------------------------------------------


def _longest_repeated_span(seq: np.ndarray) -> int:
    # A span of length L occurring at positions i and i + d is a run of L
    # equal elements on diagonal d of the self-comparison matrix; take the
    # longest run over all shifts d (occurrences may overlap). O(n^2) work.
    best = 0
    n = seq.shape[0]
    d = 1
    while n - d > best:  # diagonal d has n - d cells: it cannot beat best otherwise
        eq = np.concatenate(([0], (seq[d:] == seq[:-d]).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(eq))
        if edges.size:
            best = max(best, int(np.max(edges[1::2] - edges[0::2])))
        d += 1
    return best


def repetition_stats(
    tokens: str | Sequence[int] | np.ndarray,
    n: int = 4,
    rate_threshold: float = 0.5,
    span_threshold: int = 32,
) -> dict:
    """Repetition statistics of one generated sequence.

    * ``repeated_ngram_rate``: share of the ``L - n + 1`` n-grams that already
      occurred earlier in the sequence (0.0 when ``L < n``).
    * ``longest_repeated_span``: length of the longest contiguous span that
      occurs at least twice (occurrences may overlap; ``ABABAB`` -> 4).
    * ``oscillation``: ``repeated_ngram_rate > rate_threshold`` or
      ``longest_repeated_span >= span_threshold``.

    Args:
        tokens: ``(L,)`` token ids (ints), or a str, whose units are then
            characters (Japanese has no word spaces; pass token ids for
            token-level statistics).
        n: n-gram order (positive int).
        rate_threshold: repeated n-gram rate above which the sequence
            oscillates, in ``[0, 1]``.
        span_threshold: repeated span length (tokens) at or above which the
            sequence oscillates (positive int).

    Returns:
        ``{"n_tokens": int, "n": int, "repeated_ngram_rate": float,
        "longest_repeated_span": int, "oscillation": bool}``.

    Raises:
        ValueError: empty sequence, non-integer token ids, a 2-D array, or
            out-of-range thresholds.
    """
    fn = "repetition_stats"
    n = _check_positive_int(n, "n", fn)
    span_threshold = _check_positive_int(span_threshold, "span_threshold", fn)
    if not 0.0 <= rate_threshold <= 1.0:
        raise ValueError(f"{fn}: rate_threshold must be in [0, 1], got {rate_threshold!r}")
    if isinstance(tokens, str):
        seq = np.fromiter((ord(c) for c in tokens), dtype=np.int64, count=len(tokens))
    else:
        seq = np.asarray(tokens)
        if seq.ndim != 1:
            raise ValueError(f"{fn}: tokens must be 1-D (L,) token ids, got shape {seq.shape}")
        if seq.size and not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"{fn}: token ids must be integers, got dtype {seq.dtype}")
        seq = seq.astype(np.int64)
    if seq.size == 0:
        raise ValueError(f"{fn}: tokens is empty; need at least one token")

    ids = seq.tolist()
    n_grams = len(ids) - n + 1
    if n_grams > 0:
        seen: set[tuple[int, ...]] = set()
        repeated = 0
        for i in range(n_grams):
            gram = tuple(ids[i : i + n])
            repeated += gram in seen
            seen.add(gram)
        rate = repeated / n_grams
    else:
        rate = 0.0
    span = _longest_repeated_span(seq)
    return {
        "n_tokens": len(ids),
        "n": n,
        "repeated_ngram_rate": rate,
        "longest_repeated_span": span,
        "oscillation": bool(rate > rate_threshold or span >= span_threshold),
    }
