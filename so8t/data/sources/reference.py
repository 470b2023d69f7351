"""Debian Reference: held-out sections, ``qa_reference`` records and ``lm_text`` documents.

A held-out set of mostly Japanese sections is reserved first (:func:`select_reference_docs`)
and written out for held-out perplexity; it never feeds a training record. The other
sections give template questions answered with their lead sentences
(:func:`build_reference_records`) and, with the user's document sections, the plain
documents of the ``lm_text`` task (:func:`build_lm_text`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from so8t.data.sources.documents import term_questions
from so8t.data.sources.text import JAPANESE, lead_sentences
from so8t.schema import Task

#: A reference section qualifies for QA / held-out text when at least this share of its
#: non-space characters is Japanese (some sections are untranslated English).
MIN_JAPANESE_SHARE = 0.3

REFERENCE_QUESTIONS: tuple[str, ...] = (
    "Debian リファレンスの「{title}」の節では何が説明されていますか？",
    "「{title}」について要点を教えてください。",
    "Debian で「{title}」について知りたいです。概要を説明してください。",
    "「{title}」とはどういう内容ですか？簡単にまとめてください。",
    "Debian リファレンス {section} 節「{title}」の要点は何ですか？",
)


def japanese_share(text: str) -> float:
    """Share of non-space characters that are kana or kanji."""
    chars = [c for c in text if not c.isspace()]
    return sum(bool(JAPANESE.match(c)) for c in chars) / len(chars) if chars else 0.0


def select_reference_docs(
    docs: list[dict[str, Any]], n_qa: int | None, n_heldout: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Choose held-out documents first, then QA documents from the other sections.

    Held-out: whole sections (every piece of a section, so no neighbouring text leaks
    into training) of mostly Japanese text, shuffled, taken until ``n_heldout``
    documents. QA: the first piece of other sections that has a Japanese lead
    sentence, ``n_qa`` sampled. Both are returned in document order.

    Returns:
        ``(qa_docs, heldout_docs, counts)``.
    """
    rng = random.Random(f"{seed}:reference")
    order = {d["id"]: i for i, d in enumerate(docs)}
    sections: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        sections.setdefault(d["section"], []).append(d)
    japanese = [
        s for s, pieces in sections.items() if japanese_share("".join(p["text"] for p in pieces)) >= MIN_JAPANESE_SHARE
    ]
    rng.shuffle(japanese)
    heldout_sections: set[str] = set()
    heldout: list[dict[str, Any]] = []
    for s in japanese:
        if len(heldout) >= n_heldout:
            break
        heldout_sections.add(s)
        heldout.extend(sections[s])
    candidates = [
        pieces[0]
        for s, pieces in sections.items()
        if s not in heldout_sections and japanese_share(pieces[0]["text"]) >= MIN_JAPANESE_SHARE
        and lead_sentences(pieces[0]["text"])
    ]
    qa = rng.sample(candidates, len(candidates) if n_qa is None else min(n_qa, len(candidates)))
    counts = {
        "docs": len(docs),
        "sections": len(sections),
        "heldout_sections": len(heldout_sections),
        "heldout_docs": len(heldout),
        "qa_candidates": len(candidates),
        "qa_docs": len(qa),
    }
    return sorted(qa, key=lambda d: order[d["id"]]), sorted(heldout, key=lambda d: order[d["id"]]), counts


def build_lm_text(
    reference: list[dict[str, Any]],
    heldout: list[dict[str, Any]],
    qa_docs: list[dict[str, Any]],
    user_sections: list[dict[str, Any]],
    n_docs: int | None,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Plain documents for the ``lm_text`` task: language modelling on held-in text.

    Training on decisions and template QA alone moves the model away from plain Japanese (the
    held-out perplexity of the reference text rose from 41.9 to 55.9 in the default run); a share
    of next-token prediction on text of the same kind, never on the held-out sections, holds it.
    Candidates are every reference piece outside the held-out sections and every section piece of
    the user's documents; ``n_docs`` of them are sampled (seeded), returned in input order.

    Each document carries the ``group`` of the QA records made from its text (a reference
    section's QA document, a user document), so think-format trains only on text whose questions
    went to the train split: a val or test answer is never seen as plain text.

    Args:
        reference: collected reference pieces (``id``, ``section``, ``text``, ``source``).
        heldout: the held-out pieces (:func:`select_reference_docs`); their sections are excluded.
        qa_docs: the reference pieces turned into ``qa_reference`` records (group = their ``id``).
        user_sections: collected user section pieces (``id``, ``doc_id``, ``text``, ``source``).
        n_docs: documents to keep (``None``: all; 0: none).

    Returns:
        ``(docs, counts)``: docs ``{"id", "text", "group", "source"}``; counts of candidates and kept.
    """
    held_sections = {d["section"] for d in heldout}
    qa_group = {d["section"]: d["id"] for d in qa_docs}
    candidates = [
        {"id": f"lm-{d['id']}", "text": d["text"], "group": qa_group.get(d["section"], d["id"]), "source": d["source"]}
        for d in reference
        if d["section"] not in held_sections
    ] + [
        {"id": f"lm-{d['id']}", "text": d["text"], "group": d["doc_id"], "source": d["source"]}
        for d in user_sections
    ]
    keep = len(candidates) if n_docs is None else min(n_docs, len(candidates))
    picked = sorted(random.Random(f"{seed}:lm-text").sample(range(len(candidates)), keep))
    docs = [candidates[i] for i in picked]
    return docs, {"candidates": len(candidates), "docs": len(docs), "chars": sum(len(d["text"]) for d in docs)}


def build_reference_records(docs: Iterable[dict[str, Any]], seed: int, per_doc: int = 1) -> list[dict[str, Any]]:
    """``qa_reference`` records per document: a title question answered with the lead sentences, then
    up to ``per_doc - 1`` questions on terms of its text (:func:`so8t.data.sources.documents.term_questions`).

    Every record of a document has the document's id as its ``group`` (one split per document).
    """
    rng = random.Random(f"{seed}:reference-questions")
    terms_rng = random.Random(f"{seed}:reference-term-questions")
    records = []
    for d in docs:
        question = rng.choice(REFERENCE_QUESTIONS).format(title=d["title"], section=d["section"])
        records.append(
            {
                "id": f"qa-{d['id']}",
                "task": Task.QA_REFERENCE.value,
                "prompt": question,
                "thinking": f"Debian リファレンス {d['section']} 節「{d['title']}」の内容を問う質問です。"
                "節の冒頭の説明に沿って要点を答えます。",
                "response": lead_sentences(d["text"]),
                "group": d["id"],
                "source": d["source"],
            }
        )
        names = {"doc": "Debian リファレンス", "section": d["title"]}
        for k, q in enumerate(term_questions(d["text"], names, per_doc - 1, terms_rng) if per_doc > 1 else []):
            records.append(
                {
                    "id": f"qa-{d['id']}-{q['kind']}{k}",
                    "task": Task.QA_REFERENCE.value,
                    "prompt": q["question"],
                    "thinking": f"Debian リファレンスの「{d['title']}」に書かれている内容をもとに答えます。",
                    "response": q["answer"],
                    "group": d["id"],
                    "source": d["source"],
                }
            )
    return records
