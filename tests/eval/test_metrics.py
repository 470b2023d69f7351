import math

import numpy as np
import pytest

from so8t.eval.metrics import (
    brier_score,
    classification_report,
    expected_calibration_error,
    negative_log_likelihood,
    nll_from_logits,
    perplexity,
    reliability_bins,
)
from so8t.eval.text_metrics import (
    MecabTokenizer,
    bleu_ja,
    chrf,
    extract_final_number,
    is_polite_sentence,
    keigo_rate,
    math_exact_match,
    repetition_stats,
    rouge_l_ja,
)
from so8t.schema import Decision

# Five binary predictions used by the calibration tests.
#   i  probs         label  conf  correct
#   0  [0.9, 0.1]    0      0.9   yes
#   1  [0.8, 0.2]    1      0.8   no
#   2  [0.3, 0.7]    1      0.7   yes
#   3  [0.45, 0.55]  0      0.55  no
#   4  [0.5, 0.5]    0      0.5   yes (tie -> argmax picks class 0)
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.5, 0.5]])
LABELS = np.array([0, 1, 1, 0, 0])


# --- classification -----------------------------------------------------------


def test_classification_report_hand_computed():
    y_true = ["ALLOW", "ALLOW", "ESCALATION", "DENY", "DENY", "DENY"]
    y_pred = ["ALLOW", "ESCALATION", "ESCALATION", "DENY", "ALLOW", "DENY"]
    r = classification_report(y_true, y_pred)
    # correct at 0, 2, 3, 5 -> 4/6
    assert r["accuracy"] == pytest.approx(2 / 3)
    # ALLOW: predicted at 0, 4 (TP 0) -> P 1/2; true at 0, 1 -> R 1/2; F1 1/2
    # ESCALATION: predicted at 1, 2 (TP 2) -> P 1/2; true at 2 -> R 1; F1 2*(1/2)/(3/2) = 2/3
    # DENY: predicted at 3, 5 (both TP) -> P 1; true at 3, 4, 5 -> R 2/3; F1 2*(2/3)/(5/3) = 4/5
    pc = r["per_class"]
    assert (pc["ALLOW"]["precision"], pc["ALLOW"]["recall"], pc["ALLOW"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert pc["ESCALATION"]["f1"] == pytest.approx(2 / 3)
    assert (pc["DENY"]["precision"], pc["DENY"]["recall"], pc["DENY"]["f1"]) == pytest.approx((1.0, 2 / 3, 0.8))
    assert [pc[k]["support"] for k in ("ALLOW", "ESCALATION", "DENY")] == [2, 1, 3]
    # macro-F1 = (1/2 + 2/3 + 4/5) / 3 = (15 + 20 + 24) / 90 = 59/90
    assert r["macro_f1"] == pytest.approx(59 / 90)
    # rows = true, cols = predicted, order ALLOW, ESCALATION, DENY
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classification_report_accepts_enums_and_zero_division():
    r = classification_report([Decision.ALLOW, Decision.DENY], [Decision.ALLOW, Decision.DENY])
    assert r["accuracy"] == 1.0
    # ESCALATION is neither present nor predicted -> F1 0 (zero_division=0), so macro = 2/3
    assert r["per_class"]["ESCALATION"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro_f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([], [], "empty"),
        (["ALLOW"], ["ALLOW", "DENY"], "1 samples but y_pred has 2"),
        (["ALLOW"], ["MAYBE"], "outside the class list"),
        ("ALLOW", "ALLOW", "not a single string"),
    ],
)
def test_classification_report_bad_input(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        classification_report(y_true, y_pred)


# --- calibration metrics ------------------------------------------------------


def test_ece_hand_computed():
    # 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
    #   (.8, 1]:  {0}     acc 1,   conf .9          -> 1/5 * |1 - .9|    = .02
    #   (.6, .8]: {1, 2}  acc 1/2, conf (.8+.7)/2   -> 2/5 * |.5 - .75|  = .10  (.8 is right-inclusive)
    #   (.4, .6]: {3, 4}  acc 1/2, conf (.55+.5)/2  -> 2/5 * |.5 - .525| = .01
    # ECE = .13
    assert expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.13)
    # 15 bins split every pair above: |1-.9| + |0-.8| + |1-.7| + |0-.55| + |1-.5| = 2.25 -> /5 = .45
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.45)


def test_reliability_bins_match_ece_bins():
    bins = reliability_bins(PROBS, LABELS, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 2, 2, 1]
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    assert (bins[3]["lower"], bins[3]["upper"]) == pytest.approx((0.6, 0.8))
    assert (bins[3]["accuracy"], bins[3]["confidence"]) == pytest.approx((0.5, 0.75))
    assert (bins[2]["accuracy"], bins[2]["confidence"]) == pytest.approx((0.5, 0.525))


def test_ece_perfectly_calibrated_is_zero():
    # confidence .75 everywhere, 3 of 4 correct -> acc .75 = conf .75
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # confidence 0 falls in the first bin instead of being dropped
    assert sum(b["count"] for b in reliability_bins(np.array([[1.0, 0.0, 0.0]]), [0])) == 1


def test_brier_hand_computed():
    # per sample sum_k (p_k - y_k)^2:
    #   .1^2+.1^2 = .02;  .8^2+.8^2 = 1.28;  .3^2+.3^2 = .18;  .55^2+.55^2 = .605;  .5^2+.5^2 = .5
    # mean = 2.585 / 5 = .517
    assert brier_score(PROBS, LABELS) == pytest.approx(0.517)
    assert brier_score(np.eye(3), [0, 1, 2]) == 0.0


def test_nll_hand_computed_and_clipped():
    # -(ln .9 + ln .2 + ln .7 + ln .45 + ln .5) / 5 = 3.5631282 / 5
    expected = -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.45) + math.log(0.5)) / 5
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(expected)
    assert expected == pytest.approx(0.7126256, abs=1e-6)
    # p_true = 0 is clipped to 1e-12
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))


def test_nll_from_logits_matches_probs():
    # logits ln p reproduce p under softmax
    assert nll_from_logits(np.log(PROBS), LABELS) == pytest.approx(negative_log_likelihood(PROBS, LABELS))
    # uniform logits: NLL = ln 3 whatever the label
    assert nll_from_logits(np.zeros((2, 3)), [0, 2]) == pytest.approx(math.log(3))


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([0.5, 0.5]), [0], "2-D"),
        (np.zeros((0, 3)), [], "empty"),
        (np.array([[0.6, 0.6]]), [0], "sum to 1"),
        (np.array([[1.2, -0.2]]), [0], r"\[0, 1\]"),
        (np.array([[0.5, 0.5]]), [2], r"\[0, 2\)"),
        (np.array([[0.5, 0.5]]), [0.0], "integer"),
        (np.array([[0.5, 0.5]]), [0, 1], "shape"),
        (np.array([[np.nan, 1.0]]), [0], "NaN"),
    ],
)
def test_probability_metrics_bad_input(probs, labels, match):
    for fn in (expected_calibration_error, brier_score, negative_log_likelihood):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)


def test_bad_n_bins_and_logits():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        nll_from_logits([[0.0, np.inf]], [0])


def test_perplexity():
    # 10 tokens of NLL ln 4 each -> exp(ln 4) = 4
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="total_nll_nats"):
        perplexity(-1.0, 3)


# --- Japanese text overlap ----------------------------------------------------


def test_chrf():
    assert chrf(["今日は良い天気です。"], ["今日は良い天気です。"]) == pytest.approx(100.0)
    assert 0.0 < chrf(["今日は良い天気です。"], ["今日は悪い天気でした。"]) < 100.0


def test_bleu_ja():
    assert bleu_ja(["今日は良い天気です。"], ["今日は良い天気です。"]) == pytest.approx(100.0)
    assert 0.0 < bleu_ja(["今日は良い天気ですね。"], ["今日は悪い天気でした。"]) < 100.0


def test_rouge_l_ja_hand_computed():
    # MeCab words (punctuation dropped): hyp 今日/は/良い/天気/です (5), ref 今日/は/悪い/天気/でし/た (6)
    assert MecabTokenizer().tokenize("今日は悪い天気でした。") == ["今日", "は", "悪い", "天気", "でし", "た"]
    # LCS 今日/は/天気 = 3 -> P 3/5, R 3/6, F1 = 2 * .6 * .5 / 1.1 = 6/11
    assert rouge_l_ja(["今日は良い天気です。"], ["今日は悪い天気でした。"]) == pytest.approx(6 / 11)
    assert rouge_l_ja(["猫が好き。"], ["犬を飼う。"]) == 0.0
    # mean over pairs: (1 + 0) / 2
    assert rouge_l_ja(["猫が好き。", "猫が好き。"], ["猫が好き。", "犬を飼う。"]) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [chrf, bleu_ja, rouge_l_ja])
def test_text_metrics_bad_input(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="single string"):
        fn("abc", "abc")


# --- keigo --------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, polite",
    [
        ("今日は良い天気です", True),
        ("明日は雨でしょうか", True),  # でしょう + particle か
        ("資料を送りました", True),
        ("ご確認ください」", True),  # trailing bracket stripped
        ("まだ分かりませんね", True),
        ("社長がおっしゃった通りだ", True),  # honorific form mid-sentence
        ("担当者が伺う予定だ", True),
        ("明日は雨だ", False),
        ("資料を送った", False),
        ("少なさが問題だ", False),  # adjective noun 少なさ is not なさる
    ],
)
def test_is_polite_sentence_hand_labelled(sentence, polite):
    assert is_polite_sentence(sentence) is polite


def test_keigo_rate():
    # sentences: 今日は良い天気ですね (polite) / 明日は雨だ (plain) / いらっしゃいませ (polite)
    #            / 少なさが問題だ (plain) / ご確認ください」 (polite)  -> 3/5
    texts = ["今日は良い天気ですね。明日は雨だ。", "いらっしゃいませ！\n\n少なさが問題だ", "ご確認ください」"]
    assert keigo_rate(texts) == pytest.approx(0.6)
    assert keigo_rate("承知しました。") == 1.0
    with pytest.raises(ValueError, match="no sentence"):
        keigo_rate(["。\n", "  "])
    with pytest.raises(ValueError, match="empty"):
        keigo_rate([])


# --- math answers -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("合計は 3 + 4 = 7 個です。\n#### 1,234", "1234"),
        ("#### 5 のあとに 8 と書いた", "5"),  # #### wins over later numbers
        ("途中で 12 を使う。答え：１２０円", "120"),  # full-width colon and digits (NFKC)
        ("答え: -3.50", "-3.5"),
        ("よって \\boxed{3 + 4 = 7} です。検算 9", "7"),
        ("x は 72.0 ドルです。", "72"),
        ("気温は −5 度", "-5"),  # U+2212 minus sign
        ("期間は 3-5 日", "5"),  # hyphen between numbers is not a minus
        ("1,2,3 の和", "3"),  # commas not in thousands groups separate numbers
        ("答えは分かりません", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_math_exact_match():
    preds = ["計算すると 72 になる。\n#### 72", "答え：１，０００", "分かりません"]
    refs = ["72", "手順...\n#### 1000", "5"]
    assert math_exact_match(preds, refs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="references\\[0\\] contains no number"):
        math_exact_match(["1"], ["なし"])


# --- repetition ---------------------------------------------------------------


def test_repetition_stats_crafted():
    # bigrams (1,2) (2,3) (3,4) (4,1) (1,2)* (2,3)* (3,4)* (4,5): 3 of 8 seen before
    s = repetition_stats([1, 2, 3, 4, 1, 2, 3, 4, 5], n=2)
    assert s["repeated_ngram_rate"] == pytest.approx(3 / 8)
    assert s["longest_repeated_span"] == 4  # 1 2 3 4
    assert s["oscillation"] is False
    assert repetition_stats([1, 2, 3, 4, 1, 2, 3, 4, 5], n=2, span_threshold=4)["oscillation"] is True


def test_repetition_stats_oscillating_and_text():
    # 7 8 7 8 ... (40 tokens): 37 4-grams, only the first two are new -> 35/37;
    # tokens 0..37 equal tokens 2..39 -> span 38 (overlapping occurrences count)
    s = repetition_stats([7, 8] * 20)
    assert s["repeated_ngram_rate"] == pytest.approx(35 / 37)
    assert s["longest_repeated_span"] == 38
    assert s["oscillation"] is True
    # text is compared character by character: "ですです" repeats "です"
    t = repetition_stats("ですです", n=2)
    assert t["n_tokens"] == 4 and t["longest_repeated_span"] == 2
    # shorter than n: no n-grams, rate 0
    assert repetition_stats([1, 2], n=4)["repeated_ngram_rate"] == 0.0


def test_repetition_stats_bad_input():
    with pytest.raises(ValueError, match="empty"):
        repetition_stats([])
    with pytest.raises(ValueError, match="integers"):
        repetition_stats([1.5, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        repetition_stats(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="rate_threshold"):
        repetition_stats([1, 2], rate_threshold=2.0)


def test_chrf_indices_is_corpus_chrf_of_the_resampled_rows():
    from so8t.eval.text_metrics import chrf_indices

    hyps = ["今日は良い天気です。", "明日は雨が降ります。", "猫が好きです。"]
    refs = ["今日は悪い天気でした。", "明日は雨です。", "犬を飼っています。"]
    stat = chrf_indices(hyps, refs)
    assert stat(np.arange(3)) == pytest.approx(chrf(hyps, refs))
    # a resample with a repeated row is the corpus chrF of those rows, repeats included
    idx = np.array([1, 1, 2])
    assert stat(idx) == pytest.approx(chrf([hyps[i] for i in idx], [refs[i] for i in idx]))
    with pytest.raises(ValueError, match="chrf_indices"):
        chrf_indices([], [])
