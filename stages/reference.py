"""Stage reference: the baked model in transformers float32 on a sample of the test split, against its
F16 GGUF's own results (evaluate@baked): the check that llama.cpp runs the model transformers trained."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

import time
from pathlib import Path

from so8t.console import console, progress, run_stage
from so8t.eval.artifacts import artifact, load_result
from so8t.eval.comparisons import parity_sample
from so8t.eval.evalsets import build_eval_sets
from so8t.eval.evaluation import reference_parity, reference_summary
from so8t.inference.hf import load_tokenizer
from so8t.io import read_jsonl, write_json
from so8t.params import load_params

TRAIN = Path("data/formatted/train.jsonl")
TEST = Path("data/formatted/test.jsonl")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
BAKED_RESULT = Path("reports/eval/rows/baked.json")
OUT = Path("reports/eval/reference.json")


def main() -> None:
    start, params = time.perf_counter(), load_params()
    e = params.evaluate
    art = artifact("baked")
    if art.kind != "gguf" or not (e.parity_decisions or e.parity_texts):
        write_json(OUT, {"enabled": False, "why": "no F16 GGUF or evaluate.parity_* are 0"})
        return
    tokenizer = load_tokenizer(Path("models/base"))
    sets = build_eval_sets(params, read_jsonl(TEST), read_jsonl(TRAIN), [d["text"] for d in read_jsonl(HELDOUT)],
                           tokenizer, None)
    sample = sum(map(len, parity_sample(sets, e.parity_decisions, e.parity_texts)))
    with progress() as bar:
        task = bar.add_task("reference: transformers sample", total=sample, info="")
        flat, details = reference_parity(art, load_result(BAKED_RESULT), sets, params, lambda n: bar.advance(task, n))
    console.print(reference_summary((flat, details)))
    write_json(OUT, {"enabled": True, "flat": flat, "details": details | {"wall_s": time.perf_counter() - start}})


if __name__ == "__main__":
    run_stage("reference", main)
