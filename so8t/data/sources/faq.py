"""``qa_faq`` records: Debian FAQ questions with their (trimmed) Japanese answers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import random

from so8t.data.sources.documents import term_questions
from so8t.data.sources.text import JAPANESE, trim_at_sentence
from so8t.schema import Task

#: FAQ answers longer than this (characters) are cut at a sentence end.
FAQ_ANSWER_CHARS = 400


def drop_english_prose(text: str) -> str:
    """``text`` without its untranslated English lines (no kana/kanji, 8 words or more).

    Commands and short code lines have fewer words and are kept.
    """
    return "\n".join(line for line in text.split("\n") if JAPANESE.search(line) or len(line.split()) < 8).strip()


def build_faq_records(faq: Iterable[dict[str, Any]], per_entry: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """``qa_faq`` records: per FAQ entry with Japanese question and answer, its own question, then up
    to ``per_entry - 1`` questions on terms of its answer (:func:`so8t.data.sources.documents.term_questions`).

    Headings that are not questions (``dpkg``) become a request; untranslated English
    lines are left out of the response (``final_answer`` keeps the full answer). Every record of
    an entry has the entry's id as its ``group`` (one split per entry).
    """
    rng = random.Random(f"{seed}:faq-questions")
    records = []
    for entry in faq:
        question = entry["question"]
        answer = drop_english_prose(entry["answer"])
        is_question = "?" in question or "？" in question
        prompt = question if is_question else f"Debian の「{question}」について教えてください。"
        if not (JAPANESE.search(prompt) and JAPANESE.search(answer)):
            continue
        records.append(
            {
                "id": f"qa-{entry['id']}",
                "task": Task.QA_FAQ.value,
                "prompt": prompt,
                "thinking": f"Debian FAQ の「{entry['chapter']}」の章にある質問なので、その回答に沿って答えます。",
                "response": trim_at_sentence(answer, FAQ_ANSWER_CHARS),
                "group": entry["id"],
                "source": entry["source"],
                "final_answer": entry["answer"],
            }
        )
        names = {"doc": "Debian FAQ", "section": question}
        for k, q in enumerate(term_questions(answer, names, per_entry - 1, rng) if per_entry > 1 else []):
            records.append(
                {
                    "id": f"qa-{entry['id']}-{q['kind']}{k}",
                    "task": Task.QA_FAQ.value,
                    "prompt": q["question"],
                    "thinking": f"Debian FAQ の「{question}」の回答に書かれている内容をもとに答えます。",
                    "response": q["answer"],
                    "group": entry["id"],
                    "source": entry["source"],
                }
            )
    return records
