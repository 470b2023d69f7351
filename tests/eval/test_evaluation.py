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
