"""Inference speed and consistency of every artifact, in one run: one table.

For each row the evaluate stage runs (base and baked through their F16 GGUFs, each quantised
GGUF: llama.cpp) and the transformers float32 reference (the baked HF folder) on the test split:

* prompt tokens/s: the prompt passes of decision scoring (logits only at the label positions);
* decisions/min: every test decision scored, one request at a time (``--batch 1``, the old
  sequential path) and batched (``generation.batch_size`` for llama.cpp, ``generation.hf_batch_size``
  for the HF float32 rows, as calibrate and evaluate run them);
* generation tokens/s: greedy answers of test prompts, one at a time and continuously batched;
* parity: the share of prompts whose greedy text, and of decisions whose label, equal those of
  baked (its F16 GGUF): the quantised GGUFs and the transformers reference.

Run after ``dvc repro`` (it reads models/ and data/formatted/test.jsonl)::

    python benchmarks/inference.py [--decisions 90] [--generations 16] [--max-new-tokens 64]

Threads: the free cores at start-up (as the stages use). Compare rows of one run only:
machines of this kind differ by up to 2x.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from so8t.console import free_cores
from so8t.eval.artifacts import BAKED_DIR, Artifact, artifacts, close_backend, open_artifact
from so8t.eval.evalsets import balanced_decisions
from so8t.decision import answer_context
from so8t.inference import score_decisions, stop_strings
from so8t.io import read_jsonl
from so8t.params import load_params
from so8t.schema import DECISIONS, Task


def measure(art, threads: int, batch: int, decisions: list[dict], prompts: list[dict], max_new: int, penalty: float,
            hf_batch: int | None = None):
    """Decisions/min, prompt tokens/s, generation tokens/s, texts and labels of one artifact at one batch size
    (``hf_batch`` for an HF folder; default ``batch``)."""
    backend = open_artifact(art, threads, batch, hf_batch_size=hf_batch or batch)
    try:
        t0 = time.perf_counter()
        scored = score_decisions(backend, decisions)
        decision_seconds = time.perf_counter() - t0
        ids = [backend.tokenize(answer_context(r["prompt_text"])) for r in prompts]
        t1 = time.perf_counter()
        gens = backend.generate(ids, max_new, stop_strings(backend), penalty)
        gen_seconds = time.perf_counter() - t1
        rates = backend.stats.rates()
    finally:
        close_backend(backend)
    return {
        "decisions_per_min": 60 * len(scored) / decision_seconds,
        "prompt_tokens_per_s": rates["prompt_tokens_per_s"],
        "gen_tokens_per_s": sum(g.n_tokens for g in gens) / gen_seconds,
        "texts": {r["id"]: g.text for r, g in zip(prompts, gens)},
        "labels": {r["id"]: DECISIONS[r_["pred"]] for r, r_ in zip(decisions, scored)},
    }


def share_equal(a: dict, b: dict) -> float:
    keys = sorted(set(a) & set(b))
    return sum(a[k] == b[k] for k in keys) / len(keys) if keys else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decisions", type=int, default=90, help="test decisions scored (balanced over labels)")
    ap.add_argument("--generations", type=int, default=16, help="test prompts (math, FAQ) answered greedily")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of every row (default: generation.batch_size, HF rows generation.hf_batch_size)")
    args = ap.parse_args()
    params = load_params()
    batch = args.batch or params.generation.batch_size
    hf_batch = args.batch or params.generation.hf_batch_size
    test = read_jsonl(Path("data/formatted/test.jsonl"))
    decisions = balanced_decisions(test, args.decisions)
    prompts = sorted((r for r in test if r["task"] in (Task.MATH.value, Task.QA_FAQ.value)), key=lambda r: r["id"])
    prompts = prompts[: args.generations]
    threads = free_cores()
    console = Console()
    console.print(f"{len(decisions)} decisions, {len(prompts)} generations x {args.max_new_tokens} tokens, "
                  f"{threads} threads, batch {batch} (HF {hf_batch}) vs 1")
    results = {}
    for art in artifacts() + [Artifact("transformers", "hf", BAKED_DIR)]:
        one = measure(art, threads, 1, decisions, prompts, args.max_new_tokens, params.generation.repetition_penalty)
        many = measure(art, threads, batch, decisions, prompts, args.max_new_tokens,
                       params.generation.repetition_penalty, hf_batch)
        results[art.name] = (one, many)
        console.print(f"{art.name}: done")
    table = Table(title="Inference per artifact (test split)")
    for col in ("artifact", "prompt tok/s", "decisions/min (1 -> batch)", "gen tok/s (1 -> batch)",
                "batched = single", "text parity", "decision parity", "against"):
        table.add_column(col, justify="left" if col in ("artifact", "against") else "right")
    for name, (one, many) in results.items():
        ref = "baked" if name not in ("base", "baked") and "baked" in results else None
        parity_text = share_equal(results[ref][1]["texts"], many["texts"]) if ref else None
        parity_dec = share_equal(results[ref][1]["labels"], many["labels"]) if ref else None
        table.add_row(
            name,
            f"{many['prompt_tokens_per_s']:.0f}",
            f"{one['decisions_per_min']:.0f} -> {many['decisions_per_min']:.0f} ({many['decisions_per_min'] / one['decisions_per_min']:.1f}x)",
            f"{one['gen_tokens_per_s']:.1f} -> {many['gen_tokens_per_s']:.1f} ({many['gen_tokens_per_s'] / one['gen_tokens_per_s']:.1f}x)",
            f"{share_equal(one['texts'], many['texts']):.2f} / {share_equal(one['labels'], many['labels']):.2f}",
            "" if parity_text is None else f"{parity_text:.2f}",
            "" if parity_dec is None else f"{parity_dec:.2f}",
            ref or "",
        )
    console.print(table)


if __name__ == "__main__":
    main()
