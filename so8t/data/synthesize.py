"""Synthesise supervised records (:class:`so8t.schema.Record`) from the collected sources.

Tasks:

* ``decision``: Japanese requests labelled ALLOW / ESCALATION / DENY, drawn from the
  templates in ``so8t/data/resources/safety_templates.yaml``; exactly
  ``decisions_per_class`` per label, spread evenly over domains and templates.
* ``qa_faq``: Debian FAQ questions with their (trimmed) answers.
* ``qa_reference``: template questions about Debian Reference sections, answered with
  the section's first sentences. A held-out set of sections is reserved first and
  written out for held-out perplexity; it never feeds a training record.
* ``math``: every GSM-Symbolic original plus new variants of its template, sampled by
  rejection sampling (:func:`so8t.data.sources.gsm.sample_variants`).
* ``qa_user`` and user ``decision`` records: the user's own prompt/response and labelled
  records (:func:`so8t.data.sources.user.build_user_records`).
* ``qa_document``: template questions about sections of the user's documents (definition,
  "what does section X say about Y", cloze, summary), answered from the section text or,
  with ``teacher_gguf``, by a teacher model through llama.cpp; each keeps its source
  document and character offset (:func:`so8t.data.sources.documents.build_document_records`).

Each source is a module of :mod:`so8t.data.sources`; :func:`synthesize` calls them in a fixed
order. Exact and near-duplicate prompts are removed (:mod:`so8t.data.dedup`), and the decision classes
must each keep ``min_class_share`` of the decision records (:func:`so8t.data.datacard.check_class_balance`).

Randomness comes from ``random.Random(f"{seed}:{part}")`` streams (string seeds are
hashed with SHA-512 by :mod:`random`, so they are stable across runs and platforms):
each part is reproducible on its own and the same params give byte-identical output.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from pydantic import ValidationError

from so8t.data.datacard import check_class_balance, shares
from so8t.data.dedup import exact_duplicates, near_duplicates
from so8t.data.sources.documents import build_document_records
from so8t.data.sources.faq import build_faq_records
from so8t.data.sources.gsm import build_math_records
from so8t.data.sources.reference import build_lm_text, build_reference_records, select_reference_docs
from so8t.data.sources.teacher import teacher_answers
from so8t.data.sources.templates import build_decision_records, load_safety_templates
from so8t.data.sources.user import build_user_records
from so8t.io import DataError
from so8t.params import SynthesizeParams
from so8t.schema import Record, Task


def validate_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate every record as :class:`Record` and return it in the schema's field order.

    Raises:
        DataError: naming the record id and field.
    """
    out = []
    for r in records:
        try:
            out.append(Record.model_validate(r).model_dump(mode="json"))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise DataError(f"synthesized record {r.get('id')!r}: field {field!r}: {err['msg']}") from None
    return out


@dataclasses.dataclass
class Synthesis:
    """Output of :func:`synthesize`."""

    records: list[dict[str, Any]]
    heldout_reference: list[dict[str, Any]]
    stats: dict[str, Any]
    #: Plain held-in documents for the ``lm_text`` task (:func:`so8t.data.sources.reference.build_lm_text`).
    lm_text: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _counts(records: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(sorted(Counter(r[key] for r in records if r.get(key) is not None).items()))


def synthesize(collected: dict[str, list[dict[str, Any]]], params: SynthesizeParams, seed: int) -> Synthesis:
    """All records from the collected sources (``{"faq", "reference", "gsm", "user"}``; ``user``
    holds the items of user.jsonl and hf.jsonl and may be absent).

    Records come in a fixed order (decision, qa_faq, qa_reference, math, user records,
    qa_document); exact and near-duplicate prompts are removed, each record is validated
    as :class:`Record`, and the decision classes are checked for balance.

    Raises:
        DataError: a decision class is missing or below ``min_class_share`` (after dedup).
    """
    decisions = build_decision_records(load_safety_templates(), params.decisions_per_template, params.domains, seed)
    faq = build_faq_records(collected["faq"], params.qa_per_document, seed) if params.faq_qa else []
    qa_docs, heldout, reference_counts = select_reference_docs(
        collected["reference"], params.reference_qa_docs, params.heldout_reference_docs, seed
    )
    reference = build_reference_records(qa_docs, seed, params.qa_per_document)
    math_records, math_stats = build_math_records(
        collected["gsm"], params.math_variants_per_template, params.math_templates, seed
    )
    user = collected.get("user", [])
    user_records = build_user_records(user)
    sections = [i for i in user if i["kind"] == "section"]
    doc_records, doc_origins, doc_stats = build_document_records(sections, params.document_qa_per_section, seed)
    lm_text, lm_counts = build_lm_text(collected["reference"], heldout, qa_docs, sections, params.lm_text_docs, seed)
    doc_stats["teacher"] = None
    if params.teacher_gguf and doc_records:
        doc_stats["teacher"] = teacher_answers(
            doc_records, doc_origins, params.teacher_gguf, params.teacher_max_tokens, seed
        )
    records, removed, conflicts = exact_duplicates(
        decisions + faq + reference + math_records + user_records + doc_records
    )
    near_removed: dict[str, int] = {}
    near_pairs: list[dict[str, Any]] = []
    if params.near_dup_threshold is not None:
        records, near_removed, near_pairs = near_duplicates(records, params.near_dup_threshold)
    records = validate_records(records)
    decision_shares = check_class_balance(
        (r["decision"] for r in records if r["task"] == Task.DECISION.value), params.min_class_share, "synthesize", "synthesize.min_class_share"
    )
    by_task = _counts(records, "task")
    stats = {
        "records": len(records),
        "by_task": by_task,
        "by_decision": _counts(records, "decision"),
        "by_domain": _counts(records, "domain"),
        "by_source": _counts(records, "source"),
        "groups_by_task": {t: len({r["group"] for r in records if r["task"] == t}) for t in by_task},
        "dedup_removed": removed,
        "near_dup_removed": near_removed,
        "near_dup_threshold": params.near_dup_threshold,
        "near_dup_pairs": near_pairs[:50],
        "label_conflicts": conflicts,
        "balance": {
            "task_shares": shares(by_task),
            "decision_shares": decision_shares,
            "min_class_share": params.min_class_share,
        },
        "faq": {
            "entries": len(collected["faq"]),
            "qa_records": len(faq),
            "skipped_not_japanese": len(collected["faq"]) - len(faq) if params.faq_qa else 0,
        },
        "reference": reference_counts,
        "math": math_stats,
        "user": {
            "items": len(user),
            "qa_user": sum(r["task"] == Task.QA_USER.value for r in user_records),
            "decision": sum(r["task"] == Task.DECISION.value for r in user_records),
            "sections": len(sections),
        },
        "document_qa": doc_stats,
        "lm_text": lm_counts,
    }
    return Synthesis(records, heldout, stats, lm_text)
