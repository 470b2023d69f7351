"""The artifacts the pipeline compares and the per-task evaluations run on each.

Artifacts (:func:`artifacts`): ``base`` (models/base, HF), ``baked``
(models/baked, HF) and one per GGUF type (``f16``, ``q8_0``, ``q4_k_m`` in
models/gguf, llama.cpp). Every metric key in ``reports/metrics.json`` starts
with the artifact name, e.g. ``q4_k_m.perplexity`` or ``baked.decision.macro_f1``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from so8t.calibration import apply_temperature, calibration_summary
from so8t.metrics import (
    repetition_stats,
    bleu_ja,
    chrf,
    classification_report,
    extract_final_number,
    keigo_rate,
    math_exact_match,
    reliability_bins,
    rouge_l_ja,
)
from so8t.quantize import GGUF_TYPES
from so8t.schema import DECISIONS
from so8t.scoring import Generation, HFBackend, LlamaCppBackend, score_decisions
from so8t.think_format import parse_assistant

BASE_DIR = Path("models/base")
BAKED_DIR = Path("models/baked")
GGUF_DIR = Path("models/gguf")


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


def artifacts(gguf_types: list[str]) -> list[Artifact]:
    """Base, baked and each GGUF type requested in ``params.quantize.types``, in that order."""
    out = [Artifact("base", "hf", BASE_DIR), Artifact("baked", "hf", BAKED_DIR)]
    for t in gguf_types:
        suffix = GGUF_TYPES[t][1]
        out.append(Artifact(suffix, "gguf", GGUF_DIR / f"so8t-{suffix}.gguf"))
    return out


def open_backend(artifact: Artifact, tokenizer, n_threads: int, repetition_penalty: float = 1.0):
    """A scoring backend for ``artifact`` (HF float32 or llama.cpp)."""
    if artifact.kind == "gguf":
        return LlamaCppBackend(
            artifact.path, tokenizer, n_ctx=1024, n_threads=n_threads, repetition_penalty=repetition_penalty
        )
    return HFBackend(artifact.path, tokenizer, repetition_penalty=repetition_penalty)


def close_backend(backend) -> None:
    """Free a backend's model memory before the next artifact is loaded."""
    backend.close()
    gc.collect()


def balanced_decisions(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` decision examples, equally many per label, in a stable order."""
    per = max(1, n // len(DECISIONS))
    out = []
    for label in DECISIONS:
        out += sorted((r for r in rows if r["task"] == "decision" and r["decision"] == label), key=lambda r: r["id"])[
            :per
        ]
    return out


def first_of_task(rows: list[dict], task: str, n: int) -> list[dict]:
    """The first ``n`` examples of ``task`` by id (stable across runs)."""
    return sorted((r for r in rows if r["task"] == task), key=lambda r: r["id"])[:n]


def decision_metrics(scored: list[dict], temperature: float, n_bins: int) -> dict:
    """Accuracy, macro-F1, per-class P/R, confusion matrix and calibration of scored decisions."""
    logits = np.array([r["logits"] for r in scored], dtype=np.float64)
    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    preds = [DECISIONS[r["pred"]] for r in scored]
    report = classification_report([DECISIONS[i] for i in labels], preds)
    cal = calibration_summary(logits, labels, temperature, n_bins)
    probs = apply_temperature(logits, temperature)
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
        "reliability": reliability_bins(probs, labels, n_bins),
        "n": len(scored),
    }


def generate_answers(
    backend, examples: list[dict], max_new_tokens: int, stops: list[str], on_progress=None
) -> list[Generation]:
    """Greedy generations for formatted examples (prompt in the chat template)."""
    tok = backend.tokenizer
    prompts = [tok(ex["prompt_text"], add_special_tokens=False)["input_ids"] for ex in examples]
    return backend.generate(prompts, max_new_tokens, stops, on_progress)


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
    return {
        "chrf": chrf(finals, refs),
        "bleu": bleu_ja(finals, refs),
        "rouge_l": rouge_l_ja(finals, refs),
        "keigo_rate": keigo_rate([f for f in finals if f.strip()]) if any(f.strip() for f in finals) else 0.0,
        "answered_rate": float(np.mean([bool(f.strip()) for f in finals])),
        "n": len(examples),
    }


def stability_metrics(backend, example: dict, max_new_tokens: int, stops: list[str]) -> dict:
    """Repetition in one long greedy generation, without any repetition penalty.

    Token-level statistics (HF tokenizer ids of the generated text) from
    :func:`so8t.metrics.repetition_stats`: repeated 4-gram rate, longest repeated
    span (tokens) and the oscillation flag.
    """
    saved = backend.repetition_penalty
    backend.repetition_penalty = 1.0
    try:
        gen = generate_answers(backend, [example], max_new_tokens, stops)[0]
    finally:
        backend.repetition_penalty = saved
    ids = backend.tokenizer(gen.text, add_special_tokens=False)["input_ids"] or [0]
    stats = repetition_stats(ids, n=4)
    return stats | {"text": gen.text, "tokens_per_s": gen.n_tokens / max(gen.seconds, 1e-9)}


def decision_probabilities(scored: list[dict], temperature: float) -> np.ndarray:
    """``(N, 3)`` calibrated probabilities of scored decisions."""
    return apply_temperature(np.array([r["logits"] for r in scored], dtype=np.float64), temperature)


__all__ = [
    "Artifact",
    "artifacts",
    "open_backend",
    "close_backend",
    "balanced_decisions",
    "first_of_task",
    "decision_metrics",
    "generate_answers",
    "math_metrics",
    "faq_metrics",
    "score_decisions",
    "decision_probabilities",
    "stability_metrics",
]
