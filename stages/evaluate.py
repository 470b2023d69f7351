"""Stage evaluate@<row>: one artifact on the test split, through llama.cpp: decisions (bare and with
retrieved passages), calibration, policy, perplexity, math, FAQ and reference answers, speed.

One stage per row (``dvc repro evaluate@q4_k_m``), each reading its own model file: the base row
never reruns after a training change. The ``gather`` stage gathers the rows."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import sys
import time
from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.data.grounding import make_grounder
from so8t.eval.artifacts import artifact, close_backend, open_artifact, save_result
from so8t.eval.evalsets import build_eval_sets, sets_for
from so8t.eval.evaluation import artifact_summary, evaluate_artifact
from so8t.eval.keys import WALL_S
from so8t.inference.hf import load_tokenizer
from so8t.io import read_json, read_jsonl, write_json
from so8t.params import load_params

TRAIN = Path("data/formatted/train.jsonl")
TEST = Path("data/formatted/test.jsonl")
FORMAT_STATS = Path("data/formatted/stats.json")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
CALIBRATION = Path("reports/calibration")
OUT = Path("reports/eval/rows")
METRICS = Path("reports/metrics")


def main() -> None:
    start, row = time.perf_counter(), sys.argv[1]
    params = load_params()
    tokenizer = load_tokenizer(Path("models/base"))  # the fine-tune keeps the base's tokenizer
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    sets = build_eval_sets(
        params, read_jsonl(TEST), read_jsonl(TRAIN), [d["text"] for d in read_jsonl(HELDOUT)], tokenizer,
        make_grounder(params.retrieval, count),
    )
    art, threads, e = artifact(row), free_cores(), params.evaluate
    mine = sets_for(art, sets, e.extra_artifacts)
    with progress() as bar:
        task = bar.add_task(f"evaluate {row}: test split ({threads} threads)", total=mine.steps(), info="")
        backend = open_artifact(art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
                                hf_batch_size=params.generation.hf_batch_size)
        r = evaluate_artifact(backend, art, mine, params, read_json(CALIBRATION / f"{row}.json")[row],
                              read_json(FORMAT_STATS)["style"], lambda n: bar.advance(task, n))
        close_backend(backend)
        r.details["speed"][WALL_S] = time.perf_counter() - start
    console.print(artifact_summary(art, r))
    r.details["threads"] = threads
    save_result(OUT / f"{row}.json", r)
    write_json(METRICS / f"{row}.json", {k: round(float(v), 6) for k, v in r.flat.items()})


if __name__ == "__main__":
    run_stage("evaluate", main)
