"""Keeping the model's reasoning private: only what is provably the final answer leaves the runtime.

A generated answer (after ``判定: ALLOW``) holds reasoning (``# 思考ステップ`` or ``<think-*>``)
and then the final answer (``# 最終回答`` or ``<final>``) (:data:`so8t.schema.THINK_MARKERS`).
The caller can imitate any string, so :func:`separate` assumes everything is reasoning unless
it is provably the final answer:

1. Matching runs on a normalised copy of the text (NFKC, case folding), with a map back to
   the original characters, so full-width ``＃``, ``<THINK>``, ``< think>``, an ideographic
   space in ``#　思考`` or ``**思考ステップ**`` are the markers they look like.
2. The final answer starts after the *last* final-answer marker (a mention of ``# 最終回答``
   inside the reasoning cannot start it early) and ends at the next section marker of any
   kind, or a ``判定:`` line. No final-answer marker: no answer.
3. What remains is checked for reasoning: a reasoning header or tag of any spelling
   (``思考``, ``推論``, ``Thinking:``, ``Reasoning:``, ``<think``...), or text copied from the
   reasoning, whole sentences or :data:`ECHO_WINDOW`-character runs, or more than
   :data:`ECHO_SHARE` of the answer's character 6-grams (which survives small
   paraphrases), removes the sentence; a reasoning header flags the answer as
   ``leak`` and the agent returns ESCALATION instead of any of it.

The agent applies it to the whole generation before anything is returned or streamed, so no
partial marker or half-written section can slip out.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from so8t.decision import DECISION_MARKER

#: An answer sentence at least this long (characters, normalised, no white space) found whole
#: in the reasoning is removed.
MIN_ECHO_SENTENCE = 6
#: An answer sentence sharing a run of this many characters with the reasoning is removed.
ECHO_WINDOW = 20
#: An answer sentence whose character 6-grams are more than this share in the reasoning is removed.
ECHO_SHARE = 0.5
_GRAM = 6

#: The start of the final answer (normalised text).
FINAL_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:#+[ \t\u3000]*\**[ \t]*最終回答\**[ \t]*(?=\n|$)|<\s*final\s*>)")
#: Anything that opens or closes another section, or a decision line (normalised text).
SECTION_MARKER = re.compile(
    r"#+[ \t]*\**[ \t]*(?:最終回答|思考|推論|検討|reasoning|thinking|thought)"
    r"|\*\*[ \t]*(?:思考|推論|reasoning|thinking)"
    r"|<\s*/?\s*(?:final|think|reason|analysis|scratchpad)"
    r"|" + DECISION_MARKER.pattern +
    r"|(?:^|\n)[ \t]*(?:thinking|reasoning|thoughts?|思考ステップ|思考過程|推論過程)[ \t]*[:：]"
)
#: Reasoning left inside an answer (normalised text): a header or tag of any spelling.
REASONING_LEFT = re.compile(
    r"<\s*/?\s*(?:think|reason|analysis|scratchpad)"
    r"|(?:^|\n)[ \t]*(?:#+|\*\*)[ \t]*(?:思考|推論|reasoning|thinking)"
    r"|(?:^|\n)[ \t]*(?:thinking|reasoning|thoughts?|思考|推論)(?:ステップ|過程)?[ \t]*[:：]"
    r"|思考ステップ|思考過程|推論過程"
)

_SENTENCE_END = re.compile(r"(?<=[。．！？!?\n])")


def normalized(text: str) -> tuple[str, list[int]]:
    """NFKC + case folding of ``text``, character by character, and each output character's source index."""
    out, index = [], []
    for i, ch in enumerate(text):
        n = unicodedata.normalize("NFKC", ch).casefold()
        out.append(n)
        index += [i] * len(n)
    return "".join(out), index


def sentences(text: str) -> list[str]:
    """``text`` cut after each sentence end or newline; ``"".join`` gives ``text`` back."""
    return [s for s in _SENTENCE_END.split(text) if s]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", normalized(text)[0])


@dataclass(frozen=True)
class Separated:
    """A generation split for the caller.

    Attributes:
        reasoning: the private part (everything that is not the final answer).
        final: the answer text that may be shown (possibly empty).
        has_final: the model wrote a final-answer marker.
        leak: reasoning-like content was left in the answer: show none of it.
    """

    reasoning: str
    final: str
    has_final: bool
    leak: bool = False


def separate(text: str, style: str = "markdown") -> Separated:
    """Split a generated assistant answer into private reasoning and a showable final answer.

    Args:
        text: the generated text (no chat-template tokens).
        style: ``markdown`` or ``tags`` (``params.think_format.style``); both styles' markers are
            recognised whatever it is.
    """
    norm, index = normalized(text)
    finals = list(FINAL_MARKER.finditer(norm))
    if not finals:
        return Separated(text.strip(), "", False)
    start_n = finals[-1].end()
    cut = SECTION_MARKER.search(norm, start_n)
    end_n = cut.start() if cut else len(norm)
    start = index[start_n] if start_n < len(index) else len(text)
    end = index[end_n] if end_n < len(index) else len(text)
    final = text[start:end]
    reasoning = text[: index[finals[-1].start()] if finals[-1].start() < len(index) else len(text)] + text[end:]
    echo = _squash(reasoning)
    runs = {echo[i : i + ECHO_WINDOW] for i in range(len(echo) - ECHO_WINDOW + 1)}
    grams = {echo[i : i + _GRAM] for i in range(len(echo) - _GRAM + 1)}

    def copied(sentence: str) -> bool:
        q = _squash(sentence)
        if len(q) >= MIN_ECHO_SENTENCE and q in echo:
            return True
        if any(q[i : i + ECHO_WINDOW] in runs for i in range(len(q) - ECHO_WINDOW + 1)):
            return True
        own = [q[i : i + _GRAM] for i in range(len(q) - _GRAM + 1)]
        return len(own) >= 3 and sum(g in grams for g in own) / len(own) > ECHO_SHARE

    kept = "".join(s for s in sentences(final) if not copied(s)).strip()
    leak = bool(REASONING_LEFT.search(normalized(kept)[0]))
    return Separated(reasoning.strip(), "" if leak else kept, True, leak)
