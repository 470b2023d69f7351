"""benchmarks/so8t_ablation.py: the grid's overrides are valid params, and the table reads `dvc exp show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "so8t_ablation.py"


def _load():
    return load_script("benchmarks/so8t_ablation.py")


def test_every_queued_experiment_is_a_valid_params_file_that_differs_as_named():
    from so8t.params import Params

    ab = _load()
    commands = ab.queue_commands([1, 2], list(ab.VARIANTS))
    assert len(commands) == 2 * len(ab.VARIANTS) and len({c[5] for c in commands}) == len(commands)
    for cmd in commands:
        assert cmd[:4] == ["dvc", "exp", "run", "--queue"] and ab.NAME.match(cmd[5])
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        for key, value in (o.split("=", 1) for o in cmd[7::2]):
            *parents, leaf = key.split(".")
            node = params
            for part in parents:
                node = node[part]
            assert leaf in node, f"{cmd[5]}: -S {key} is not a key of params.yaml"
            node[leaf] = yaml.safe_load(value)
        p = Params.model_validate(params)
        variant = ab.NAME.match(cmd[5])["variant"]
        assert p.seed == int(ab.NAME.match(cmd[5])["seed"])
        assert p.train.so8t.enabled == (variant not in ("lora", "pet"))
        assert p.train.pet.enabled == (variant not in ("lora", "so8t"))
        assert p.train.so8t.rotation == (variant if variant in ("hadamard", "random") else "learned")


def _exp_show(values: dict[tuple[str, int], tuple[float, float]]) -> list:
    """The shape of DVC 3's `dvc exp show --json`: a workspace, a baseline, its experiments."""
    def rev(variant, seed, f1, ppl):
        return {"rev": f"{variant}{seed}", "name": f"abl-{variant}-s{seed}", "data": {
            "params": {}, "metrics": {
                "reports/metrics.json": {"data": {"baked.decision.macro_f1": f1, "baked.perplexity": ppl,
                                                  "q8_0.perplexity": ppl + 0.2, "q4_k_m.perplexity": ppl + 1.5,
                                                  "f16.parity.perplexity_hf": ppl, "f16.parity.perplexity_ratio": 1.0,
                                                  "q8_0.parity.decision": 1.0, "q4_k_m.parity.decision": f1}},
                "reports/performance/train.json": {"data": {"train_seconds": 100.0, "tokens_per_s": 9.0}},
                "dvclive/metrics.json": {"data": {"loss": 1.0}}}}}
    return [
        {"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None},
        {"rev": "abc", "name": "main", "data": {"metrics": {}}, "experiments": [
            {"name": f"abl-{v}-s{s}", "executor": None, "revs": [rev(v, s, f1, ppl)]}
            for (v, s), (f1, ppl) in values.items()]},
    ]


def test_the_table_gives_means_with_intervals_and_paired_differences_against_lora(tmp_path):
    ab = _load()
    values = {("lora", 1): (0.80, 50.0), ("lora", 2): (0.70, 52.0), ("lora", 3): (0.75, 54.0),
              ("so8t", 1): (0.81, 50.0), ("so8t", 2): (0.71, 52.1), ("so8t", 3): (0.76, 53.9),
              ("pet", 1): (0.70, 50.0), ("pet", 2): (0.80, 52.0), ("pet", 3): (0.75, 54.0)}
    runs = ab.runs_from_exp_show(_exp_show(values))
    assert set(runs) == set(values)
    assert runs[("lora", 1)]["train_seconds"] == 100.0 and "loss" not in runs[("lora", 1)]
    result = ab.table(runs)
    mean, low, high = result["lora"]["test macro-F1"]["mean_ci95"]
    assert mean == pytest.approx(0.75) and low < 0.75 < high
    # t interval, n = 3: mean +- t(0.975, 2) * sd / sqrt(3), sd = 0.05
    assert high - mean == pytest.approx(4.302653 * 0.05 / 3**0.5, rel=1e-5)
    assert result["lora"]["Q4_K_M loss"]["values"] == pytest.approx([1.5, 1.5, 1.5])
    assert result["lora"]["Q8_0 agreement"]["values"] == [1.0, 1.0, 1.0]
    assert result["so8t"]["Q4_K_M agreement"]["diff_vs_lora"]["mean_ci95"][0] == pytest.approx(0.01)
    # so8t is +0.01 on every seed: a consistent paired gain, whatever the spread between seeds
    d = result["so8t"]["test macro-F1"]["diff_vs_lora"]
    assert d["n"] == 3 and d["mean_ci95"][0] == pytest.approx(0.01) and d["verdict"] == "higher"
    # pet: -0.1, +0.1, 0: the interval holds 0
    assert result["pet"]["test macro-F1"]["diff_vs_lora"]["verdict"] == "no difference"
    assert "diff_vs_lora" not in result["lora"]["test macro-F1"]

    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(_exp_show(values)))
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--json", str(saved), "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["so8t"]["test macro-F1"]["diff_vs_lora"]["verdict"] == "higher"


def test_the_table_says_when_no_ablation_run_exists(tmp_path):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps([{"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None}]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--json", str(saved)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode != 0 and "no finished experiment named abl-" in proc.stderr
