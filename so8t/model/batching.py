"""What the train stage feeds the Trainer: the rows of one pass, their order and their batches.

* :func:`mix_tasks`: each task's examples repeated by its ``train.task_weights`` weight;
* :func:`decision_line_copies`: the decision examples cut after their ``判定: X`` line (extra
  passes over the decisions), and :func:`choice_token_ids`, the labels' first tokens;
* :class:`BalancedDecisionSampler` / :func:`train_sampler`: the order of the rows
  (``train.sampling: balanced_decisions``);
* :class:`DecisionWeightCollator`: padding plus ``label_weights`` and ``choice_mask``;
* :func:`eval_sets`: the per-task val examples of Trainer's evaluations.
"""

from __future__ import annotations

import torch

from so8t.decision import common_prefix_length
from so8t.schema import IGNORE_INDEX


class DecisionWeightCollator:
    """Pads ``input_ids`` / ``labels`` (``DataCollatorForSeq2Seq``) and adds ``label_weights`` and ``choice_mask``.

    ``label_weights`` ``(B, T)`` float is 1 everywhere and ``weight`` on the tokens of each row's
    ``decision_span`` (the ``判定: X`` line), so the decision, one or three tokens in ~100 of a
    decision example, is not drowned by its reasoning and answer. ``choice_mask`` ``(B, T)`` bool
    is true at each row's ``choice_pos`` (a decision line's first label token,
    :func:`decision_line_copies`; absent or -1: none).
    """

    def __init__(self, tokenizer, weight: float) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
        self.weight = weight

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        spans = [f.get("decision_span") or (0, 0) for f in features]
        batch = self.pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        weights = torch.ones(batch["labels"].shape, dtype=torch.float32)
        choice = torch.zeros(batch["labels"].shape, dtype=torch.bool)
        for i, (start, end) in enumerate(spans):
            weights[i, start:end] = self.weight
            pos = features[i].get("choice_pos")
            if pos is not None and pos >= 0:
                choice[i, pos] = True
        batch["label_weights"] = weights
        batch["choice_mask"] = choice
        return batch


class BalancedDecisionSampler(torch.utils.data.Sampler[int]):
    """Indices in batches: decision lines with every label equally often, all batches length-grouped.

    A pass (one "epoch" of the sampler) holds

    * **decision batches**: rows with a ``label`` (the cut ``判定: X`` lines), ``batch_size // k`` of
      each of the ``k`` labels per batch (the ``batch_size % k`` remaining slots rotate over the labels
      from batch to batch, so each label gets the same share of the pass; a batch smaller than ``k``
      holds ``batch_size`` different labels and every ``k`` consecutive ones hold each label
      ``batch_size`` times). The number of batches
      covers the largest label once; a smaller label is drawn again (a fresh shuffle each round), so
      the model never learns the train split's class shares as a prior. Within each label the
      drawn rows are sorted by length and batch ``j`` takes the next rows of every label, so one
      batch holds rows of a similar length (little padding: a grounded prompt is ~4x a bare one);
    * **other batches**: rows without a label, shuffled, sorted by length within mega-batches of
      ``50 * batch_size`` (as transformers' ``group_by_length``) and cut into batches.

    Full batches are shuffled together; a last, partial batch of other rows goes at the end
    (a ``DataLoader`` cuts the index stream into consecutive ``batch_size`` chunks, so only the
    last chunk may be short). The order depends only on ``seed`` and the epoch
    (:meth:`set_epoch`), so a resumed run skips exactly the batches it already trained on.

    Args:
        labels: ``(N,)`` the decision label of each row, ``None`` for rows outside the balancing.
        lengths: ``(N,)`` tokens of each row.
        batch_size: rows per batch (per device).
        seed: the run's seed.

    Raises:
        ValueError: ``labels`` and ``lengths`` differ in length, or ``batch_size`` is below 1.
    """

    def __init__(self, labels: list[str | None], lengths: list[int], batch_size: int, seed: int) -> None:
        if len(labels) != len(lengths):
            raise ValueError(f"labels ({len(labels)}) and lengths ({len(lengths)}) differ in length")
        self.labels, self.lengths, self.batch_size, self.seed = list(labels), list(lengths), batch_size, seed
        if batch_size < 1:
            raise ValueError(f"train.per_device_train_batch_size: {batch_size} must be at least 1")
        self.names = sorted({x for x in self.labels if x is not None})
        self.epoch = 0
        self._length = sum(len(b) for b in self.batches(0))

    def set_epoch(self, epoch: int) -> None:
        """Use pass ``epoch``'s order (Trainer calls this at the start of each pass)."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of pass ``epoch``, in training order (decision batches hold every label)."""
        import random

        rng = random.Random(f"{self.seed}:balanced:{epoch}")
        b, names = self.batch_size, self.names
        by_label: dict[str, list[int]] = {x: [] for x in names}
        others: list[int] = []
        for i, x in enumerate(self.labels):
            (others if x is None else by_label[x]).append(i)
        full: list[list[int]] = []
        if names:
            k, extra = divmod(b, len(names))
            n_batches = -(-max(len(v) for v in by_label.values()) * len(names) // b)
            counts = [[k + ((j + t) % len(names) < extra) for t in range(len(names))] for j in range(n_batches)]
            queues = {}
            for t, x in enumerate(names):
                need = sum(c[t] for c in counts)
                drawn: list[int] = []
                while len(drawn) < need:
                    pool = by_label[x][:]
                    rng.shuffle(pool)
                    drawn += pool[: need - len(drawn)]
                queues[x] = sorted(drawn, key=lambda i: (self.lengths[i], rng.random()))
            for j in range(n_batches):
                batch = []
                for t, x in enumerate(names):
                    batch += queues[x][: counts[j][t]]
                    queues[x] = queues[x][counts[j][t]:]
                full.append(batch)
        rng.shuffle(others)
        mega = 50 * b
        grouped = [i for s in range(0, len(others), mega)
                   for i in sorted(others[s:s + mega], key=lambda i: -self.lengths[i])]
        chunks = [grouped[s:s + b] for s in range(0, len(grouped), b)]
        tail = chunks.pop() if chunks and len(chunks[-1]) < b else None
        full += chunks
        rng.shuffle(full)
        return full + ([tail] if tail else [])

    def __iter__(self):
        for batch in self.batches(self.epoch):
            yield from batch

    def __len__(self) -> int:
        return self._length


def train_sampler(params, rows: list[dict]) -> BalancedDecisionSampler | None:
    """The sampler ``train.sampling`` asks for: :class:`BalancedDecisionSampler` over the cut decision
    lines (``task`` ``decision_line``, balanced by ``decision``) for ``balanced_decisions``, else ``None``
    (Trainer's own ``random`` / ``group_by_length``)."""
    p = params.train
    if p.sampling != "balanced_decisions":
        return None
    labels = [r.get("decision") if r.get("task") == "decision_line" else None for r in rows]
    return BalancedDecisionSampler(labels, [len(r["input_ids"]) for r in rows], p.per_device_train_batch_size, params.seed)


def mix_tasks(rows: list[dict], weights: dict, seed: int) -> list[dict]:
    """The training examples with each task's repeated by its weight (a fraction keeps a seeded sample).

    Args:
        rows: examples with ``task``.
        weights: ``{task: w}``; tasks not named keep weight 1.

    Returns:
        ``floor(w)`` copies of every example of a task plus ``round((w - floor(w)) * n)`` of them
        drawn without replacement, in task order (the Trainer shuffles).
    """
    import random

    rng = random.Random(f"{seed}:mix")
    out: list[dict] = []
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r.get("task", ""), []).append(r)
    for task, items in sorted(by_task.items()):
        w = float(weights.get(task, 1.0))
        whole, frac = int(w), w - int(w)
        out += items * whole + rng.sample(items, round(frac * len(items)))
    return out


def decision_line_copies(rows: list[dict], passes: float, seed: int, rag_passes: float | None = None) -> list[dict]:
    """Decision examples cut after their ``判定: X`` line: ``passes`` extra passes over the decisions.

    A full decision example spends ~100 label tokens of reasoning and answer for its one
    decision token; the cut copy ``input_ids[:end]`` (``end`` the end of ``decision_span``) trains
    the same prompt -> decision step at a fraction of the cost. Its loss is on the label alone:
    the tokens of ``decision_span`` from the first one in which the labels differ (``判定:`` is the
    prefix every decision line shares; the full examples teach it). The first label token
    (``choice_pos``) is learnt among the labels' first tokens only
    (:func:`so8t.model.loss.label_token_ce_sum` with ``choice_mask``), the rest of the label over
    the whole vocabulary. A softmax over the
    whole vocabulary at that position is learnt first by raising the three label tokens
    everywhere: on the train decisions' bare lines (lr 5e-4, batch 12) held-out perplexity went
    from ~50 to 695 after 20 steps and 1,874 after 40, while among the labels alone it stayed at
    ~52 (1,024 held-out tokens, transformers). No end-of-turn token follows the cut, so nothing
    teaches the model to stop after the decision line.

    A decision whose prompt carries retrieved passages (``rag``, ``think_format.rag_share``) makes
    a line ~7x as long as a bare one (on the default data 307 of 948 lines, 77 % of the lines'
    tokens): ``rag_passes`` gives those lines their own number of passes, so the step budget goes
    to the many short lines.

    Args:
        rows: formatted examples (``task``, ``input_ids``, ``labels``, ``decision_span``, ``rag``).
        passes: copies per decision example (a fraction keeps a seeded sample, as :func:`mix_tasks`).
        seed: seed of that sample (passed to :func:`mix_tasks`; the run's ``seed``).
        rag_passes: copies per decision example with passages (``None``: ``passes``, every line alike).

    Returns:
        The cut copies (``task`` ``decision_line``, ``choice_pos``: the first label token's
        position): in input order with ``rag_passes`` ``None``, else the bare lines' copies, then
        those with passages.
    """
    decisions = [r for r in rows if r.get("task") == "decision" and r.get("decision_span", [0, 0])[1] > 0]
    spans = [r["input_ids"][r["decision_span"][0] : r["decision_span"][1]] for r in decisions]
    shared = common_prefix_length(spans)
    cut = []
    for r, span in zip(decisions, spans):
        start, end = r["decision_span"]
        first = start + min(shared, len(span) - 1)  # the label's first token: where the labels differ
        labels = [IGNORE_INDEX] * first + r["labels"][first:end]
        cut.append(r | {"task": "decision_line", "input_ids": r["input_ids"][:end], "labels": labels, "choice_pos": first})
    if rag_passes is None:
        return mix_tasks(cut, {"decision_line": passes}, seed) if passes > 0 else []
    bare = [r for r in cut if not r.get("rag")]
    rag = [r for r in cut if r.get("rag")]
    return mix_tasks(bare, {"decision_line": passes}, seed) + mix_tasks(rag, {"decision_line": rag_passes}, seed)


def choice_token_ids(rows: list[dict]) -> list[int]:
    """The first label tokens of the decision lines (``choice_pos`` of :func:`decision_line_copies`), sorted."""
    return sorted({r["input_ids"][r["choice_pos"]] for r in rows if r.get("choice_pos", -1) >= 0})


def eval_sets(rows: list[dict], per_task: int, seed: int) -> dict[str, list[dict]]:
    """``{task: up to per_task val examples}`` (seeded sample) for Trainer's per-task eval loss."""
    import random

    rng = random.Random(f"{seed}:eval")
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(
            {"input_ids": r["input_ids"], "labels": r["labels"], "decision_span": r.get("decision_span", [0, 0])}
        )
    return {t: rng.sample(v, min(per_task, len(v))) for t, v in sorted(by_task.items())}
