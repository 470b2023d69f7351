"""The calibrate and evaluate stages' work on the artifacts, the training hook, console lines and writers.

The artifacts (:mod:`so8t.eval.artifacts`): ``base``, ``baked`` and every quantised GGUF, all run
through llama.cpp, the engine users run. Each is evaluated on the same eval sets
(:mod:`so8t.eval.evalsets`) by :func:`evaluate_artifact`, in named steps: the decisions, the
generated answers, the answers with retrieved passages, then the flat metrics
(:mod:`so8t.eval.task_metrics`) and the speed. transformers is the reference, run on a sample
(:func:`reference_parity`: the ``f16.parity.*`` keys); the rows are compared with each other and
with the linear probe in :mod:`so8t.eval.comparisons`. :func:`calibrate_artifact` fits an
artifact's decision temperature; :func:`decision_eval` is the training run's hook;
:func:`write_evaluation` writes ``reports/metrics.json`` (every key starts with the artifact name,
:mod:`so8t.eval.keys`), the details, the performance file and the plots.

All model work goes through :mod:`so8t.inference`: generation and scoring
are batched (``generation.batch_size``), greedy, with the repetition penalty of
``generation.repetition_penalty`` in every backend.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from so8t.data.think_format import parse_assistant
from so8t.decision import ALLOW_INDEX, answer_context
from so8t.eval import keys
from so8t.eval.artifacts import Artifact, ArtifactResult, close_backend
from so8t.eval.calibration import calibration_summary, fit_temperature
from so8t.eval.comparisons import chrf_comparison, parity, parity_metrics, parity_sample
from so8t.eval.evalsets import EvalSets, balanced_decisions
from so8t.inference import (
    Backend,
    Generation,
    open_backend,
    perplexity_of,
    score_decisions,
    stop_strings,
)
from so8t.eval.metrics import bootstrap_interval, classification_report, macro_f1_indices
from so8t.eval.task_metrics import (
    cited,
    decision_flat,
    decision_metrics,
    faq_metrics,
    generated_decision_lines,
    generated_decision_metrics,
    math_metrics,
    policy_metrics,
    stability_metrics,
)
from so8t.io import write_json, write_text
from so8t.schema import DECISIONS

# --------------------------------------------------------------------------- calibrate


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


# --------------------------------------------------------------------------- evaluate


def evaluate_artifact(
    backend: Backend, art: Artifact, sets: EvalSets, params, calibration: dict, style: str, step=None
) -> ArtifactResult:
    """Decisions, perplexity, math, FAQ, stability and speed of one artifact on the test split.

    The steps, in this order on the backend: :func:`_decision_step` (the decisions scored and their
    generated lines), :func:`_generation_step` (perplexity, math and FAQ answers, stability),
    :func:`_rag_metrics` (the same with retrieved passages); then the runtime policy, the flat
    metrics (:func:`_artifact_flat`) and the speed (:func:`_artifact_speed`).

    Args:
        calibration: this artifact's entry of ``reports/calibration.json`` (``temperature``,
            ``at_bound``), or ``{}`` (uncalibrated, T = 1).
    """
    start = time.perf_counter()
    temperature = calibration.get("temperature", 1.0)
    dec = _decision_step(backend, sets, params, temperature, style, step)
    gen = _generation_step(backend, sets, params, style, step)
    rag = _rag_metrics(backend, sets, params, temperature, style, step, dec["scored"], gen["faq_gens"])
    policy = policy_metrics(dec["scored"], temperature, params.runtime.allow_threshold)
    flat = _artifact_flat(art, dec, gen, rag, policy, calibration.get("at_bound"))
    details = {
        "kind": art.kind,
        "path": str(art.path),
        "decision": dec["decision"],
        "decision_rag": rag["decision"],
        "policy": policy,
        "decision_generated": dec["generated"],
        "perplexity": gen["perplexity"],
        "math": gen["math"],
        "faq": gen["faq"],
        "stability": gen["stability"],
        "speed": _artifact_speed(backend, dec, gen, rag, start),
        "decision_rows": dec["scored"],
        "samples": [
            {"id": ex["id"], "prompt": ex["prompt"], "reference": ex["response"], "output": g.text}
            for ex, g in zip(sets.faqs, gen["faq_gens"])
        ],
    }
    texts = {ex["id"]: g.text for ex, g in zip(sets.maths + sets.faqs, gen["math_gens"] + gen["faq_gens"])}
    return ArtifactResult(art.name, flat, details, texts, {r["id"]: DECISIONS[r["pred"]] for r in dec["scored"]})


def _decision_step(backend: Backend, sets: EvalSets, params, temperature: float, style: str, step) -> dict:
    """The decision work of :func:`evaluate_artifact`: the test decisions scored (timed) and their
    metrics, their generated ``判定`` lines (timed) against the scored labels, then the train sample
    and the benign prompts scored.

    Returns:
        ``{"scored" (the test decisions' rows), "decision" (:func:`so8t.eval.task_metrics.decision_metrics`),
        "lines" (the generated lines), "generated" (:func:`so8t.eval.task_metrics.generated_decision_metrics`),
        "decision_seconds", "line_seconds", "train", "benign" (scored rows; ``[]`` for an empty set)}``.
    """
    e, g = params.evaluate, params.generation
    t0 = time.perf_counter()
    scored = score_decisions(backend, sets.decisions, step)
    decision_seconds = time.perf_counter() - t0
    dec = decision_metrics(scored, temperature, params.metrics)
    t0 = time.perf_counter()
    lines = generated_decision_lines(backend, sets.decisions, e.decision_line_max_new_tokens, g.repetition_penalty, step)
    generated = generated_decision_metrics([x.text for x in lines], scored, style)
    line_seconds = time.perf_counter() - t0
    train = score_decisions(backend, sets.train_decisions, step) if sets.train_decisions else []
    benign = score_decisions(backend, sets.benign, step) if sets.benign else []
    return {
        "scored": scored,
        "decision": dec,
        "lines": lines,
        "generated": generated,
        "decision_seconds": decision_seconds,
        "line_seconds": line_seconds,
        "train": train,
        "benign": benign,
    }


def _generation_step(backend: Backend, sets: EvalSets, params, style: str, step) -> dict:
    """The generation work of :func:`evaluate_artifact`: held-out perplexity, the math and FAQ
    answers (after ``判定: ALLOW``) and their metrics, and the stability run on the first FAQ.

    Returns:
        ``{"perplexity", "math_gens", "faq_gens", "stability" (``None`` without FAQ), "math", "faq"}``.
    """
    e, g = params.evaluate, params.generation
    ppl = perplexity_of(backend, sets.windows)
    math_gens = _generations(backend, sets.maths, e.math_max_new_tokens, g.repetition_penalty, step)
    faq_gens = _generations(backend, sets.faqs, e.faq_max_new_tokens, g.repetition_penalty, step)
    stab = stability_metrics(backend, sets.faqs[0], e.stability_max_new_tokens) if sets.faqs else None
    if step is not None and sets.faqs:
        step(1)
    return {
        "perplexity": ppl,
        "math_gens": math_gens,
        "faq_gens": faq_gens,
        "stability": stab,
        "math": math_metrics(sets.maths, math_gens, style),
        "faq": faq_metrics(sets.faqs, faq_gens, style),
    }


def _artifact_flat(
    art: Artifact, dec: dict, gen: dict, rag: dict, policy: dict, at_bound: bool | None
) -> dict[str, float]:
    """The flat ``reports/metrics.json`` keys of one artifact, from :func:`evaluate_artifact`'s steps.

    Args:
        dec, gen, rag: the results of :func:`_decision_step`, :func:`_generation_step` and :func:`_rag_metrics`.
        policy: :func:`so8t.eval.task_metrics.policy_metrics` of the scored test decisions.
        at_bound: the calibration's ``at_bound`` (``None``: uncalibrated, no key).
    """
    a = art.name
    generated, ppl, mth, faq = dec["generated"], gen["perplexity"], gen["math"], gen["faq"]
    flat = decision_flat(a, dec["decision"], at_bound) | {
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
    train, benign, stab = dec["train"], dec["benign"], gen["stability"]
    if train:
        flat[keys.key(a, keys.TRAIN_DECISION_N)] = len(train)
        flat[keys.key(a, keys.TRAIN_DECISION_MACRO_F1)] = classification_report(
            [DECISIONS[r["label"]] for r in train], [DECISIONS[r["pred"]] for r in train]
        )["macro_f1"]
    if benign:
        flat[keys.key(a, keys.BENIGN_ALLOW_RATE)] = float(np.mean([r["pred"] == ALLOW_INDEX for r in benign]))
    if stab is not None:
        flat |= {
            keys.key(a, keys.STABILITY_REPEATED_NGRAM_RATE): stab["repeated_ngram_rate"],
            keys.key(a, keys.STABILITY_LONGEST_REPEATED_SPAN): stab["longest_repeated_span"],
            keys.key(a, keys.STABILITY_OSCILLATION): float(stab["oscillation"]),
        }
    return flat


def _artifact_speed(backend: Backend, dec: dict, gen: dict, rag: dict, start: float) -> dict[str, float]:
    """Speed of one artifact (the performance file only; it varies from run to run): seconds per
    decision request and per generated line, the backend's token rates, perplexity tokens/s,
    decisions per minute, and the wall time since ``start``."""
    scored, ppl = dec["scored"], gen["perplexity"]
    rates = backend.stats.rates()
    return rag["speed"] | {
        keys.SECONDS_PER_REQUEST: dec["decision_seconds"] / max(len(scored), 1),
        keys.SECONDS_PER_GENERATED_DECISION: dec["line_seconds"] / max(len(dec["lines"]), 1),
        keys.TOKENS_PER_S: rates["tokens_per_s"],
        keys.PROMPT_TOKENS_PER_S: rates["prompt_tokens_per_s"],
        keys.PERPLEXITY_TOKENS_PER_S: ppl["tokens"] / max(ppl["seconds"], 1e-9),
        keys.DECISIONS_PER_MINUTE: 60.0 * len(scored) / max(dec["decision_seconds"], 1e-9),
        keys.WALL_S: time.perf_counter() - start,
    }


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


# --------------------------------------------------------------------------- the transformers reference


def reference_parity(art: Artifact, gguf: ArtifactResult, sets: EvalSets, params, step=None) -> tuple[dict, dict]:
    """The F16 GGUF of ``art`` against its transformers float32 folder, on a sample.

    transformers (``art.hf_dir``, batches of ``generation.hf_batch_size``) scores the decisions
    and generates the greedy answers of :func:`so8t.eval.comparisons.parity_sample` (``evaluate.parity_decisions``,
    ``evaluate.parity_texts``, the same budgets and repetition penalty as the GGUF rows) and
    computes perplexity on every held-out window; the GGUF row's own results (``gguf``, scored on
    every example) are compared on the same ids.

    Returns:
        ``(flat, details)``: ``f16.parity.decision`` / ``.text`` (shares of identical labels / texts)
        with their ``_n``, ``f16.parity.perplexity_hf`` and ``f16.parity.perplexity_ratio`` (GGUF
        perplexity / transformers perplexity); details with the sampled ids and ``wall_s``.

    Raises:
        so8t.inference.InferenceError: ``art.hf_dir`` is not a Hugging Face folder, or a prompt
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


# --------------------------------------------------------------------------- the training hook


def decision_eval(
    tokenizer, val_rows: list[dict], n: int, batch_size: int, windows: list[list[int]] | None = None, m=None
):
    """A ``decision_eval`` hook for :func:`so8t.model.train.run_training`: accuracy and macro-F1 of
    ``n`` val decisions (balanced, spread over templates), scored as the evaluate stage scores them,
    and the held-out perplexity of ``windows`` (:func:`so8t.inference.perplexity_of`, the
    evaluate stage's windows), so a sweep sees what the decisions cost general Japanese.

    Args:
        windows: token windows of held-out text (:func:`so8t.inference.perplexity_windows`);
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

    from so8t.inference import HFBackend

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


# --------------------------------------------------------------------------- console lines and writers


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
    wall_s: float | None = None, probe: tuple[dict, dict] | None = None, served: tuple[dict, dict] | None = None,
) -> dict[str, float]:
    """Write ``metrics.json`` (flat, rounded), ``eval/details.json``, ``performance/evaluate.json`` and the plots.

    Args:
        reference: :func:`reference_parity`'s ``(flat, details)``, or ``None`` (not run).
        wall_s: the stage's wall time (seconds), for the performance file.
        probe: :func:`so8t.eval.comparisons.probe_comparison`'s ``(flat, details)``, or ``None`` (no probe).
        served: :func:`so8t.eval.served.evaluate_served`'s ``(flat, details)``, or ``None`` (not run).

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
    if served is not None:
        flat |= served[0]
    write_json(out / "metrics.json", {k: round(float(v), 6) for k, v in flat.items()})
    write_json(
        out / "eval" / "details.json",
        {"artifacts": {n: r.details for n, r in results.items()}} | ({"reference": reference[1]} if reference else {})
        | ({"probe": probe[1]} if probe else {}) | ({"served": served[1]} if served else {}),
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
    "artifact_summary",
    "calibrate_artifact",
    "decision_eval",
    "evaluate_artifact",
    "reference_parity",
    "reference_summary",
    "write_evaluation",
]
