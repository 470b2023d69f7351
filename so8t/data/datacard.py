"""The data card (``reports/data_card.md`` + ``reports/data_card.json``) and the class-balance check.

The card gathers what the data stages measured: sources with versions and licences
(collect manifest), rejected input, masked personal data, label spellings mapped,
duplicates removed, task and class balance (synthesize stats), token lengths per task
with the real tokenizer, shortened and dropped records, and the splits (think-format
stats). The JSON is a DVC metric, so ``dvc metrics diff`` shows how the data changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from so8t.io import DataError
from so8t.schema import DECISIONS

def shares(counts: dict[str, int]) -> dict[str, float]:
    """Each key's share of the total, rounded to 4 places (empty for no counts)."""
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.items()} if total else {}


def check_class_balance(decisions: Iterable[str], min_share: float, where: str, key: str) -> dict[str, float]:
    """Shares of ALLOW / ESCALATION / DENY among decision records; fail if one is too rare.

    No decision records, or ``min_share == 0``, passes (the shares are still returned).

    Args:
        where: what is checked, for the message (``"synthesize"``, ``"think-format: train split"``).
        key: the param key of ``min_share`` (``synthesize.min_class_share``, ``think_format.min_class_share``).

    Raises:
        DataError: a class is missing or below ``min_share``, naming the class, its count
            and share, and ``key``.
    """
    counts = Counter(decisions)
    total = sum(counts.values())
    result = {d: round(counts[d] / total, 4) if total else 0.0 for d in DECISIONS}
    if total == 0 or min_share == 0:
        return result
    for d in DECISIONS:
        share = counts[d] / total
        if counts[d] == 0:
            raise DataError(
                f"{where}: decision class {d} is missing (0 of {total} decision records; counts {dict(counts)}); "
                f"{key} = {min_share:g} requires each of {', '.join(DECISIONS)}. Add {d} examples, "
                f"or set {key}: 0 to train on it anyway"
            )
        if share < min_share:
            raise DataError(
                f"{where}: decision class {d} has {counts[d]} of {total} decision records ({share:.1%}), below "
                f"{key} = {min_share:g} ({min_share:.0%}); counts {dict(counts)}. Add {d} examples, "
                f"or lower {key}"
            )
    return result


def build_data_card(manifest: dict, synth: dict, fmt: dict, min_class_share: float) -> dict[str, Any]:
    """The data card as a JSON-able dict (the DVC metric ``reports/data_card.json``).

    Args:
        manifest: ``data/collected/manifest.json``.
        synth: ``data/synth/stats.json``.
        fmt: ``data/formatted/stats.json`` (as written by the think-format stage).
        min_class_share: ``think_format.min_class_share`` (the train split's minimum share).
    """
    sources = {
        s["name"]: {
            "kind": s.get("kind"),
            "enabled": s.get("enabled"),
            "version": s.get("version"),
            "licence": s.get("licence"),
            "records": s.get("records", 0),
            "chars": s.get("chars", 0),
            "files": len(s.get("files") or []),
            "pii_masked": sum((s.get("pii_masked") or {}).values()),
        }
        for s in manifest.get("sources", [])
    }
    labels = [m for s in manifest.get("sources", []) for m in s.get("label_mapping", [])]
    encodings: Counter[str] = Counter()
    for s in manifest.get("sources", []):
        encodings.update(s.get("encodings") or {})
    rejects = manifest.get("rejects", {})
    train = fmt.get("splits", {}).get("train", {})
    return {
        "sources": sources,
        "collect": {
            "records": sum(v["records"] for v in sources.values()),
            "normalize": manifest.get("normalize"),
            "encodings": dict(sorted(encodings.items())),
            "pii_mask": manifest.get("pii_mask"),
            "pii_masked": manifest.get("pii_masked") or {},
            "labels_mapped": {m["label"]: m["decision"] for m in labels},
            "label_records_mapped": sum(m["records"] for m in labels if m["label"] != m["decision"]),
            "rejects": rejects.get("count", 0),
            "rejects_by_kind": rejects.get("by_kind", {}),
            "reject_policy": rejects.get("policy"),
        },
        "synthesize": {
            "records": synth.get("records", 0),
            "by_task": synth.get("by_task", {}),
            "task_shares": shares(synth.get("by_task", {})),
            "by_decision": synth.get("by_decision", {}),
            "by_domain": synth.get("by_domain", {}),
            "user_records": synth.get("user", {}),
            "document_qa": {k: v for k, v in synth.get("document_qa", {}).items() if k != "teacher"},
            "teacher": (synth.get("document_qa", {}).get("teacher") or {}).get("model"),
        },
        "dedup": {
            "exact_removed": sum(synth.get("dedup_removed", {}).values()),
            "exact_removed_by_task": synth.get("dedup_removed", {}),
            "near_removed": sum(synth.get("near_dup_removed", {}).values()),
            "near_removed_by_task": synth.get("near_dup_removed", {}),
            "near_dup_threshold": synth.get("near_dup_threshold"),
            "label_conflicts": synth.get("label_conflicts", 0),
        },
        "balance": {
            "min_class_share": min_class_share,
            "decision_shares": shares(synth.get("by_decision", {})),
            "train_decision_shares": shares(dict(sorted(train.get("by_decision", {}).items()))),
        },
        "lengths": {
            "max_length": fmt.get("max_length"),
            "style": fmt.get("style"),
            "by_task": {
                t: {k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}
                for t, stats in fmt.get("token_lengths", {}).items()
            },
            "shortened": fmt.get("shortened", {}),
            "dropped": fmt.get("dropped", {}),
        },
        "splits": {s: {"examples": d["examples"], "groups": d["groups"]} for s, d in fmt.get("splits", {}).items()},
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pairs(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _percent(d: dict[str, float]) -> str:
    return _pairs({k: f"{v:.1%}" for k, v in d.items()})


def render_data_card(card: dict[str, Any]) -> str:
    """``reports/data_card.md``: the card as Markdown tables and short lines."""
    c, s, dd, b, ln = card["collect"], card["synthesize"], card["dedup"], card["balance"], card["lengths"]
    q = s["document_qa"]
    out = ["# Data card", "", "## Sources", ""]
    out.append(
        _table(
            ["source", "kind", "version", "licence", "records", "characters", "files", "PII masked"],
            [
                [n, v["kind"], v["version"] or ("-" if v["enabled"] else "disabled"), v["licence"], v["records"],
                 v["chars"], v["files"], v["pii_masked"]]
                for n, v in card["sources"].items()
            ],
        )
    )
    out += [
        "",
        "## Collection",
        "",
        f"- Records collected: {c['records']}; user text normalisation: {c['normalize']}; "
        f"encodings of user files: {_pairs(c['encodings'])}.",
        f"- Personal data masked: {_pairs(c['pii_masked']) if c['pii_mask'] else 'off (collect.pii_mask: false)'}.",
        f"- Label spellings mapped: {_pairs({k: '→ ' + v for k, v in c['labels_mapped'].items()})} "
        f"({c['label_records_mapped']} records relabelled).",
        f"- Rejected input (policy `{c['reject_policy']}`): {c['rejects']} ({_pairs(c['rejects_by_kind'])}).",
        "",
        "## Records and balance",
        "",
        _table(
            ["task", "records", "share"],
            [[t, n, f"{s['task_shares'].get(t, 0):.1%}"] for t, n in s["by_task"].items()],
        ),
        "",
        f"- Decisions: {_pairs(s['by_decision'])}; shares {_percent(b['decision_shares'])}, "
        f"in train {_percent(b['train_decision_shares'])} "
        f"(each must be at least {b['min_class_share']:.0%}, `think_format.min_class_share`).",
        f"- Domains: {_pairs(s['by_domain'])}.",
        f"- User data: {_pairs(s['user_records'])}; document QA: {q.get('pairs', 0)} pairs from "
        f"{q.get('sections_with_qa', 0)} of {q.get('sections', 0)} sections in {q.get('documents', 0)} documents "
        f"({_pairs(q.get('by_template', {}))})"
        + (f", answered by teacher `{s['teacher']}`." if s["teacher"] else ", template answers."),
        f"- Duplicates removed: {dd['exact_removed']} exact ({_pairs(dd['exact_removed_by_task'])}), "
        f"{dd['near_removed']} near (Jaccard >= {dd['near_dup_threshold']}; {_pairs(dd['near_removed_by_task'])}); "
        f"label conflicts among exact duplicates: {dd['label_conflicts']}.",
        "",
        f"## Token lengths (style `{ln['style']}`, max {ln['max_length']} tokens)",
        "",
        _table(
            ["task", "count", "min", "mean", "p50", "p95", "max", "shortened", "dropped"],
            [
                [t, v["count"], v["min"], v["mean"], v["p50"], v["p95"], v["max"], ln["shortened"].get(t, 0),
                 ln["dropped"].get(t, 0)]
                for t, v in ln["by_task"].items()
            ],
        ),
        "",
        "Reasoning is shortened sentence by sentence to fit; the answer is never cut, and a record "
        "that still does not fit is dropped.",
        "",
        "## Splits",
        "",
        _table(["split", "examples", "groups"], [[k, v["examples"], v["groups"]] for k, v in card["splits"].items()]),
        "",
    ]
    return "\n".join(out)
