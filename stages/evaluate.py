"""Stage evaluate: every artifact on the test split, through llama.cpp: decisions (bare and with retrieved
passages), calibration, policy (on the served artifact also after generating, as the runtime does),
perplexity, math, FAQ and reference answers, speed, parity between runtimes;
the baked model in transformers on a sample (the reference its F16 GGUF is checked against); every row's
decision macro-F1 against the linear probe's (reports/probe.json) on the same test decisions."""

import time
from pathlib import Path

from so8t.console import console, free_cores, progress, run_stage
from so8t.data.grounding import make_grounder
from so8t.eval import keys
from so8t.eval.artifacts import artifacts, close_backend, open_artifact
from so8t.eval.comparisons import load_probe, parity_sample, probe_comparison
from so8t.eval.evalsets import build_eval_sets, sets_for
from so8t.eval.served import allow_requests, evaluate_served
from so8t.eval.evaluation import (
    artifact_summary,
    evaluate_artifact,
    reference_parity,
    reference_summary,
    write_evaluation,
)
from so8t.io import read_json, read_jsonl
from so8t.inference.hf import load_tokenizer
from so8t.params import load_params

TRAIN = Path("data/formatted/train.jsonl")
TEST = Path("data/formatted/test.jsonl")
FORMAT_STATS = Path("data/formatted/stats.json")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
CALIBRATION = Path("reports/calibration.json")
PROBE = Path("reports/probe.json")
OUT = Path("reports")


def main() -> None:
    start = time.perf_counter()
    params = load_params()
    tokenizer = load_tokenizer(Path("models/baked"))
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    test, grounder = read_jsonl(TEST), make_grounder(params.retrieval, count)
    sets = build_eval_sets(params, test, read_jsonl(TRAIN), [d["text"] for d in read_jsonl(HELDOUT)], tokenizer, grounder)
    style = read_json(FORMAT_STATS)["style"]
    calibration = read_json(CALIBRATION)["artifacts"]
    probe, no_probe = load_probe(PROBE, params.probe.enabled)
    threads, arts, results = free_cores(), artifacts(), {}
    e = params.evaluate
    baked = next((a for a in arts if a.name == "baked" and a.kind == "gguf"), None)
    ref_steps = sum(map(len, parity_sample(sets, e.parity_decisions, e.parity_texts))) if baked else 0
    reference = None
    with progress() as bar:
        steps = sum(sets_for(a, sets, e.extra_artifacts).steps() for a in arts) + ref_steps + 2 * len(allow_requests(test))
        task = bar.add_task("evaluate: test split", total=steps, info="")
        for art in arts:
            bar.update(task, info=f"{art.name} ({threads} threads)")
            t0 = time.perf_counter()
            backend = open_artifact(
                art, threads, params.generation.batch_size, n_gpu_layers=params.generation.n_gpu_layers,
                hf_batch_size=params.generation.hf_batch_size,
            )
            r = evaluate_artifact(
                backend, art, sets_for(art, sets, e.extra_artifacts), params, calibration.get(art.name, {}), style,
                lambda n: bar.advance(task, n),
            )
            close_backend(backend)
            r.details["speed"][keys.WALL_S] = time.perf_counter() - t0
            results[art.name] = r
            console.print(artifact_summary(art, r))
        if baked is not None and (e.parity_decisions or e.parity_texts):
            bar.update(task, info="transformers reference (sample)")
            reference = reference_parity(baked, results["baked"], sets, params, lambda n: bar.advance(task, n))
            console.print(reference_summary(reference))
        bar.update(task, info="served artifact: the runtime's policy after generation")
        served = evaluate_served(arts, results, test, grounder, tokenizer, params, style, calibration, threads,
                                 lambda n: bar.advance(task, n))
    against_probe = probe_comparison(results, probe, params.metrics, PROBE) if probe else None
    if against_probe is None:
        console.print(f"evaluate: no comparison with the linear probe: {no_probe}")
    flat = write_evaluation(OUT, results, threads, reference, time.perf_counter() - start, against_probe, served)
    console.print(f"evaluate: parity {{{', '.join(f'{k}: {v:.3f}' for k, v in flat.items() if '.parity.' in k)}}}")


if __name__ == "__main__":
    run_stage("evaluate", main)
