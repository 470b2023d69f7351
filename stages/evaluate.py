"""Stage evaluate: every artifact on the test split: decisions (bare and with retrieved passages), calibration,
policy, perplexity, math, FAQ and reference answers, speed, parity between runtimes."""

from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.data.grounding import make_grounder
from so8t.eval import keys
from so8t.eval.evaluation import (
    artifacts,
    build_eval_sets,
    close_backend,
    evaluate_artifact,
    open_artifact,
    write_evaluation,
)
from so8t.io import read_json, read_jsonl
from so8t.model.base_model import load_tokenizer
from so8t.params import load_params

TRAIN = Path("data/formatted/train.jsonl")
TEST = Path("data/formatted/test.jsonl")
FORMAT_STATS = Path("data/formatted/stats.json")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
CALIBRATION = Path("reports/calibration.json")
OUT = Path("reports")


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(Path("models/baked"))
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    sets = build_eval_sets(
        params, read_jsonl(TEST), read_jsonl(TRAIN), [d["text"] for d in read_jsonl(HELDOUT)], tokenizer,
        make_grounder(params.retrieval, count),
    )
    style = read_json(FORMAT_STATS)["style"]
    calibration = read_json(CALIBRATION)["artifacts"]
    threads, arts, results = free_cores(), artifacts(), {}
    with progress() as bar:
        task = bar.add_task("evaluate: test split", total=len(arts) * sets.steps(), info="")
        for art in arts:
            bar.update(task, info=f"{art.name} ({threads} threads)")
            backend = open_artifact(
                art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
                hf_batch_size=params.generation.hf_batch_size,
            )
            r = evaluate_artifact(backend, art, sets, params, calibration.get(art.name, {}), style, lambda n: bar.advance(task, n))
            close_backend(backend)
            results[art.name] = r
            f, a = r.flat, art.name
            get = lambda name: f.get(keys.key(a, name), float("nan"))  # noqa: E731
            console.print(
                f"evaluate: {a}: macro-F1 {get(keys.DECISION_MACRO_F1):.3f} [{get(keys.DECISION_MACRO_F1_CI_LOW):.3f}, "
                f"{get(keys.DECISION_MACRO_F1_CI_HIGH):.3f}] (n={get(keys.DECISION_N):.0f}), with passages "
                f"{get(keys.DECISION_MACRO_F1_RAG):.3f}; ECE {get(keys.DECISION_ECE):.3f} -> "
                f"{get(keys.DECISION_ECE_CALIBRATED):.3f}; ppl {get(keys.PERPLEXITY):.2f}; chrF {get(keys.FAQ_CHRF):.1f} "
                f"/ {get(keys.FAQ_CHRF_RAG):.1f}; speed {r.details['speed']}"
            )
    flat = write_evaluation(OUT, results, threads)
    console.print(f"evaluate: parity {{{', '.join(f'{k}: {v:.3f}' for k, v in flat.items() if '.parity.' in k)}}}")


if __name__ == "__main__":
    run_stage("evaluate", main)
