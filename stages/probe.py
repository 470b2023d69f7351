"""Stage probe: the linear-probe baseline, logistic regression on the frozen base model's hidden states
of each decision prompt (fitted on train, chosen on val, scored on every test decision).

Reads only models/base and data/formatted, so training runs never recompute it; the evaluate stage pairs
its test predictions with every row's. Disabled (probe.enabled: false), it writes a marker only.
"""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import time
from pathlib import Path

import torch

from so8t.console import console, free_cores, progress, run_stage
from so8t.eval.probe import decision_rows, run_probe, summary_line
from so8t.io import read_jsonl, write_json
from so8t.inference.hf import load_causal_lm, load_tokenizer
from so8t.params import load_params

BASE = Path("models/base")
SPLITS = {s: Path(f"data/formatted/{s}.jsonl") for s in ("train", "val", "test")}
OUT = Path("reports/probe.json")
PERFORMANCE = Path("reports/performance/probe.json")


def main() -> None:
    start = time.perf_counter()
    params = load_params()
    p = params.probe
    if not p.enabled:
        write_json(OUT, {"enabled": False})
        write_json(PERFORMANCE, {"wall_s": 0.0})
        console.print("probe: disabled (probe.enabled: false); wrote the marker only")
        return
    splits = {s: decision_rows(read_jsonl(path), path) for s, path in SPLITS.items()}
    threads = free_cores()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(BASE)
    model = load_causal_lm(BASE, torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    with progress() as bar:
        task = bar.add_task("probe: base-model features", total=sum(map(len, splits.values())), info="")
        result = run_probe(model, tokenizer, splits, p, params.metrics, lambda n: bar.advance(task, n))
    write_json(OUT, result)
    write_json(PERFORMANCE, {"wall_s": round(time.perf_counter() - start, 1), "threads": threads})
    console.print(summary_line(result))


if __name__ == "__main__":
    run_stage("probe", main)
