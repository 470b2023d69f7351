"""Report tables and HTML: hand-built metrics in, exact Markdown cells out."""

import base64

from so8t.eval.report import distill_table, headline_table, previous_run_table, to_html


def _rows(table: str) -> dict[str, list[str]]:
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_headline_table_shows_deltas_against_base_with_direction():
    m = {"base.perplexity": 45.0, "baked.perplexity": 42.5, "base.decision.accuracy": 0.5,
         "baked.decision.accuracy": 0.25}
    rows = _rows(headline_table(m, ["base", "baked"]))
    assert rows["Perplexity (held-out ja)"] == ["45.00", "42.50 (▼2.50, better)"]
    assert rows["Decision accuracy"] == ["0.500", "0.250 (▼0.250, worse)"]
    assert rows["Math exact match"] == ["n/a", "n/a"]


def test_previous_run_table_compares_with_the_committed_run():
    cur = {"baked.perplexity": 40.0}
    assert "No previous run" in previous_run_table(cur, None, ["baked"])
    rows = _rows(previous_run_table(cur, {"baked.perplexity": 41.0}, ["baked"]))
    assert rows["Perplexity (held-out ja)"] == ["40.00 (▼1.00, better)"]
    rows = _rows(previous_run_table(cur, {"other": 1.0}, ["baked"]))
    assert rows["Perplexity (held-out ja)"] == ["40.00 (new)"]


def test_distill_table_lists_teacher_student_and_base():
    d = {"enabled": True, "teacher.size_mb": 300.2, "student.size_mb": 201.0, "base.size_mb": 300.0,
         "teacher.parameters": 268_098_176, "student.parameters": 200_000_000, "base.parameters": 268_098_176,
         "student.agreement.top1": 0.6123, "base.agreement.top1": 0.5, "student.agreement.kl": 0.31,
         "base.agreement.kl": 0.52, "teacher.perplexity": 42.0, "student.perplexity": 60.25,
         "base.perplexity": 45.0}
    rows = _rows(distill_table(d))
    assert rows["Size (MB)"] == ["300", "201", "300"]
    assert rows["Parameters (M)"] == ["268", "200", "268"]
    assert rows["Top-1 agreement with the teacher"] == ["—", "0.612", "0.500"]
    assert rows["Held-out perplexity"] == ["42.00", "60.25", "45.00"]
    assert rows["Decision macro-F1"] == ["—", "—", "—"]


def test_html_is_self_contained_with_embedded_figures(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(png)
    html = to_html("# T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![fig](figures/a.png)\n", tmp_path)
    assert "<table>" in html and "<td>1</td>" in html
    assert "data:image/png;base64," + base64.b64encode(png).decode() in html
    assert "figures/a.png" not in html


def test_previous_metrics_skips_commits_equal_to_the_current_run(tmp_path, monkeypatch):
    import json
    import subprocess

    from so8t.eval.report import previous_metrics

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    f = tmp_path / "reports" / "metrics.json"
    runs = [{"baked.perplexity": 44.0}, {"baked.perplexity": 41.0}]
    for run in runs:
        f.write_text(json.dumps(run))
        git("add", "-A")
        git("commit", "-qm", "run")
    monkeypatch.chdir(tmp_path)
    found = previous_metrics(runs[1])
    assert found is not None and found[0] == runs[0]
    assert previous_metrics({"baked.perplexity": 40.0})[0] == runs[1]
    monkeypatch.chdir(tmp_path.parent)  # outside any repository
    assert previous_metrics(runs[1]) is None


def test_retrieval_and_policy_sections_show_both_columns():
    from types import SimpleNamespace

    from so8t.eval.report import _policy_section, _retrieval_section

    m = {"q8_0.decision.n_rag": 90.0, "q8_0.decision.macro_f1_same_sample": 0.29,
         "q8_0.decision.macro_f1_rag": 0.31, "q8_0.decision.macro_f1_rag_ci_low": 0.22,
         "q8_0.decision.macro_f1_rag_ci_high": 0.40, "q8_0.decision.macro_f1": 0.30,
         "q8_0.faq.chrf": 4.6, "q8_0.faq.chrf_ci_low": 3.0, "q8_0.faq.chrf_ci_high": 6.0,
         "q8_0.faq.chrf_rag": 5.3, "q8_0.faq.chrf_rag_gain": 0.7, "q8_0.faq.chrf_rag_gain_ci_low": -1.2,
         "q8_0.faq.chrf_rag_gain_ci_high": 2.5, "q8_0.faq.citation_rate_rag": 0.0}
    details = {"artifacts": {"q8_0": {"policy": {
        "model": {"ALLOW": 0.35, "ESCALATION": 0.0, "DENY": 0.65},
        "policy": {"ALLOW": 0.0, "ESCALATION": 0.35, "DENY": 0.65},
        "overridden": 0.35, "policy_macro_f1": 0.28, "allow_recall": 0.0}}}}
    inp = SimpleNamespace(metrics=m, details=details)
    rows = _rows(_retrieval_section(inp, ["q8_0"])[4])  # title, blank, text, blank, table
    assert rows["q8_0"][:6] == ["90", "0.290", "0.310 [0.220, 0.400]", "4.6 [3.0, 6.0]", "5.3", "+0.7 [-1.2, +2.5]"]
    assert rows["q8_0"][-1] == "0.00"
    policy = "\n".join(_policy_section(inp, ["q8_0"]))
    assert "| q8_0 | 0.35 / 0.00 / 0.65 | 0.00 / 0.35 / 0.65 | 0.35 | 0.300 | 0.280 | 0.000 |" in policy
    assert _retrieval_section(SimpleNamespace(metrics={}, details=details), ["q8_0"]) == []


def test_decision_table_has_a_probe_row_and_the_gain_and_generated_columns():
    from types import SimpleNamespace

    from so8t.eval.report import decision_table

    dec = {"n": 12, "macro_f1": 0.7, "macro_f1_ci_low": 0.6, "macro_f1_ci_high": 0.8, "accuracy": 0.75,
           "ece_calibrated": 0.05, "temperature": 2.0}
    m = {"baked.decision.probe_gain": 0.1, "baked.decision.probe_gain_ci_low": -0.05,
         "baked.decision.probe_gain_ci_high": 0.25, "baked.decision.generated_agreement": 0.9,
         "baked.decision.generated_macro_f1": 0.65, "baked.decision.generated_unparsed_rate": 0.05}
    probe = {"decision": {"n": 12, "macro_f1": 0.6, "macro_f1_ci_low": 0.5, "macro_f1_ci_high": 0.7,
                          "accuracy": 0.6, "accuracy_ci_low": 0.4, "accuracy_ci_high": 0.8},
             "layer": 12, "pooling": "mean", "C": 0.1}
    inp = SimpleNamespace(metrics=m, calibration={}, details={"artifacts": {"baked": {"decision": dec}}, "probe": probe})
    rows = _rows(decision_table(inp, ["baked"]))
    assert rows["baked"][7:] == ["+0.100 [-0.050, +0.250]", "0.900", "0.650 (0.05 no label)"]
    assert rows["probe (base, linear; layer 12, mean, C=0.1)"][:3] == ["12", "0.600 [0.500, 0.700]", "0.600 [0.400, 0.800]"]
    inp.details.pop("probe")
    assert list(_rows(decision_table(inp, ["baked"]))) == ["baked"]


def test_headline_table_shows_the_probe_gain_generated_agreement_and_allow_recall():
    m = {"base.decision.probe_gain": -0.2, "baked.decision.probe_gain": 0.05,
         "base.decision.policy.allow_recall": 0.0, "baked.decision.policy.allow_recall": 0.8,
         "baked.decision.generated_agreement": 0.95}
    rows = _rows(headline_table(m, ["base", "baked"]))
    assert rows["Decision macro-F1 − linear probe (paired)"] == ["-0.200", "0.050 (▲0.250, better)"]
    assert rows["Gold-ALLOW requests the policy answers"] == ["0.000", "0.800 (▲0.800, better)"]
    assert rows["Generated 判定 line = scored label"] == ["n/a", "0.950"]
