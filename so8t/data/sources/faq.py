"""``qa_faq`` records: Debian FAQ questions with their (trimmed) Japanese answers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from so8t.data.sources.text import JAPANESE, trim_at_sentence
from so8t.schema import Task

#: FAQ answers longer than this (characters) are cut at a sentence end.
FAQ_ANSWER_CHARS = 400


def drop_english_prose(text: str) -> str:
    """``text`` without its untranslated English lines (no kana/kanji, 8 words or more).

    Commands and short code lines have fewer words and are kept.
    """
    return "\n".join(line for line in text.split("\n") if JAPANESE.search(line) or len(line.split()) < 8).strip()


def build_faq_records(faq: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``qa_faq`` record per FAQ entry with Japanese question and answer.

    Headings that are not questions (``dpkg``) become a request; untranslated English
    lines are left out of the response (``final_answer`` keeps the full answer).
    """
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
    return records
