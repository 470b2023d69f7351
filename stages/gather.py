"""Stage gather: gather the evaluate@<row> results into reports/metrics.json, details and plots: parity
between rows, the transformers reference sample, every row against the linear probe (reports/probe.json),
the calibrations in one reports/calibration.json (the runtime reads it), and the runtime path (the policy
after generation) on the artifact `runtime.model: auto` serves."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import time
from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.data.grounding import make_grounder
from so8t.eval.artifacts import artifacts, load_result
from so8t.eval.comparisons import load_probe, probe_comparison
from so8t.eval.evaluation import write_evaluation
from so8t.eval.qa import QA_TASKS
from so8t.eval.served import allow_requests, evaluate_served
from so8t.inference.hf import load_tokenizer
from so8t.io import read_json, read_jsonl, write_json
from so8t.params import load_params

TEST = Path("data/formatted/test.jsonl")
FORMAT_STATS = Path("data/formatted/stats.json")
CALIBRATION = Path("reports/calibration")
ROWS = Path("reports/eval/rows")
PROBE = Path("reports/probe.json")
REFERENCE = Path("reports/eval/reference.json")
CALIBRATE_PERF = Path("reports/performance/calibrate")
OUT = Path("reports")


def main() -> None:
    start, params = time.perf_counter(), load_params()
    arts = artifacts()
    results = {a.name: load_result(ROWS / f"{a.name}.json") for a in arts}
    cal = {a.name: read_json(CALIBRATION / f"{a.name}.json") for a in arts}
    first = next(iter(cal.values()))
    calibration = {k: first[k] for k in ("split", "examples", "ece_bins")}
    calibration["artifacts"] = {n: c[n] for n, c in cal.items()}
    write_json(OUT / "calibration.json", calibration)
    tokenizer = load_tokenizer(Path("models/base"))
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    test, threads = read_jsonl(TEST), free_cores()
    with progress() as bar:
        # the gold-ALLOW requests scored and answered, then each QA question scored (grounded, bare) and answered
        steps = 2 * len(allow_requests(test)) + 3 * sum(r["task"] in QA_TASKS for r in test)
        task = bar.add_task("gather: the served artifact after generation", total=steps, info="")
        served = evaluate_served(arts, results, test, make_grounder(params.retrieval, count), tokenizer, params,
                                 read_json(FORMAT_STATS)["style"], calibration["artifacts"], threads,
                                 lambda n: bar.advance(task, n))
    probe, no_probe = load_probe(PROBE, params.probe.enabled)
    against_probe = probe_comparison(results, probe, params.metrics, PROBE) if probe else None
    if against_probe is None:
        console.print(f"gather: no comparison with the linear probe: {no_probe}")
    ref = read_json(REFERENCE)
    reference = (ref["flat"], ref["details"]) if ref.get("enabled") else None
    walls = sum(r.details["speed"].get("wall_s", 0.0) for r in results.values())
    wall = walls + time.perf_counter() - start
    flat = write_evaluation(OUT, results, threads, reference, wall, against_probe, served)
    cal_perf = {a.name: read_json(CALIBRATE_PERF / f"{a.name}.json")["wall_s"] for a in arts}
    write_json(OUT / "performance" / "calibrate.json",
               {"wall_s": round(sum(cal_perf.values()), 1)} | {f"{n}.wall_s": w for n, w in cal_perf.items()})
    console.print(f"gather: parity {{{', '.join(f'{k}: {v:.3f}' for k, v in flat.items() if '.parity.' in k)}}}")


if __name__ == "__main__":
    run_stage("gather", main)
