"""Crash-safe training: atomic verified checkpoints, resume, fingerprints, signals, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from so8t.model.checkpoint import (
    FINGERPRINT,
    latest_good_checkpoint,
    list_checkpoints,
    prepare_root,
    publish,
    rotate,
    verify_checkpoint,
)
from tiny import tiny_base_dir, tiny_train_jsonl

REPO = Path(__file__).resolve().parents[2]


def _fake_checkpoint(root: Path, step: int) -> Path:
    staged = root / ".staging" / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(os.urandom(1000))
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return publish(staged, root)


def test_publish_writes_manifest_and_verify_detects_damage(tmp_path):
    c1 = _fake_checkpoint(tmp_path, 1)
    c2 = _fake_checkpoint(tmp_path, 2)
    c3 = _fake_checkpoint(tmp_path, 3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-2", "checkpoint-1"]
    assert verify_checkpoint(c3) is None
    # truncated file in the newest, missing file in the next: both skipped with a reason
    with open(c3 / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(10)
    (c2 / "trainer_state.json").unlink()
    warnings = []
    assert latest_good_checkpoint(tmp_path, warn=warnings.append) == c1
    assert "truncated" in warnings[0] and "checkpoint-3" in warnings[0]
    assert "missing file trainer_state.json" in warnings[1]
    # a corrupt byte with the same size is caught by the hash
    data = bytearray((c1 / "adapter_model.safetensors").read_bytes())
    data[0] ^= 0xFF
    (c1 / "adapter_model.safetensors").write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(c1)


def test_half_written_checkpoint_without_manifest_is_skipped(tmp_path):
    good = _fake_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"partial")
    assert latest_good_checkpoint(tmp_path, warn=lambda m: None) == good


def test_rotate_keeps_newest_complete(tmp_path):
    for s in range(1, 7):
        _fake_checkpoint(tmp_path, s)
    rotate(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-5"]


def test_changed_fingerprint_starts_fresh_and_says_why(tmp_path):
    root = tmp_path / "ckpt"
    assert prepare_root(root, {"train params": "a", "dataset": "x"}) is False
    _fake_checkpoint(root, 1)
    assert prepare_root(root, {"train params": "a", "dataset": "x"}) is True
    logs = []
    assert prepare_root(root, {"train params": "b", "dataset": "x"}, log=logs.append) is False
    assert "train params changed" in logs[0] and "starting fresh" in logs[0]
    assert list_checkpoints(root) == []
    assert json.loads((root / FINGERPRINT).read_text())["train params"] == "b"
    assert any(p.name.startswith("ckpt.stale-") for p in tmp_path.iterdir())


# --- real training runs on a tiny model ---------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from so8t.params import load_params
    from so8t.model.train import TrainPaths, run_training
    s = run_training(load_params("params.yaml"), TrainPaths(base=Path({base!r}), data=Path({data!r}),
                     out=Path("out"), live_dir=Path("live"), performance=Path("perf.json")))
    sys.exit(s["exit_code"] or 0)
    """
)


def _workdir(tmp_path: Path, name: str, base: Path, data: Path, steps: int, ckpt_steps: int, minutes=0.0) -> Path:
    work = tmp_path / name
    work.mkdir()
    params = {
        "seed": 3,
        "train": {
            "max_steps": steps, "per_device_train_batch_size": 2, "lora_r": 2, "lora_alpha": 4,
            "learning_rate": 1e-2, "num_threads": 1, "warmup_ratio": 0.0,
            "so8t": {"init_scale": 0.05, "learning_rate": 1e-2},
        },
        "checkpoint": {"steps": ckpt_steps, "minutes": minutes, "keep": 3, "dir": "ckpt"},
    }
    import yaml

    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "drive.py").write_text(DRIVER.format(tests=str(Path(__file__).parent), base=str(base), data=str(data)))
    return work


def _start(work: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "drive.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    w = load_file(out / "adapter_model.safetensors")
    w |= {f"rot.{k}": v for k, v in load_file(out / "so8t_rotations.safetensors").items()}
    return w


def _curve(live: Path) -> list[tuple[int, str]]:
    """``(step, loss)`` rows of dvclive's loss plot (its timestamps left out)."""
    lines = (live / "plots/metrics/loss.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"))) for line in lines[1:]]
    return [(int(r["step"]), r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = tiny_base_dir(root / "base", "llama")
    data = root / "train.jsonl"
    tiny_train_jsonl(data, n=16)
    ref = _workdir(root, "reference", base, data, steps=8, ckpt_steps=0)
    proc = _start(ref)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return root, base, data, _weights(ref / "out")


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tiny_run):
    root, base, data, reference = tiny_run
    work = _workdir(root, "killed", base, data, steps=8, ckpt_steps=1)
    kills = 0
    for target in (2, 5):  # kill twice, after the checkpoints of steps 2 and 5 appear
        proc = _start(work)
        deadline = time.time() + 240
        while not (work / "ckpt" / f"checkpoint-{target}" / "manifest.json").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = _start(work)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out
    resumed = _weights(work / "out")
    assert [s for s, _ in _curve(work / "live")] == list(range(1, 9))  # every step once, history replayed
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= 1e-6, worst
    assert kills == 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tiny_run):
    root, base, data, _ = tiny_run
    work = _workdir(root, "term", base, data, steps=400, ckpt_steps=0)
    proc = _start(work)
    deadline = time.time() + 240
    while not any((work / "live").rglob("loss.tsv")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    ckpts = list_checkpoints(work / "ckpt")
    assert ckpts and verify_checkpoint(ckpts[0]) is None
    assert not (work / "out").exists()  # no final adapter from an interrupted run


@pytest.mark.slow
def test_rerun_after_a_finished_run_restores_without_extra_steps(tiny_run, tmp_path):
    root, base, data, reference = tiny_run
    ref_work = root / "reference"
    import shutil

    out_before = _weights(ref_work / "out")
    curve_before = _curve(ref_work / "live")
    shutil.rmtree(ref_work / "out")  # as `dvc repro` deletes outputs before rerunning a stage
    shutil.rmtree(ref_work / "live")
    proc = _start(ref_work)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    again = _weights(ref_work / "out")
    assert max(float((again[k] - out_before[k]).abs().max()) for k in again) == 0.0
    assert "resuming from" in out and "checkpoint-8" in out
    assert _curve(ref_work / "live") == curve_before and [s for s, _ in curve_before] == list(range(1, 9))


DRIVER_FULL_DISK = DRIVER.replace(
    "from so8t.model.train import TrainPaths, run_training",
    textwrap.dedent(
        """
        import resource, signal
        from so8t.model.train import TrainPaths, run_training
        from so8t.model.trainer import SO8TTrainer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        save = SO8TTrainer._save_checkpoint
        def full_after_three(self, model, trial):
            if self.state.global_step > 3:  # the disk is full from the 4th checkpoint on
                resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
            save(self, model, trial)
        SO8TTrainer._save_checkpoint = full_after_three
        """
    ),
)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_published_checkpoints(tiny_run):
    root, base, data, _ = tiny_run
    work = _workdir(root, "full", base, data, steps=8, ckpt_steps=1)
    (work / "drive.py").write_text(
        DRIVER_FULL_DISK.format(tests=str(Path(__file__).parent), base=str(base), data=str(data))
    )
    proc = _start(work)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "cannot write" in out and "ckpt/.staging/checkpoint-4" in out, out[-3000:]
    ckpts = list_checkpoints(work / "ckpt")
    assert [c.name for c in ckpts] == ["checkpoint-3", "checkpoint-2", "checkpoint-1"]
    assert all(verify_checkpoint(c) is None for c in ckpts)
    assert not (work / "ckpt" / ".staging" / "checkpoint-4").exists()  # no half checkpoint left
    assert latest_good_checkpoint(work / "ckpt") == ckpts[0]  # the next run resumes from it
