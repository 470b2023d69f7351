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


def trained_model(with_rotations: bool):
    """The trained model as training left it: fresh float32 base + LoRA adapter + rotations."""
    # Always a fresh float32 base: never merge into a quantised (QLoRA) copy.
    model = PeftModel.from_pretrained(load_causal_lm(BASE, torch.float32), str(ADAPTER))
    n = len(load_rotations(model, ADAPTER / ROTATIONS_FILE)) if with_rotations else 0
    return model, n


def main() -> None:
    params = load_params()
    b = params.bake
    so8t = params.train.so8t.enabled
    dtype = getattr(torch, b.verify_dtype)
    ids, mask = verify_batch(b.verify_examples)
    start = time.perf_counter()
    model, n_rot = trained_model(so8t)
    console.print(f"bake: {n_rot} trained rotations from {ADAPTER / ROTATIONS_FILE}")
    reference = model_logits(model.to(dtype), ids, mask)
    reference_fp32 = model_logits(model.float(), ids, mask) if dtype != torch.float32 else reference
    baked = bake_model(model, require_rotations=so8t)
    bake_seconds = time.perf_counter() - start
    with atomic_dir(OUT) as tmp:
        baked.save_pretrained(tmp)
        load_tokenizer(BASE).save_pretrained(tmp)
        # Verify the saved files, not the in-memory model: they are what later stages use.
        reloaded = load_causal_lm(tmp, torch.float32)
        diff32 = compare_logits(reference_fp32, model_logits(reloaded, ids, mask))
        diff = compare_logits(reference, model_logits(reloaded.to(dtype), ids, mask))
        report = {
            "max_abs_diff": diff.max_abs_diff,
            "mean_abs_diff": diff.mean_abs_diff,
            "kl": diff.kl,
            "verify_dtype": b.verify_dtype,
            "float32": diff32.to_dict(),
            "positions": diff.positions,
            "threshold": b.max_abs_diff,
            "rotations_folded": n_rot,
            "architecture": type(reloaded).__name__,
            "model_type": reloaded.config.model_type,
            "bake_seconds": round(bake_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
        }
        console.print(f"bake: {report}")
        if diff.max_abs_diff > b.max_abs_diff:
            raise BakeError(
                f"baked logits differ from the trained model by {diff.max_abs_diff:.3g} ({b.verify_dtype}) > "
                f"bake.max_abs_diff = {b.max_abs_diff:g}; nothing was written"
            )
        write_json(tmp / "bake_report.json", report)


if __name__ == "__main__":
    run_stage("bake", main)
