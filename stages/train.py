"""Stage train: LoRA + SO8T + PET on the think-formatted train split, with crash-safe checkpoints.

Every ``train.eval_steps`` steps the val split's per-task loss, decision macro-F1 and the held-out
perplexity (the evaluate stage's windows) go to dvclive (the learning curve). Runs unchanged under `torchrun --nproc_per_node N stages/train.py` (DDP).
"""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import sys
from pathlib import Path

from so8t.console import console, run_stage
from so8t.eval.evaluation import decision_eval
from so8t.inference import perplexity_windows
from so8t.io import read_jsonl
from so8t.inference.hf import load_tokenizer
from so8t.model.train import TrainPaths, run_training
from so8t.params import load_params

PATHS = TrainPaths(
    base=Path("models/base"),
    data=Path("data/formatted/train.jsonl"),
    out=Path("models/adapter"),
    val=Path("data/formatted/val.jsonl"),
)
HELDOUT = Path("data/synth/heldout_reference.jsonl")


def main() -> None:
    params = load_params()
    p = params.train
    hook = None
    if p.eval_steps and p.eval_decisions:
        tokenizer, m = load_tokenizer(PATHS.base), params.metrics
        windows = perplexity_windows(
            tokenizer, [d["text"] for d in read_jsonl(HELDOUT)], m.perplexity_max_tokens, m.perplexity_window
        )
        hook = decision_eval(
            tokenizer, read_jsonl(PATHS.val), p.eval_decisions, p.per_device_train_batch_size, windows, m
        )
    summary = run_training(params, PATHS, decision_eval=hook)
    console.print(f"train: {summary}")
    if summary["exit_code"] is not None:
        console.print("[yellow]train: stopped by a signal; rerun to resume from the checkpoint just saved[/]")
        sys.exit(summary["exit_code"])


if __name__ == "__main__":
    run_stage("train", main)
