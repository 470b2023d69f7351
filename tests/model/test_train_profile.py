"""benchmarks/train_profile.py runs on a tiny random model and writes only its --json file."""

from __future__ import annotations

import json
import random

import pytest
from scripts import load_script
from tiny import tiny_base_dir


def _load():
    return load_script("benchmarks/train_profile.py")


def _rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Formatted rows (as think-format writes them): decisions with a decision span, math and FAQ answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = ("decision", "math", "qa_faq")[i % 3]
        prompt = rng.randint(4, 10)
        completion = [rng.randrange(6, 100) for _ in range(rng.randint(6, 30))]
        ids = [rng.randrange(6, 100) for _ in range(prompt)] + completion
        rows.append(
            {
                "id": f"r{i}", "task": task, "input_ids": ids, "labels": [-100] * prompt + completion,
                "decision_span": [prompt, prompt + 3] if task == "decision" else [prompt, prompt + 1],
                "decision": ("ALLOW", "ESCALATION", "DENY", "ALLOW")[i // 3] if task == "decision" else "ALLOW",
            }
        )
    return rows


def _setup(tmp_path, sampling: str = "group_by_length"):
    base = tiny_base_dir(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n  lora_r: 2\n  lora_alpha: 4\n  per_device_train_batch_size: 3\n  gradient_accumulation_steps: 2\n"
        f"  max_steps: 20\n  decision_line_passes: 1.0\n  sampling: {sampling}\n",
        encoding="utf-8",
    )
    return tmp_path, base, data, params


@pytest.fixture
def setup(tmp_path):
    return _setup(tmp_path)


def test_profile_times_every_phase_and_writes_only_the_json(setup, monkeypatch):
    tmp_path, base, data, params = setup
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show too
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "profile.json"
    result = _load().main(
        ["--base", str(base), "--data", str(data), "--params", str(params), "--steps", "3", "--threads", "1", "--json", str(out)]
    )
    assert set(tmp_path.rglob("*")) - before == {out}
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["summary"] == pytest.approx(result["summary"])
    assert len(saved["steps"]) == 3 and saved["steps"][0]["warmup"] and saved["summary"]["timed_steps"] == 2
    phases = ("data", "forward", "lm_head_ce", "pet", "backward", "optimizer", "log", "other")
    assert sum(saved["share"][k] for k in phases) == pytest.approx(1.0, abs=1e-6)
    assert all(saved["mean_seconds"][k] > 0 for k in ("forward", "lm_head_ce", "pet", "backward", "optimizer", "log"))
    assert 0 < saved["mean_seconds"]["so8t_build"] < saved["mean_seconds"]["forward"]
    assert saved["config"]["so8t_rotations"] == 2 and saved["config"]["gradient_accumulation_steps"] == 2
    for step in saved["steps"]:
        assert len(step["sequence_lengths"]) == 2  # two micro-batches of 3 rows per optimiser step
        assert step["real_tokens"] <= step["padded_tokens"] and step["label_tokens"] > 0


def test_task_filter_profiles_only_decision_lines(setup):
    _, base, data, params = setup
    result = _load().main(
        ["--base", str(base), "--data", str(data), "--params", str(params), "--steps", "2", "--threads", "1",
         "--tasks", "decision_line", "--batch-size", "4"]
    )
    c = result["config"]
    assert c["tasks"] == ["decision_line"] and c["rows"] == c["rows_per_task"]["decision_line"] == 4
    # A decision-line copy ends at its decision span: its 3 label tokens (all after the prompt) and no more.
    assert all(s["label_tokens"] == 2 * 4 * 3 for s in result["steps"])  # 2 micro-batches of 4 rows


def _samplings() -> tuple[str, ...]:
    from so8t.params import TrainParams

    return TrainParams.model_fields["sampling"].annotation.__args__


@pytest.mark.parametrize("sampling", _samplings())
def test_every_sampling_mode_runs(tmp_path, sampling):
    tmp_path, base, data, params = _setup(tmp_path, sampling)
    result = _load().main(["--base", str(base), "--data", str(data), "--params", str(params), "--steps", "2", "--threads", "1"])
    assert result["config"]["sampling"] == sampling and sampling in result["config"]["batches"]
    assert all(s["label_tokens"] > 0 for s in result["steps"])
