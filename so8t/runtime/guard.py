"""Keeping the model's reasoning private: only the final answer ever leaves the runtime.

A generated assistant turn holds reasoning (``# 思考ステップ`` or
``<think-*>``), then the final answer (``# 最終回答`` or ``<final>``), then the
``判定:`` line (:data:`so8t.schema.THINK_MARKERS`). :func:`separate` keeps, of
all that, only text that is

1. after the first final-answer marker (as in
   :func:`so8t.think_format.parse_assistant`: no marker means no answer, so
   reasoning is never mistaken for one);
2. before the next section marker of either style (``</final>`` included) or
   ``判定:`` line (a model asked to "print its 思考ステップ" may
   open a reasoning section again there); and
3. not a sentence copied from the reasoning: a sentence of the answer is
   dropped when, after NFKC and white-space removal, it occurs in the
   reasoning whole (at least :data:`MIN_ECHO_SENTENCE` characters) or shares
   a run of :data:`ECHO_WINDOW` characters with it. So reasoning pasted into
   the answer is dropped too. On the training data's answers this removes no
   sentence by the first rule and a sentence of 2 answers in 729 by the
   second (a section title the reasoning quotes); shorter pieces of
   reasoning woven into the answer's own sentences are not caught.

The agent applies it to the whole generation before anything is returned or
streamed, so no partial marker or half-written section can slip out.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from so8t.schema import THINK_MARKERS
from so8t.data.think_format import parse_assistant

#: An answer sentence at least this long (characters, NFKC, no white space) found whole
#: in the reasoning is removed.
MIN_ECHO_SENTENCE = 6
#: An answer sentence sharing a run of this many characters with the reasoning is removed.
ECHO_WINDOW = 20


def _marker_patterns() -> list[str]:
    """Every section marker of every style, as regex pieces (``{kind}`` tags matched by prefix)."""
    out = []
    for markers in THINK_MARKERS.values():
        for value in markers.values():
            value = value.strip()
            if value:
                out.append(re.escape(value.split("{kind}")[0]))
    return sorted(set(out), key=len, reverse=True)


#: A section marker, a ``<think>``-like tag of other models, or the start of a decision line.
SECTION_MARKER = re.compile("|".join([*_marker_patterns(), r"</?think", r"判定\s*[:：]"]))

_SENTENCE_END = re.compile(r"(?<=[。．！？!?\n])")


def sentences(text: str) -> list[str]:
    """``text`` cut after each sentence end or newline; ``"".join`` gives ``text`` back."""
    return [s for s in _SENTENCE_END.split(text) if s]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


@dataclass(frozen=True)
class Separated:
    """A generation split for the caller.

    Attributes:
        reasoning: the private part (everything before the final-answer marker).
        final: the answer text that may be shown (possibly empty).
        has_final: the model wrote a final-answer marker.
        decision: the label of a ``判定:`` line the model wrote inside its answer, if any.
    """

    reasoning: str
    final: str
    has_final: bool
    decision: str | None


def separate(text: str, style: str) -> Separated:
    """Split a generated assistant turn into private reasoning and a showable final answer.

    Args:
        text: the generated assistant text (no chat-template tokens).
        style: ``markdown`` or ``tags`` (``params.think_format.style``).
    """
    marker = THINK_MARKERS[style]["final_open"].strip()
    reasoning, _, decision = parse_assistant(text, style)
    idx = text.find(marker)
    final = "" if idx < 0 else text[idx + len(marker) :]
    cut = SECTION_MARKER.search(final)
    if cut:
        final = final[: cut.start()]
    echo = _squash(reasoning)
    runs = {echo[i : i + ECHO_WINDOW] for i in range(len(echo) - ECHO_WINDOW + 1)}

    def copied(sentence: str) -> bool:
        q = _squash(sentence)
        if len(q) >= MIN_ECHO_SENTENCE and q in echo:
            return True
        return any(q[i : i + ECHO_WINDOW] in runs for i in range(len(q) - ECHO_WINDOW + 1))

    kept = [s for s in sentences(final) if not copied(s)]
    return Separated(reasoning, "".join(kept).strip(), idx >= 0, decision)
