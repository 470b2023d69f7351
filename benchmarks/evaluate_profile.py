"""Where the evaluate stage's time goes for one row: every model call of ``evaluate_artifact``, timed.

Runs exactly what the evaluate stage runs for one artifact (default ``q8_0``) on the test split
and prints one line per model call in order (decision scoring, perplexity, generation with and
without retrieved passages), with its requests, prompt and generated tokens and seconds, then the
totals by kind. ``--batch 1`` runs the same calls one sequence at a time, for comparison.

Run after ``dvc repro`` (it reads models/, data/ and reports/calibration.json)::

    python benchmarks/evaluate_profile.py [--artifact q8_0] [--batch 8]

Threads: the free cores at start-up, as the stage. Compare rows of one run only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from so8t.console import free_cores
from so8t.data.grounding import make_grounder
from so8t.eval.artifacts import artifacts, close_backend, open_artifact
from so8t.eval.evalsets import build_eval_sets
from so8t.eval.evaluation import evaluate_artifact
from so8t.io import read_json, read_jsonl
from so8t.inference.hf import load_tokenizer
from so8t.params import load_params


class Timed:
    """Wraps a backend's ``score``, ``generate`` and ``token_logprobs``; records each call."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, []
        for name in ("score", "generate", "token_logprobs"):
            setattr(self, name, self._wrap(name, getattr(backend, name)))

    def _wrap(self, name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t0
            first = args[0]
            if name == "score":
                row = (name, len(first), sum(len(p) for p, _ in first), 0, seconds)
            elif name == "generate":
                row = (name, len(first), sum(map(len, first)), sum(g.n_tokens for g in out), seconds)
            else:
                row = (name, 1, len(first), 0, seconds)
            if name == "token_logprobs" and self.calls and self.calls[-1][0] == name:
                prev = self.calls.pop()
                row = (name, prev[1] + 1, prev[2] + row[2], 0, prev[4] + seconds)
            self.calls.append(row)
            return out

        return run

    def __getattr__(self, item):
        return getattr(self.backend, item)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default="q8_0")
    ap.add_argument("--batch", type=int, default=None, help="llama.cpp sequences per batch (default: generation.batch_size)")
    args = ap.parse_args()
    params = load_params()
    tokenizer = load_tokenizer(Path("models/baked"))
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    sets = build_eval_sets(
        params, read_jsonl(Path("data/formatted/test.jsonl")), read_jsonl(Path("data/formatted/train.jsonl")),
        [d["text"] for d in read_jsonl(Path("data/synth/heldout_reference.jsonl"))], tokenizer,
        make_grounder(params.retrieval, count),
    )
    (art,) = [a for a in artifacts() if a.name == args.artifact]
    threads, batch = free_cores(), args.batch or params.generation.batch_size
    style = read_json(Path("data/formatted/stats.json"))["style"]
    calibration = read_json(Path("reports/calibration.json"))["artifacts"].get(art.name, {})
    backend = Timed(open_artifact(art, threads, batch, hf_batch_size=params.generation.hf_batch_size))
    t0 = time.perf_counter()
    evaluate_artifact(backend, art, sets, params, calibration, style)
    total = time.perf_counter() - t0
    close_backend(backend.backend)
    table = Table(title=f"evaluate_artifact({art.name}, {art.path.name}): {total:.1f} s, {threads} threads, batch {batch}")
    for col in ("call", "requests", "prompt tokens", "generated tokens", "seconds", "share"):
        table.add_column(col, justify="left" if col == "call" else "right")
    for name, n, ptok, gtok, sec in backend.calls:
        table.add_row(name, str(n), str(ptok), str(gtok), f"{sec:.1f}", f"{sec / total:.0%}")
    by_kind: dict[str, float] = {}
    for name, *_, sec in backend.calls:
        by_kind[name] = by_kind.get(name, 0.0) + sec
    for name, sec in by_kind.items():
        table.add_row(f"[bold]{name} (all)", "", "", "", f"{sec:.1f}", f"{sec / total:.0%}")
    table.add_row("[bold]other (metrics, tokenising)", "", "", "", f"{total - sum(by_kind.values()):.1f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
