"""Japanese sentence helpers shared by the QA sources: trimming at a sentence end, lead sentences."""

from __future__ import annotations

import re

#: Reference answers: at most this many leading sentences and characters.
REFERENCE_SENTENCES = 3
REFERENCE_ANSWER_CHARS = 300
_SENTENCE = re.compile(r"[^。\n]+。")
#: One kana or kanji character.
JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def trim_at_sentence(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` after a ``。`` (else a line end, else hard with ``…``)."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("。", 0, max_chars) + 1
    if cut < max_chars // 3:
        cut = text.rfind("\n", 0, max_chars)
    if cut < max_chars // 3:
        return text[: max_chars - 1].rstrip() + "…"
    return text[:cut].rstrip()


def lead_sentences(text: str, max_sentences: int = REFERENCE_SENTENCES, max_chars: int = REFERENCE_ANSWER_CHARS) -> str:
    """The first Japanese sentences (ending in ``。``) of ``text``, within the limits; "" if none.

    Stops at the first line without a sentence (a command, a bare list) once one
    sentence is taken, so the answer reads as one passage.
    """
    out: list[str] = []
    for line in text.split("\n"):
        sentences = [s.strip().lstrip("*+- ") for s in _SENTENCE.findall(line) if JAPANESE.search(s)]
        if out and not sentences:
            break  # a command or list follows; what comes after it would not read on
        for sentence in sentences:
            if len("".join(out)) + len(sentence) > max_chars or len(out) >= max_sentences:
                return "".join(out)
            out.append(sentence)
    return "".join(out)
