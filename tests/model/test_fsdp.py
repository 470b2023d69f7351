"""Sharded training through ``configs/accelerate_fsdp.yaml`` (FSDP2), on CPU with gloo.

accelerate 1.15 turns on FSDP only for accelerator devices: on CPU, ``AcceleratorState`` sets
``DistributedType.FSDP`` only inside its ``MULTI_GPU`` / ``MULTI_XPU`` / ... branch, so the very
same ``accelerate launch --config_file configs/accelerate_fsdp.yaml`` runs plain DDP
(``MULTI_CPU``) and the train stage says so. The driver below lifts exactly that device check
(``FSDP_ON_CPU``): everything else is the path a multi-GPU user runs (Trainer's FSDP plugin from
the config, ``fully_shard`` of every decoder layer, ``DTensor`` parameters, sharded
checkpoints ``pytorch_model_fsdp_0`` / ``optimizer_0``, resume from them, the adapter and
rotations gathered from the shards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny import tiny_base_dir, tiny_train_jsonl

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"

FSDP_ON_CPU = textwrap.dedent(
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    _init = state.AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = _fsdp_on_cpu
    """
)

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    if os.environ.get("FSDP_ON_CPU") == "1":
        exec(Path("fsdp_on_cpu.py").read_text())
    from so8t.params import Params
    import so8t.model.train as train
    from so8t.model.trainer import SO8TTrainer

    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    if kill_at:  # a power cut right after checkpoint `kill_at` is published
        save = SO8TTrainer._save_checkpoint
        def _save_then_die(self, model, trial):
            save(self, model, trial)
            if self.state.global_step == kill_at and self.args.should_save:
                os.kill(os.getpid(), signal.SIGKILL)
        SO8TTrainer._save_checkpoint = _save_then_die

    params = Params.model_validate(json.loads(Path(sys.argv[3]).read_text()))
    s = train.run_training(params, train.TrainPaths(base=Path(sys.argv[1]), data=Path(sys.argv[2]),
                           out=Path("out"), live_dir=Path("live"), performance=Path("perf.json")))
    if int(os.environ.get("RANK", "0")) == 0:
        Path("summary.json").write_text(json.dumps({k: s[k] for k in ("world_size", "steps", "resumed_from")}))
    """
)


def _params(batch: int, accumulation: int) -> dict:
    from so8t.params import Params

    return Params.model_validate(
        {
            "seed": 1,
            "train": {"max_steps": 5, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
                      "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0},  # no dropout: ranks draw other masks
            "checkpoint": {"minutes": 0, "steps": 1, "keep": 2, "dir": "ckpt"},
        }
    ).model_dump(mode="json")


def _workdir(tmp_path: Path, name: str, params: dict) -> Path:
    work = tmp_path / name
    work.mkdir()
    (work / "params.json").write_text(json.dumps(params))
    (work / "drive.py").write_text(DRIVER)
    (work / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    return work


def _run(cmd: list[str], work: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=work, env=full, capture_output=True, text=True, timeout=600)


def _max_diff(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    out = {}
    for name in ("adapter_model.safetensors", "so8t_rotations.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        out[name] = max(float((x[k] - y[k]).abs().max()) for k in x)
    return out


@pytest.mark.slow
def test_fsdp_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    base = tiny_base_dir(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    tiny_train_jsonl(data, n=24)
    args = [str(base), str(data), "params.json"]

    # Reference: one process, two micro-batches of 2 per step: the batches the two ranks take.
    single = _workdir(tmp_path, "single", _params(batch=2, accumulation=2))
    proc = _run([sys.executable, "drive.py", *args], single)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    sharded = _workdir(tmp_path, "fsdp", _params(batch=2, accumulation=1))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
              "--num_processes", "2", "--main_process_port", "29541", "drive.py", *args]
    proc = _run(launch, sharded, FSDP_ON_CPU="1", KILL_AT_STEP="3")
    assert proc.returncode != 0, "the run was to be killed after checkpoint 3"
    assert not (sharded / "out" / "adapter_model.safetensors").exists()
    ckpt = sharded / "ckpt" / "checkpoint-3"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()  # sharded, not DDP
    assert (ckpt / "so8t_rotations.safetensors").is_file()

    proc = _run(launch, sharded, FSDP_ON_CPU="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 5
    assert summary["resumed_from"].endswith("checkpoint-3")

    diffs = _max_diff(sharded / "out", single / "out")
    assert all(d <= 1e-5 for d in diffs.values()), diffs

    # A rerun of the finished run restores checkpoint-5 from its shards and writes the same files.
    proc = _run(launch, sharded, FSDP_ON_CPU="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((sharded / "summary.json").read_text())["resumed_from"].endswith("checkpoint-5")
    assert _max_diff(sharded / "out", single / "out") == diffs


@pytest.mark.slow
def test_the_fsdp_config_on_cpu_runs_ddp_and_says_so(tmp_path):
    """Without the shim, accelerate keeps CPU runs on DDP: the stage warns instead of pretending to shard."""
    base = tiny_base_dir(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    tiny_train_jsonl(data, n=8)
    work = _workdir(tmp_path, "ddp", _params(batch=2, accumulation=1))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
              "--num_processes", "2", "--main_process_port", "29542", "drive.py", str(base), str(data), "params.json"]
    proc = _run(launch, work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "FSDP is not active" in proc.stdout + proc.stderr
    assert not any((work / "ckpt").glob("checkpoint-*/pytorch_model_fsdp_0"))
    assert (work / "out" / "adapter_model.safetensors").is_file()
