"""Evaluate-stage helpers: paired chrF comparison of bare and grounded answers, the rows, parity, the
paired gain over the linear probe, the generated decision line and the runtime policy's ALLOW recall."""

from types import SimpleNamespace

import pytest

from so8t.eval.evaluation import chrf_comparison
from so8t.eval.metrics import chrf
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


def _quantize_report(folder, with_f16=True, with_base=True):
    import json

    folder.mkdir(parents=True)
    files = {}
    for name in (["f16"] if with_f16 else []) + ["q8_0", "q4_k_m"]:
        (folder / f"so8t-{name}.gguf").write_bytes(b"x")
        files[name] = {"file": f"so8t-{name}.gguf", "size_bytes": 1}
    report = {"files": files}
    if with_base:
        (folder / "base-f16.gguf").write_bytes(b"x")
        report["reference"] = {"base": {"file": "base-f16.gguf", "size_bytes": 1}}
    (folder / "quantize_report.json").write_text(json.dumps(report))


def test_every_row_runs_in_llama_cpp_when_the_f16_files_exist(tmp_path):
    from so8t.eval.evaluation import artifacts

    _quantize_report(tmp_path / "gguf")
    arts = artifacts(tmp_path / "base", tmp_path / "baked", tmp_path / "gguf")
    assert [(a.name, a.kind, a.path.name) for a in arts] == [
        ("base", "gguf", "base-f16.gguf"), ("baked", "gguf", "so8t-f16.gguf"),
        ("q8_0", "gguf", "so8t-q8_0.gguf"), ("q4_k_m", "gguf", "so8t-q4_k_m.gguf"),
    ]
    assert arts[1].hf_dir == tmp_path / "baked" and arts[2].hf_dir is None


def test_rows_without_an_f16_file_fall_back_to_transformers(tmp_path):
    from so8t.eval.evaluation import artifacts

    _quantize_report(tmp_path / "gguf", with_f16=False, with_base=False)
    arts = artifacts(tmp_path / "base", tmp_path / "baked", tmp_path / "gguf")
    assert [(a.name, a.kind) for a in arts] == [("base", "hf"), ("baked", "hf"), ("q8_0", "gguf"), ("q4_k_m", "gguf")]


def test_quantised_rows_are_compared_with_the_f16_row():
    from so8t.eval.evaluation import ArtifactResult, parity_metrics

    def row(name, texts, decisions):
        return ArtifactResult(name, {}, {}, dict(enumerate(texts)), dict(enumerate(decisions)))

    results = {
        "base": row("base", "xyzw", ["DENY"] * 4),
        "baked": row("baked", "abcd", ["ALLOW", "DENY", "DENY", "ESCALATION"]),
        "q8_0": row("q8_0", "abcx", ["ALLOW", "DENY", "DENY", "DENY"]),
    }
    assert parity_metrics(results) == {"q8_0.parity.text": 0.75, "q8_0.parity.decision": 0.75}


def test_parity_sample_is_balanced_and_splits_texts_between_math_and_faq():
    from so8t.eval.evaluation import EvalSets, parity_sample

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


# --------------------------------------------------------------------------- the linear probe, the generated line, the policy


def test_paired_gain_of_identical_predictions_is_zero_with_a_zero_interval():
    import numpy as np

    from so8t.eval.evaluation import paired_gain

    labels = np.array([0, 1, 2] * 10)
    pred = labels.copy()
    pred[:7] = (pred[:7] + 1) % 3
    assert paired_gain(labels, pred, pred, M) == {"gain": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_gain_of_a_known_difference():
    import numpy as np
    from sklearn.metrics import f1_score

    from so8t.eval.evaluation import paired_gain

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


def _scored(rows):
    return [{"id": i, "label": lab, "pred": pred, "logits": z} for i, (lab, pred, z) in enumerate(rows)]


def test_generated_lines_are_parsed_from_their_first_line_only():
    from so8t.eval.evaluation import generated_decision_metrics

    scored = _scored([(0, 0, None), (1, 2, None), (2, 2, None), (0, 0, None), (2, 2, None)])
    texts = ["判定: ALLOW", "判定：ESCALATION ", "# 思考ステップ", "判定: ALLOW\n判定: DENY", "はい\n判定: DENY"]
    out = generated_decision_metrics(texts, scored, "markdown")
    assert out["labels"] == {0: "ALLOW", 1: "ESCALATION", 2: None, 3: "ALLOW", 4: None}
    assert out["agreement"] == pytest.approx(2 / 5)  # rows 0 and 3 name the scored label
    assert out["unparsed_rate"] == pytest.approx(2 / 5)
    # ALLOW f1 1, ESCALATION f1 1, DENY 0 of 2 found (no label counts as wrong, not as a 4th class)
    assert out["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="4 texts for 5"):
        generated_decision_metrics(texts[:4], scored, "markdown")


def test_generated_decision_lines_stop_at_the_line_end_and_keep_generation_speed_apart():
    import torch
    from tiny import TINY_CONFIGS, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from so8t.data.think_format import render
    from so8t.eval.evaluation import generated_decision_lines
    from so8t.eval.inference import HFBackend

    tok = tiny_tokenizer()
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    backend = HFBackend.from_model(model, tok, batch_size=2)
    backend.stats.generated_tokens, backend.stats.generation_seconds = 7, 1.5
    rows = [{"prompt_text": render(tok, p, None)} for p in ("あいう", "かきくけこ", "さし")]
    gens = generated_decision_lines(backend, rows, 6, 1.15)
    assert len(gens) == 3 and all("\n" not in g.text and g.n_tokens <= 6 for g in gens)
    assert (backend.stats.generated_tokens, backend.stats.generation_seconds) == (7, 1.5)


def test_allow_recall_is_the_share_of_gold_allow_the_policy_answers():
    from so8t.eval.evaluation import policy_metrics

    # p(ALLOW) = 1 / (1 + 2 e^-1) = 0.576 for the first row; the second is decided DENY; the third
    # (gold DENY, confident ALLOW) does not count.
    scored = _scored([(0, 0, [0.0, -1.0, -1.0]), (0, 2, [-2.0, -2.0, 0.0]), (2, 0, [0.0, -9.0, -9.0])])
    assert policy_metrics(scored, 1.0, 0.5)["allow_recall"] == 0.5
    assert policy_metrics(scored, 1.0, 0.6)["allow_recall"] == 0.0  # the ALLOW becomes ESCALATION
    assert policy_metrics(scored, 10.0, 0.5)["allow_recall"] == 0.0  # a large T flattens it below 0.5
    out = policy_metrics(scored, 1.0, 0.0)
    assert out["allow_recall"] == 0.5 and out["allow_n"] == 2
    import math

    assert math.isnan(policy_metrics(scored[2:], 1.0, 0.5)["allow_recall"])


def _probe(preds, macro_f1=0.5):
    return {"enabled": True, "probe": {"decision": {"n": len(preds), "macro_f1": macro_f1, "macro_f1_ci_low": 0.4,
            "macro_f1_ci_high": 0.6, "accuracy": 0.5}}, "layer": 4, "pooling": "mean", "C": 0.1,
            "val_macro_f1": 0.55, "n_train": 9, "n_val": 3, "n_test": len(preds), "predictions": preds}


def test_every_row_is_paired_with_the_probe_by_example_id(tmp_path):
    from so8t.eval.evaluation import ArtifactResult, probe_comparison

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

    from so8t.eval.evaluation import load_probe

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
