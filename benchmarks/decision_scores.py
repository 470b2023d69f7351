"""Test decisions of one model folder, scored as the evaluate stage scores them, against the probe.

For a sweep: after `dvc exp run -S train.max_steps=400 train` and `python stages/bake.py`, this scores
every test decision of `data/formatted/test.jsonl` with the HF model (labels scored after the prompt,
temperature 1; the evaluate stage's `score_decisions` and `decision_metrics`) in minutes, instead of the
whole evaluate stage (every GGUF row, generation, perplexity: ~20 min on 2 cores). Prints macro-F1 and
accuracy with 95% bootstrap intervals, per-class recall, and the paired gain over the linear probe
(`reports/probe.json`, same decisions), and writes them as JSON with `--out`.

    python benchmarks/decision_scores.py [--model models/baked] [--split data/formatted/test.jsonl] [--out F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from so8t.console import console, free_cores
from so8t.eval.comparisons import load_probe, paired_gain
from so8t.eval.evalsets import balanced_decisions
from so8t.inference import HFBackend, score_decisions
from so8t.eval.task_metrics import decision_metrics
from so8t.io import read_jsonl, write_json
from so8t.inference.hf import load_causal_lm, load_tokenizer
from so8t.params import load_params
from so8t.schema import DECISIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/baked", help="HF model folder (default: models/baked)")
    ap.add_argument("--split", default="data/formatted/test.jsonl")
    ap.add_argument("--probe", default="reports/probe.json")
    ap.add_argument("--batch-size", type=int, default=None, help="default: generation.hf_batch_size")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    params = load_params()
    m = params.metrics
    torch.set_num_threads(free_cores())
    rows = balanced_decisions(read_jsonl(Path(args.split)), None)  # every decision of the split
    start = time.perf_counter()
    model = load_causal_lm(Path(args.model), torch.float32).eval()
    backend = HFBackend.from_model(model, load_tokenizer(Path(args.model)), args.batch_size or params.generation.hf_batch_size)
    with torch.no_grad():
        scored = score_decisions(backend, rows)
    dec = decision_metrics(scored, 1.0, m)
    out = {"model": args.model, "split": args.split, "n": dec["n"], "seconds": round(time.perf_counter() - start, 1)}
    out |= {k: dec[k] for k in ("macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high")}
    out["recall"] = {label: dec["per_class"][label]["recall"] for label in DECISIONS}
    probe, why = load_probe(Path(args.probe), params.probe.enabled)
    if probe is not None:
        preds = probe["predictions"]
        missing = [r["id"] for r in scored if r["id"] not in preds]
        if missing:
            raise SystemExit(f"{args.probe}: no prediction for {len(missing)} decisions (e.g. {missing[0]}); rerun `dvc repro probe`")
        ref = np.array([DECISIONS.index(preds[r["id"]]["pred"]) for r in scored])
        g = paired_gain(np.array([r["label"] for r in scored]), np.array([r["pred"] for r in scored]), ref, m)
        out |= {"probe_gain": g["gain"], "probe_gain_ci_low": g["ci_low"], "probe_gain_ci_high": g["ci_high"]}
    else:
        console.print(f"no probe: {why}")
    for k, v in out.items():
        console.print(f"{k}: {v if not isinstance(v, float) else round(v, 4)}")
    if args.out:
        write_json(Path(args.out), out)


if __name__ == "__main__":
    main()
