"""Stage calibrate: fit a decision temperature per artifact on the val split (Guo et al. 2017)."""

import time
from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.eval.artifacts import artifacts, close_backend, open_artifact
from so8t.eval.evalsets import balanced_decisions
from so8t.eval.evaluation import calibrate_artifact
from so8t.io import DataError, read_jsonl, write_json
from so8t.params import load_params

VAL = Path("data/formatted/val.jsonl")
OUT = Path("reports/calibration.json")
PERFORMANCE = Path("reports/performance/calibrate.json")


def main() -> None:
    start = time.perf_counter()
    params = load_params()
    examples = balanced_decisions(read_jsonl(VAL), params.calibrate.max_examples)
    if not examples:
        raise DataError(f"{VAL}: no decision examples to calibrate on")
    threads, arts, bins = free_cores(), artifacts(), params.metrics.ece_bins
    result = {"split": "val", "examples": len(examples), "ece_bins": bins, "artifacts": {}}
    performance: dict = {"threads": threads}
    with progress() as bar:
        task = bar.add_task("calibrate: val decisions", total=len(arts) * len(examples), info="")
        for art in arts:
            bar.update(task, info=art.name)
            t0 = time.perf_counter()
            backend = open_artifact(
                art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
                hf_batch_size=params.generation.hf_batch_size,
            )
            summary = calibrate_artifact(backend, examples, bins, lambda n: bar.advance(task, n))
            close_backend(backend)
            performance[f"{art.name}.wall_s"] = round(time.perf_counter() - t0, 1)
            result["artifacts"][art.name] = summary
            state = "converged" if summary["converged"] else ("FAILED: on a bound" if summary["at_bound"] else "FAILED")
            console.print(
                f"calibrate: {art.name}: T={summary['temperature']:.3f} ({state}) ECE {summary['ece_before']:.3f} -> "
                f"{summary['ece_after']:.3f}, NLL {summary['nll_before']:.3f} -> {summary['nll_after']:.3f}"
            )
    write_json(OUT, result)
    write_json(PERFORMANCE, {"wall_s": round(time.perf_counter() - start, 1)} | performance)


if __name__ == "__main__":
    run_stage("calibrate", main)
