"""``qa_document`` records: template questions about sections of the user's documents.

Kinds: definition, "what does section X say about Y", cloze and summary
(:func:`document_questions`), answered from the section text; each record keeps its
source document and character offset (:func:`build_document_records`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from so8t.data.sources.text import JAPANESE, REFERENCE_ANSWER_CHARS, lead_sentences, trim_at_sentence
from so8t.schema import Task

#: Question templates per kind for user document sections (``{doc}`` title, ``{section}``
#: title, ``{term}`` a key term, ``{sentence}`` a sentence with the term blanked out).
DOCUMENT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "definition": (
        "「{doc}」によると、{term}とは何ですか？",
        "{term}とは何か、「{doc}」の記述に沿って説明してください。",
    ),
    "about": (
        "「{doc}」の「{section}」では、{term}について何と述べていますか？",
        "「{section}」の節に書かれている{term}に関する内容を教えてください。（出典: {doc}）",
    ),
    "cloze": ("「{doc}」の「{section}」にある次の文の［　　］に入る語句は何ですか？\n{sentence}",),
    "summary": (
        "「{doc}」の「{section}」には何が書かれていますか？",
        "「{doc}」の「{section}」の要点を教えてください。",
    ),
}
DOCUMENT_THINKING = "ユーザー提供の文書「{doc}」の「{section}」に書かれている内容をもとに答えます。"
CLOZE_BLANK = "［　　］"
#: Key-term candidates: runs of katakana and kanji (noun compounds such as クラウド会計), ASCII names.
_TERM = re.compile(r"[\u30a1-\u30fa\u30fc\u4e00-\u9fff々]{2,12}|[A-Za-z][A-Za-z0-9+\-]{2,}")
_STOP_TERMS = frozenset(
    "場合 必要 以下 以上 可能 今回 本書 記載 説明 利用 使用 方法 内容 実施 対応 予定 一部 全体 関係".split()
)
_DEFINITION = re.compile(r"^(?P<term>[「『]?[\u30a1-\u30fa\u30fc\u4e00-\u9fff々A-Za-z0-9]{2,20}[」』]?)とは[、,]?")
_SENTENCE_POS = re.compile(r"[^。\n]+。")


def _sentences_at(text: str) -> list[tuple[int, str]]:
    """``(offset in text, sentence)`` for each Japanese sentence ending in ``。`` (list markers stripped)."""
    out = []
    for m in _SENTENCE_POS.finditer(text):
        raw = m.group(0)
        sentence = raw.lstrip().lstrip("*+-・ ")
        if JAPANESE.search(sentence):
            out.append((m.start() + len(raw) - len(sentence), sentence))
    return out


def _terms(sentence: str) -> list[str]:
    return [t for t in _TERM.findall(sentence) if t not in _STOP_TERMS]


def document_questions(text: str) -> list[dict[str, Any]]:
    """Template question/answer candidates for one section piece, in template order.

    Returns:
        ``{"kind", "slots", "answer", "at"}`` dicts: ``slots`` fill the question template,
        ``at`` is the answer's character offset in ``text``.
    """
    sentences = _sentences_at(text)
    out: list[dict[str, Any]] = []
    for at, s in sentences:
        if (m := _DEFINITION.match(s)) and len(s) <= 200:
            out.append({"kind": "definition", "slots": {"term": m.group("term")}, "answer": s, "at": at})
    # dict.fromkeys, not set: ties are broken by first appearance, whatever PYTHONHASHSEED is.
    counts = Counter(t for _, s in sentences for t in dict.fromkeys(_terms(s)))
    frequent = [t for t, n in counts.most_common() if n >= 2]
    if frequent:
        term = max(frequent, key=lambda t: (counts[t], len(t)))
        hits = [(at, s) for at, s in sentences if term in s][:2]
        answer = trim_at_sentence("".join(s for _, s in hits), REFERENCE_ANSWER_CHARS)
        out.append({"kind": "about", "slots": {"term": term}, "answer": answer, "at": hits[0][0]})
    for at, s in sentences:
        terms = _terms(s)
        if 15 <= len(s) <= 150 and terms:
            term = max(terms, key=len)
            blanked = s.replace(term, CLOZE_BLANK, 1)
            answer = f"{CLOZE_BLANK}に入る語句は「{term}」です。"
            out.append({"kind": "cloze", "slots": {"sentence": blanked}, "answer": answer, "at": at})
            break
    lead = lead_sentences(text)
    if lead:
        at = next((a for a, s in sentences if lead.startswith(s[:10])), 0)
        out.append({"kind": "summary", "slots": {}, "answer": lead, "at": at})
    return out


#: Kinds of :func:`document_questions` asked about a known document's text (FAQ entries, reference
#: sections): questions on its terms, as people ask them; cloze and summary are left to the
#: document's own question (the FAQ question, the reference title question).
TERM_KINDS: tuple[str, ...] = ("definition", "about")


def term_questions(text: str, names: dict[str, str], k: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to ``k`` questions on the terms of ``text`` (:data:`TERM_KINDS`), each answered from the text.

    Args:
        names: ``{"doc", "section"}`` slot values of :data:`DOCUMENT_QUESTIONS`.
        rng: picks the candidates (a seeded sample in template order) and each question's template.

    Returns:
        ``{"kind", "question", "answer", "at"}`` dicts (``at``: the answer's offset in ``text``).
    """
    candidates = [c for c in document_questions(text) if c["kind"] in TERM_KINDS]
    if len(candidates) > k:
        candidates = [candidates[i] for i in sorted(rng.sample(range(len(candidates)), k))]
    return [
        {"kind": c["kind"], "question": rng.choice(DOCUMENT_QUESTIONS[c["kind"]]).format(**names, **c["slots"]),
         "answer": c["answer"], "at": c["at"]}
        for c in candidates
    ]


def build_document_records(
    sections: list[dict[str, Any]], per_section: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``qa_document`` records: up to ``per_section`` template pairs per section piece.

    When a piece has more candidates (:func:`document_questions`) than ``per_section``, a
    seeded sample keeps the template order. Records of one section share a group (so a
    section never spans two splits); ``source_doc`` and ``source_offset`` locate the
    passage the answer comes from in the collected document text.

    Returns:
        ``(records, their sections (parallel to records), stats)``.
    """
    rng = random.Random(f"{seed}:document-qa")
    records: list[dict[str, Any]] = []
    origins: list[dict[str, Any]] = []
    by_kind: Counter[str] = Counter()
    used = 0
    for sec in sections if per_section else []:
        candidates = document_questions(sec["text"])
        if len(candidates) > per_section:
            keep = sorted(rng.sample(range(len(candidates)), per_section))
            candidates = [candidates[k] for k in keep]
        used += bool(candidates)
        section = sec["title"] if sec["title"] != sec["doc_title"] else "冒頭"
        names = {"doc": sec["doc_title"], "section": section}
        for k, c in enumerate(candidates):
            question = rng.choice(DOCUMENT_QUESTIONS[c["kind"]]).format(**names, **c["slots"])
            by_kind[c["kind"]] += 1
            records.append(
                {
                    "id": f"docqa-{sec['id']}-{c['kind']}{k}",
                    "task": Task.QA_DOCUMENT.value,
                    "prompt": question,
                    "thinking": DOCUMENT_THINKING.format(**names),
                    "response": c["answer"],
                    # One document is one group: its sections never sit in two splits.
                    "group": sec["doc_id"],
                    "source": sec["source"],
                    "source_doc": sec["doc_id"],
                    "source_offset": sec["offset"] + c["at"],
                }
            )
            origins.append(sec)
    stats = {
        "documents": len({s["doc_id"] for s in sections}),
        "sections": len(sections),
        "sections_with_qa": used,
        "pairs": len(records),
        "by_template": dict(sorted(by_kind.items())),
    }
    return records, origins, stats
