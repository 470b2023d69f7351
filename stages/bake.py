"""Stage bake: merge LoRA, fold the trained SO8T rotations into o_proj, verify, save a plain HF model."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import time
from pathlib import Path

from so8t.console import console, run_stage
from so8t.io import DataError, read_jsonl, write_json
from so8t.model.bake import bake_adapter
from so8t.params import load_params

BASE = Path("models/base")
ADAPTER = Path("models/adapter")
VERIFY = Path("data/formatted/val.jsonl")
OUT = Path("models/baked")
PERFORMANCE = Path("reports/performance/bake.json")


def main() -> None:
    b = load_params().bake
    rows = [r["input_ids"] for r in read_jsonl(VERIFY)[: b.verify_examples]]
    if not rows:
        raise DataError(f"{VERIFY}: no examples to verify the bake on")
    start = time.perf_counter()
    report = bake_adapter(
        BASE, ADAPTER, OUT, rows, b.max_abs_diff, b.verify_dtype, b.max_abs_diff_float32, b.spot_check_layers
    )
    write_json(PERFORMANCE, {"total_seconds": round(time.perf_counter() - start, 2)})
    console.print(f"bake: {report}")


if __name__ == "__main__":
    run_stage("bake", main)
