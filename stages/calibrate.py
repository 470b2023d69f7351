"""Stage calibrate@<row>: fit the decision temperature of one artifact on the val split (Guo et al. 2017).

One stage per row (``dvc repro calibrate@q4_k_m``): each reads only its own model file, so the base
row never reruns after a training change."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import sys
import time
from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.eval.artifacts import artifact, close_backend, open_artifact
from so8t.eval.evalsets import balanced_decisions
from so8t.eval.evaluation import calibrate_artifact
from so8t.io import DataError, read_jsonl, write_json
from so8t.params import load_params

VAL = Path("data/formatted/val.jsonl")
OUT = Path("reports/calibration")
PERFORMANCE = Path("reports/performance/calibrate")


def main() -> None:
    start = time.perf_counter()
    row = sys.argv[1]
    params = load_params()
    examples = balanced_decisions(read_jsonl(VAL), params.calibrate.max_examples)
    if not examples:
        raise DataError(f"{VAL}: no decision examples to calibrate on")
    threads, art, bins = free_cores(), artifact(row), params.metrics.ece_bins
    with progress() as bar:
        task = bar.add_task(f"calibrate {row}: val decisions", total=len(examples), info="")
        backend = open_artifact(
            art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
            hf_batch_size=params.generation.hf_batch_size,
        )
        summary = calibrate_artifact(backend, examples, bins, lambda n: bar.advance(task, n))
        close_backend(backend)
    state = "converged" if summary["converged"] else ("FAILED: on a bound" if summary["at_bound"] else "FAILED")
    console.print(
        f"calibrate: {row}: T={summary['temperature']:.3f} ({state}) ECE {summary['ece_before']:.3f} -> "
        f"{summary['ece_after']:.3f}, NLL {summary['nll_before']:.3f} -> {summary['nll_after']:.3f}"
    )
    write_json(OUT / f"{row}.json", {"split": "val", "examples": len(examples), "ece_bins": bins, row: summary})
    write_json(PERFORMANCE / f"{row}.json", {"threads": threads, "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    run_stage("calibrate", main)
