"""Stage train: LoRA + SO8T + PET on the think-formatted train split, with crash-safe checkpoints.

Runs unchanged under `torchrun --nproc_per_node N stages/train.py` (DDP).
"""

import sys
from pathlib import Path

from so8t.console import console, run_stage
from so8t.params import load_params
from so8t.model.train import TrainPaths, run_training

PATHS = TrainPaths(base=Path("models/base"), data=Path("data/formatted/train.jsonl"), out=Path("models/adapter"))


def main() -> None:
    summary = run_training(load_params(), PATHS)
    console.print(f"train: {summary}")
    if summary["exit_code"] is not None:
        console.print("[yellow]train: stopped by a signal; rerun to resume from the checkpoint just saved[/]")
        sys.exit(summary["exit_code"])


if __name__ == "__main__":
    run_stage("train", main)
