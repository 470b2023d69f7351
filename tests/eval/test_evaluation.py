"""Evaluate-stage helpers that need no model: paired chrF comparison of bare and grounded answers."""

from types import SimpleNamespace

import pytest

from so8t.eval.evaluation import chrf_comparison
from so8t.eval.metrics import chrf

M = SimpleNamespace(confidence=0.95, bootstrap_resamples=500)
REFS = ["今日は良い天気です。", "明日は雨が降ります。", "猫が好きです。", "駅は北口にあります。", "会議は十時からです。"]


def test_chrf_comparison_identical_answers_gain_nothing():
    bare = ["今日は天気です。", "明日は雨。", "犬が好き。", "駅は南口です。", "会議は九時です。"]
    out = chrf_comparison(bare, bare, REFS, M)
    assert out["chrf"] == pytest.approx(chrf(bare, REFS)) == pytest.approx(out["chrf_rag"])
    assert out["chrf_rag_gain"] == out["chrf_rag_gain_ci_low"] == out["chrf_rag_gain_ci_high"] == 0.0


def test_chrf_comparison_paired_gain_and_intervals():
    bare = ["はい。", "いいえ。", "わかりません。", "はい。", "いいえ。"]
    out = chrf_comparison(bare, REFS, REFS, M)  # grounded answers copy the reference
    assert out["chrf_rag"] == pytest.approx(100.0)
    assert out["chrf_rag_gain"] == pytest.approx(100.0 - chrf(bare, REFS))
    assert 0.0 < out["chrf_rag_gain_ci_low"] <= out["chrf_rag_gain"] <= out["chrf_rag_gain_ci_high"]
    assert out["chrf_ci_low"] <= out["chrf"] <= out["chrf_ci_high"]
