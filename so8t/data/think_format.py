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

from so8t.data.grounding import grounded_prompt
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
    record: Record, tokenizer, style: str, max_length: int, stats: FormatStats, grounding: tuple | None = None
) -> dict | None:
    """Render and tokenise one record within ``max_length`` tokens, or ``None`` if it cannot fit.

    Args:
        grounding: ``(kind, passages)``: the user turn gets ``passages`` (``(doc_id, title, text)``)
            before the question in the runtime's grounded format (:func:`so8t.data.grounding.grounded_prompt`);
            ``kind`` (``relevant`` / ``unrelated``) is kept in the row.
    """
    kind, passages = grounding if grounding else (None, [])
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


def choose_grounding(record: Record, grounder, rag_share: float, unrelated_share: float, seed: int):
    """``(kind, passages)`` for a train record, or ``None``: a seeded ``rag_share`` of the grounded tasks
    get passages, of those ``unrelated_share`` unrelated ones (the answer is not in the documents),
    the rest the retriever's passages without the record's own answer text."""
    rng = random.Random(f"{seed}:rag:{record.id}")
    if grounder is None or record.task.value not in GROUNDED_TASKS or rng.random() >= rag_share:
        return None
    if rng.random() < unrelated_share:
        return "unrelated", grounder.unrelated(record.prompt, rng)
    return "relevant", grounder.relevant(record.prompt, exclude_text=record.response)


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
                "labels": list(piece), "decision_span": [0, 0], "rag": None, "passages": [],
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
    (:func:`choose_grounding`, ``rag_share`` / ``rag_unrelated_share``); val and test stay bare
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
    formatted = []
    for r in items:
        train = assignment[r.group] == "train"
        grounding = choose_grounding(r, grounder, params.rag_share, params.rag_unrelated_share, seed) if train else None
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
