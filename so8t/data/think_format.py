"""Rendering records in the base model's own chat template with separated reasoning.

The assistant turn states its decision first, then the reasoning and the answer,
in one of two styles (:data:`so8t.schema.THINK_MARKERS`)::

    markdown:  判定: X\n# 思考ステップ\n{thinking}\n# 最終回答\n{response}
    tags:      判定: X\n<think-task>...</think-task> (or <think-safety> + <think-policy>)
               <final>\n{response}\n</final>

Every record has a decision: a safety-decision record its label, every other
task (FAQ, reference and document QA, math, the user's own pairs) ALLOW, since
benign help is ALLOW by policy. Because the label comes right after the prompt,
its likelihood is the model's uncertainty about the request itself (not its
consistency with reasoning it has just written), the calibrate, evaluate and
runtime code score it there (:func:`so8t.inference.score_labels`), and the
runtime generates an answer only for ALLOW.

Tokenisation uses the tokenizer's own ``apply_chat_template`` text; labels are
``-100`` on every prompt token (loss only on the assistant turn, including its
end-of-turn token). Truncation never cuts the final answer: reasoning is
shortened sentence by sentence from its end first, and a record that still
does not fit is dropped and counted.

Splits are train/val/test by the fractions in params (per task where
``think_format.fractions_by_task`` says so), stratified by (task, decision,
domain) and grouped by ``Record.group`` so no template, FAQ entry, document or
GSM template appears in two splits.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from so8t.data.grounding import ABSTAIN_ANSWER, cite, grounded_prompt, holds_answer
from so8t.decision import decision_line, parse_decision, strip_decision_lines
from so8t.schema import IGNORE_INDEX, THINK_KIND, THINK_MARKERS, Decision, Record, Task

SPLITS = ("train", "val", "test")


def assistant_text(record: Record, style: str, thinking: str | None = None) -> str:
    """The assistant turn's content for ``record`` in ``style`` (``markdown`` or ``tags``).

    Args:
        thinking: overrides ``record.thinking`` (used when shortening).
    """
    m = THINK_MARKERS[style]
    thinking = record.thinking if thinking is None else thinking
    answer = record.response.strip()
    head = decision_line(record_decision(record))
    if style == "markdown":
        think = f"{m['think_open']}{thinking.strip()}{m['think_close']}" if thinking.strip() else ""
        return f"{head}{think}{m['final_open']}{answer}{m['final_close']}"
    kind = THINK_KIND[record.task]
    think = ""
    if thinking.strip():
        think = m["think_open"].format(kind=kind) + thinking.strip() + m["think_close"].format(kind=kind)
    if record.task is Task.DECISION and record.reason:
        think += m["think_open"].format(kind="policy") + record.reason.strip() + m["think_close"].format(kind="policy")
    return f"{head}{think}{m['final_open']}{answer}{m['final_close']}"


def record_decision(record: Record) -> str:
    """The decision a record's assistant turn states: its label, or ALLOW for every non-decision task."""
    return record.decision.value if record.decision is not None else Decision.ALLOW.value



def render(tokenizer, prompt: str, assistant: str | None) -> str:
    """Chat-template text of a user turn, followed by the assistant turn or the generation prompt."""
    messages = [{"role": "user", "content": prompt}]
    if assistant is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[。．！？!?\n])", text)
    return [p for p in parts if p]


@dataclass
class Encoded:
    """One tokenised example.

    Attributes:
        decision_span: ``[start, end)`` token positions of the assistant's first line (``判定: X``).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_text: str
    completion_text: str
    decision_span: tuple[int, int] = (0, 0)


def encode(tokenizer, prompt: str, assistant: str) -> Encoded:
    """Tokenise the full conversation; mask every token that starts inside the prompt.

    Raises:
        ValueError: if the template does not render the prompt as a prefix of
            the full conversation (labels could not be placed safely).
    """
    prompt_text = render(tokenizer, prompt, None)
    full = render(tokenizer, prompt, assistant)
    if not full.startswith(prompt_text):
        raise ValueError(
            "chat template: the generation prompt is not a prefix of the rendered conversation; "
            "cannot separate prompt and answer tokens"
        )
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    cut = len(prompt_text)
    offsets = enc["offset_mapping"]
    labels = [tid if start >= cut else IGNORE_INDEX for tid, (start, _) in zip(ids, offsets)]
    line_end = cut + full[cut:].find("\n") if "\n" in full[cut:] else len(full)
    span = [i for i, (start, _) in enumerate(offsets) if cut <= start < line_end]
    return Encoded(ids, labels, prompt_text, full[cut:], (span[0], span[-1] + 1) if span else (0, 0))


@dataclass
class FormatStats:
    shortened: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    lengths: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def format_record(
    record: Record, tokenizer, style: str, max_length: int, stats: FormatStats, grounding: Grounding | None = None
) -> dict | None:
    """Render and tokenise one record within ``max_length`` tokens, or ``None`` if it cannot fit.

    Args:
        grounding: the user turn gets its ``passages`` (``(doc_id, title, text)``) before the question
            in the runtime's grounded format (:func:`so8t.data.grounding.grounded_prompt`), the
            assistant turn its ``response`` / ``thinking`` where set; its ``kind`` and ``cited``
            passage number are kept in the row (``rag``, ``cited``).
    """
    kind, passages = (grounding.kind, grounding.passages) if grounding else (None, [])
    if grounding is not None and grounding.response is not None:
        record = record.model_copy(update={"response": grounding.response, "thinking": grounding.thinking or ""})
    user_text = grounded_prompt(record.prompt, passages)
    sentences = _sentences(record.thinking)
    keep = len(sentences)
    while True:
        thinking = "".join(sentences[:keep])
        enc = encode(tokenizer, user_text, assistant_text(record, style, thinking))
        if len(enc.input_ids) <= max_length:
            break
        if keep == 0:
            stats.dropped[record.task.value] += 1
            return None
        keep -= 1
    if keep < len(sentences):
        stats.shortened[record.task.value] += 1
    stats.lengths[record.task.value].append(len(enc.input_ids))
    return {
        "id": record.id,
        "task": record.task.value,
        "decision": record.decision.value if record.decision else None,
        "domain": record.domain.value if record.domain else None,
        "category": record.category,
        "group": record.group,
        "source": record.source,
        "prompt": record.prompt,
        "response": record.response,
        "final_answer": record.final_answer,
        "prompt_text": enc.prompt_text,
        "completion_text": enc.completion_text,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "decision_span": list(enc.decision_span),
        "rag": kind,
        "passages": [doc_id for doc_id, _, _ in passages],
        "cited": grounding.cited if grounding else None,
        "n_tokens": len(enc.input_ids),
        "shortened": keep < len(sentences),
    }


def split_groups(
    records: list[Record],
    fractions: tuple[float, float, float],
    seed: int,
    fractions_by_task: dict[str, tuple[float, float, float]] | None = None,
) -> dict[str, str]:
    """Assign every group to a split: stratified by (task, decision, domain), grouped by ``group``.

    Within each stratum the groups are shuffled (seeded) and each goes to the
    split whose record count is furthest below its target share, so splits
    match the fractions as closely as whole groups allow; a stratum with at
    least three groups gives val and test one group each at minimum.

    Args:
        fractions: (train, val, test) shares.
        fractions_by_task: other shares for some tasks (``{"decision": (0.7, 0.15, 0.15)}``).

    Returns:
        ``{group: split name}``.
    """
    group_size: Counter = Counter(r.group for r in records)
    stratum_groups: dict[tuple, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for r in records:
        if r.group not in seen:
            seen.add(r.group)
            key = (r.task.value, r.decision.value if r.decision else "", r.domain.value if r.domain else "")
            stratum_groups[key].append(r.group)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for key in sorted(stratum_groups):
        share = (fractions_by_task or {}).get(key[0], fractions)
        groups = sorted(stratum_groups[key])
        rng.shuffle(groups)
        total = sum(group_size[g] for g in groups)
        counts = dict.fromkeys(SPLITS, 0)
        order = list(groups)
        if len(order) >= 3 and share[1] > 0 and share[2] > 0:
            for name in ("val", "test"):
                g = order.pop()
                assignment[g] = name
                counts[name] += group_size[g]
        for g in order:
            deficits = {s: share[i] * total - counts[s] for i, s in enumerate(SPLITS)}
            best = max(SPLITS, key=lambda s: (deficits[s], -SPLITS.index(s)))
            assignment[g] = best
            counts[best] += group_size[g]
    return assignment


def length_summary(lengths: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per-task token length statistics: count, min, mean, p50, p95, max."""
    out = {}
    for task, vals in sorted(lengths.items()):
        a = np.asarray(vals)
        out[task] = {
            "count": int(a.size),
            "min": int(a.min()),
            "mean": round(float(a.mean()), 1),
            "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)),
            "max": int(a.max()),
        }
    return out


def parse_assistant(text: str, style: str) -> tuple[str, str, str | None]:
    """Split a generated assistant turn into (reasoning, final answer, decision).

    The decision is the first ``判定: X`` line (the turn's first line as trained); the
    reasoning is everything else before the final-answer marker (``# 最終回答`` or
    ``<final>``); the final answer is what follows it (up to ``</final>``), with any
    ``判定:`` line removed. Without a final-answer marker the whole text counts as
    reasoning and the final answer is empty, so reasoning is never mistaken for an answer.
    """
    m = THINK_MARKERS[style]
    decision = parse_decision(text)
    marker = m["final_open"].strip()
    idx = text.find(marker)
    if idx < 0:
        reasoning, final = text, ""
    else:
        reasoning, final = text[:idx], text[idx + len(marker) :]
        close = m["final_close"].strip()
        if close and close in final:
            final = final[: final.find(close)]
    reasoning = strip_decision_lines(reasoning, count=1)
    final = strip_decision_lines(final)
    return reasoning.strip(), final.strip(), decision


def read_records(path) -> list[Record]:
    """Records of ``data/synth/records.jsonl``, validated.

    Raises:
        DataError: naming ``file:line`` and the field of the first invalid record.
    """
    from pydantic import ValidationError

    from so8t.errors import error_location
    from so8t.io import DataError, read_jsonl

    records = []
    for lineno, raw in enumerate(read_jsonl(path), start=1):
        try:
            records.append(Record.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            field_name = error_location(err)
            raise DataError(f"{path}:{lineno}: field {field_name!r}: {err['msg']}") from None
    return records


#: Tasks whose training prompts may carry retrieved passages (math never asks about documents).
GROUNDED_TASKS: frozenset[str] = frozenset(
    {Task.DECISION.value, Task.QA_FAQ.value, Task.QA_REFERENCE.value, Task.QA_USER.value, Task.QA_DOCUMENT.value}
)


#: QA tasks: trained RAFT-style on passages (:func:`choose_grounding`).
QA_TASKS: frozenset[str] = GROUNDED_TASKS - {Task.DECISION.value}
#: Reasoning of a grounded QA target: it names the passage it uses (never a section number of its own).
GOLD_THINKING = "【資料 {n}】に質問への答えが書かれているので、その記述に沿って答えます。"
ABSTAIN_THINKING = "どの資料にも質問への答えは書かれていないので、資料からは答えられないことを伝えます。"


@dataclass(frozen=True)
class Grounding:
    """The passages of one train example and, for QA, the target they call for.

    Attributes:
        kind: ``relevant`` / ``unrelated`` (decisions: passages do not change the label), ``gold``
            (QA: a passage holds the answer; the target cites it) or ``abstain`` (QA: none does; the
            target says so, :data:`so8t.data.grounding.ABSTAIN_ANSWER`).
        passages: ``(doc_id, title, text)`` as fitted into the prompt.
        response, thinking: the target's answer and reasoning (``None``: the record's own).
        cited: the 1-based number of the passage the target cites (``gold`` only).
    """

    kind: str
    passages: list
    response: str | None = None
    thinking: str | None = None
    cited: int | None = None


def _holding(passages: list, reference: str) -> int | None:
    """1-based number of the first fitted passage holding ``reference`` (:func:`so8t.data.grounding.holds_answer`)."""
    return next((n for n, (_, _, text) in enumerate(passages, start=1) if holds_answer(text, reference)), None)


def _in_passage(answer: str, passage_text: str) -> str:
    """The leading sentences of ``answer`` whose text (whitespace removed, NFKC) is in ``passage_text``:
    the part of an extractive answer the fitted (possibly cut) passage really shows; ``""`` if none."""
    import unicodedata

    squash = lambda t: "".join(unicodedata.normalize("NFKC", t).split())  # noqa: E731
    text, kept = squash(passage_text), []
    for sentence in _sentences(answer):
        if squash(sentence) and squash(sentence) not in text:
            break
        kept.append(sentence)
    return "".join(kept).strip()


def _cited_target(record: Record, fitted: list, kind: str = "gold") -> Grounding | None:
    """A :class:`Grounding` whose target cites the first fitted passage holding the answer, cut to the
    sentences that passage shows; ``None`` when no passage shows a whole sentence of it."""
    n = _holding(fitted, record.response)
    answer = _in_passage(record.response, fitted[n - 1][2]) if n else ""
    if not answer:
        return None
    return Grounding(kind, fitted, cite(answer, n), GOLD_THINKING.format(n=n), n)


def _gold(record: Record, grounder, exclude_docs, rng) -> Grounding | None:
    """The retrieved passages with the one holding the answer among them (RAFT's gold + distractors),
    or ``None`` when no indexed passage of the record's document holds it within the token budget."""
    hits = grounder.search(record.prompt, exclude_docs)
    gold = [p for p in grounder.passages_of(record.group) if holds_answer(p.text, record.response)]
    gold += [p for p in hits if holds_answer(p.text, record.response)]
    if not gold:
        return None
    g = gold[0]
    if not any(p.passage_id == g.passage_id for p in hits):
        hits = hits[: max(grounder.retriever.top_k - 1, 0)]
        hits.insert(rng.randrange(len(hits) + 1), g)
    found = _cited_target(record, grounder.fit(hits))
    if found is None:  # cut by the budget: the runtime's top passage is the one it keeps whole
        found = _cited_target(record, grounder.fit([g] + [p for p in hits if p.passage_id != g.passage_id]))
    return found


def choose_grounding(
    record: Record, grounder, params, seed: int, exclude_docs=frozenset()
) -> Grounding | None:
    """The passages of a train record, or ``None`` (a bare prompt).

    Decisions: a seeded ``rag_share`` get passages, of those ``rag_unrelated_share`` random unrelated
    ones, the rest the retriever's; the label does not change. QA, after RAFT (Zhang et al. 2024,
    "RAFT: Adapting Language Model to Domain Specific RAG"): a seeded ``qa_rag_share`` get passages,
    of those ``qa_gold_share`` the retriever's with the passage holding the answer among them, the
    target citing it (:class:`Grounding` ``gold``), the rest what the retriever finds without the
    record's own document, the target saying the documents do not hold the answer (``abstain``;
    ``gold`` instead if another document holds it).

    Args:
        params: the ``think_format`` params.
        exclude_docs: doc ids never shown (the val and test documents).
    """
    rng = random.Random(f"{seed}:rag:{record.id}")
    if grounder is None or record.task.value not in GROUNDED_TASKS:
        return None
    if record.task.value not in QA_TASKS:
        if rng.random() >= params.rag_share:
            return None
        if rng.random() < params.rag_unrelated_share:
            return Grounding("unrelated", grounder.unrelated(record.prompt, rng, exclude_docs))
        return Grounding("relevant", grounder.relevant(record.prompt, exclude_docs))
    if rng.random() >= params.qa_rag_share:
        return None
    if rng.random() < params.qa_gold_share:
        return _gold(record, grounder, exclude_docs, rng)
    own = {p.doc_id for p in grounder.passages_of(record.group)}
    fitted = grounder.relevant(record.prompt, set(exclude_docs) | own)
    if not fitted:  # nothing retrieved: the prompt would be bare, and a bare question is answered
        return None
    if _holding(fitted, record.response) is not None:  # another document holds it: cite that one
        return _cited_target(record, fitted)
    return Grounding("abstain", fitted, ABSTAIN_ANSWER, ABSTAIN_THINKING)


def lm_text_windows(docs: list[dict], tokenizer, window: int, allowed_groups) -> tuple[list[dict], dict]:
    """``lm_text`` train examples: each document tokenised with BOS, cut into ``window``-token windows.

    The windows are those of held-out perplexity (:func:`so8t.inference.perplexity_windows`:
    the tokenizer's own special tokens, then consecutive pieces), so the task trains exactly what
    that metric measures, on other text. Every token is a label (position 0 predicts nothing);
    pieces under 16 tokens are dropped.

    Args:
        docs: ``{"id", "text", "group", "source"}`` (:func:`so8t.data.sources.reference.build_lm_text`).
        window: tokens per window (``think_format.lm_window``).
        allowed_groups: called with a document's ``group``: ``False`` skips it (its QA records are
            in val or test).

    Returns:
        ``(examples, stats)``: stats ``{"docs", "skipped_docs", "windows", "tokens"}``.
    """
    out: list[dict] = []
    skipped = 0
    for d in docs:
        if not allowed_groups(d["group"]):
            skipped += 1
            continue
        ids = tokenizer(d["text"])["input_ids"]
        for k, start in enumerate(range(0, len(ids), window)):
            piece = ids[start : start + window]
            if len(piece) < 16:
                continue
            out.append({
                "id": f"{d['id']}#{k}", "task": Task.LM_TEXT.value, "decision": None, "domain": None,
                "category": None, "group": d["group"], "source": d["source"], "input_ids": piece,
                "labels": list(piece), "decision_span": [0, 0], "rag": None, "passages": [], "cited": None,
                "n_tokens": len(piece), "shortened": False,
            })
    stats = {"docs": len(docs) - skipped, "skipped_docs": skipped, "windows": len(out),
             "tokens": sum(len(e["input_ids"]) for e in out)}
    return out, stats


def format_and_split(
    records: list[Record], tokenizer, params, seed: int, progress=None, grounder=None, lm_docs: list[dict] | None = None
) -> tuple[dict, dict]:
    """Render, tokenise and split ``records`` (``params``: the ``think_format`` section).

    Train examples of the grounded tasks get passages as the runtime would give them
    (:func:`choose_grounding`), never from a val or test document; val and test stay bare
    (evaluate scores them both with and without passages).

    Args:
        progress: wraps the record iterator (e.g. :func:`so8t.console.track`), or ``None``.
        grounder: a :class:`so8t.data.grounding.Grounder` (``None``: no passages anywhere).
        lm_docs: documents of the ``lm_text`` task (:func:`lm_text_windows`), added to the train
            split only, and only where their ``group`` has no records outside train.

    Returns:
        (``{split: [example, ...]}``, the summary written to ``data/formatted/stats.json``).
    """
    stats = FormatStats()
    assignment = split_groups(
        records,
        (params.train_fraction, params.val_fraction, params.test_fraction),
        seed,
        {task.value: tuple(f) for task, f in params.fractions_by_task.items()},
    )
    items = progress(records) if progress is not None else records
    # The val and test documents never appear in a training prompt (nor in a target: targets come
    # from the record's own document, and a record's document is in its split).
    held = grounder.docs_of({g for g, s in assignment.items() if s != "train"}) if grounder else set()
    formatted = []
    for r in items:
        train = assignment[r.group] == "train"
        grounding = choose_grounding(r, grounder, params, seed, held) if train else None
        ex = format_record(r, tokenizer, params.style, params.max_length, stats, grounding)
        if ex is not None:
            formatted.append(ex)
    by_split = {s: [ex for ex in formatted if assignment[ex["group"]] == s] for s in SPLITS}
    lm, lm_stats = lm_text_windows(lm_docs or [], tokenizer, params.lm_window,
                                   lambda g: assignment.get(g, "train") == "train")
    by_split["train"] += lm
    if lm:
        stats.lengths[Task.LM_TEXT.value] += [e["n_tokens"] for e in lm]
    summary = {
        "style": params.style,
        "max_length": params.max_length,
        "records_in": len(records),
        "examples_out": len(formatted),
        "shortened": dict(stats.shortened),
        "dropped": dict(stats.dropped),
        "token_lengths": length_summary(stats.lengths),
        "grounded": dict(Counter(f"{e['task']}:{e['rag']}" for e in formatted if e["rag"])),
        "lm_text": lm_stats | {"window": params.lm_window},
        "splits": {
            s: {
                "examples": len(ex),
                "groups": len({e["group"] for e in ex}),
                "by_task": dict(Counter(e["task"] for e in ex)),
                "by_decision": dict(Counter(e["decision"] for e in ex if e["decision"])),
            }
            for s, ex in by_split.items()
        },
    }
    return by_split, summary
