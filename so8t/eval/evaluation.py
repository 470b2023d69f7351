"""The artifacts the pipeline compares, and the calibrate and evaluate stages' work on them.

Artifacts (:func:`artifacts`): ``base`` (models/base, HF), ``baked``
(models/baked, HF) and each GGUF the quantize stage wrote (``f16``, ``q8_0``,
``q4_k_m``: ``models/gguf/quantize_report.json``, llama.cpp). Every metric key in
``reports/metrics.json`` starts with the artifact name (:mod:`so8t.eval.keys`).

All model work goes through :mod:`so8t.eval.inference`: generation and scoring
are batched (``generation.batch_size``), greedy, with the repetition penalty of
``generation.repetition_penalty`` in every backend.
"""

from __future__ import annotations

import csv
import gc
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from so8t.data.think_format import parse_assistant
from so8t.eval import keys
from so8t.eval.calibration import apply_temperature, calibration_summary, fit_temperature
from so8t.eval.inference import (
    Backend,
    Generation,
    open_backend,
    perplexity_of,
    score_decisions,
    stop_strings,
)
from so8t.eval.metrics import (
    bleu_ja,
    chrf,
    classification_report,
    extract_final_number,
    keigo_rate,
    math_exact_match,
    reliability_bins,
    repetition_stats,
    rouge_l_ja,
)
from so8t.io import DataError, read_json, write_json, write_text
from so8t.schema import DECISIONS, Task

BASE_DIR = Path("models/base")
BAKED_DIR = Path("models/baked")
GGUF_DIR = Path("models/gguf")
QUANTIZE_REPORT = "quantize_report.json"


@dataclass(frozen=True)
class Artifact:
    """One model the pipeline produced (or started from)."""

    name: str
    kind: str  # "hf" or "gguf"
    path: Path

    def size_bytes(self) -> int:
        """Bytes of the weights (safetensors files of a folder, or the GGUF file)."""
        if self.kind == "gguf":
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))


def artifacts(base_dir: Path = BASE_DIR, baked_dir: Path = BAKED_DIR, gguf_dir: Path = GGUF_DIR) -> list[Artifact]:
    """Base, baked and every GGUF listed in ``<gguf_dir>/quantize_report.json``, in that order.

    Raises:
        DataError: the quantize report is missing or lists a file that is not there.
    """
    report = read_json(gguf_dir / QUANTIZE_REPORT)
    out = [Artifact("base", "hf", base_dir), Artifact("baked", "hf", baked_dir)]
    for name, info in report["files"].items():
        path = gguf_dir / info["file"]
        if not path.is_file():
            raise DataError(f"{gguf_dir / QUANTIZE_REPORT}: lists {path}, which does not exist (rerun quantize)")
        out.append(Artifact(name, "gguf", path))
    return out


def open_artifact(artifact: Artifact, n_threads: int, batch_size: int, n_ctx: int = 1024) -> Backend:
    """The inference backend of ``artifact`` (HF float32 or llama.cpp)."""
    return open_backend(artifact.path, n_ctx=n_ctx, n_threads=n_threads, batch_size=batch_size)


def close_backend(backend: Backend) -> None:
    """Free a backend's model memory before the next artifact is loaded."""
    backend.close()
    gc.collect()


# --------------------------------------------------------------------------- example selection


def balanced_decisions(rows: list[dict], n: int | None) -> list[dict]:
    """Decision examples, equally many per label (``n // 3``; ``None`` = as many as the rarest label has).

    Within a label the examples are taken round-robin over their templates (``group``),
    in a stable order, so a sample spans as many templates as it can.
    """
    by_label = {label: [r for r in rows if r["task"] == Task.DECISION.value and r["decision"] == label] for label in DECISIONS}
    per = min(map(len, by_label.values())) if n is None else max(1, n // len(DECISIONS))
    out = []
    for label in DECISIONS:
        groups: dict[str, list[dict]] = {}
        for r in sorted(by_label[label], key=lambda r: r["id"]):
            groups.setdefault(r.get("group") or r["id"], []).append(r)
        queues = [groups[g] for g in sorted(groups)]
        picked: list[dict] = []
        depth = 0
        while len(picked) < per and any(depth < len(q) for q in queues):
            picked += [q[depth] for q in queues if depth < len(q)][: per - len(picked)]
            depth += 1
        out += picked
    return out


def first_of_task(rows: list[dict], task: Task, n: int | None) -> list[dict]:
    """The first ``n`` examples of ``task`` by id (stable across runs; ``None`` = all)."""
    return sorted((r for r in rows if r["task"] == task.value), key=lambda r: r["id"])[:n]


# --------------------------------------------------------------------------- per-task metrics


def decision_metrics(scored: list[dict], temperature: float, n_bins: int) -> dict:
    """Accuracy, macro-F1, per-class P/R, confusion matrix and calibration of scored decisions."""
    logits = np.array([r["logits"] for r in scored], dtype=np.float64)
    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    report = classification_report([DECISIONS[i] for i in labels], [DECISIONS[r["pred"]] for r in scored])
    cal = calibration_summary(logits, labels, temperature, n_bins)
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "format_rate": float(np.mean([r["format_ok"] for r in scored])),
        "ece": cal["ece_before"],
        "brier": cal["brier_before"],
        "nll": cal["nll_before"],
        "ece_calibrated": cal["ece_after"],
        "brier_calibrated": cal["brier_after"],
        "nll_calibrated": cal["nll_after"],
        "temperature": temperature,
        "reliability": reliability_bins(apply_temperature(logits, temperature), labels, n_bins),
        "n": len(scored),
    }


def math_metrics(examples: list[dict], gens: list[Generation], style: str) -> dict:
    """Exact match of the final number (``答え: N`` / ``#### N`` / last number) against the reference."""
    preds = []
    for g in gens:
        _, final, _ = parse_assistant(g.text, style)
        preds.append(extract_final_number(final or g.text) or "")
    refs = [ex["final_answer"] for ex in examples]
    return {"exact_match": math_exact_match(preds, refs), "n": len(examples), "predictions": preds}


def faq_metrics(examples: list[dict], gens: list[Generation], style: str) -> dict:
    """chrF, BLEU (ja-mecab), ROUGE-L (MeCab tokens) and keigo rate of the final answers vs the FAQ answers."""
    finals = [parse_assistant(g.text, style)[1] for g in gens]
    refs = [ex["response"] for ex in examples]
    answered = [f for f in finals if f.strip()]
    return {
        "chrf": chrf(finals, refs),
        "bleu": bleu_ja(finals, refs),
        "rouge_l": rouge_l_ja(finals, refs),
        "keigo_rate": keigo_rate(answered) if answered else 0.0,
        "answered_rate": float(np.mean([bool(f.strip()) for f in finals])),
        "n": len(examples),
    }


def stability_metrics(backend: Backend, example: dict, max_new_tokens: int) -> dict:
    """Repetition in one long greedy generation without any repetition penalty.

    Token-level statistics (the backend's token ids of the generated text) from
    :func:`so8t.eval.metrics.repetition_stats`: repeated 4-gram rate, longest
    repeated span (tokens) and the oscillation flag.
    """
    (gen,) = backend.generate([backend.tokenize(example["prompt_text"])], max_new_tokens, stop_strings(backend), 1.0)
    ids = backend.tokenize(gen.text) or [0]
    return repetition_stats(ids, n=4) | {"text": gen.text, "tokens_per_s": gen.n_tokens / max(gen.seconds, 1e-9)}


def parity(reference: dict[str, str], other: dict[str, str]) -> float:
    """Share of the ids in both whose values are identical (greedy texts or decisions)."""
    common = sorted(set(reference) & set(other))
    return float(np.mean([reference[i] == other[i] for i in common])) if common else float("nan")


# --------------------------------------------------------------------------- the stages


@dataclass
class EvalSets:
    """The test examples and held-out windows every artifact is evaluated on."""

    decisions: list[dict]
    maths: list[dict]
    faqs: list[dict]
    windows: list[list[int]]

    def generations(self) -> int:
        """Generations per artifact (decisions, math, FAQ and one stability run)."""
        return len(self.decisions) + len(self.maths) + len(self.faqs) + (1 if self.faqs else 0)


@dataclass
class ArtifactResult:
    """What evaluating one artifact gives: flat metrics and the details behind them."""

    name: str
    flat: dict[str, float]
    details: dict
    texts: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


def calibrate_artifact(backend: Backend, examples: list[dict], params, on_progress=None) -> tuple[dict, list[dict]]:
    """Fit the decision temperature of one artifact on ``examples`` (Guo et al. 2017).

    Returns:
        (the calibration summary with ``temperature``, ``converged``, ``iterations``, ``at_bound``,
        the scored rows).
    """
    g = params.generation
    scored = score_decisions(backend, examples, g.decision_max_new_tokens, g.repetition_penalty, on_progress)
    logits = np.array([r["logits"] for r in scored])
    labels = np.array([r["label"] for r in scored])
    fit = fit_temperature(logits, labels)
    summary = calibration_summary(logits, labels, fit.temperature, params.metrics.ece_bins)
    return summary | {"converged": fit.converged, "iterations": fit.iterations}, scored


def evaluate_artifact(
    backend: Backend, art: Artifact, sets: EvalSets, params, temperature: float, style: str, step=None
) -> ArtifactResult:
    """Decisions, perplexity, math, FAQ, stability and speed of one artifact on the test split."""
    e, g = params.evaluate, params.generation
    stops = stop_strings(backend)
    t0 = time.perf_counter()
    scored = score_decisions(backend, sets.decisions, g.decision_max_new_tokens, g.repetition_penalty, step)
    decision_seconds = time.perf_counter() - t0
    dec = decision_metrics(scored, temperature, params.metrics.ece_bins)
    ppl = perplexity_of(backend, sets.windows)

    def answers(rows: list[dict], budget: int) -> list[Generation]:
        prompts = [backend.tokenize(r["prompt_text"]) for r in rows]
        return backend.generate(prompts, budget, stops, g.repetition_penalty, step)

    math_gens = answers(sets.maths, e.math_max_new_tokens)
    faq_gens = answers(sets.faqs, e.faq_max_new_tokens)
    stab = stability_metrics(backend, sets.faqs[0], e.stability_max_new_tokens) if sets.faqs else None
    if step is not None and sets.faqs:
        step(1)
    mth = math_metrics(sets.maths, math_gens, style)
    faq = faq_metrics(sets.faqs, faq_gens, style)
    rates = backend.stats.rates()
    size_mb = art.size_bytes() / 1e6
    a = art.name
    flat = {
        keys.key(a, keys.DECISION_N): dec["n"],
        keys.key(a, keys.DECISION_ACCURACY): dec["accuracy"],
        keys.key(a, keys.DECISION_MACRO_F1): dec["macro_f1"],
        keys.key(a, keys.DECISION_FORMAT_RATE): dec["format_rate"],
        keys.key(a, keys.DECISION_ECE): dec["ece"],
        keys.key(a, keys.DECISION_BRIER): dec["brier"],
        keys.key(a, keys.DECISION_NLL): dec["nll"],
        keys.key(a, keys.DECISION_ECE_CALIBRATED): dec["ece_calibrated"],
        keys.key(a, keys.DECISION_BRIER_CALIBRATED): dec["brier_calibrated"],
        keys.key(a, keys.DECISION_NLL_CALIBRATED): dec["nll_calibrated"],
        keys.key(a, keys.DECISION_TEMPERATURE): temperature,
        keys.key(a, keys.PERPLEXITY): ppl["perplexity"],
        keys.key(a, keys.MATH_EXACT_MATCH): mth["exact_match"],
        keys.key(a, keys.FAQ_CHRF): faq["chrf"],
        keys.key(a, keys.FAQ_BLEU): faq["bleu"],
        keys.key(a, keys.FAQ_ROUGE_L): faq["rouge_l"],
        keys.key(a, keys.FAQ_KEIGO_RATE): faq["keigo_rate"],
        keys.key(a, keys.SIZE_MB): size_mb,
    }
    if stab is not None:
        flat |= {
            keys.key(a, keys.STABILITY_REPEATED_NGRAM_RATE): stab["repeated_ngram_rate"],
            keys.key(a, keys.STABILITY_LONGEST_REPEATED_SPAN): stab["longest_repeated_span"],
            keys.key(a, keys.STABILITY_OSCILLATION): float(stab["oscillation"]),
        }
    speed = {
        keys.TOKENS_PER_S: rates["tokens_per_s"],
        keys.PROMPT_TOKENS_PER_S: rates["prompt_tokens_per_s"],
        keys.PERPLEXITY_TOKENS_PER_S: ppl["tokens"] / max(ppl["seconds"], 1e-9),
        keys.DECISIONS_PER_MINUTE: 60.0 * len(scored) / max(decision_seconds, 1e-9),
    }
    texts = {r["id"]: r["generated"] for r in scored}
    texts |= {ex["id"]: gen.text for ex, gen in zip(sets.maths + sets.faqs, math_gens + faq_gens)}
    details = {
        "kind": art.kind,
        "path": str(art.path),
        "decision": dec,
        "perplexity": ppl,
        "math": mth,
        "faq": faq,
        "stability": stab,
        "speed": speed,
        "decision_rows": scored,
        "samples": [
            {"id": ex["id"], "prompt": ex["prompt"], "reference": ex["response"], "output": gen.text}
            for ex, gen in zip(sets.faqs, faq_gens)
        ],
    }
    return ArtifactResult(a, flat, details, texts, {r["id"]: DECISIONS[r["pred"]] for r in scored})


def parity_metrics(results: dict[str, ArtifactResult]) -> dict[str, float]:
    """Greedy-text and decision agreement: ``f16`` against ``baked`` (same weights, two runtimes),
    every other GGUF against ``f16`` (what quantisation changes)."""
    flat: dict[str, float] = {}
    pairs = [("f16", "baked")] + [(n, "f16") for n in results if n not in ("base", "baked", "f16")]
    for name, ref in pairs:
        if name in results and ref in results:
            flat[keys.key(name, keys.PARITY_TEXT)] = parity(results[ref].texts, results[name].texts)
            flat[keys.key(name, keys.PARITY_DECISION)] = parity(results[ref].decisions, results[name].decisions)
    return flat


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_evaluation(out: Path, results: dict[str, ArtifactResult], threads: int) -> dict[str, float]:
    """Write ``metrics.json`` (flat, rounded), ``eval/details.json``, ``performance/evaluate.json`` and the plots.

    Speed figures go to the performance file only: they vary from run to run, metrics do not.
    """
    flat: dict[str, float] = {}
    for r in results.values():
        flat |= r.flat
    flat |= parity_metrics(results)
    write_json(out / "metrics.json", {k: round(float(v), 6) for k, v in flat.items()})
    write_json(out / "eval" / "details.json", {"artifacts": {n: r.details for n, r in results.items()}})
    write_json(
        out / "performance" / "evaluate.json",
        {"threads": threads} | {keys.key(n, k): round(float(v), 3) for n, r in results.items() for k, v in r.details["speed"].items()},
    )
    reliability, quant = [], []
    for name, r in results.items():
        dec = r.details["decision"]
        rows = [{"actual": DECISIONS[x["label"]], "predicted": DECISIONS[x["pred"]]} for x in r.details["decision_rows"]]
        if rows:
            write_text(out / "plots" / "confusion" / f"{name}.csv", _csv(rows))
        reliability += [
            {"artifact": name, "confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"]}
            for b in dec["reliability"]
            if b["count"]
        ]
        quant.append(
            {"artifact": name, "size_mb": round(r.flat[keys.key(name, keys.SIZE_MB)], 1),
             "perplexity": r.flat[keys.key(name, keys.PERPLEXITY)]}
        )
    if reliability:
        write_text(out / "plots" / "reliability.csv", _csv(reliability))
    write_text(out / "plots" / "quantization.csv", _csv(quant))
    return flat


__all__ = [
    "Artifact",
    "ArtifactResult",
    "EvalSets",
    "artifacts",
    "balanced_decisions",
    "calibrate_artifact",
    "close_backend",
    "decision_metrics",
    "evaluate_artifact",
    "faq_metrics",
    "first_of_task",
    "math_metrics",
    "open_artifact",
    "parity",
    "parity_metrics",
    "stability_metrics",
    "write_evaluation",
]
