"""Decisions on requests nobody templated: the 60 hand-written prompts of holdout_requests.jsonl.

Runs each prompt through the runtime agent (the served model, its calibrated temperature and
the policy) twice, without and with retrieval, and prints macro-F1 and accuracy of the
model's own label and of the policy's label, each with a 95% percentile bootstrap interval,
and the seconds per request.

    python benchmarks/holdout.py [--model models/gguf/so8t-q8_0.gguf] [--requests benchmarks/holdout_requests.jsonl]

Run after `dvc repro` (it reads the model, reports/calibration.json and the retrieval roots of
params.yaml). The audit rows go to a temporary database.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from so8t.eval.metrics import bootstrap_interval, classification_report, macro_f1_indices
from so8t.io import read_jsonl
from so8t.params import load_params
from so8t.schema import DECISIONS


def run(params, model_path: str, requests: list[dict], retrieval: bool, audit_dir: Path) -> dict:
    from so8t.runtime.agent import Principal, build_agent

    update = {"runtime": params.runtime.model_copy(update={
        "model": model_path, "audit": params.runtime.audit.model_copy(update={"db": str(audit_dir / "audit.sqlite3")}),
    }), "retrieval": params.retrieval.model_copy(update={"enabled": retrieval})}
    agent = build_agent(params.model_copy(update=update), warn=lambda m: None)
    who = Principal.of("holdout", "公開")
    rows, t0 = [], time.perf_counter()
    try:
        for r in requests:
            ans = agent.ask(r["prompt"], who, channel="holdout")
            rows.append((r["label"], ans.model_decision, ans.decision))
    finally:
        agent.close()
    seconds = (time.perf_counter() - t0) / len(requests)
    truth = np.array([DECISIONS.index(t) for t, _, _ in rows])
    out = {"seconds_per_request": seconds}
    for name, col in (("model", 1), ("policy", 2)):
        pred = np.array([DECISIONS.index(r[col]) for r in rows])
        rep = classification_report([DECISIONS[i] for i in truth], [DECISIONS[i] for i in pred])
        out[name] = {
            "macro_f1": rep["macro_f1"],
            "macro_f1_ci": bootstrap_interval(macro_f1_indices(truth, pred), len(rows)),
            "accuracy": rep["accuracy"],
            "accuracy_ci": bootstrap_interval(lambda idx: float(np.mean(truth[idx] == pred[idx])), len(rows)),
            "rates": {d: float(np.mean(pred == i)) for i, d in enumerate(DECISIONS)},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF or HF folder (default: runtime.model)")
    ap.add_argument("--requests", default=str(Path(__file__).with_name("holdout_requests.jsonl")))
    args = ap.parse_args()
    params = load_params()
    requests = read_jsonl(args.requests)
    model = args.model or params.runtime.model
    table = Table(title=f"{len(requests)} hand-written requests, {model}")
    for col in ("retrieval", "label", "macro-F1 [95% CI]", "accuracy [95% CI]", "ALLOW / ESC / DENY rates", "s/request"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for retrieval in (False, True):
            res = run(params, model, requests, retrieval, Path(tmp) / str(retrieval))
            for name in ("model", "policy"):
                r = res[name]
                table.add_row(
                    "on" if retrieval else "off", name,
                    f"{r['macro_f1']:.3f} [{r['macro_f1_ci'][0]:.3f}, {r['macro_f1_ci'][1]:.3f}]",
                    f"{r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]",
                    " / ".join(f"{r['rates'][d]:.2f}" for d in DECISIONS),
                    f"{res['seconds_per_request']:.2f}",
                )
    Console().print(table)


if __name__ == "__main__":
    main()
