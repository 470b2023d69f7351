"""QLoRA (bitsandbytes 8-bit / nf4, on CPU too) and DDP training with the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from so8t.params import Params
from tiny import tiny_base_dir, tiny_train_jsonl

pytest.importorskip("bitsandbytes")


def _params(tmp_path: Path, **train) -> Params:
    return Params.model_validate(
        {
            "seed": 1,
            "train": {"max_steps": 2, "per_device_train_batch_size": 2, "lora_r": 2, "lora_alpha": 4, **train},
            "checkpoint": {"minutes": 0, "steps": 1, "keep": 2, "dir": str(tmp_path / "ckpt")},
        }
    )


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_qlora_trains_and_bakes_from_a_full_precision_base(tmp_path, quantization):
    from peft import PeftModel

    from so8t.model.attach import load_rotations
    from so8t.model.bake import bake_model, compare_logits, model_logits
    from so8t.inference.hf import load_causal_lm
    from so8t.model.train import TrainPaths, run_training

    base = tiny_base_dir(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    tiny_train_jsonl(data, n=8)
    paths = TrainPaths(base=base, data=data, out=tmp_path / "out", live_dir=tmp_path / "live",
                       performance=tmp_path / "perf.json")
    summary = run_training(_params(tmp_path, quantization=quantization), paths)
    assert summary["exit_code"] is None and summary["steps"] == 2
    # Bake merges into a fresh float32 base, never into the quantised one.
    model = PeftModel.from_pretrained(load_causal_lm(base, torch.float32), str(paths.out))
    load_rotations(model, paths.out / "so8t_rotations.safetensors")
    ids = torch.randint(6, 50, (2, 10))
    mask = torch.ones_like(ids)
    ref = model_logits(model, ids, mask)
    baked = bake_model(model)
    assert all(p.dtype == torch.float32 for p in baked.parameters())
    assert compare_logits(ref, model_logits(baked, ids, mask)).max_abs_diff < 1e-4


def test_quantised_base_is_refused_by_bake(tmp_path):
    from so8t.model.attach import attach_rotations
    from so8t.model.bake import BakeError, bake_model
    from so8t.inference.hf import load_causal_lm

    base = tiny_base_dir(tmp_path / "base", "llama")
    model = load_causal_lm(base, torch.float32, quantization="8bit")
    attach_rotations(model)
    with pytest.raises(BakeError, match="16/32-bit base"):
        bake_model(model)


DDP_DRIVER = textwrap.dedent(
    """
    import os, sys, json
    from pathlib import Path
    from so8t.params import Params
    from so8t.model.train import TrainPaths, run_training
    params = Params.model_validate(json.loads(Path("params.json").read_text()))
    s = run_training(params, TrainPaths(base=Path(sys.argv[1]), data=Path(sys.argv[2]), out=Path("out"),
                     live_dir=Path("live"), performance=Path("perf.json")))
    if int(os.environ.get("RANK", "0")) == 0:
        Path("summary.json").write_text(json.dumps({"world_size": s["world_size"], "steps": s["steps"]}))
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    base = tiny_base_dir(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    tiny_train_jsonl(data, n=16)
    work = tmp_path / "work"
    work.mkdir()
    params = _params(tmp_path / "work", max_steps=3).model_dump(mode="json")
    params["checkpoint"]["dir"] = "ckpt"
    (work / "params.json").write_text(json.dumps(params))
    (work / "drive.py").write_text(DDP_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "drive.py", str(base), str(data)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary == {"world_size": 2, "steps": 3}
    ckpts = sorted(p.name for p in (work / "ckpt").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-3"]  # written once (rank 0), rotated to keep=2
    assert (work / "out" / "so8t_rotations.safetensors").is_file()
    _assert_curves(work / "live", steps=3)
    # resume after the run: a rerun resumes from checkpoint-3 and does no new steps
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resuming from" in proc.stdout + proc.stderr
    # one Live, on rank 0: another rank's Live(resume=False) would empty the folder under it
    _assert_curves(work / "live", steps=3)


def _assert_curves(live: Path, steps: int) -> None:
    """dvclive's folder holds the loss at every step (rank 0 wrote it, nothing removed it)."""
    loss = (live / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in loss[1:]] == list(range(1, steps + 1))
    assert json.loads((live / "metrics.json").read_text())["step"] == steps
