"""Comparisons (:mod:`so8t.eval.comparisons`): paired chrF comparison of bare and grounded answers, parity
between rows and the transformers sample, the paired gain over the linear probe and the probe file."""

from types import SimpleNamespace

import pytest

from so8t.eval.comparisons import chrf_comparison
from so8t.eval.text_metrics import chrf
from so8t.io import DataError

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


# --------------------------------------------------------------------------- parity


def test_quantised_rows_are_compared_with_the_f16_row():
    from so8t.eval.artifacts import ArtifactResult
    from so8t.eval.comparisons import parity_metrics

    def row(name, texts, decisions):
        return ArtifactResult(name, {}, {}, dict(enumerate(texts)), dict(enumerate(decisions)))

    results = {
        "base": row("base", "xyzw", ["DENY"] * 4),
        "baked": row("baked", "abcd", ["ALLOW", "DENY", "DENY", "ESCALATION"]),
        "q8_0": row("q8_0", "abcx", ["ALLOW", "DENY", "DENY", "DENY"]),
    }
    assert parity_metrics(results) == {"q8_0.parity.text": 0.75, "q8_0.parity.decision": 0.75}


def test_parity_sample_is_balanced_and_splits_texts_between_math_and_faq():
    from so8t.eval.comparisons import parity_sample
    from so8t.eval.evalsets import EvalSets

    decisions = [
        {"id": f"{lab}{i}", "task": "decision", "decision": lab, "group": f"{lab}-t{i % 5}"}
        for lab in ("ALLOW", "ESCALATION", "DENY") for i in range(20)
    ]
    sets = EvalSets(decisions, [], [], [{"id": f"m{i}"} for i in range(5)], [{"id": f"f{i}"} for i in range(2)], [])
    dec, maths, faqs = parity_sample(sets, 12, 6)
    assert len(dec) == 12 and {d["decision"] for d in dec} == {"ALLOW", "ESCALATION", "DENY"}
    assert len({d["group"] for d in dec if d["decision"] == "ALLOW"}) == 4  # spread over templates
    assert (len(maths), len(faqs)) == (4, 2)  # only 2 FAQ: math fills the rest
    assert parity_sample(sets, 0, 0) == ([], [], [])


# --------------------------------------------------------------------------- the linear probe


def test_paired_gain_of_identical_predictions_is_zero_with_a_zero_interval():
    import numpy as np

    from so8t.eval.comparisons import paired_gain

    labels = np.array([0, 1, 2] * 10)
    pred = labels.copy()
    pred[:7] = (pred[:7] + 1) % 3
    assert paired_gain(labels, pred, pred, M) == {"gain": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_gain_of_a_known_difference():
    import numpy as np
    from sklearn.metrics import f1_score

    from so8t.eval.comparisons import paired_gain

    labels = np.array([0, 1, 2] * 20)
    worse = np.where(labels == 0, 1, labels)  # every ALLOW called ESCALATION
    expected = 1.0 - f1_score(labels, worse, average="macro")
    g = paired_gain(labels, labels, worse, M)
    assert g["gain"] == pytest.approx(expected) == pytest.approx(1 - (0 + 2 / 3 + 1) / 3)
    assert 0.0 < g["ci_low"] <= g["gain"] <= g["ci_high"]
    back = paired_gain(labels, worse, labels, M)
    assert back["gain"] == pytest.approx(-expected) and back["ci_high"] < 0
    with pytest.raises(ValueError, match="paired_gain"):
        paired_gain(labels, labels[:-1], labels, M)


def _probe(preds, macro_f1=0.5):
    return {"enabled": True, "probe": {"decision": {"n": len(preds), "macro_f1": macro_f1, "macro_f1_ci_low": 0.4,
            "macro_f1_ci_high": 0.6, "accuracy": 0.5}}, "layer": 4, "pooling": "mean", "C": 0.1,
            "val_macro_f1": 0.55, "n_train": 9, "n_val": 3, "n_test": len(preds), "predictions": preds}


def test_every_row_is_paired_with_the_probe_by_example_id(tmp_path):
    from so8t.eval.artifacts import ArtifactResult
    from so8t.eval.comparisons import probe_comparison

    labels = ["ALLOW", "ESCALATION", "DENY"] * 4
    rows = [{"id": f"d{i}", "label": ["ALLOW", "ESCALATION", "DENY"].index(lab), "pred": 0} for i, lab in enumerate(labels)]
    perfect = [dict(r, pred=r["label"]) for r in rows]
    # The probe's predictions, stored in another order, are right on every other example.
    preds = {r["id"]: {"label": labels[i], "pred": labels[i] if i % 2 else "DENY"} for i, r in reversed(list(enumerate(rows)))}
    results = {
        "base": ArtifactResult("base", {}, {"decision_rows": rows}),
        "baked": ArtifactResult("baked", {}, {"decision_rows": perfect}),
    }
    path = tmp_path / "probe.json"
    flat, details = probe_comparison(results, _probe(preds), M, path)
    assert flat["probe.decision.macro_f1"] == 0.5 and flat["probe.decision.n"] == 12
    assert flat["baked.decision.probe_gain"] > 0 > flat["base.decision.probe_gain"]
    for name in ("base", "baked"):
        assert flat[f"{name}.decision.probe_gain_ci_low"] <= flat[f"{name}.decision.probe_gain"]
        assert flat[f"{name}.decision.probe_gain"] <= flat[f"{name}.decision.probe_gain_ci_high"]
    assert (details["layer"], details["pooling"], details["C"]) == (4, "mean", 0.1)
    with pytest.raises(DataError, match=r"probe.json: no probe prediction for 1 of the 12 test decisions"):
        probe_comparison(results, _probe({k: v for k, v in preds.items() if k != "d3"}), M, path)
    with pytest.raises(DataError, match="rerun `dvc repro probe`"):
        probe_comparison(results, _probe(preds | {"d0": {"label": "DENY", "pred": "DENY"}}), M, path)


def test_load_probe_skips_a_disabled_or_missing_probe_and_refuses_a_bad_file(tmp_path):
    import json

    from so8t.eval.comparisons import load_probe

    path = tmp_path / "probe.json"
    assert load_probe(path, False) == (None, "probe.enabled is false")
    probe, why = load_probe(path, True)
    assert probe is None and "missing" in why
    path.write_text(json.dumps({"enabled": False}))
    assert load_probe(path, True)[0] is None
    rows = [{"id": "d0", "label": "ALLOW", "pred": "ALLOW"}, {"id": "d1", "label": "DENY", "pred": "ALLOW"}]
    path.write_text(json.dumps(_probe(rows)))
    probe, _ = load_probe(path, True)
    assert probe["layer"] == 4 and probe["predictions"]["d1"] == rows[1]
    path.write_text(json.dumps({"enabled": True, "probe": {}}))
    with pytest.raises(DataError, match="probe.json: no `predictions`"):
        load_probe(path, True)
    path.write_text(json.dumps(_probe(rows + rows[:1])))
    with pytest.raises(DataError, match="'d0' twice"):
        load_probe(path, True)
