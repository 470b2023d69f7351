"""Stage bake: merge LoRA, fold the trained SO8T rotations into o_proj, verify, save a plain HF model."""

import time
from pathlib import Path

import torch
from peft import PeftModel

from so8t.attach import ROTATIONS_FILE, load_rotations
from so8t.bake import BakeError, bake_model, compare_logits, model_logits
from so8t.base_model import load_causal_lm, load_tokenizer
from so8t.console import console, run_stage
from so8t.io import atomic_dir, read_jsonl, write_json
from so8t.params import load_params

BASE = Path("models/base")
ADAPTER = Path("models/adapter")
VERIFY = Path("data/formatted/val.jsonl")
OUT = Path("models/baked")


def verify_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real validation examples, right-padded: ``(input_ids, attention_mask)``."""
    rows = [r["input_ids"] for r in read_jsonl(VERIFY)[:n]]
    if not rows:
        raise ValueError(f"{VERIFY}: no examples to verify the bake on")
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def main() -> None:
    params = load_params()
    start = time.perf_counter()
    # Always a fresh float32 base: never merge into a quantised (QLoRA) copy.
    model = PeftModel.from_pretrained(load_causal_lm(BASE, torch.float32), str(ADAPTER))
    rotations_file = ADAPTER / ROTATIONS_FILE
    if params.train.so8t.enabled:
        rotations = load_rotations(model, rotations_file)
        console.print(f"bake: {len(rotations)} trained rotations from {rotations_file}")
    ids, mask = verify_batch(params.bake.verify_examples)
    reference = model_logits(model, ids, mask)
    baked = bake_model(model, require_rotations=params.train.so8t.enabled)
    bake_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(BASE)
    with atomic_dir(OUT) as tmp:
        baked.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The saved files, not the in-memory model, are what later stages use: verify those.
        reloaded = load_causal_lm(tmp, torch.float32)
        diff = compare_logits(reference, model_logits(reloaded, ids, mask))
        report = {
            "max_abs_diff": diff.max_abs_diff,
            "mean_abs_diff": diff.mean_abs_diff,
            "kl": diff.kl,
            "positions": diff.positions,
            "threshold": params.bake.max_abs_diff,
            "rotations_folded": len(rotations) if params.train.so8t.enabled else 0,
            "architecture": type(reloaded).__name__,
            "model_type": reloaded.config.model_type,
            "bake_seconds": round(bake_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
        }
        console.print(f"bake: {report}")
        if diff.max_abs_diff > params.bake.max_abs_diff:
            raise BakeError(
                f"baked logits differ from the trained model by {diff.max_abs_diff:.3g} > "
                f"bake.max_abs_diff = {params.bake.max_abs_diff:g}; nothing was written"
            )
        write_json(tmp / "bake_report.json", report)


if __name__ == "__main__":
    run_stage("bake", main)
