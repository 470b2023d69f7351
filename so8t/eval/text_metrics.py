"""Metrics of generated Japanese text: overlap with references (chrF, BLEU, ROUGE-L), politeness
(keigo), math answers and repetition.

Conventions as in :mod:`so8t.eval.metrics`: chrF and BLEU are on 0-100 (sacrebleu), ROUGE-L F1
on 0-1 (rouge-score); bad input raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

from so8t.eval.metrics import check_positive_int


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
    n = check_positive_int(n, "n", fn)
    span_threshold = check_positive_int(span_threshold, "span_threshold", fn)
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
