"""The whole pipeline, end to end, with `dvc repro` on tiny data and a tiny random Gemma 3.

The tiny model uses the real Gemma 3 tokenizer (from the embedded GGUF) so that
collect -> synthesize -> think-format -> train -> bake -> quantize (llama.cpp)
-> calibrate -> evaluate -> report all run exactly as with the default model,
in about two minutes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_PARAMS = {
    "synthesize": {
        "decisions_per_template": 1,
        "reference_qa_docs": 6,
        "heldout_reference_docs": 20,
        "math_templates": [0, 1, 2, 4, 5, 6],
        "math_variants_per_template": 1,
    },
    "think_format": {"max_length": 256},
    "train": {
        "max_steps": 4, "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8,
        "eval_steps": 2, "eval_examples_per_task": 2, "eval_decisions": 6,
    },
    "quantize": {"check_max_tokens": 4},
    "metrics": {"perplexity_max_tokens": 128, "perplexity_window": 64, "bootstrap_resamples": 200},
    "calibrate": {"max_examples": 30},
    "evaluate": {
        "train_decision_sample": 9,
        "max_math_examples": 2,
        "max_faq_examples": 2,
        "math_max_new_tokens": 6,
        "faq_max_new_tokens": 6,
        "parity_decisions": 6,
        "parity_texts": 2,
    },
}


def _dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([str(BIN / "dvc"), *args], cwd=workdir, env=env, capture_output=True, text=True)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def pipeline_workdir(work: Path, source: Path) -> Path:
    """A DVC project in ``work``: this repository's pipeline, code and params with :data:`TINY_PARAMS`
    and ``base_model.source`` = ``source`` (a tiny HF folder). Returns ``work``."""
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    for name in ("stages", "so8t"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params = _merge(params, TINY_PARAMS | {"base_model": {"source": str(source), "chat_template": None}})
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    assert _dvc(work, "init", "--no-scm", "-q").returncode == 0
    return work


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, gemma_tok):
    from tiny import tiny_gemma_dir

    root = tmp_path_factory.mktemp("e2e")
    tok = copy.deepcopy(gemma_tok)
    tok.chat_template = None  # as the embedded GGUF has none: the base stage gives Gemma its turn template
    tiny = tiny_gemma_dir(root / "tiny-gemma", tok, sliding_window=64)
    work = pipeline_workdir(root / "work", tiny)
    first = _dvc(work, "repro")
    return work, first


def test_dvc_repro_runs_every_stage(pipeline):
    work, proc = pipeline
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = ("base", "baked", "q8_0", "q4_k_m")
    for stage in ("base", "collect", "synthesize", "think-format", "train", "bake", "base-gguf", "quantize",
                  *(f"calibrate@{r}" for r in rows), "probe", *(f"evaluate@{r}" for r in rows), "reference",
                  "gather", "report", "distill-teacher", "distill"):
        assert f"Running stage '{stage}'" in proc.stdout


def test_artifacts_are_real(pipeline):
    work, _ = pipeline
    bake = json.loads((work / "models/baked/bake_report.json").read_text())
    assert bake["max_abs_diff"] < 1e-4 and bake["rotations_folded"] == 2
    config = json.loads((work / "models/baked/config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    quant = json.loads((work / "models/gguf/quantize_report.json").read_text())
    assert set(quant["files"]) == {"f16", "q8_0", "q4_k_m"}
    assert all(f["tokenizer_match"] and f["size_bytes"] > 0 for f in quant["files"].values())
    base_gguf = json.loads((work / "models/base-gguf/report.json").read_text())
    assert base_gguf["base"]["file"] == "base-f16.gguf" and (work / "models/base-gguf/base-f16.gguf").is_file()
    for row in ("base", "baked", "q8_0", "q4_k_m"):  # each row's own metrics file, for `dvc exp show`
        per_row = json.loads((work / f"reports/metrics/{row}.json").read_text())
        assert per_row and all(k.startswith(f"{row}.") for k in per_row)
    metrics = json.loads((work / "reports/metrics.json").read_text())
    for art in ("base", "baked", "q8_0", "q4_k_m"):
        for key in ("decision.accuracy", "decision.macro_f1", "decision.ece", "perplexity", "faq.chrf",
                    "decision.probe_gain", "decision.probe_gain_ci_low", "decision.probe_gain_ci_high",
                    "decision.generated_agreement", "decision.generated_macro_f1",
                    "decision.generated_unparsed_rate", "decision.policy.allow_recall"):
            assert f"{art}.{key}" in metrics
        assert metrics[f"{art}.perplexity"] > 1.0
        assert 0.0 <= metrics[f"{art}.decision.generated_agreement"] <= 1.0
        assert metrics[f"{art}.decision.probe_gain"] == pytest.approx(
            metrics[f"{art}.decision.macro_f1"] - metrics["probe.decision.macro_f1"], abs=1e-5)
    # The linear probe on the base model: its own stage, every test decision, paired with every row.
    probe = json.loads((work / "reports/probe.json").read_text())
    assert probe["enabled"] and probe["n_test"] == metrics["base.decision.n"] == len(probe["predictions"])
    assert probe["layer"] in probe["layers"] and probe["pooling"] in ("last", "mean")
    shown = _dvc(work, "metrics", "show", "reports/probe.json")
    assert shown.returncode == 0 and "probe.decision.macro_f1" in shown.stdout
    assert probe["predictions"][0]["id"] not in shown.stdout  # per-example rows stay out of `dvc metrics show`
    for key in ("n", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy"):
        assert metrics[f"probe.decision.{key}"] == pytest.approx(probe["probe"]["decision"][key], abs=1e-5)
    # Every row ran in llama.cpp; transformers checked the F16 GGUF on a sample.
    details = json.loads((work / "reports/eval/details.json").read_text())
    assert {a: d["kind"] for a, d in details["artifacts"].items()} == dict.fromkeys(("base", "baked", "q8_0", "q4_k_m"), "gguf")
    assert details["artifacts"]["baked"]["path"].endswith("so8t-f16.gguf")
    assert metrics["f16.parity.decision_n"] == 6 and metrics["f16.parity.text_n"] == 2
    assert metrics["f16.parity.decision"] >= 0.5 and 0.9 < metrics["f16.parity.perplexity_ratio"] < 1.1
    assert {"q8_0.parity.decision", "q4_k_m.parity.text"} <= set(metrics)
    perf = json.loads((work / "reports/performance/evaluate.json").read_text())
    assert perf["wall_s"] > 0 and all(perf[f"{a}.wall_s"] > 0 for a in ("base", "baked", "q8_0", "q4_k_m"))
    assert json.loads((work / "reports/performance/calibrate.json").read_text())["wall_s"] > 0
    report = (work / "reports/report.md").read_text(encoding="utf-8")
    assert "Headline metrics" in report and "Data card" in report and "## Evaluation engine and time" in report
    assert "| probe (base, linear; layer " in report and "**Linear probe**" in report
    assert "**Served model**: serving so8t-" in report and "(runtime.model: auto)" in report
    assert (work / "reports/figures/training.png").stat().st_size > 1000
    assert json.loads((work / "reports/distill.json").read_text()) == {"enabled": False}
    assert "## Distillation" in report
    rotations = work / "models/adapter/so8t_rotations.safetensors"
    assert rotations.is_file()


def test_second_repro_does_nothing_and_metrics_show(pipeline):
    work, _ = pipeline
    again = _dvc(work, "repro")
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    shown = _dvc(work, "metrics", "show")
    assert shown.returncode == 0 and "q4_k_m.perplexity" in shown.stdout


def _cached_outs(work: Path) -> dict[str, str]:
    """md5 of every cached output in dvc.lock (metrics files with cache: false hold wall times)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text(encoding="utf-8"))
    return {
        o["path"]: o["md5"]
        for stage in lock["stages"].values()
        for o in stage.get("outs", [])
        if not o["path"].startswith(("reports/", "dvclive/"))
    }


def test_rerunning_stages_writes_the_same_bytes(pipeline):
    """Wall times live in reports/performance, not in cached outputs: a forced rerun changes no model hash,
    so nothing downstream reruns but the report (which shows the timings)."""
    work, _ = pipeline
    before = _cached_outs(work)
    for stage in ("train", "bake", "quantize"):
        proc = _dvc(work, "repro", "-f", "-s", stage)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _cached_outs(work) == before
    again = _dvc(work, "repro")
    ran = {line.split("'")[1] for line in again.stdout.splitlines() if line.startswith("Running stage")}
    assert ran <= {"report"}, again.stdout[-2000:]


def test_editing_an_imported_module_reruns_its_stages(pipeline):
    """so8t/eval/gguf_check.py runs in the two GGUF exports only; nothing else may claim to be stale."""
    work, _ = pipeline
    keys = work / "so8t" / "eval" / "gguf_check.py"
    original = keys.read_text(encoding="utf-8")
    keys.write_text(original + "\n# edited\n", encoding="utf-8")
    try:
        status = _dvc(work, "status").stdout
    finally:
        keys.write_text(original, encoding="utf-8")
    changed = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert changed == {"base-gguf", "quantize"}, status


def test_training_params_never_rerun_the_probe(pipeline):
    """The probe reads the base model and the formatted data only: a training change leaves it as it is."""
    work, _ = pipeline
    path = work / "params.yaml"
    original = path.read_text(encoding="utf-8")
    params = yaml.safe_load(original)
    params["train"]["max_steps"] += 1
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    try:
        status = _dvc(work, "status").stdout
    finally:
        path.write_text(original, encoding="utf-8")
    changed = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert "train" in changed and "probe" not in changed, status
    # The base model's rows read only the base model: a training change never reruns them.
    assert not changed & {"base-gguf", "calibrate@base", "evaluate@base"}, status


def test_evaluate_param_reruns_only_evaluate_and_report(pipeline):
    work, _ = pipeline
    path = work / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["evaluate"]["max_faq_examples"] = 1
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    proc = _dvc(work, "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate@base", "evaluate@baked", "evaluate@q8_0", "evaluate@q4_k_m", "reference", "gather", "report"}


def test_one_row_reruns_alone(pipeline):
    """`dvc repro -f evaluate@q4_k_m` rebuilds that row only; its metrics file is the same again."""
    work, _ = pipeline
    before = (work / "reports/metrics/q4_k_m.json").read_text()
    proc = _dvc(work, "repro", "-f", "-s", "evaluate@q4_k_m")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate@q4_k_m"}
    assert (work / "reports/metrics/q4_k_m.json").read_text() == before


def test_push_to_a_local_remote(pipeline, tmp_path):
    work, _ = pipeline
    remote = tmp_path / "remote"
    assert _dvc(work, "remote", "add", "-d", "local", str(remote)).returncode == 0
    proc = _dvc(work, "push")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(remote.rglob("*"))
