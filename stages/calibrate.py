"""Stage calibrate: fit a decision temperature per artifact on the val split (Guo et al. 2017)."""

from pathlib import Path

import numpy as np

from so8t.base_model import load_tokenizer
from so8t.calibration import calibration_summary, fit_temperature
from so8t.console import console, free_cores, progress, run_stage
from so8t.evaluation import artifacts, balanced_decisions, close_backend, open_backend
from so8t.io import read_jsonl, write_json
from so8t.params import load_params
from so8t.quantize import stop_strings
from so8t.scoring import score_decisions

VAL = Path("data/formatted/val.jsonl")
OUT = Path("reports/calibration.json")


def main() -> None:
    params = load_params()
    c = params.calibrate
    tokenizer = load_tokenizer(Path("models/baked"))
    examples = balanced_decisions(read_jsonl(VAL), c.max_examples)
    if not examples:
        raise ValueError(f"{VAL}: no decision examples to calibrate on")
    threads = free_cores()
    result = {"split": "val", "examples": len(examples), "ece_bins": c.ece_bins, "artifacts": {}}
    arts = artifacts(params.quantize.types)
    with progress() as bar:
        task = bar.add_task("calibrate: val decisions", total=len(arts) * len(examples), info="")
        scored_by = {}
        for art in arts:
            bar.update(task, info=art.name)
            backend = open_backend(art, tokenizer, threads, params.evaluate.repetition_penalty)
            scored_by[art.name] = score_decisions(
                backend, examples, c.max_new_tokens, stop_strings(tokenizer), lambda n: bar.advance(task, n)
            )
            close_backend(backend)
    for art in arts:
        scored = scored_by[art.name]
        logits = np.array([r["logits"] for r in scored])
        labels = np.array([r["label"] for r in scored])
        fit = fit_temperature(logits, labels)
        summary = calibration_summary(logits, labels, fit.temperature, c.ece_bins)
        result["artifacts"][art.name] = summary | {"converged": fit.converged, "iterations": fit.iterations}
        console.print(
            f"calibrate: {art.name}: T={fit.temperature:.3f} ECE {summary['ece_before']:.3f} -> "
            f"{summary['ece_after']:.3f}, NLL {summary['nll_before']:.3f} -> {summary['nll_after']:.3f}"
        )
    write_json(OUT, result)


if __name__ == "__main__":
    run_stage("calibrate", main)
