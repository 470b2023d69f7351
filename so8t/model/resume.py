"""Run identity and resume: which checkpoint a (possibly distributed) run starts from.

* :func:`run_fingerprint`: what makes checkpoints belong to one run (training params, seed, data,
  the rows built from it, the base model);
* :func:`resume_point`: rank 0 runs the preflight, keeps or clears the checkpoint folder by the
  fingerprint and picks the newest good checkpoint; :func:`broadcast_resume` shares that choice
  with every rank (DDP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from so8t.model.checkpoint import fingerprint, latest_good_checkpoint, prepare_root
from so8t.model.preflight import preflight

if TYPE_CHECKING:
    from so8t.model.train import TrainPaths


def run_fingerprint(params, paths: TrainPaths, rows: list[dict] | None = None) -> dict[str, str]:
    """Ingredients that make checkpoints belong to one run: training params, data, the rows trained on
    (as the code builds them from the data: a change in how they are built is another run), base model."""
    import hashlib
    import json

    from so8t.io import sha256_file

    base = Path(paths.base)
    built = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() if rows is not None else None
    return fingerprint(
        {
            "train params": params.train.model_dump(mode="json") | {"num_threads": None},
            "seed": params.seed,
            "dataset": sha256_file(paths.data),
            "rows": built,
            "base model": {
                "config": (base / "config.json").read_text(encoding="utf-8"),
                "weights": sorted((p.name, p.stat().st_size) for p in base.glob("*.safetensors")),
            },
        }
    )


def resume_point(params, paths: TrainPaths, n_trainable: int, rows: list[dict] | None = None) -> tuple[str | None, dict]:
    """The checkpoint to resume from (``None``: start fresh) and the preflight numbers (rank 0 decides)."""
    from so8t.console import console

    c = params.checkpoint
    root = Path(c.dir)
    resume_from, check = None, {}
    if int(os.environ.get("RANK", "0")) == 0:
        check = preflight(paths.base, root, paths.out, n_trainable, c.keep)
        same_run = prepare_root(root, run_fingerprint(params, paths, rows), log=console.print)
        if same_run and c.resume:
            ckpt = latest_good_checkpoint(root, warn=lambda m: console.print(f"[yellow]train: {m}[/]"))
            resume_from = str(ckpt) if ckpt else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        resume_from = broadcast_resume(resume_from)
    return resume_from, check


def broadcast_resume(path: str | None) -> str | None:
    """Rank 0's resume decision, shared with every rank (DDP)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]
