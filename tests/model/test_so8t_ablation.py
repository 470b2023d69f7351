"""benchmarks/so8t_ablation.py: the grid's overrides are valid params, and the table reads `dvc exp show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        assert p.train.so8t.rotation == (variant if variant in ab.FIXED_ROTATIONS else "learned")


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
            for (v, s), (f1, ppl) in values.items()] + [
            # a queued run shows the metrics its workspace copy started from, not its own
            {"name": "abl-random-s1", "executor": {"state": state}, "revs": [rev("random", 1, 0.99, 1.0)]}
            for state in ("running", "queued", "failed")]},
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
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--json", str(saved), "--records", str(tmp_path / "none"),
                           "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["by_variant"]["so8t"]["test macro-F1"]["diff_vs_lora"]["verdict"] == "higher"
    assert out["per_seed"] == {}  # experiments alone carry no test decisions to pair


def test_the_table_says_when_no_ablation_run_exists(tmp_path):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps([{"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None}]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--json", str(saved), "--records", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode != 0 and "no finished experiment named abl-" in proc.stderr


def _params(seed=1, so8t=True, pet=True, rotation="learned") -> dict:
    return {"seed": seed, "train": {"so8t": {"enabled": so8t, "rotation": rotation}, "pet": {"enabled": pet}}}


def _details(preds: list[int], labels: list[int]) -> dict:
    rows = [{"id": f"t{i}", "label": y, "pred": p, "logits": [0.0, 0.0, 0.0]} for i, (y, p) in enumerate(zip(labels, preds))]
    return {"artifacts": {a: {"decision_rows": rows} for a in ("base", "baked", "q8_0", "q4_k_m")}}


def test_a_run_is_named_by_its_params_and_a_mismatch_is_refused():
    ab = _load()
    for variant in ab.VARIANTS:
        s = ab.variant_setting(variant)
        params = _params(3, s["train.so8t.enabled"], s["train.pet.enabled"], s["train.so8t.rotation"])
        assert ab.variant_of(params) == variant
    # without rotations, the rotation kind has nothing to choose
    assert ab.variant_of(_params(so8t=False, pet=False, rotation="hadamard")) == "lora"
    with pytest.raises(ab.RecordError, match="none of the ablation's variants"):
        ab.variant_of(_params(pet=False, rotation="hadamard"))
    with pytest.raises(ab.RecordError, match="x.yaml: params.yaml has no key train.pet.enabled"):
        ab.variant_of({"seed": 1, "train": {"so8t": {"enabled": True, "rotation": "learned"}}}, "x.yaml")

    metrics, perf = {"baked.decision.macro_f1": 0.5}, {"train_seconds": 10.0}
    rec = ab.make_record("abl-pet-s3", metrics, perf, _params(3, so8t=False), _details([0, 1], [0, 1]),
                         {"kind": "experiment", "rev": "r1"})
    assert rec["variant"] == "pet" and rec["seed"] == 3 and rec["decisions"]["q4_k_m"] == [["t0", 0, 0], ["t1", 1, 1]]
    assert rec["performance"]["train_seconds"] == 10.0 and rec["recorded_on"]["cpus"] >= 1
    with pytest.raises(ab.RecordError, match="abl-lora-s3: its params.yaml is variant pet with seed 3"):
        ab.make_record("abl-lora-s3", metrics, perf, _params(3, so8t=False), _details([0], [0]), {"rev": "r"})
    with pytest.raises(ab.RecordError, match="seed 3"):
        ab.make_record("abl-pet-s4", metrics, perf, _params(3, so8t=False), _details([0], [0]), {"rev": "r"})
    with pytest.raises(ab.RecordError, match="no artifacts.q8_0.decision_rows"):
        ab.make_record("abl-pet-s3", metrics, perf, _params(3, so8t=False),
                       {"artifacts": {"baked": {"decision_rows": [{"id": 1, "label": 0, "pred": 0}]}}}, {"rev": "r"})


def test_records_keep_finished_runs_and_pair_them_within_a_seed(tmp_path):
    from sklearn.metrics import f1_score

    ab = _load()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120).tolist()
    lora_pred = [y if rng.random() < 0.6 else int(rng.integers(0, 3)) for y in labels]
    so8t_pred = [y if rng.random() < 0.9 else int(rng.integers(0, 3)) for y in labels]
    lora = ab.make_record("abl-lora-s1", {"baked.decision.macro_f1": 0.6}, {}, _params(1, False, False),
                          _details(lora_pred, labels), {"kind": "experiment", "rev": "a"})
    so8t = ab.make_record("abl-so8t-s1", {"baked.decision.macro_f1": 0.9}, {}, _params(1, True, False),
                          _details(so8t_pred, labels), {"kind": "experiment", "rev": "b"})
    said = ab.save_records([lora, so8t], tmp_path)
    assert all("recorded experiment" in line for line in said)
    assert ab.save_records([lora], tmp_path) == [f"{tmp_path / 'abl-lora-s1.json'}: already recorded"]
    other = {**lora, "source": {"kind": "experiment", "rev": "c"}, "metrics": {"baked.decision.macro_f1": 0.1}}
    assert "kept" in ab.save_records([other], tmp_path)[0]  # another run of the same name is not replaced ...
    records = ab.read_records(tmp_path)
    assert records[("lora", 1)]["metrics"]["baked.decision.macro_f1"] == 0.6
    ab.save_records([other], tmp_path, force=True)  # ... unless asked
    assert ab.read_records(tmp_path)[("lora", 1)]["source"]["rev"] == "c"
    ab.save_records([lora], tmp_path, force=True)

    gains = ab.per_seed_gains(ab.read_records(tmp_path), 0.95, 500)
    row = gains["so8t"][0]
    expected = f1_score(labels, so8t_pred, average="macro") - f1_score(labels, lora_pred, average="macro")
    assert row["seed"] == 1 and row["n"] == 120 and row["baked"]["gain"] == pytest.approx(expected)
    assert row["baked"]["ci_low"] < expected < row["baked"]["ci_high"] and row["baked"]["ci_low"] > 0
    assert row["same_decision"] == pytest.approx(np.mean(np.array(lora_pred) == np.array(so8t_pred)))

    (tmp_path / "abl-so8t-s1.json").write_text(json.dumps(
        {**so8t, "decisions": {a: rows[:-1] for a, rows in so8t["decisions"].items()}}))
    with pytest.raises(ab.RecordError, match="abl-so8t-s1 and abl-lora-s1: different baked test decisions"):
        ab.per_seed_gains(ab.read_records(tmp_path), 0.95, 100)
    (tmp_path / "abl-pet-s2.json").write_text(json.dumps({**so8t, "variant": "so8t"}))
    with pytest.raises(ab.RecordError, match="abl-pet-s2.json: holds variant 'so8t' seed 1"):
        ab.read_records(tmp_path)

    (tmp_path / "abl-pet-s2.json").unlink()
    (tmp_path / "abl-so8t-s1.json").write_text(json.dumps(so8t))
    empty = tmp_path / "exps.json"
    empty.write_text(json.dumps([{"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None}]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--json", str(empty), "--records", str(tmp_path),
                           "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["by_variant"]["so8t"]["test macro-F1"]["values"] == [0.9]
    assert out["per_seed"]["so8t"][0]["baked"]["gain"] == pytest.approx(expected)
    assert out["runs"]["abl-lora-s1"]["source"]["rev"] == "a"
    assert "Within one seed" in proc.stdout


def test_a_fixed_rotation_is_also_paired_with_the_trained_one(tmp_path):
    from sklearn.metrics import f1_score

    ab = _load()
    assert ab.references("lora") == [] and ab.references("so8t") == ["lora"]
    assert ab.references("hadamard") == ab.references("random") == ["lora", "so8t_pet"]
    values = {("lora", 1): (0.70, 50.0), ("lora", 2): (0.72, 51.0),
              ("so8t_pet", 1): (0.90, 52.0), ("so8t_pet", 2): (0.88, 53.0),
              ("hadamard", 1): (0.80, 52.5), ("hadamard", 2): (0.79, 53.6)}
    result = ab.table(ab.runs_from_exp_show(_exp_show(values)))
    d = result["hadamard"]["test macro-F1"]["diff_vs_so8t_pet"]
    assert d["values"] == pytest.approx([-0.10, -0.09]) and d["verdict"] == "lower"
    assert result["hadamard"]["test macro-F1"]["diff_vs_lora"]["values"] == pytest.approx([0.10, 0.07])
    assert result["hadamard"]["perplexity"]["diff_vs_so8t_pet"]["values"] == pytest.approx([0.5, 0.6])
    assert "diff_vs_so8t_pet" not in result["so8t_pet"]["test macro-F1"]

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90).tolist()
    preds = {v: [y if rng.random() < acc else int(rng.integers(0, 3)) for y in labels]
             for v, acc in (("lora", 0.5), ("so8t_pet", 0.9), ("hadamard", 0.7))}
    settings = {"lora": (False, False, "learned"), "so8t_pet": (True, True, "learned"),
                "hadamard": (True, True, "hadamard")}
    recs = [ab.make_record(f"abl-{v}-s1", {"baked.decision.macro_f1": 0.5}, {}, _params(1, *settings[v]), _details(preds[v], labels),
                           {"kind": "experiment", "rev": v}) for v in preds]
    ab.save_records(recs, tmp_path)
    records = ab.read_records(tmp_path)
    vs_trained = ab.per_seed_gains(records, 0.95, 300, "so8t_pet", ab.FIXED_ROTATIONS)
    assert list(vs_trained) == ["hadamard"]  # lora is not a fixed rotation: not paired with the trained one
    expected = f1_score(labels, preds["hadamard"], average="macro") - f1_score(labels, preds["so8t_pet"], average="macro")
    assert vs_trained["hadamard"][0]["baked"]["gain"] == pytest.approx(expected)
    assert set(ab.per_seed_gains(records, 0.95, 300)) == {"so8t_pet", "hadamard"}


def test_the_default_is_paired_with_each_one_factor_run():
    """so8t_pet - pet is SO8T's effect with PET on; so8t_pet - so8t is PET's effect with SO8T on."""
    ab = _load()
    assert ab.references("so8t_pet") == ["lora", "pet", "so8t"]
    assert ab.references("pet") == ab.references("so8t") == ["lora"]
    values = {("lora", 1): (0.70, 50.0), ("lora", 2): (0.72, 51.0),
              ("so8t", 1): (0.80, 50.5), ("so8t", 2): (0.765, 51.2),
              ("pet", 1): (0.85, 52.0), ("pet", 2): (0.83, 53.0),
              ("so8t_pet", 1): (0.86, 52.5), ("so8t_pet", 2): (0.82, 53.1)}
    result = ab.table(ab.runs_from_exp_show(_exp_show(values)))
    f1 = result["so8t_pet"]["test macro-F1"]
    assert f1["diff_vs_pet"]["values"] == pytest.approx([0.01, -0.01]) and f1["diff_vs_pet"]["verdict"] == "no difference"
    assert f1["diff_vs_so8t"]["values"] == pytest.approx([0.06, 0.055]) and f1["diff_vs_so8t"]["verdict"] == "higher"
    assert result["so8t_pet"]["perplexity"]["diff_vs_pet"]["values"] == pytest.approx([0.5, 0.1])
    assert "diff_vs_pet" not in result["so8t"]["test macro-F1"]


def test_an_invariant_rotation_is_also_paired_with_the_same_model_unrotated():
    ab = _load()
    assert ab.references("hadamard_invariant") == ab.references("random_invariant") == ["lora", "so8t_pet", "pet"]
    assert "pet" not in ab.references("hadamard")
    values = {("pet", 1): (0.90, 50.0), ("pet", 2): (0.86, 51.0), ("lora", 1): (0.80, 50.0), ("lora", 2): (0.80, 51.0),
              ("hadamard_invariant", 1): (0.91, 50.1), ("hadamard_invariant", 2): (0.85, 51.11)}
    result = ab.table(ab.runs_from_exp_show(_exp_show(values)))
    d = result["hadamard_invariant"]["perplexity"]["diff_vs_pet"]
    assert d["values"] == pytest.approx([0.1, 0.11]) and d["verdict"] == "higher"
    assert result["hadamard_invariant"]["test macro-F1"]["diff_vs_pet"]["verdict"] == "no difference"
    assert result["hadamard_invariant"]["perplexity"]["diff_vs_so8t_pet"]["n"] == 0  # no so8t_pet run: no pair
    params = _params(1, True, True, "random_invariant")
    assert ab.variant_of(params) == "random_invariant"


def test_experiments_of_every_commit_are_found_not_only_heads():
    ab = _load()
    listed = "357a36b:\n\tbc83b1e [abl-lora-s42]\n\t9152280 [abl-so8t-s42]\n8a68837e:\n\t1234567 [abl-pet-s1]\n"
    assert ab.baselines(listed) == ["357a36b", "8a68837e"]
    assert ab.baselines("") == []
    # the branch head's experiments are listed under the branch name, not a sha
    listed = "1b77842:\n\t7a3cf11 [abl-hadamard_invariant-s42]\nmain:\n\t06b1d49 [abl-lora-s2]\n"
    assert ab.baselines(listed) == ["1b77842", "main"]
