"""The artifacts the pipeline compares, and the calibrate and evaluate stages' work on them.

Artifacts (:func:`artifacts`), all run through llama.cpp, the engine users run: ``base`` (the
base model's F16 GGUF, ``models/gguf/base-f16.gguf``), ``baked`` (the fine-tune's F16 GGUF,
``so8t-f16.gguf``) and each other GGUF the quantize stage wrote (``q8_0``, ``q4_k_m``; listed in
``models/gguf/quantize_report.json``). transformers is the reference, run on a sample
(:func:`reference_parity`: the ``f16.parity.*`` keys). Every metric key in
``reports/metrics.json`` starts with the artifact name (:mod:`so8t.eval.keys`).

All model work goes through :mod:`so8t.eval.inference`: generation and scoring
are batched (``generation.batch_size``), greedy, with the repetition penalty of
``generation.repetition_penalty`` in every backend.
"""

from __future__ import annotations

import csv
import dataclasses
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
    answer_context,
    open_backend,
    perplexity_of,
    score_decisions,
    stop_strings,
)
from so8t.eval.metrics import (
    bleu_ja,
    bootstrap_interval,
    chrf,
    chrf_indices,
    classification_report,
    expected_calibration_error,
    extract_final_number,
    keigo_rate,
    macro_f1_indices,
    math_exact_match,
    reliability_bins,
    repetition_stats,
    rouge_l_ja,
)
from so8t.io import DataError, read_json, write_json, write_text
from so8t.schema import DECISIONS, Decision, Task

BASE_DIR = Path("models/base")
BAKED_DIR = Path("models/baked")
GGUF_DIR = Path("models/gguf")
QUANTIZE_REPORT = "quantize_report.json"


@dataclass(frozen=True)
class Artifact:
    """One model the pipeline produced (or started from).

    Attributes:
        name: the metric-key prefix (``base``, ``baked``, ``q8_0``...).
        kind: ``"gguf"`` (llama.cpp) or ``"hf"`` (transformers).
        path: the ``.gguf`` file or the HF folder that is evaluated.
        hf_dir: the HF folder a GGUF row was converted from (``base``, ``baked``), else ``None``.
    """

    name: str
    kind: str  # "hf" or "gguf"
    path: Path
    hf_dir: Path | None = None

    def size_bytes(self) -> int:
        """Bytes of the weights (safetensors files of a folder, or the GGUF file)."""
        if self.kind == "gguf":
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))


def artifacts(base_dir: Path = BASE_DIR, baked_dir: Path = BAKED_DIR, gguf_dir: Path = GGUF_DIR) -> list[Artifact]:
    """The evaluated rows, in order: ``base``, ``baked``, then every other GGUF of the quantize report.

    ``base`` is the base model's F16 GGUF (the report's ``reference.base``) and ``baked`` the
    fine-tune's F16 GGUF (its ``f16`` file): the same engine as the quantised rows. Where the
    quantize stage wrote no F16 (``quantize.types`` without ``F16``, or a report from before
    the base GGUF existed) that row is the HF folder.

    Raises:
        DataError: the quantize report is missing or lists a file that is not there.
    """
    report_path = gguf_dir / QUANTIZE_REPORT
    report = read_json(report_path)

    def gguf(info: dict) -> Path:
        path = gguf_dir / info["file"]
        if not path.is_file():
            raise DataError(f"{report_path}: lists {path}, which does not exist (rerun quantize)")
        return path

    files = report["files"]
    base_info = report.get("reference", {}).get("base")
    out = [
        Artifact("base", "gguf", gguf(base_info), base_dir) if base_info else Artifact("base", "hf", base_dir),
        Artifact("baked", "gguf", gguf(files["f16"]), baked_dir) if "f16" in files else Artifact("baked", "hf", baked_dir),
    ]
    out += [Artifact(name, "gguf", gguf(info)) for name, info in files.items() if name != "f16"]
    return out


def open_artifact(
    artifact: Artifact, n_threads: int, batch_size: int, n_ctx: int = 1024, n_gpu_layers: int = -1,
    hf_batch_size: int | None = None,
) -> Backend:
    """The inference backend of ``artifact`` (HF float32, on CUDA when present, or llama.cpp);
    ``batch_size`` for llama.cpp, ``hf_batch_size`` (default ``batch_size``) for HF."""
    return open_backend(
        artifact.path, n_ctx=n_ctx, n_threads=n_threads, batch_size=batch_size, n_gpu_layers=n_gpu_layers,
        hf_batch_size=hf_batch_size,
    )


def close_backend(backend: Backend) -> None:
    """Free a backend's model memory before the next artifact is loaded."""
    backend.close()
    gc.collect()


# --------------------------------------------------------------------------- example selection


def balanced_decisions(rows: list[dict], n: int | None) -> list[dict]:
    """Decision examples: every one (``n`` is ``None``), or ``n // 3`` per label spread over templates.

    Within a label a sample is taken round-robin over the label's templates (``group``),
    in a stable order, so it spans as many templates as it can: one template never fills it.
    """
    decisions = [r for r in rows if r["task"] == Task.DECISION.value]
    if n is None:
        return sorted(decisions, key=lambda r: r["id"])
    by_label = {label: [r for r in decisions if r["decision"] == label] for label in DECISIONS}
    per = max(1, n // len(DECISIONS))
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


def decision_metrics(scored: list[dict], temperature: float, m) -> dict:
    """Decision quality and calibration of scored decisions, with bootstrap intervals.

    Args:
        scored: rows of :func:`so8t.eval.inference.score_decisions`.
        temperature: the calibrated ``T`` of this artifact (1.0 when the fit failed).
        m: the ``metrics`` params section (ECE bins, bootstrap resamples, confidence).

    Returns:
        accuracy, macro-F1 and ECE (calibrated) with ``*_ci_low`` / ``*_ci_high`` (percentile
        bootstrap over examples, :func:`so8t.eval.metrics.bootstrap_interval`), per-class P/R,
        the confusion matrix, ECE / Brier / NLL before and after temperature scaling,
        reliability bins, and accuracy by domain and by policy category.
    """
    logits = np.array([r["logits"] for r in scored], dtype=np.float64)
    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    preds = np.array([r["pred"] for r in scored], dtype=np.int64)
    report = classification_report([DECISIONS[i] for i in labels], [DECISIONS[i] for i in preds])
    cal = calibration_summary(logits, labels, temperature, m.ece_bins)
    probs = apply_temperature(logits, temperature)
    ci = {"confidence": m.confidence, "n_resamples": m.bootstrap_resamples}

    def interval(stat) -> tuple[float, float]:
        return bootstrap_interval(stat, len(scored), m.confidence, m.bootstrap_resamples)

    f1_lo, f1_hi = interval(macro_f1_indices(labels, preds))
    acc_lo, acc_hi = interval(lambda idx: float(np.mean(labels[idx] == preds[idx])))
    ece_lo, ece_hi = interval(lambda idx: expected_calibration_error(probs[idx], labels[idx], m.ece_bins))
    return {
        "n": len(scored),
        "accuracy": report["accuracy"],
        "accuracy_ci_low": acc_lo,
        "accuracy_ci_high": acc_hi,
        "macro_f1": report["macro_f1"],
        "macro_f1_ci_low": f1_lo,
        "macro_f1_ci_high": f1_hi,
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "ece": cal["ece_before"],
        "brier": cal["brier_before"],
        "nll": cal["nll_before"],
        "ece_calibrated": cal["ece_after"],
        "ece_calibrated_ci_low": ece_lo,
        "ece_calibrated_ci_high": ece_hi,
        "brier_calibrated": cal["brier_after"],
        "nll_calibrated": cal["nll_after"],
        "temperature": temperature,
        "interval": ci,
        "reliability": reliability_bins(probs, labels, m.ece_bins),
        "by_domain": _accuracy_by(scored, "domain"),
        "by_category": _accuracy_by(scored, "category"),
    }


def _accuracy_by(scored: list[dict], field_name: str) -> dict[str, dict]:
    """``{value: {"n", "accuracy"}}`` of the rows grouped by ``field_name`` (rows without it left out)."""
    groups: dict[str, list[dict]] = {}
    for r in scored:
        if r.get(field_name):
            groups.setdefault(r[field_name], []).append(r)
    return {
        k: {"n": len(v), "accuracy": float(np.mean([r["label"] == r["pred"] for r in v]))} for k, v in sorted(groups.items())
    }


def decision_flat(artifact: str, dec: dict, at_bound: bool | None = None) -> dict[str, float]:
    """The flat ``reports/metrics.json`` keys of :func:`decision_metrics` for one artifact."""
    k = lambda name: keys.key(artifact, name)  # noqa: E731
    flat = {
        k(keys.DECISION_N): dec["n"],
        k(keys.DECISION_ACCURACY): dec["accuracy"],
        k(keys.DECISION_MACRO_F1): dec["macro_f1"],
        k(keys.DECISION_MACRO_F1_CI_LOW): dec["macro_f1_ci_low"],
        k(keys.DECISION_MACRO_F1_CI_HIGH): dec["macro_f1_ci_high"],
        k(keys.DECISION_ECE): dec["ece"],
        k(keys.DECISION_BRIER): dec["brier"],
        k(keys.DECISION_NLL): dec["nll"],
        k(keys.DECISION_ECE_CALIBRATED): dec["ece_calibrated"],
        k(keys.DECISION_ECE_CALIBRATED_CI_LOW): dec["ece_calibrated_ci_low"],
        k(keys.DECISION_ECE_CALIBRATED_CI_HIGH): dec["ece_calibrated_ci_high"],
        k(keys.DECISION_BRIER_CALIBRATED): dec["brier_calibrated"],
        k(keys.DECISION_NLL_CALIBRATED): dec["nll_calibrated"],
        k(keys.DECISION_TEMPERATURE): dec["temperature"],
    }
    if at_bound is not None:
        flat[k(keys.DECISION_TEMPERATURE_AT_BOUND)] = float(at_bound)
    for group in ("by_domain", "by_category"):
        for value, g in dec[group].items():
            flat[k(f"decision.{group}.{value}.accuracy")] = g["accuracy"]
    return flat


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


def policy_metrics(scored: list[dict], temperature: float, allow_threshold: float) -> dict:
    """The runtime policy's labels beside the model's: an ALLOW below ``allow_threshold`` becomes ESCALATION.

    The policy is the runtime's decision step (``so8t.runtime.agent``): ``p = softmax(z / T)``
    of the scored label log-likelihoods ``z`` (:func:`so8t.eval.calibration.apply_temperature`), the
    model's label ``argmax p``, and an ALLOW with ``p_ALLOW < allow_threshold`` becomes ESCALATION.

    Returns:
        ``{"model": {label: rate}, "policy": {label: rate}, "policy_macro_f1", "overridden",
        "allow_recall", "allow_n"}``, so a calibration failure that turns every ALLOW into
        ESCALATION shows in the metrics. ``allow_recall``: share of the ``allow_n`` gold-ALLOW rows
        the policy answers (its label is ALLOW); NaN without a gold-ALLOW row.
    """
    probs = apply_temperature(np.array([r["logits"] for r in scored], dtype=np.float64), temperature)
    model = [DECISIONS[r["pred"]] for r in scored]
    policy = [
        "ESCALATION" if m == "ALLOW" and p[0] < allow_threshold else m for m, p in zip(model, probs)
    ]
    truth = [DECISIONS[r["label"]] for r in scored]
    rates = lambda labels: {d: float(np.mean([x == d for x in labels])) for d in DECISIONS}  # noqa: E731
    return {
        "model": rates(model),
        "policy": rates(policy),
        "policy_macro_f1": classification_report(truth, policy)["macro_f1"],
        "overridden": float(np.mean([a != b for a, b in zip(model, policy)])),
        "allow_recall": _allow_recall(truth, policy),
        "allow_n": sum(t == Decision.ALLOW.value for t in truth),
    }


def _allow_recall(truth: list[str], labels: list[str]) -> float:
    """Share of the gold-ALLOW rows whose label in ``labels`` is ALLOW (NaN without a gold ALLOW)."""
    hits = [x == Decision.ALLOW.value for t, x in zip(truth, labels) if t == Decision.ALLOW.value]
    return float(np.mean(hits)) if hits else float("nan")


def generated_decision_lines(
    backend: Backend, rows: list[dict], max_new_tokens: int, penalty: float, step=None
) -> list[Generation]:
    """The greedy first line of the assistant turn after each prompt: where the model writes ``判定: X``.

    Generation starts at the rendered prompt (``prompt_text``, the chat template's generation prompt)
    and stops at the first newline, an end-of-turn token or ``max_new_tokens`` tokens; the same
    greedy decoding and repetition penalty as every other generation. These short, prefill-bound
    generations are kept out of the backend's generation tokens/s (:attr:`Backend.stats`).
    """
    prompts = [backend.tokenize(r["prompt_text"]) for r in rows]
    stats = backend.stats
    kept = stats.generated_tokens, stats.generation_seconds
    try:
        return backend.generate(prompts, max_new_tokens, [*stop_strings(backend), "\n"], penalty, step)
    finally:
        stats.generated_tokens, stats.generation_seconds = kept


def generated_decision_metrics(texts: list[str], scored: list[dict], style: str) -> dict:
    """The generated ``判定: X`` lines against the scored labels and the gold ones.

    Each text's first line is parsed with :func:`so8t.data.think_format.parse_assistant` (the
    ``判定\\s*[:：]\\s*(ALLOW|ESCALATION|DENY)`` pattern the training data is written in); a line without
    a label has none.

    Args:
        texts: generated texts (:func:`generated_decision_lines`), one per scored row.
        scored: the same examples' rows of :func:`so8t.eval.inference.score_decisions` (``label``:
            the gold index, ``pred``: argmax of the scored label log-likelihoods).
        style: ``think_format.style``.

    Returns:
        ``{"n", "agreement" (share whose generated label equals the scored one), "macro_f1" (of the
        generated labels against the gold ones over the 3 labels, sklearn ``zero_division=0``; a line
        without a label is wrong), "unparsed_rate" (share of lines without a label), "labels" ({id:
        label or None})}``; NaN rates for no rows.

    Raises:
        ValueError: ``texts`` and ``scored`` differ in length.
    """
    if len(texts) != len(scored):
        raise ValueError(f"generated_decision_metrics: {len(texts)} texts for {len(scored)} scored rows")
    parsed = [parse_assistant(t.split("\n", 1)[0], style)[2] for t in texts]
    n = len(parsed)
    if not n:
        return {"n": 0, "agreement": float("nan"), "macro_f1": float("nan"), "unparsed_rate": float("nan"), "labels": {}}
    generated = np.array([DECISIONS.index(x) if x else len(DECISIONS) for x in parsed], dtype=np.int64)
    gold = np.array([r["label"] for r in scored], dtype=np.int64)
    pred = np.array([r["pred"] for r in scored], dtype=np.int64)
    return {
        "n": n,
        "agreement": float(np.mean(generated == pred)),
        "macro_f1": macro_f1_indices(gold, generated)(np.arange(n)),
        "unparsed_rate": float(np.mean(generated == len(DECISIONS))),
        "labels": {r["id"]: x for r, x in zip(scored, parsed)},
    }


def cited(rows: list[dict], scored: list[dict]) -> float:
    """Share of QA requests the runtime would answer (ALLOW) citing the question's own document
    (a retrieved passage from the record's ``group``: its FAQ entry or reference section)."""
    hits = [
        r["pred"] == 0 and any(doc.endswith(f"#{row['group']}") for doc in row.get("passages", []))
        for row, r in zip(rows, scored)
    ]
    return float(np.mean(hits)) if hits else float("nan")


def stability_metrics(backend: Backend, example: dict, max_new_tokens: int) -> dict:
    """Repetition in one long greedy generation without any repetition penalty.

    Token-level statistics (the backend's token ids of the generated text) from
    :func:`so8t.eval.metrics.repetition_stats`: repeated 4-gram rate, longest
    repeated span (tokens) and the oscillation flag.
    """
    prompt = backend.tokenize(answer_context(example["prompt_text"]))
    (gen,) = backend.generate([prompt], max_new_tokens, stop_strings(backend), 1.0)
    ids = backend.tokenize(gen.text) or [0]
    return repetition_stats(ids, n=4) | {"text": gen.text, "tokens_per_s": gen.n_tokens / max(gen.seconds, 1e-9)}


def parity(reference: dict[str, str], other: dict[str, str]) -> float:
    """Share of the ids in both whose values are identical (greedy texts or decisions)."""
    common = sorted(set(reference) & set(other))
    return float(np.mean([reference[i] == other[i] for i in common])) if common else float("nan")


# --------------------------------------------------------------------------- the stages


@dataclass
class EvalSets:
    """What every artifact is evaluated on.

    Attributes:
        decisions: every test decision (scored, no generation).
        train_decisions: a sample of train decisions, spread over templates (to see over-fitting).
        benign: the test split's other prompts (QA, math): all benign, so ALLOW is right.
        maths, faqs: test examples whose answers are generated and scored.
        windows: held-out text windows for perplexity.
    """

    decisions: list[dict]
    train_decisions: list[dict]
    benign: list[dict]
    maths: list[dict]
    faqs: list[dict]
    windows: list[list[int]]
    #: The same requests with retrieved passages before the question (the runtime's prompt):
    #: decisions (a balanced sample), FAQ and reference QA; each row's ``passages`` lists its doc ids.
    decisions_rag: list[dict] = field(default_factory=list)
    faqs_rag: list[dict] = field(default_factory=list)
    refs: list[dict] = field(default_factory=list)
    refs_rag: list[dict] = field(default_factory=list)

    def steps(self) -> int:
        """Progress steps per artifact: scored prompts, generations (the decisions' ``判定`` lines too)
        and the stability run."""
        scored = len(self.decisions) + len(self.train_decisions) + len(self.benign) + len(self.decisions_rag)
        generated = len(self.maths) + len(self.faqs) + len(self.faqs_rag) + len(self.refs) + len(self.refs_rag)
        generated += len(self.decisions)
        return scored + len(self.faqs_rag) + generated + (1 if self.faqs else 0)


@dataclass
class ArtifactResult:
    """What evaluating one artifact gives: flat metrics, the details behind them and its speed."""

    name: str
    flat: dict[str, float]
    details: dict
    texts: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


def grounded_rows(rows: list[dict], grounder, tokenizer) -> list[dict]:
    """``rows`` with retrieved passages before each question, rendered as the runtime renders them.

    The passages are what the runtime's retriever returns for the question (nothing is left
    out: at serving time the answer is not known); ``passages`` keeps their doc ids.
    """
    from so8t.data.grounding import grounded_prompt
    from so8t.data.think_format import render

    out = []
    for r in rows:
        passages = grounder.relevant(r["prompt"])
        prompt_text = render(tokenizer, grounded_prompt(r["prompt"], passages), None)
        out.append(r | {"prompt_text": prompt_text, "passages": [d for d, _, _ in passages]})
    return out


def build_eval_sets(params, test: list[dict], train: list[dict], heldout: list[str], tokenizer, grounder) -> EvalSets:
    """Every test decision, a train sample, the benign test prompts, math, FAQ and reference QA, the
    held-out windows, and (with a ``grounder``) their grounded versions (``evaluate.rag_decision_sample``)."""
    from so8t.eval.inference import perplexity_windows

    e, m = params.evaluate, params.metrics
    faqs = first_of_task(test, Task.QA_FAQ, e.max_faq_examples)
    refs = first_of_task(test, Task.QA_REFERENCE, e.max_faq_examples)
    sets = EvalSets(
        decisions=balanced_decisions(test, None),
        train_decisions=balanced_decisions(train, e.train_decision_sample) if e.train_decision_sample else [],
        benign=[r for r in test if r["task"] != Task.DECISION.value],
        maths=first_of_task(test, Task.MATH, e.max_math_examples),
        faqs=faqs,
        windows=perplexity_windows(tokenizer, heldout, m.perplexity_max_tokens, m.perplexity_window),
        refs=refs,
    )
    if grounder is not None:
        sets.decisions_rag = grounded_rows(balanced_decisions(test, e.rag_decision_sample), grounder, tokenizer)
        sets.faqs_rag = grounded_rows(faqs, grounder, tokenizer)
        sets.refs_rag = grounded_rows(refs, grounder, tokenizer)
    return sets


def sets_for(art: Artifact, sets: EvalSets, extra_artifacts: list[str] | None) -> EvalSets:
    """What ``art`` is evaluated on: all of ``sets`` for the rows in ``extra_artifacts`` (``None``:
    every row), else the core set without the train sample and the with-passages sets."""
    if extra_artifacts is None or art.name in extra_artifacts:
        return sets
    return dataclasses.replace(sets, train_decisions=[], decisions_rag=[], faqs_rag=[], refs_rag=[])


def calibrate_artifact(backend: Backend, examples: list[dict], ece_bins: int, on_progress=None) -> dict:
    """Fit the decision temperature of one artifact on ``examples`` (Guo et al. 2017).

    Returns:
        The calibration summary (:func:`so8t.eval.calibration.calibration_summary`) with
        ``temperature`` (1.0 when the fit failed), ``converged``, ``at_bound``, ``iterations``
        and ``n``.
    """
    scored = score_decisions(backend, examples, on_progress)
    logits = np.array([r["logits"] for r in scored])
    labels = np.array([r["label"] for r in scored])
    fit = fit_temperature(logits, labels)
    summary = calibration_summary(logits, labels, fit.temperature, ece_bins)
    return summary | {"converged": fit.converged, "at_bound": fit.at_bound, "iterations": fit.iterations, "n": len(scored)}


def _generations(backend: Backend, rows: list[dict], budget: int, penalty: float, step) -> list[Generation]:
    """Answers after ``判定: ALLOW`` (as the runtime answers an allowed request)."""
    prompts = [backend.tokenize(answer_context(r["prompt_text"])) for r in rows]
    return backend.generate(prompts, budget, stop_strings(backend), penalty, step)


def evaluate_artifact(
    backend: Backend, art: Artifact, sets: EvalSets, params, calibration: dict, style: str, step=None
) -> ArtifactResult:
    """Decisions, perplexity, math, FAQ, stability and speed of one artifact on the test split.

    Args:
        calibration: this artifact's entry of ``reports/calibration.json`` (``temperature``,
            ``at_bound``), or ``{}`` (uncalibrated, T = 1).
    """
    e, g, m = params.evaluate, params.generation, params.metrics
    start = t0 = time.perf_counter()
    scored = score_decisions(backend, sets.decisions, step)
    decision_seconds = time.perf_counter() - t0
    dec = decision_metrics(scored, calibration.get("temperature", 1.0), m)
    t0 = time.perf_counter()
    lines = generated_decision_lines(backend, sets.decisions, e.decision_line_max_new_tokens, g.repetition_penalty, step)
    generated = generated_decision_metrics([x.text for x in lines], scored, style)
    line_seconds = time.perf_counter() - t0
    train = score_decisions(backend, sets.train_decisions, step) if sets.train_decisions else []
    benign = score_decisions(backend, sets.benign, step) if sets.benign else []
    ppl = perplexity_of(backend, sets.windows)
    math_gens = _generations(backend, sets.maths, e.math_max_new_tokens, g.repetition_penalty, step)
    faq_gens = _generations(backend, sets.faqs, e.faq_max_new_tokens, g.repetition_penalty, step)
    stab = stability_metrics(backend, sets.faqs[0], e.stability_max_new_tokens) if sets.faqs else None
    if step is not None and sets.faqs:
        step(1)
    mth = math_metrics(sets.maths, math_gens, style)
    faq = faq_metrics(sets.faqs, faq_gens, style)
    a = art.name
    rag = _rag_metrics(backend, sets, params, calibration.get("temperature", 1.0), style, step, scored, faq_gens)
    policy = policy_metrics(scored, calibration.get("temperature", 1.0), params.runtime.allow_threshold)
    flat = decision_flat(a, dec, calibration.get("at_bound")) | {
        keys.key(a, f"decision.{kind}.{label.lower()}_rate"): rate
        for kind in ("model", "policy") for label, rate in policy[kind].items()
    } | {keys.key(a, k): v for k, v in rag["flat"].items()} | {
        keys.key(a, keys.POLICY_MACRO_F1): policy["policy_macro_f1"],
        keys.key(a, keys.POLICY_ALLOW_RECALL): policy["allow_recall"],
        keys.key(a, keys.DECISION_GENERATED_AGREEMENT): generated["agreement"],
        keys.key(a, keys.DECISION_GENERATED_MACRO_F1): generated["macro_f1"],
        keys.key(a, keys.DECISION_GENERATED_UNPARSED): generated["unparsed_rate"],
        keys.key(a, keys.PERPLEXITY): ppl["perplexity"],
        keys.key(a, keys.MATH_EXACT_MATCH): mth["exact_match"],
        keys.key(a, keys.FAQ_CHRF): faq["chrf"],
        keys.key(a, keys.FAQ_BLEU): faq["bleu"],
        keys.key(a, keys.FAQ_ROUGE_L): faq["rouge_l"],
        keys.key(a, keys.FAQ_KEIGO_RATE): faq["keigo_rate"],
        keys.key(a, keys.SIZE_MB): art.size_bytes() / 1e6,
    }
    if train:
        flat[keys.key(a, keys.TRAIN_DECISION_N)] = len(train)
        flat[keys.key(a, keys.TRAIN_DECISION_MACRO_F1)] = classification_report(
            [DECISIONS[r["label"]] for r in train], [DECISIONS[r["pred"]] for r in train]
        )["macro_f1"]
    if benign:
        flat[keys.key(a, keys.BENIGN_ALLOW_RATE)] = float(np.mean([r["pred"] == 0 for r in benign]))
    if stab is not None:
        flat |= {
            keys.key(a, keys.STABILITY_REPEATED_NGRAM_RATE): stab["repeated_ngram_rate"],
            keys.key(a, keys.STABILITY_LONGEST_REPEATED_SPAN): stab["longest_repeated_span"],
            keys.key(a, keys.STABILITY_OSCILLATION): float(stab["oscillation"]),
        }
    rates = backend.stats.rates()
    speed = rag["speed"] | {
        keys.SECONDS_PER_REQUEST: decision_seconds / max(len(scored), 1),
        keys.SECONDS_PER_GENERATED_DECISION: line_seconds / max(len(lines), 1),
        keys.TOKENS_PER_S: rates["tokens_per_s"],
        keys.PROMPT_TOKENS_PER_S: rates["prompt_tokens_per_s"],
        keys.PERPLEXITY_TOKENS_PER_S: ppl["tokens"] / max(ppl["seconds"], 1e-9),
        keys.DECISIONS_PER_MINUTE: 60.0 * len(scored) / max(decision_seconds, 1e-9),
        keys.WALL_S: time.perf_counter() - start,
    }
    details = {
        "kind": art.kind,
        "path": str(art.path),
        "decision": dec,
        "decision_rag": rag["decision"],
        "policy": policy,
        "decision_generated": generated,
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
    texts = {ex["id"]: gen.text for ex, gen in zip(sets.maths + sets.faqs, math_gens + faq_gens)}
    return ArtifactResult(a, flat, details, texts, {r["id"]: DECISIONS[r["pred"]] for r in scored})


def decision_eval(
    tokenizer, val_rows: list[dict], n: int, batch_size: int, windows: list[list[int]] | None = None, m=None
):
    """A ``decision_eval`` hook for :func:`so8t.model.train.run_training`: accuracy and macro-F1 of
    ``n`` val decisions (balanced, spread over templates), scored as the evaluate stage scores them,
    and the held-out perplexity of ``windows`` (:func:`so8t.eval.inference.perplexity_of`, the
    evaluate stage's windows), so a sweep sees what the decisions cost general Japanese.

    Args:
        windows: token windows of held-out text (:func:`so8t.eval.inference.perplexity_windows`);
            ``None`` or empty: no perplexity.
        m: the ``metrics`` params section (``confidence``, ``bootstrap_resamples``): with it the
            macro-F1 gets its percentile bootstrap interval over the val decisions, as a test row's
            (:func:`so8t.eval.metrics.bootstrap_interval`); ``None``: no interval.

    Returns:
        ``model -> {"eval_decision_accuracy", "eval_decision_macro_f1", "eval_decision_n"}`` plus
        ``"eval_decision_macro_f1_ci_low"`` / ``"_ci_high"`` with ``m`` and ``"eval_heldout_perplexity"``
        with ``windows``; the model is put back in training mode afterwards.
    """
    import torch

    from so8t.eval.inference import HFBackend

    examples = balanced_decisions(val_rows, n)

    def run(model) -> dict[str, float]:
        if not examples:
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                backend = HFBackend.from_model(model, tokenizer, batch_size)
                scored = score_decisions(backend, examples)
                ppl = perplexity_of(backend, windows)["perplexity"] if windows else None
        finally:
            model.train(was_training)
        report = classification_report([DECISIONS[r["label"]] for r in scored], [DECISIONS[r["pred"]] for r in scored])
        out = {
            "eval_decision_accuracy": report["accuracy"],
            "eval_decision_macro_f1": report["macro_f1"],
            "eval_decision_n": len(scored),
        }
        if m is not None:
            labels = np.array([r["label"] for r in scored])
            preds = np.array([r["pred"] for r in scored])
            lo, hi = bootstrap_interval(macro_f1_indices(labels, preds), len(scored), m.confidence, m.bootstrap_resamples)
            out |= {"eval_decision_macro_f1_ci_low": lo, "eval_decision_macro_f1_ci_high": hi}
        return out | ({"eval_heldout_perplexity": ppl} if ppl is not None else {})

    return run


def chrf_comparison(bare: list[str], rag: list[str], refs: list[str], m) -> dict[str, float]:
    """chrF of the same examples answered without and with passages, and the paired gain.

    Args:
        bare, rag: final answers, one per reference, without / with retrieved passages.
        refs: the reference answers.
        m: the ``metrics`` params section (bootstrap confidence and resamples).

    Returns:
        ``chrf``, ``chrf_rag`` and ``chrf_rag_gain`` (rag − bare, chrF points on 0-100), each
        with ``*_ci_low`` / ``*_ci_high``: percentile bootstrap over examples with the two answers
        of one example kept paired (:func:`so8t.eval.metrics.bootstrap_interval` of
        :func:`so8t.eval.metrics.chrf_indices`). A gain whose interval contains 0 is no difference.
    """
    stat_bare, stat_rag = chrf_indices(bare, refs), chrf_indices(rag, refs)
    n, out = len(refs), {}
    stats = {
        "chrf": stat_bare,
        "chrf_rag": stat_rag,
        "chrf_rag_gain": lambda idx: stat_rag(idx) - stat_bare(idx),
    }
    for name, stat in stats.items():
        out[name] = stat(np.arange(n))
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_interval(stat, n, m.confidence, m.bootstrap_resamples)
    return out


def paired_gain(labels: np.ndarray, pred: np.ndarray, pred_ref: np.ndarray, m) -> dict[str, float]:
    """Macro-F1 of ``pred`` minus macro-F1 of ``pred_ref`` on the same examples, with a paired interval.

    Args:
        labels, pred, pred_ref: ``(N,)`` int label indices into ``DECISIONS`` (a prediction outside
            ``[0, 3)`` counts as wrong), one row per example, paired.
        m: the ``metrics`` params section (``confidence``, ``bootstrap_resamples``).

    Returns:
        ``{"gain", "ci_low", "ci_high"}`` in macro-F1 points (0-1 scale): the percentile bootstrap
        over examples (:func:`so8t.eval.metrics.bootstrap_interval`, Efron and Tibshirani 1993) where
        each resample scores both predictions on the same resampled indices, so the interval is that
        of the difference (Koehn 2004's paired bootstrap). A gain whose interval contains 0 is no
        difference; ``(nan, nan)`` for fewer than 2 examples.

    Raises:
        ValueError: the three arrays differ in length.
    """
    labels, pred, pred_ref = (np.asarray(x, dtype=np.int64) for x in (labels, pred, pred_ref))
    if not len(labels) == len(pred) == len(pred_ref):
        raise ValueError(f"paired_gain: {len(labels)} labels, {len(pred)} and {len(pred_ref)} predictions")
    f1, f1_ref = macro_f1_indices(labels, pred), macro_f1_indices(labels, pred_ref)

    def stat(idx):
        return f1(idx) - f1_ref(idx)

    lo, hi = bootstrap_interval(stat, len(labels), m.confidence, m.bootstrap_resamples)
    return {"gain": stat(np.arange(len(labels))) if len(labels) else float("nan"), "ci_low": lo, "ci_high": hi}


def load_probe(path: Path, enabled: bool) -> tuple[dict | None, str]:
    """The probe stage's result (``reports/probe.json``, :func:`so8t.eval.probe.run_probe`), or why not.

    Returns:
        ``(probe, "")`` with ``probe["predictions"]`` keyed by example id (``{id: {"label", "pred",
        "probs"}}``; the file holds them as a list), or ``(None, reason)`` when ``probe.enabled`` is
        false, the file is missing or it is the disabled marker.

    Raises:
        DataError: the file has no ``predictions`` list or ``probe.decision``, a prediction without
            ``id``, or an id twice (naming the file).
    """
    if not enabled:
        return None, "probe.enabled is false"
    if not path.is_file():
        return None, f"{path} is missing (run `dvc repro probe`)"
    probe = read_json(path)
    if not probe.get("enabled"):
        return None, f"{path} is the disabled marker (rerun `dvc repro probe`)"
    rows = probe.get("predictions")
    if not isinstance(rows, list) or "decision" not in probe.get(keys.PROBE, {}):
        raise DataError(f"{path}: no `predictions` list or `probe.decision` (rerun `dvc repro probe`)")
    by_id: dict[str, dict] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "id" not in r:
            raise DataError(f"{path}: predictions[{i}] has no `id` (rerun `dvc repro probe`)")
        if r["id"] in by_id:
            raise DataError(f"{path}: predictions list {r['id']!r} twice (rerun `dvc repro probe`)")
        by_id[r["id"]] = r
    return probe | {"predictions": by_id}, ""


def probe_comparison(results: dict[str, ArtifactResult], probe: dict, m, path: Path) -> tuple[dict, dict]:
    """Every row against the linear-probe baseline on the same test decisions.

    Args:
        results: the evaluated rows (their ``details["decision_rows"]``, scored test decisions).
        probe: :func:`load_probe`'s result (predictions keyed by id).
        m: the ``metrics`` params section.
        path: the probe file (named in errors).

    Returns:
        ``(flat, details)``: ``probe.decision.{n, macro_f1, macro_f1_ci_low, macro_f1_ci_high,
        accuracy, accuracy_ci_low, accuracy_ci_high}`` (the probe stage's test scores) and every row's
        ``<row>.decision.probe_gain`` with ``_ci_low`` / ``_ci_high`` (:func:`paired_gain` of the row's
        predictions and the probe's, paired by example id); details: the probe's chosen point.

    Raises:
        DataError: the probe has no prediction for a scored test decision, a prediction outside the
            labels, or a gold label that differs from the row's (a stale file).
    """
    preds = probe["predictions"]
    dec = probe[keys.PROBE]["decision"]
    flat = {keys.key(keys.PROBE, f"decision.{k}"): dec[k] for k in (
        "n", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    ) if k in dec}
    for name, r in results.items():
        rows = r.details["decision_rows"]
        missing = [x["id"] for x in rows if x["id"] not in preds]
        if missing:
            raise DataError(
                f"{path}: no probe prediction for {len(missing)} of the {len(rows)} test decisions "
                f"(e.g. {missing[:3]}); rerun `dvc repro probe`"
            )
        ref = []
        for x in rows:
            p = preds[x["id"]]
            if p.get("pred") not in DECISIONS or p.get("label") != DECISIONS[x["label"]]:
                raise DataError(
                    f"{path}: prediction of {x['id']!r} is {p.get('pred')!r} for gold {p.get('label')!r}, expected a "
                    f"label of {list(DECISIONS)} for gold {DECISIONS[x['label']]!r}; rerun `dvc repro probe`"
                )
            ref.append(DECISIONS.index(p["pred"]))
        g = paired_gain([x["label"] for x in rows], [x["pred"] for x in rows], ref, m)
        flat[keys.key(name, keys.DECISION_PROBE_GAIN)] = g["gain"]
        flat[keys.key(name, keys.DECISION_PROBE_GAIN_CI_LOW)] = g["ci_low"]
        flat[keys.key(name, keys.DECISION_PROBE_GAIN_CI_HIGH)] = g["ci_high"]
    details = {"source": str(path), "decision": dec} | {
        k: probe.get(k) for k in ("layer", "pooling", "C", "C_at_bound", "val_macro_f1", "n_train", "n_val", "n_test")
    }
    return flat, details


def _rag_metrics(
    backend: Backend, sets: EvalSets, params, temperature: float, style: str, step, scored_bare: list[dict],
    faq_gens: list[Generation],
) -> dict:
    """Decisions, FAQ and reference answers with retrieved passages, beside the bare scores.

    Args:
        scored_bare: the bare test decisions already scored (the rows of ``sets.decisions``).
        faq_gens: the bare FAQ answers already generated (``sets.faqs``).

    Returns:
        ``{"flat": {name: value} (``*_rag`` keys, the bare reference chrF and the paired chrF gains
        with intervals), "speed": seconds per decision request with passages, "decision": the RAG
        decision metrics}``.
    """
    e, g = params.evaluate, params.generation
    out: dict = {"flat": {}, "speed": {}, "decision": None}
    if sets.decisions_rag:
        t0 = time.perf_counter()
        scored = score_decisions(backend, sets.decisions_rag, step)
        out["speed"][keys.SECONDS_PER_REQUEST_RAG] = (time.perf_counter() - t0) / len(scored)
        dec = decision_metrics(scored, temperature, params.metrics)
        out["decision"] = dec
        out["flat"] |= {
            keys.DECISION_MACRO_F1_RAG: dec["macro_f1"],
            f"{keys.DECISION_MACRO_F1_RAG}_ci_low": dec["macro_f1_ci_low"],
            f"{keys.DECISION_MACRO_F1_RAG}_ci_high": dec["macro_f1_ci_high"],
            f"{keys.DECISION_N}_rag": dec["n"],
        }
        rag_ids = {r["id"] for r in sets.decisions_rag}
        plain = [r for r in scored_bare if r["id"] in rag_ids]
        out["flat"][f"{keys.DECISION_MACRO_F1}_same_sample"] = classification_report(
            [DECISIONS[r["label"]] for r in plain], [DECISIONS[r["pred"]] for r in plain]
        )["macro_f1"]
    for name, rows, rows_rag in (("faq", sets.faqs, sets.faqs_rag), ("reference", sets.refs, sets.refs_rag)):
        if not rows:
            continue
        bare = faq_gens if name == "faq" else _generations(backend, rows, e.faq_max_new_tokens, g.repetition_penalty, step)
        if not rows_rag:  # retrieval off: the bare reference answers only
            if name == "reference":
                out["flat"]["reference.chrf"] = faq_metrics(rows, bare, style)["chrf"]
            continue
        gens = _generations(backend, rows_rag, e.faq_max_new_tokens, g.repetition_penalty, step)
        cmp = chrf_comparison(
            [parse_assistant(x.text, style)[1] for x in bare],
            [parse_assistant(x.text, style)[1] for x in gens],
            [r["response"] for r in rows],
            params.metrics,
        )
        out["flat"] |= {f"{name}.{k}": v for k, v in cmp.items() if name == "reference" or k != "chrf"}
        if name == "faq":
            out["flat"][keys.FAQ_CITATION_RATE_RAG] = cited(rows_rag, score_decisions(backend, rows_rag, step))
    return out


def parity_metrics(results: dict[str, ArtifactResult]) -> dict[str, float]:
    """Greedy-text and decision agreement of every quantised GGUF with ``baked`` (its F16 GGUF) on
    every test example: what quantisation changes. (F16 against transformers: :func:`reference_parity`.)"""
    flat: dict[str, float] = {}
    ref = results.get("baked")
    if ref is None:
        return flat
    for name, r in results.items():
        if name not in ("base", "baked"):
            flat[keys.key(name, keys.PARITY_TEXT)] = parity(ref.texts, r.texts)
            flat[keys.key(name, keys.PARITY_DECISION)] = parity(ref.decisions, r.decisions)
    return flat


def parity_sample(sets: EvalSets, n_decisions: int, n_texts: int) -> tuple[list[dict], list[dict], list[dict]]:
    """The transformers reference sample: ``n_decisions`` test decisions (balanced over labels,
    spread over templates, :func:`balanced_decisions`), and the first ``n_texts`` generation
    prompts, half math and half FAQ (all of one when the other runs out).

    Returns:
        ``(decisions, maths, faqs)``.
    """
    decisions = balanced_decisions(sets.decisions, n_decisions) if n_decisions else []
    n_math = min(len(sets.maths), n_texts // 2)
    n_faq = min(len(sets.faqs), n_texts - n_math)
    n_math = min(len(sets.maths), n_texts - n_faq)
    return decisions, sets.maths[:n_math], sets.faqs[:n_faq]


def reference_parity(art: Artifact, gguf: ArtifactResult, sets: EvalSets, params, step=None) -> tuple[dict, dict]:
    """The F16 GGUF of ``art`` against its transformers float32 folder, on a sample.

    transformers (``art.hf_dir``, batches of ``generation.hf_batch_size``) scores the decisions
    and generates the greedy answers of :func:`parity_sample` (``evaluate.parity_decisions``,
    ``evaluate.parity_texts``, the same budgets and repetition penalty as the GGUF rows) and
    computes perplexity on every held-out window; the GGUF row's own results (``gguf``, scored on
    every example) are compared on the same ids.

    Returns:
        ``(flat, details)``: ``f16.parity.decision`` / ``.text`` (shares of identical labels / texts)
        with their ``_n``, ``f16.parity.perplexity_hf`` and ``f16.parity.perplexity_ratio`` (GGUF
        perplexity / transformers perplexity); details with the sampled ids and ``wall_s``.

    Raises:
        so8t.eval.inference.InferenceError: ``art.hf_dir`` is not a Hugging Face folder, or a prompt
            does not fit the model.
    """
    e, g = params.evaluate, params.generation
    t0 = time.perf_counter()
    decisions, maths, faqs = parity_sample(sets, e.parity_decisions, e.parity_texts)
    backend = open_backend(art.hf_dir, hf_batch_size=g.hf_batch_size, batch_size=g.batch_size)
    try:
        scored = score_decisions(backend, decisions, step) if decisions else []
        gens = _generations(backend, maths, e.math_max_new_tokens, g.repetition_penalty, step) if maths else []
        gens += _generations(backend, faqs, e.faq_max_new_tokens, g.repetition_penalty, step) if faqs else []
        ppl = perplexity_of(backend, sets.windows)
    finally:
        close_backend(backend)
    hf_decisions = {r["id"]: DECISIONS[r["pred"]] for r in scored}
    hf_texts = {ex["id"]: gen.text for ex, gen in zip(maths + faqs, gens)}
    gguf_ppl = gguf.flat.get(keys.key(gguf.name, keys.PERPLEXITY), float("nan"))
    k = lambda name: keys.key(keys.F16, name)  # noqa: E731
    flat = {
        k(keys.PARITY_DECISION): parity(hf_decisions, gguf.decisions),
        k(keys.PARITY_DECISION_N): len(hf_decisions),
        k(keys.PARITY_TEXT): parity(hf_texts, gguf.texts),
        k(keys.PARITY_TEXT_N): len(hf_texts),
        k(keys.PARITY_PERPLEXITY_HF): ppl["perplexity"],
        k(keys.PARITY_PERPLEXITY_RATIO): gguf_ppl / ppl["perplexity"],
    }
    details = {
        "reference": str(art.hf_dir),
        "compared_with": str(art.path),
        "decision_ids": sorted(hf_decisions),
        "text_ids": sorted(hf_texts),
        "texts_differing": sorted(i for i in hf_texts if hf_texts[i] != gguf.texts.get(i)),
        "perplexity": ppl,
        "wall_s": time.perf_counter() - t0,
    }
    return flat, details


def artifact_summary(art: Artifact, r: ArtifactResult) -> str:
    """One console line of an evaluated row: file, wall time, decisions, calibration, perplexity, chrF, speed."""
    get = lambda name: r.flat.get(keys.key(art.name, name), float("nan"))  # noqa: E731
    return (
        f"evaluate: {art.name} ({art.path.name}, {r.details['speed'].get(keys.WALL_S, float('nan')):.0f} s): macro-F1 "
        f"{get(keys.DECISION_MACRO_F1):.3f} [{get(keys.DECISION_MACRO_F1_CI_LOW):.3f}, "
        f"{get(keys.DECISION_MACRO_F1_CI_HIGH):.3f}] (n={get(keys.DECISION_N):.0f}), with passages "
        f"{get(keys.DECISION_MACRO_F1_RAG):.3f}; generated 判定 line = scored {get(keys.DECISION_GENERATED_AGREEMENT):.3f}; "
        f"policy answers {get(keys.POLICY_ALLOW_RECALL):.3f} of gold ALLOW; ECE {get(keys.DECISION_ECE):.3f} -> "
        f"{get(keys.DECISION_ECE_CALIBRATED):.3f}; ppl {get(keys.PERPLEXITY):.2f}; chrF {get(keys.FAQ_CHRF):.1f} "
        f"/ {get(keys.FAQ_CHRF_RAG):.1f}; speed {r.details['speed']}"
    )


def reference_summary(reference: tuple[dict, dict]) -> str:
    """One console line of :func:`reference_parity`'s result."""
    flat, details = reference
    m = lambda name: flat[keys.key(keys.F16, name)]  # noqa: E731
    return (
        f"evaluate: transformers reference ({details['wall_s']:.0f} s): the F16 GGUF agrees on "
        f"{m(keys.PARITY_DECISION):.3f} of {m(keys.PARITY_DECISION_N):.0f} decisions and {m(keys.PARITY_TEXT):.3f} of "
        f"{m(keys.PARITY_TEXT_N):.0f} greedy texts; perplexity {m(keys.PARITY_PERPLEXITY_HF):.2f} in transformers "
        f"(GGUF / transformers {m(keys.PARITY_PERPLEXITY_RATIO):.4f})"
    )


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_evaluation(
    out: Path, results: dict[str, ArtifactResult], threads: int, reference: tuple[dict, dict] | None = None,
    wall_s: float | None = None, probe: tuple[dict, dict] | None = None,
) -> dict[str, float]:
    """Write ``metrics.json`` (flat, rounded), ``eval/details.json``, ``performance/evaluate.json`` and the plots.

    Args:
        reference: :func:`reference_parity`'s ``(flat, details)``, or ``None`` (not run).
        wall_s: the stage's wall time (seconds), for the performance file.
        probe: :func:`probe_comparison`'s ``(flat, details)``, or ``None`` (no probe).

    Speed figures go to the performance file only: they vary from run to run, metrics do not.
    """
    flat: dict[str, float] = {}
    for r in results.values():
        flat |= r.flat
    flat |= parity_metrics(results)
    if reference is not None:
        flat |= reference[0]
    if probe is not None:
        flat |= probe[0]
    write_json(out / "metrics.json", {k: round(float(v), 6) for k, v in flat.items()})
    write_json(
        out / "eval" / "details.json",
        {"artifacts": {n: r.details for n, r in results.items()}} | ({"reference": reference[1]} if reference else {})
        | ({"probe": probe[1]} if probe else {}),
    )
    perf = {"threads": threads} | ({keys.WALL_S: round(wall_s, 1)} if wall_s is not None else {})
    perf |= {keys.key(n, k): round(float(v), 3) for n, r in results.items() for k, v in r.details["speed"].items()}
    if reference is not None:
        perf[keys.key("reference", keys.WALL_S)] = round(reference[1]["wall_s"], 1)
    write_json(out / "performance" / "evaluate.json", perf)
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
    "artifact_summary",
    "reference_summary",
    "EvalSets",
    "artifacts",
    "balanced_decisions",
    "build_eval_sets",
    "grounded_rows",
    "calibrate_artifact",
    "close_backend",
    "decision_eval",
    "decision_metrics",
    "evaluate_artifact",
    "faq_metrics",
    "first_of_task",
    "generated_decision_lines",
    "generated_decision_metrics",
    "load_probe",
    "paired_gain",
    "policy_metrics",
    "probe_comparison",
    "math_metrics",
    "open_artifact",
    "parity",
    "parity_metrics",
    "parity_sample",
    "reference_parity",
    "sets_for",
    "stability_metrics",
    "write_evaluation",
]
