"""Stage evaluate: every artifact on the test split: decisions, calibration, perplexity, math, FAQ, speed."""

import csv
import io
from pathlib import Path

from so8t.base_model import load_tokenizer
from so8t.console import console, free_cores, progress, run_stage
from so8t.evaluation import (
    artifacts,
    balanced_decisions,
    close_backend,
    decision_metrics,
    faq_metrics,
    first_of_task,
    generate_answers,
    math_metrics,
    open_backend,
    stability_metrics,
)
from so8t.io import read_json, read_jsonl, write_json, write_text
from so8t.params import load_params
from so8t.quantize import stop_strings
from so8t.schema import DECISIONS
from so8t.scoring import perplexity_of, perplexity_windows, score_decisions

TEST = Path("data/formatted/test.jsonl")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
CALIBRATION = Path("reports/calibration.json")
OUT = Path("reports")


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main() -> None:
    params = load_params()
    e = params.evaluate
    style = params.think_format.style
    tokenizer = load_tokenizer(Path("models/baked"))
    stops = stop_strings(tokenizer)
    test = read_jsonl(TEST)
    decisions = balanced_decisions(test, e.max_decision_examples)
    maths = first_of_task(test, "math", e.max_math_examples)
    faqs = first_of_task(test, "qa_faq", e.max_faq_examples)
    windows = perplexity_windows(
        tokenizer, [d["text"] for d in read_jsonl(HELDOUT)], e.perplexity_max_tokens, e.perplexity_window
    )
    temperatures = {k: v["temperature"] for k, v in read_json(CALIBRATION)["artifacts"].items()}
    threads = free_cores()
    flat: dict[str, float] = {}
    details: dict[str, dict] = {"threads": threads, "artifacts": {}}
    confusion_rows, reliability_rows, quant_rows = [], [], []
    arts = artifacts(params.quantize.types)
    per_artifact = len(decisions) + len(maths) + len(faqs) + (1 if faqs else 0)
    bar = progress()
    bar.start()
    task = bar.add_task("evaluate: test generations", total=len(arts) * per_artifact, info="")
    step = lambda n: bar.advance(task, n)  # noqa: E731
    for art in arts:
        bar.update(task, info=f"{art.name} ({threads} threads)")
        backend = open_backend(art, tokenizer, threads, params.evaluate.repetition_penalty)
        scored = score_decisions(backend, decisions, e.decision_max_new_tokens, stops, step)
        dec = decision_metrics(scored, temperatures.get(art.name, 1.0), params.calibrate.ece_bins)
        ppl = perplexity_of(backend, windows)
        math_gens = generate_answers(backend, maths, e.math_max_new_tokens, stops, step)
        faq_gens = generate_answers(backend, faqs, e.faq_max_new_tokens, stops, step)
        stab = stability_metrics(backend, faqs[0], e.stability_max_new_tokens, stops) if faqs else None
        step(1 if faqs else 0)
        close_backend(backend)
        mth = math_metrics(maths, math_gens, style)
        faq = faq_metrics(faqs, faq_gens, style)
        gen_tokens = sum(r["gen_tokens"] for r in scored) + sum(g.n_tokens for g in math_gens + faq_gens)
        gen_seconds = sum(r["gen_seconds"] for r in scored) + sum(g.seconds for g in math_gens + faq_gens)
        size_mb = art.size_bytes() / 1e6
        a = art.name
        flat |= {
            f"{a}.decision.accuracy": dec["accuracy"],
            f"{a}.decision.macro_f1": dec["macro_f1"],
            f"{a}.decision.format_rate": dec["format_rate"],
            f"{a}.decision.ece": dec["ece"],
            f"{a}.decision.brier": dec["brier"],
            f"{a}.decision.nll": dec["nll"],
            f"{a}.decision.ece_calibrated": dec["ece_calibrated"],
            f"{a}.decision.brier_calibrated": dec["brier_calibrated"],
            f"{a}.decision.nll_calibrated": dec["nll_calibrated"],
            f"{a}.perplexity": ppl["perplexity"],
            f"{a}.math.exact_match": mth["exact_match"],
            f"{a}.faq.chrf": faq["chrf"],
            f"{a}.faq.bleu": faq["bleu"],
            f"{a}.faq.rouge_l": faq["rouge_l"],
            f"{a}.faq.keigo_rate": faq["keigo_rate"],
            f"{a}.tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            f"{a}.prompt_tokens_per_s": ppl["tokens"] / max(ppl["seconds"], 1e-9),
            f"{a}.size_mb": size_mb,
        }
        if stab is not None:
            flat |= {
                f"{a}.stability.repeated_ngram_rate": stab["repeated_ngram_rate"],
                f"{a}.stability.longest_repeated_span": stab["longest_repeated_span"],
                f"{a}.stability.oscillation": float(stab["oscillation"]),
            }
        details["artifacts"][a] = {
            "kind": art.kind,
            "path": str(art.path),
            "decision": dec,
            "perplexity": ppl,
            "math": mth,
            "faq": faq,
            "stability": stab,
            "threads": threads,
            "decision_rows": scored,
            "samples": [
                {"id": ex["id"], "prompt": ex["prompt"], "reference": ex["response"], "output": g.text}
                for ex, g in zip(faqs, faq_gens)
            ],
        }
        confusion_rows += [
            {"artifact": a, "actual": DECISIONS[r["label"]], "predicted": DECISIONS[r["pred"]]} for r in scored
        ]
        reliability_rows += [
            {"artifact": a, "confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"]}
            for b in dec["reliability"]
            if b["count"]
        ]
        quant_rows.append({"artifact": a, "size_mb": round(size_mb, 1), "perplexity": ppl["perplexity"]})
        console.print(
            f"evaluate: {a}: acc {dec['accuracy']:.3f} macro-F1 {dec['macro_f1']:.3f} "
            f"ECE {dec['ece']:.3f}->{dec['ece_calibrated']:.3f} ppl {ppl['perplexity']:.2f} "
            f"math EM {mth['exact_match']:.2f} chrF {faq['chrf']:.1f} {flat[f'{a}.tokens_per_s']:.1f} tok/s"
        )
    bar.stop()
    write_json(OUT / "metrics.json", {k: round(float(v), 6) for k, v in flat.items()})
    write_json(OUT / "eval" / "details.json", details)
    for name in {r["artifact"] for r in confusion_rows}:
        rows = [{k: v for k, v in r.items() if k != "artifact"} for r in confusion_rows if r["artifact"] == name]
        write_text(OUT / "plots" / "confusion" / f"{name}.csv", _csv(rows))
    write_text(OUT / "plots" / "reliability.csv", _csv(reliability_rows))
    write_text(OUT / "plots" / "quantization.csv", _csv(quant_rows))


if __name__ == "__main__":
    run_stage("evaluate", main)
