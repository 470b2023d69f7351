"""The run report: ``reports/report.md`` with PNG figures (:mod:`so8t.eval.figures`).

Sections: run summary, data card, training curve, headline metrics with deltas
against the base model, calibration (reliability diagram), decisions
(confusion matrix), bake exactness, GGUF files (size, bits per weight, K-quant
fallbacks, size/perplexity trade-off) and sample generations side by side.
Every number comes from an artifact a stage wrote; nothing is recomputed here.

:func:`to_html` turns the Markdown into a self-contained ``reports/report.html``
(Python-Markdown with the tables extension; figures embedded as data URIs).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from so8t.eval import keys
from so8t.eval.figures import plot_confusion, plot_reliability, plot_training, plot_tradeoff
from so8t.schema import DECISIONS

#: Headline rows: (label, metric name (:mod:`so8t.eval.keys`), higher is better, format).
HEADLINE: list[tuple[str, str, bool, str]] = [
    ("Decisions scored", keys.DECISION_N, True, "{:.0f}"),
    ("Decision accuracy", keys.DECISION_ACCURACY, True, "{:.3f}"),
    ("Decision macro-F1", keys.DECISION_MACRO_F1, True, "{:.3f}"),
    ("Decision macro-F1, 95% interval low", keys.DECISION_MACRO_F1_CI_LOW, True, "{:.3f}"),
    ("Decision macro-F1, 95% interval high", keys.DECISION_MACRO_F1_CI_HIGH, True, "{:.3f}"),
    ("Decision macro-F1 on train (sample)", keys.TRAIN_DECISION_MACRO_F1, True, "{:.3f}"),
    ("Decision macro-F1 − linear probe (paired)", keys.DECISION_PROBE_GAIN, True, "{:.3f}"),
    ("Generated 判定 line = scored label", keys.DECISION_GENERATED_AGREEMENT, True, "{:.3f}"),
    ("Generated 判定 line macro-F1", keys.DECISION_GENERATED_MACRO_F1, True, "{:.3f}"),
    ("Gold-ALLOW requests the policy answers", keys.POLICY_ALLOW_RECALL, True, "{:.3f}"),
    ("Benign requests decided ALLOW", keys.BENIGN_ALLOW_RATE, True, "{:.3f}"),
    ("ECE (15 bins)", keys.DECISION_ECE, False, "{:.3f}"),
    ("ECE, calibrated", keys.DECISION_ECE_CALIBRATED, False, "{:.3f}"),
    ("ECE, calibrated, 95% interval high", keys.DECISION_ECE_CALIBRATED_CI_HIGH, False, "{:.3f}"),
    ("Temperature T (1 = fit failed or uncalibrated)", keys.DECISION_TEMPERATURE, False, "{:.3f}"),
    ("Brier", keys.DECISION_BRIER, False, "{:.3f}"),
    ("NLL", keys.DECISION_NLL, False, "{:.3f}"),
    ("Perplexity (held-out ja)", keys.PERPLEXITY, False, "{:.2f}"),
    ("Math exact match", keys.MATH_EXACT_MATCH, True, "{:.3f}"),
    ("FAQ chrF", keys.FAQ_CHRF, True, "{:.1f}"),
    ("FAQ BLEU (ja-mecab)", keys.FAQ_BLEU, True, "{:.1f}"),
    ("FAQ ROUGE-L", keys.FAQ_ROUGE_L, True, "{:.3f}"),
    ("Keigo rate", keys.FAQ_KEIGO_RATE, True, "{:.2f}"),
    ("Repeated 4-gram rate (long greedy generation)", keys.STABILITY_REPEATED_NGRAM_RATE, False, "{:.2f}"),
    ("Longest repeated span (tokens)", keys.STABILITY_LONGEST_REPEATED_SPAN, False, "{:.0f}"),
    ("Same greedy text as the reference runtime", keys.PARITY_TEXT, True, "{:.2f}"),
    ("Same decision as the reference runtime", keys.PARITY_DECISION, True, "{:.2f}"),
    ("Generation tokens/s", keys.TOKENS_PER_S, True, "{:.1f}"),
    ("Prompt tokens/s", keys.PROMPT_TOKENS_PER_S, True, "{:.0f}"),
    ("Decisions per minute", keys.DECISIONS_PER_MINUTE, True, "{:.0f}"),
    ("Evaluation wall time (s)", keys.WALL_S, False, "{:.0f}"),
    ("Size (MB)", keys.SIZE_MB, False, "{:.0f}"),
]


@dataclass
class ReportInputs:
    """Everything the report reads (loaded JSON/TSV contents)."""

    metrics: dict[str, float]
    details: dict
    calibration: dict
    manifest: dict
    synth_stats: dict
    format_stats: dict
    train_summary: dict
    train_history: dict[str, list[tuple[float, float]]]
    bake_report: dict
    quantize_report: dict
    #: ``reports/distill.json`` (flat metrics of the distill stage), or ``None`` / ``{"enabled": False}``.
    distill: dict | None = None
    #: ``reports/performance/<stage>.json`` by stage: wall times, tokens/s, memory (vary run to run).
    performance: dict = field(default_factory=dict)


def read_dvclive_series(folder: Path, names: list[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` from dvclive's ``plots/metrics`` TSV files.

    A metric in a subfolder (dvclive writes Trainer's ``eval_x`` as ``eval/x.tsv``) is named
    with ``_`` for ``/`` (``eval_x``). ``names``: the metrics to read (``None``: all there are).
    """
    out = {}
    files = {str(p.relative_to(folder).with_suffix("")).replace("/", "_"): p for p in folder.rglob("*.tsv")} if folder.is_dir() else {}
    for name in names if names is not None else sorted(files):
        path = files.get(name)
        if path is None:
            continue
        with open(path, encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        column = path.stem
        out[name] = [(float(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
    return out


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def _delta(value: float | None, base: float | None, higher_better: bool, fmt: str) -> str:
    if value is None or base is None or any(map(math.isnan, (value, base))):
        return ""
    d = value - base
    if abs(d) < 1e-12:
        return " (=)"
    better = (d > 0) == higher_better
    arrow = "▲" if d > 0 else "▼"
    mark = "better" if better else "worse"
    return f" ({arrow}{fmt.format(abs(d))}, {mark})"


def headline_table(metrics: dict[str, float], names: list[str]) -> str:
    """Markdown table: one row per headline metric, one column per artifact, deltas vs ``base``."""
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, suffix, higher, fmt in HEADLINE:
        base = metrics.get(f"base.{suffix}")
        cells = []
        for n in names:
            v = metrics.get(f"{n}.{suffix}")
            cells.append(_fmt(v, fmt) + ("" if n == "base" else _delta(v, base, higher, fmt)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Rows of the distillation table: (label, key suffix, format).
DISTILL_ROWS: list[tuple[str, str, str]] = [
    ("Size (MB)", keys.SIZE_MB, "{:.0f}"),
    ("Parameters (M)", keys.PARAMETERS, "{:.0f}"),
    ("Generation tokens/s", keys.TOKENS_PER_S, "{:.1f}"),
    ("Prompt tokens/s", keys.PROMPT_TOKENS_PER_S, "{:.0f}"),
    ("Held-out perplexity", keys.PERPLEXITY, "{:.2f}"),
    ("Decision macro-F1", keys.DECISION_MACRO_F1, "{:.3f}"),
    ("Top-1 agreement with the teacher", keys.AGREEMENT_TOP1, "{:.3f}"),
    ("Mean KL(teacher ‖ model), nats", keys.AGREEMENT_KL, "{:.3f}"),
]


def distill_table(d: dict) -> str:
    """Teacher vs student vs base (all GGUF in llama.cpp) from the flat ``reports/distill.json``.

    Missing values (e.g. the teacher's agreement with itself) are shown as ``—``.
    """
    names = ("teacher", "student", "base")
    rows = []
    for label, key, fmt in DISTILL_ROWS:
        cells = []
        for n in names:
            v = d.get(keys.key(n, key))
            if v is None:
                cells.append("—")
            else:
                cells.append(fmt.format(v / 1e6 if key == keys.PARAMETERS else v))
        rows.append([label, *cells])
    return _table(["metric", *names], rows)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    t = " ".join(text.split()).replace("|", "\\|")
    return t if len(t) <= limit else t[:limit] + "…"


def _run_summary(inp: ReportInputs, params_diff: dict[str, tuple]) -> list[str]:
    ts, perf = inp.train_summary, inp.performance.get("train", {})
    out = ["## Run summary", ""]
    out.append(
        f"- Training: {ts.get('steps')} steps in {perf.get('train_seconds')} s "
        f"({perf.get('seconds_per_step')} s/step, {perf.get('tokens_per_s', 'n/a')} tokens/s, "
        f"peak RSS {(perf.get('peak_rss_bytes') or 0) / 1e9:.1f} GB), final train loss "
        f"{ts.get('final_train_loss', 0):.3f}; trainable parameters {ts.get('trainable_parameters')}"
    )
    if params_diff:
        out.append("- Parameters that differ from the defaults: " + ", ".join(
            f"`{k}` = {v[0]!r} (default {v[1]!r})" for k, v in sorted(params_diff.items())
        ))
    else:
        out.append("- All parameters at their defaults.")
    out.append(f"- Evaluation threads: {inp.performance.get('evaluate', {}).get('threads')}")
    return out


def _data_section(inp: ReportInputs) -> list[str]:
    out = ["## Data card", ""]
    rows = [
        [s["name"], s.get("kind"), s.get("version"), s.get("licence"), s.get("records"), s.get("chars")]
        for s in inp.manifest.get("sources", [])
    ]
    out.append(_table(["source", "kind", "version", "licence", "records", "characters"], rows))
    st = inp.synth_stats
    out += ["", "- Synthesised records by task: " + ", ".join(f"{k} {v}" for k, v in st.get("by_task", {}).items())]
    out.append("- Decisions by label: " + ", ".join(f"{k} {v}" for k, v in st.get("by_decision", {}).items()))
    out.append("- Decisions by domain: " + ", ".join(f"{k} {v}" for k, v in st.get("by_domain", {}).items()))
    fs = inp.format_stats
    split_rows = [
        [s, d["examples"], d["groups"], d["by_task"], d["by_decision"]] for s, d in fs.get("splits", {}).items()
    ]
    out += ["", _table(["split", "examples", "groups", "by task", "by decision"], split_rows)]
    out.append(
        f"\nChat-template style `{fs.get('style')}`, max length {fs.get('max_length')} tokens; "
        f"reasoning shortened: {fs.get('shortened') or 0}, dropped: {fs.get('dropped') or 0}."
    )
    lens = fs.get("token_lengths", {})
    out += ["", _table(["task", "count", "min", "mean", "p95", "max"], [
        [t, v["count"], v["min"], f"{v['mean']:.1f}", f"{v['p95']:.1f}", v["max"]] for t, v in lens.items()
    ])]
    return out


def _calibration_section(inp: ReportInputs, figures: dict[str, str]) -> list[str]:
    out = ["## Calibration (temperature scaling, fitted on val)", ""]
    cal_rows = []
    for n, c in inp.calibration.get("artifacts", {}).items():
        cal_rows.append([
            n, f"{c['temperature']:.3f}", f"{c['ece_before']:.3f} → {c['ece_after']:.3f}",
            f"{c['brier_before']:.3f} → {c['brier_after']:.3f}", f"{c['nll_before']:.3f} → {c['nll_after']:.3f}",
            c.get("converged"),
        ])
    out.append(_table(["artifact", "T", "ECE (val)", "Brier (val)", "NLL (val)", "converged"], cal_rows))
    out += ["", f"![reliability diagram]({figures['reliability']})", ""]
    return out


def _ci(d: dict, name: str, fmt: str = "{:.3f}") -> str:
    value, lo, hi = d.get(name), d.get(f"{name}_ci_low"), d.get(f"{name}_ci_high")
    if value is None:
        return "—"
    return fmt.format(value) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None and hi is not None else "")


def _row_metrics(metrics: dict[str, float], n: str) -> dict[str, float]:
    """The flat metrics of row ``n`` without its prefix (``decision.macro_f1``...)."""
    return {k[len(n) + 1:]: v for k, v in metrics.items() if k.startswith(f"{n}.")}


def probe_row(probe: dict | None) -> list | None:
    """The linear probe's cells of the decision table (:func:`decision_table`), or ``None`` without a probe."""
    if not probe:
        return None
    dec = probe["decision"]
    edge = ", C on the edge of the values tried: not bracketed" if probe.get("C_at_bound") else ""
    point = f"layer {probe.get('layer')}, {probe.get('pooling')}, C={probe.get('C')}{edge}"
    return [f"{keys.PROBE} (base, linear; {point})", dec["n"], _ci(dec, "macro_f1"), _ci(dec, "accuracy"),
            "—", "—", "—", "—", "—", "—", "—"]


def decision_table(inp: ReportInputs, names: list[str]) -> str:
    """One row per artifact (and the linear probe): macro-F1 and accuracy with intervals, calibration,
    the paired gain over the probe, the generated ``判定`` line against the scored label."""
    rows = []
    for n in names:
        dec = inp.details["artifacts"][n]["decision"]
        cal = inp.calibration.get("artifacts", {}).get(n, {})
        flat = _row_metrics(inp.metrics, n)
        t = f"{dec['temperature']:.3f}" + (" (fit failed: on a bound)" if cal.get("at_bound") else "")
        unparsed = flat.get(keys.DECISION_GENERATED_UNPARSED)
        rows.append([
            n, dec["n"], _ci(dec, "macro_f1"), _ci(dec, "accuracy"), _ci(dec, "ece_calibrated"), t,
            _fmt(flat.get(keys.TRAIN_DECISION_MACRO_F1), "{:.3f}"),
            _fmt(flat.get(keys.BENIGN_ALLOW_RATE), "{:.3f}"),
            _ci(flat, keys.DECISION_PROBE_GAIN, "{:+.3f}"),
            _fmt(flat.get(keys.DECISION_GENERATED_AGREEMENT), "{:.3f}"),
            _fmt(flat.get(keys.DECISION_GENERATED_MACRO_F1), "{:.3f}")
            + (f" ({_fmt(unparsed, '{:.2f}')} no label)" if unparsed else ""),
        ])
    probe = probe_row(inp.details.get("probe"))
    if probe is not None:
        rows.append(probe)
    return _table(
        ["artifact", "n", "macro-F1 [95% CI]", "accuracy [95% CI]", "ECE calibrated [95% CI]", "T",
         "train macro-F1", "benign → ALLOW", "− probe [95% CI]", "generated = scored", "generated macro-F1"], rows)


def _decision_section(inp: ReportInputs, figures: dict[str, str], names: list[str]) -> list[str]:
    out = ["## Decisions", ""]
    out.append(
        "Each label's score is the log-likelihood of `判定: L` right after the prompt (the model states its "
        "decision before any reasoning), `p = softmax(z / T)` with the temperature fitted on val; the runtime "
        "uses the same numbers. Every test decision is scored; templates of the test split never occur in "
        "training. Intervals: 95% percentile bootstrap over examples. `probe`: logistic regression on the frozen "
        "base model's hidden states of the same prompts (fitted on train, layer / pooling / C chosen on val); "
        "`− probe`: the row's macro-F1 minus the probe's on the same test decisions, paired bootstrap interval "
        "(one that holds 0 is no difference). `generated = scored`: share of test decisions whose greedy "
        "`判定: X` line names the scored label; its macro-F1 counts a line without a label as wrong."
    )
    out.append(decision_table(inp, names))
    for group, title in (("by_domain", "Accuracy by domain"), ("by_category", "Accuracy by policy category")):
        values = sorted({v for n in names for v in inp.details["artifacts"][n]["decision"].get(group, {})})
        if values:
            out += ["", f"**{title}** (n per cell in brackets)", ""]
            out.append(_table(["artifact", *values], [
                [n] + [
                    f"{g['accuracy']:.2f} ({g['n']})" if (g := inp.details["artifacts"][n]["decision"][group].get(v)) else "—"
                    for v in values
                ]
                for n in names
            ]))
    out += ["", f"![confusion matrix]({figures['confusion']})", ""]
    pc_rows = []
    for n in names:
        dec = inp.details["artifacts"][n]["decision"]
        pc_rows.append([n] + [
            f"P {dec['per_class'][lab]['precision']:.2f} / R {dec['per_class'][lab]['recall']:.2f}" for lab in DECISIONS
        ])
    probe = (inp.details.get("probe") or {}).get("decision", {})
    if probe.get("per_class"):
        pc_rows.append([keys.PROBE] + [
            f"P {probe['per_class'][lab]['precision']:.2f} / R {probe['per_class'][lab]['recall']:.2f}"
            for lab in DECISIONS
        ])
    out.append(_table(["artifact", *DECISIONS], pc_rows))
    return out


def _policy_section(inp: ReportInputs, names: list[str]) -> list[str]:
    """The model's label beside the runtime policy's (ALLOW below ``runtime.allow_threshold`` → ESCALATION)."""
    rows = []
    for n in names:
        pol = inp.details["artifacts"][n].get("policy")
        if not pol:
            continue
        rows.append([
            n,
            " / ".join(f"{pol['model'].get(lab, 0.0):.2f}" for lab in DECISIONS),
            " / ".join(f"{pol['policy'].get(lab, 0.0):.2f}" for lab in DECISIONS),
            f"{pol['overridden']:.2f}",
            _fmt(inp.metrics.get(keys.key(n, keys.DECISION_MACRO_F1)), "{:.3f}"),
            _fmt(pol.get("policy_macro_f1"), "{:.3f}"),
            _fmt(pol.get("allow_recall"), "{:.3f}"),
        ])
    if not rows:
        return []
    labels = " / ".join(DECISIONS)
    return [
        "### The runtime policy",
        "",
        (
            "Share of test decisions given each label by the model (argmax) and by the runtime policy, which "
            "turns an ALLOW whose calibrated probability is below `runtime.allow_threshold` into ESCALATION. "
            "A calibration that never reaches the threshold shows here as an ALLOW rate of 0 for the policy. "
            "Gold ALLOW answered: share of the gold-ALLOW test requests the policy answers (its label is ALLOW)."
        ),
        "",
        _table(["artifact", f"model {labels}", f"policy {labels}", "changed by policy", "model macro-F1",
                "policy macro-F1", "gold ALLOW answered"], rows),
        "",
    ] + _served_policy_lines(inp)


def _served_policy_lines(inp: ReportInputs) -> list[str]:
    """The gold-ALLOW test requests through the runtime path on the served artifact (``served.policy.*``)."""
    m, served = inp.metrics, inp.details.get("served")
    if not served or "served.policy.allow_recall" not in m:
        return []
    overrides = ", ".join(
        f"{k.rsplit('.', 1)[1]} {int(v)}" for k, v in sorted(m.items()) if k.startswith("served.policy.override.")
    )
    return [
        (
            f"**After generation** (the runtime path on the served `{served['artifact']}`, "
            f"{'with' if served.get('with_passages') else 'without'} retrieved passages): of "
            f"{int(m['served.policy.allow_n'])} gold-ALLOW test requests, "
            f"{m['served.policy.allow_recall_before']:.3f} are answered before generation and "
            f"{_ci(_row_metrics(m, 'served.policy'), 'allow_recall')} end as an answer; "
            f"the runtime's overrides: {overrides}."
        ),
        "",
    ]


def _retrieval_section(inp: ReportInputs, names: list[str]) -> list[str]:
    """Bare prompt vs the runtime's grounded prompt (retrieved passages before the question)."""
    m = inp.metrics

    def ci(n: str, name: str, fmt: str) -> str:
        return _ci({k[len(n) + 1:]: v for k, v in m.items() if k.startswith(f"{n}.{name}")}, name, fmt)

    rows = []
    for n in names:
        if keys.key(n, keys.DECISION_MACRO_F1_RAG) not in m:
            continue
        rows.append([
            n,
            _fmt(m.get(keys.key(n, keys.DECISION_N + "_rag")), "{:.0f}"),
            _fmt(m.get(keys.key(n, keys.DECISION_MACRO_F1 + "_same_sample")), "{:.3f}"),
            ci(n, keys.DECISION_MACRO_F1_RAG, "{:.3f}"),
            ci(n, keys.FAQ_CHRF, "{:.1f}"), ci(n, keys.FAQ_CHRF_RAG, "{:.1f}"), ci(n, "faq.chrf_rag_gain", "{:+.1f}"),
            ci(n, keys.REFERENCE_CHRF, "{:.1f}"), ci(n, keys.REFERENCE_CHRF_RAG, "{:.1f}"),
            ci(n, "reference.chrf_rag_gain", "{:+.1f}"),
            _fmt(m.get(keys.key(n, keys.FAQ_CITATION_RATE_RAG)), "{:.2f}"),
        ])
    if not rows:
        return []
    return [
        "## Retrieval: the bare prompt and the runtime's prompt",
        "",
        (
            "The same test requests without and with the passages the runtime retrieves (its grounded prompt). "
            "Decisions: a balanced sample, macro-F1 of the same requests bare and grounded. FAQ / reference QA: "
            "chrF of the final answers (0-100) and the paired gain (grounded − bare); 95% percentile bootstrap "
            "intervals over examples, answers of one question kept paired; a gain whose interval holds 0 is no "
            "difference. Cited: share of FAQ questions the model ALLOWs with their own FAQ entry among the passages "
            "(what the runtime returns as citations). Rows: `evaluate.extra_artifacts` (the quantised files are "
            "compared with F16 on every bare example instead)."
        ),
        "",
        _table(["artifact", "n decisions", "macro-F1 bare", "macro-F1 grounded [95% CI]", "FAQ chrF bare",
                "FAQ chrF grounded", "FAQ gain", "reference chrF bare", "reference chrF grounded",
                "reference gain", "cited"], rows),
        "",
    ]


#: The QA rows of the report: (label, key under ``served.``, goal of issue 38).
QA_ROWS: tuple[tuple[str, str, str], ...] = (
    ("chrF, answerable, with passages", "qa.chrf", "> top passage"),
    ("top retrieved passage shown as the answer (baseline)", "retrieval.qa.chrf", "—"),
    ("gain over the top passage (paired)", "qa.passage_gain", "interval > 0"),
    ("supported sentences", "qa.supported_rate", ">= 0.9"),
    ("citation accuracy", "qa.citation_accuracy", ">= 0.8"),
    ("abstain, unanswerable", "qa.abstain_rate", ">= 0.8"),
    ("abstain, answer in the passages", "qa.false_abstain_rate", "<= 0.1"),
    ("answer in the retrieved passages", "qa.answer_in_passages_rate", "—"),
    ("benign ALLOW, bare", "qa.benign_allow_rate_bare", ">= 0.95"),
    ("benign ALLOW, with passages", "qa.benign_allow_rate", ">= 0.95"),
    ("ALLOW without a final answer", "qa.no_final_answer_rate", "<= 0.05"),
    ("answered through the policy (all questions)", "qa.answered_rate", "—"),
)


def _qa_section(inp: ReportInputs, samples: int = 10) -> list[str]:
    """Answers from the documents on the served artifact (``served.qa.*``, :mod:`so8t.eval.qa`)."""
    m, served = inp.metrics, inp.details.get("served") or {}
    if "served.qa.n" not in m:
        return []
    sm = _row_metrics(m, "served")
    rows = [[label, _ci(sm, key, "{:.1f}" if "chrf" in key or "gain" in key else "{:.3f}"), goal]
            for label, key, goal in QA_ROWS if key in sm]
    rows += [["semantic similarity (multilingual-e5-small cosine)", _fmt(sm.get("qa.semantic_similarity"), "{:.3f}"), "—"],
             ["repeated 4-gram rate: answers / references",
              f"{_fmt(sm.get('qa.repeated_ngram_rate'), '{:.3f}')} / "
              f"{_fmt(sm.get('qa.reference_repeated_ngram_rate'), '{:.3f}')}", "answers <= references"]]
    qa = served.get("qa", [])
    picked = [r for r in qa if r["kind"] == "answerable"][: samples - samples // 3]
    picked += [r for r in qa if r["kind"] != "answerable"][: samples // 3]
    sample_rows = [[r["kind"], _one_line(r["question"], 80), ", ".join(r["passages"]) or "—",
                    _one_line(r["answer"] or f"({r['decision']}, {r['override'] or 'policy text'})", 200),
                    ", ".join(f"【資料 {n}】" for n in r["cited"]) or "—", ", ".join(map(str, r["gold"])) or "—"]
                   for r in picked]
    return [
        "## Answers from the documents (served artifact, through the runtime path)",
        "",
        (
            f"`{served.get('artifact')}`: {int(m['served.qa.n'])} answerable test questions (every QA question of "
            f"the test documents) and {int(m['served.qa.unanswerable_n'])} unanswerable ones (a test question with "
            "its own document taken out of the index, and questions on topics the documents do not cover), each "
            "with the passages the runtime retrieves, scored, answered and checked by the runtime policy. Rates "
            "with 95% Wilson intervals, chrF and supported sentences with percentile bootstrap intervals over "
            "questions. Supported: a sentence's character 3-grams at least 60% in the passages."
        ),
        "",
        _table(["metric", "value [95% CI]", "goal"], rows),
        "",
        _table(["kind", "question", "passages", "answer shown", "cites", "holds the answer"], sample_rows),
        "",
    ]


def _bake_and_gguf_section(inp: ReportInputs, figures: dict[str, str]) -> list[str]:
    b = inp.bake_report
    spot = b.get("spot_check", {})
    out = ["## Bake", ""]
    out.append(
        f"{b.get('rotations_folded')} rotations folded into `o_proj` (`W' = W R^T`) of a "
        f"`{b.get('architecture')}`; logits of the saved model vs the trained model on {b.get('positions')} "
        f"real positions, float32, whole vocabulary: max |Δ| {b.get('max_abs_diff', math.nan):.3g} (threshold "
        f"{b.get('threshold_float32')}), mean |Δ| {b.get('mean_abs_diff', math.nan):.3g}, KL {b.get('kl', math.nan):.3g}; "
        f"the fold itself, {spot.get('dtype')}, `o_proj` of layers {', '.join(spot.get('layers', {})) or '—'}: "
        f"max |Δ| {spot.get('max_abs_diff', math.nan):.3g} (threshold {spot.get('threshold')}). "
        f"Bake took {inp.performance.get('bake', {}).get('total_seconds')} s."
    )
    out += ["", "## GGUF files", ""]
    q_perf = inp.performance.get("quantize", {}).get("files", {})
    q_rows = [
        [
            f["type"], f"{f['size_bytes'] / 1e6:.1f}", f["bits_per_weight"], f["tensor_types"],
            len(f.get("k_quant_fallback_tensors", {})), q_perf.get(name, {}).get("generation_tokens_per_s"),
        ]
        for name, f in inp.quantize_report.get("files", {}).items()
    ]
    out.append(_table(["type", "MB", "bits/weight", "tensor types", "K-quant fallbacks", "tok/s (check)"], q_rows))
    out.append(
        "\nK-quants need row widths divisible by 256; narrower tensors fall back per tensor (listed in "
        "`models/gguf/quantize_report.json`)."
    )
    out += ["", f"![size vs perplexity]({figures['tradeoff']})", ""]
    return out


def served_artifact(inp: ReportInputs) -> tuple[str | None, str]:
    """The row ``runtime.model: auto`` serves (:func:`so8t.eval.selection.pick` on the quantize
    report's sizes and this run's metrics), and its reason; ``(None, why not)`` without them."""
    from so8t.eval.selection import F16, metric_row, pick

    sizes = {n: f["size_bytes"] for n, f in inp.quantize_report.get("files", {}).items()}
    if F16 not in sizes or keys.key("baked", keys.PERPLEXITY) not in inp.metrics:
        return None, "no F16 GGUF or no baked perplexity: `runtime.model: auto` falls back to Q8_0"
    name, reason = pick(sizes, inp.metrics, {n: f["file"] for n, f in inp.quantize_report["files"].items()})
    return metric_row(name), reason


def _engine_section(inp: ReportInputs, names: list[str]) -> list[str]:
    """Which engine and file each row ran on, the stages' wall times, and the transformers reference sample."""
    ev, cal = inp.performance.get("evaluate", {}), inp.performance.get("calibrate", {})
    arts = inp.details["artifacts"]
    out = ["## Evaluation engine and time", ""]
    out.append(
        "Every row runs in llama.cpp (the engine users run: base and baked through their F16 GGUFs); "
        f"calibrate took {_fmt(cal.get(keys.WALL_S), '{:.0f}')} s and evaluate {_fmt(ev.get(keys.WALL_S), '{:.0f}')} s "
        f"on {ev.get('threads')} threads."
    )
    rows = [
        [
            n, f"{'llama.cpp' if arts[n].get('kind') == 'gguf' else 'transformers'}: `{Path(arts[n]['path']).name}`",
            _fmt(cal.get(keys.key(n, keys.WALL_S)), "{:.0f}"), _fmt(ev.get(keys.key(n, keys.WALL_S)), "{:.0f}"),
            _fmt(ev.get(keys.key(n, keys.TOKENS_PER_S)), "{:.0f}"), _fmt(ev.get(keys.key(n, keys.DECISIONS_PER_MINUTE)), "{:.0f}"),
        ]
        for n in names
    ]
    ref = inp.details.get("reference")
    if ref:
        rows.append([
            "reference", f"transformers float32: `{ref['reference']}` (sample)", "—",
            _fmt(ev.get(keys.key("reference", keys.WALL_S)), "{:.0f}"), "—", "—",
        ])
    out += ["", _table(["row", "engine: file", "calibrate s", "evaluate s", "generation tok/s", "decisions/min"], rows)]
    if ref:
        m = lambda name: inp.metrics.get(keys.key(keys.F16, name))  # noqa: E731
        out += ["", (
            f"**transformers reference** (the baked HF folder, float32) against the F16 GGUF on a sample: the same "
            f"decision on {_fmt(m(keys.PARITY_DECISION), '{:.3f}')} of {_fmt(m(keys.PARITY_DECISION_N), '{:.0f}')} test "
            f"decisions (balanced over labels), the same greedy text on {_fmt(m(keys.PARITY_TEXT), '{:.3f}')} of "
            f"{_fmt(m(keys.PARITY_TEXT_N), '{:.0f}')} math/FAQ answers, held-out perplexity "
            f"{_fmt(m(keys.PARITY_PERPLEXITY_HF), '{:.2f}')} in transformers vs "
            f"{_fmt(inp.metrics.get(keys.key('baked', keys.PERPLEXITY)), '{:.2f}')} in llama.cpp (ratio "
            f"{_fmt(m(keys.PARITY_PERPLEXITY_RATIO), '{:.4f}')}, every window)."
        )]
    probe = inp.details.get("probe")
    if probe:
        out += ["", (
            f"**Linear probe** (stage `probe`, base model only, never rerun by training): "
            f"{_fmt(inp.performance.get('probe', {}).get(keys.WALL_S), '{:.0f}')} s; fitted on "
            f"{probe.get('n_train')} train decisions, layer / pooling / C chosen on {probe.get('n_val')} val "
            f"decisions (val macro-F1 {_fmt(probe.get('val_macro_f1'), '{:.3f}')})."
        )]
    served, reason = served_artifact(inp)
    out += ["", f"**Served model**: {reason}.", ""]
    return out


def _distill_section(inp: ReportInputs) -> list[str]:
    d, perf = inp.distill or {}, inp.performance.get("distill", {})
    out = ["## Distillation", ""]
    if not d.get("enabled"):
        return out + ["Not run (`distill.enabled: false` in params.yaml).", ""]
    out.append(
        f"Student ({d.get('distill.student_layers')} layers) trained {d.get('distill.steps')} steps on the "
        f"teacher's top-{d.get('distill.top_k')} log-probs at {d.get('distill.train_positions')} label positions "
        f"(T = {d.get('distill.temperature')}, CE weight {d.get('distill.ce_weight')}); student training "
        f"{perf.get('train_seconds', math.nan):.0f} s. Agreement on {d.get('distill.test_positions')} "
        "test label positions."
    )
    # Speeds live in the performance file (they vary run to run); the table shows both.
    return out + ["", distill_table(d | {k: v for k, v in perf.items() if k.count(".") == 1}), ""]


def _samples_section(inp: ReportInputs, names: list[str]) -> list[str]:
    out = ["## Sample generations (FAQ test prompts, greedy)", ""]
    arts = inp.details["artifacts"]
    left, right = "base", "baked" if "baked" in arts else names[-1]
    sample_rows = [
        [_one_line(a["prompt"], 80), _one_line(a["output"]), _one_line(c["output"]), _one_line(a["reference"])]
        for a, c in zip(arts[left]["samples"], arts[right]["samples"])
    ]
    out.append(_table(["prompt", left, right, "reference"], sample_rows))
    return out + [""]


def build_markdown(
    inp: ReportInputs,
    figures: dict[str, str],
    params_diff: dict[str, tuple],
    previous: tuple[dict[str, float], str] | None = None,
) -> str:
    """The report's Markdown text (figure paths relative to the report).

    ``previous``: ``(flat metrics, commit)`` of the previous run (:func:`previous_metrics`), for the
    comparison table.
    """
    names = list(inp.details["artifacts"])
    speed = {k: v for k, v in inp.performance.get("evaluate", {}).items() if k != "threads"}
    out = ["# so8t run report", "", *_run_summary(inp, params_diff), "", *_data_section(inp)]
    out += ["", "## Training", "", f"![training curve]({figures['training']})", ""]
    out += ["## Headline metrics (test split; deltas against the base model)", ""]
    out += [headline_table(inp.metrics | speed, names), ""]
    prev_metrics, prev_rev = previous if previous else (None, None)
    title = f"commit {prev_rev}" if prev_rev else "last committed `reports/metrics.json`"
    out += [f"## Against the previous run ({title})", "", previous_run_table(inp.metrics, prev_metrics, names), ""]
    out += _calibration_section(inp, figures)
    out += _decision_section(inp, figures, names)
    out += ["", *_policy_section(inp, names), *_retrieval_section(inp, names), *_qa_section(inp)]
    out += ["", *_bake_and_gguf_section(inp, figures), *_engine_section(inp, names), *_distill_section(inp)]
    out += _samples_section(inp, names)
    return "\n".join(out)


def previous_metrics(
    current: dict[str, float] | None = None, path: str = "reports/metrics.json", max_commits: int = 50
) -> tuple[dict[str, float], str] | None:
    """The last committed run's metrics that differ from ``current``, and that commit's short hash.

    Walks ``git log -- path`` from ``HEAD`` (at most ``max_commits`` commits) and
    returns the first committed version whose content is not ``current``, so that
    a report rebuilt after committing its own metrics still compares with the run
    before. ``None`` outside git, before the first commit, or when no committed
    version differs.
    """
    import json
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    log = git("log", f"-n{max_commits}", "--format=%h", "--", path)
    for rev in (log or "").split():
        text = git("show", f"{rev}:{path}")
        if text is None:
            continue
        try:
            metrics = json.loads(text)
        except json.JSONDecodeError:
            continue
        if metrics != current:
            return metrics, rev
    return None


def previous_run_table(current: dict[str, float], previous: dict[str, float] | None, names: list[str]) -> str:
    """Markdown table of headline metrics: this run vs the previous committed run, per artifact."""
    if not previous:
        return "No previous run is committed (no earlier `reports/metrics.json` differs from this one in git)."
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, suffix, higher, fmt in HEADLINE:
        cells = []
        for n in names:
            key = f"{n}.{suffix}"
            v, p = current.get(key), previous.get(key)
            cells.append(_fmt(v, fmt) + (_delta(v, p, higher, fmt) if p is not None else " (new)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_HTML_STYLE = """
body { font-family: "Noto Sans CJK JP", "Hiragino Sans", "Yu Gothic", sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 3px solid #2b6cb0; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #edf2f7; }
tr:nth-child(even) td { background: #f7fafc; }
img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f1f1f1; padding: 0 3px; }
"""


def to_html(markdown_text: str, base_dir: Path, title: str = "so8t run report") -> str:
    """A self-contained HTML page: the report's Markdown rendered, its PNG figures inlined.

    ``▲``/``▼`` deltas marked "better" are coloured green, "worse" red.
    """
    import base64
    import re

    import markdown as md

    body = md.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def inline(m: re.Match) -> str:
        src = m.group(1)
        path = base_dir / src
        if not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    body = re.sub(r"\(([▲▼][^,()]*), better\)", r'(<span style="color:#2f855a">\1, better</span>)', body)
    body = re.sub(r"\(([▲▼][^,()]*), worse\)", r'(<span style="color:#c53030">\1, worse</span>)', body)
    return (
        f'<!DOCTYPE html>\n<html lang="ja"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def build_report_inputs(reports: Path = Path("reports")) -> ReportInputs:
    """Read everything the report shows from the files the stages wrote."""
    from so8t.io import read_json

    perf_dir = reports / "performance"
    distill = reports / "distill.json"
    return ReportInputs(
        metrics=read_json(reports / "metrics.json"),
        details=read_json(reports / "eval" / "details.json"),
        calibration=read_json(reports / "calibration.json"),
        manifest=read_json("data/collected/manifest.json"),
        synth_stats=read_json("data/synth/stats.json"),
        format_stats=read_json("data/formatted/stats.json"),
        train_summary=read_json("models/adapter/train_summary.json"),
        train_history=read_dvclive_series(Path("dvclive/plots/metrics")),
        bake_report=read_json("models/baked/bake_report.json"),
        quantize_report=read_json("models/gguf/quantize_report.json"),
        distill=read_json(distill) if distill.is_file() else None,
        performance={p.stem: read_json(p) for p in sorted(perf_dir.glob("*.json"))} if perf_dir.is_dir() else {},
    )


def write_report(inp: ReportInputs, out: Path, params_diff: dict[str, tuple], ece_bins: int) -> dict[str, str]:
    """Draw the figures into ``out/figures`` and write ``report.md`` and the self-contained ``report.html``.

    Returns:
        ``{figure name: path relative to the report}``.
    """
    from so8t.io import write_text

    names = list(inp.details["artifacts"])
    fig_dir = out / "figures"
    figures = {k: f"figures/{k}.png" for k in ("training", "reliability", "confusion", "tradeoff")}
    plot_training(inp.train_history, fig_dir / "training.png")
    plot_reliability(inp.details, [n for n in ("base", "baked", "q4_k_m") if n in names], fig_dir / "reliability.png",
                     ece_bins)
    served = served_artifact(inp)[0]
    served = served if served in names else ("baked" if "baked" in names else names[-1])
    plot_confusion(inp.details["artifacts"][served]["decision"]["confusion_matrix"], f"Decisions ({served}, test)",
                   fig_dir / "confusion.png")
    plot_tradeoff(inp.metrics, names, fig_dir / "tradeoff.png")
    text = build_markdown(inp, figures, params_diff, previous_metrics(inp.metrics))
    write_text(out / "report.md", text)
    write_text(out / "report.html", to_html(text, out))
    return figures
