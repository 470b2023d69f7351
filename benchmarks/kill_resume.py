"""Kill training with SIGKILL at random moments, resume each time, compare with an uninterrupted run.

Runs the real train stage code (``so8t.model.train.run_training``) on the formatted
data and base model of this repository, in a scratch folder. Prints, per kill:
the work lost (seconds since the newest complete checkpoint), the resume
overhead (seconds from restart until the first new optimiser step, minus the
same for a fresh start), and at the end whether the final adapter and
rotations match the uninterrupted run (max abs diff).

    python benchmarks/kill_resume.py --kills 5 --steps 40 --minutes 0.5
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from so8t.params import load_params
    from so8t.model.train import TrainPaths, run_training
    s = run_training(load_params("params.yaml"), TrainPaths(base=Path({base!r}), data=Path({data!r}),
                     out=Path("out"), live_dir=Path("live"), performance=Path("perf.json")))
    sys.exit(s["exit_code"] or 0)
    """
)


def workdir(root: Path, name: str, steps: int, minutes: float) -> Path:
    work = root / name
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["max_steps"] = steps
    params["checkpoint"] |= {"minutes": minutes, "steps": 0, "dir": "ckpt", "keep": 3}
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (work / "drive.py").write_text(
        DRIVER.format(base=str(REPO / "models/base"), data=str(REPO / "data/formatted/train.jsonl"))
    )
    return work


def steps_logged(work: Path) -> int:
    f = work / "live" / "plots" / "metrics" / "loss.tsv"
    return max(0, len(f.read_text().splitlines()) - 1) if f.is_file() else 0


def newest_checkpoint_time(work: Path) -> float | None:
    times = [m.stat().st_mtime for m in (work / "ckpt").glob("checkpoint-*/manifest.json")]
    return max(times) if times else None


def start(work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "drive.py"], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_to_first_new_step(work: Path, proc: subprocess.Popen) -> float:
    t0 = time.time()
    before = steps_logged(work)
    while steps_logged(work) <= before:
        if proc.poll() is not None:
            return time.time() - t0
        time.sleep(0.2)
    return time.time() - t0


def weights(out: Path) -> dict:
    w = load_file(out / "adapter_model.safetensors")
    rot = out / "so8t_rotations.safetensors"
    return w | ({f"rot.{k}": v for k, v in load_file(rot).items()} if rot.is_file() else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=0.5, help="checkpoint interval")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="so8t-kill-"))
    print(f"scratch folder {root}")

    ref = workdir(root, "reference", args.steps, args.minutes)
    t0 = time.time()
    proc = start(ref)
    fresh_first_step = time_to_first_new_step(ref, proc)
    proc.wait()
    total = time.time() - t0
    print(f"uninterrupted: {total:.1f} s for {args.steps} steps; first step after {fresh_first_step:.1f} s")

    work = workdir(root, "killed", args.steps, args.minutes)
    for k in range(args.kills):
        proc = start(work)
        overhead = time_to_first_new_step(work, proc) - fresh_first_step
        time.sleep(rng.uniform(0.2, 0.9) * total / (args.kills + 1))
        if proc.poll() is not None:
            print(f"kill {k + 1}: training had already finished")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        last = newest_checkpoint_time(work)
        ckpts = sorted(int(m.parent.name.split("-")[1]) for m in (work / "ckpt").glob("checkpoint-*/manifest.json"))
        saved = (f"work lost {killed_at - last:.1f} s of wall time since checkpoint-{ckpts[-1]}"
                 if last else "no checkpoint yet (restarts from step 0)")
        print(f"kill {k + 1}: at step {steps_logged(work)}, {saved}, resume overhead {overhead:+.1f} s")
    proc = start(work)
    proc.wait()
    a, b = weights(ref / "out"), weights(work / "out")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"final weights: max abs diff {worst:.3g} ({'match' if worst <= 1e-6 else 'DIFFER'}, tolerance 1e-6)")
    if os.environ.get("KEEP") is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
