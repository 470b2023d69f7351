"""Stage evaluate: every artifact on the test split: decisions, calibration, perplexity, math, FAQ, speed, parity."""

from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.eval import keys
from so8t.eval.evaluation import (
    EvalSets,
    artifacts,
    balanced_decisions,
    close_backend,
    evaluate_artifact,
    first_of_task,
    open_artifact,
    write_evaluation,
)
from so8t.eval.inference import perplexity_windows
from so8t.io import read_json, read_jsonl
from so8t.model.base_model import load_tokenizer
from so8t.params import load_params
from so8t.schema import Task

TRAIN = Path("data/formatted/train.jsonl")
TEST = Path("data/formatted/test.jsonl")
FORMAT_STATS = Path("data/formatted/stats.json")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
CALIBRATION = Path("reports/calibration.json")
OUT = Path("reports")


def main() -> None:
    params = load_params()
    e, m = params.evaluate, params.metrics
    test = read_jsonl(TEST)
    texts = [d["text"] for d in read_jsonl(HELDOUT)]
    sets = EvalSets(
        decisions=balanced_decisions(test, None),
        train_decisions=balanced_decisions(read_jsonl(TRAIN), e.train_decision_sample) if e.train_decision_sample else [],
        benign=[r for r in test if r["task"] != Task.DECISION.value],
        maths=first_of_task(test, Task.MATH, e.max_math_examples),
        faqs=first_of_task(test, Task.QA_FAQ, e.max_faq_examples),
        windows=perplexity_windows(load_tokenizer(Path("models/baked")), texts, m.perplexity_max_tokens, m.perplexity_window),
    )
    style = read_json(FORMAT_STATS)["style"]
    calibration = read_json(CALIBRATION)["artifacts"]
    threads, arts, results = free_cores(), artifacts(), {}
    with progress() as bar:
        task = bar.add_task("evaluate: test split", total=len(arts) * sets.steps(), info="")
        for art in arts:
            bar.update(task, info=f"{art.name} ({threads} threads)")
            backend = open_artifact(art, threads, params.generation.batch_size)
            r = evaluate_artifact(backend, art, sets, params, calibration.get(art.name, {}), style, lambda n: bar.advance(task, n))
            close_backend(backend)
            results[art.name] = r
            f, a = r.flat, art.name
            console.print(
                f"evaluate: {a}: macro-F1 {f[keys.key(a, keys.DECISION_MACRO_F1)]:.3f} "
                f"[{f[keys.key(a, keys.DECISION_MACRO_F1_CI_LOW)]:.3f}, {f[keys.key(a, keys.DECISION_MACRO_F1_CI_HIGH)]:.3f}] "
                f"(n={f[keys.key(a, keys.DECISION_N)]}), ECE {f[keys.key(a, keys.DECISION_ECE)]:.3f}->"
                f"{f[keys.key(a, keys.DECISION_ECE_CALIBRATED)]:.3f}, ppl {f[keys.key(a, keys.PERPLEXITY)]:.2f}, "
                f"math EM {f[keys.key(a, keys.MATH_EXACT_MATCH)]:.2f}, chrF {f[keys.key(a, keys.FAQ_CHRF)]:.1f}; "
                f"speed {r.details['speed']}"
            )
    flat = write_evaluation(OUT, results, threads)
    console.print(f"evaluate: parity {{{', '.join(f'{k}: {v:.3f}' for k, v in flat.items() if '.parity.' in k)}}}")


if __name__ == "__main__":
    run_stage("evaluate", main)
