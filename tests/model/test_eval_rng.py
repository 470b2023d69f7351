"""Looking at the model never changes it: ``train.eval_steps`` 0, 2 and 4 train the same adapter.

Each evaluation's DataLoader draws its base seed from torch's global generator; without
:meth:`so8t.model.trainer.SO8TTrainer.evaluate` forking the generators, every evaluation would
shift the LoRA dropout masks of the steps after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_base_dir, tiny_train_jsonl

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from so8t.params import load_params
    from so8t.model.train import TrainPaths, run_training
    s = run_training(load_params("params.yaml"), TrainPaths(base=Path({base!r}), data=Path({data!r}),
                     out=Path("out"), live_dir=Path("live"), performance=Path("perf.json"), val=Path({val!r})))
    sys.exit(s["exit_code"] or 0)
    """
)


def _train(root: Path, eval_steps: int, base: Path, data: Path, val: Path) -> dict[str, torch.Tensor]:
    work = root / f"eval{eval_steps}"
    work.mkdir()
    params = {
        "seed": 5,
        "train": {
            "max_steps": 6, "per_device_train_batch_size": 2, "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.3,
            "learning_rate": 1e-2, "num_threads": 1, "warmup_ratio": 0.0, "eval_steps": eval_steps,
            "eval_examples_per_task": 4, "eval_decisions": 0,
        },
        "checkpoint": {"steps": 0, "minutes": 0.0},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "drive.py").write_text(DRIVER.format(base=str(base), data=str(data), val=str(val)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "drive.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if eval_steps:
        logged = (work / "live" / "metrics.json").read_text()
        assert "eval" in logged, f"eval_steps={eval_steps} ran no evaluation: {logged[:500]}"
    return load_file(work / "out" / "adapter_model.safetensors")


@pytest.mark.slow
def test_evaluations_do_not_change_the_trained_adapter(tmp_path):
    base = tiny_base_dir(tmp_path / "base", "llama")
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    tiny_train_jsonl(data, n=16)
    tiny_train_jsonl(val, n=8, seed=1)
    rows = [json.loads(line) | {"task": "qa_faq"} for line in val.read_text().splitlines()]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {n: _train(tmp_path, n, base, data, val) for n in (0, 2, 4)}
    for n in (2, 4):
        assert runs[n].keys() == runs[0].keys()
        for k in runs[0]:
            assert torch.equal(runs[n][k], runs[0][k]), f"eval_steps={n} changed {k}"
