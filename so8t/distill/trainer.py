"""Training the student on the teacher's stored top-k: KD + CE, with the train stage's PET and SO8T.

**Loss** per label position (Hinton, Vinyals and Dean 2015, "Distilling the
Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531)::

    loss = w * CE(z_s, y) + (1 - w) * T^2 * KL(p_T || q_T)
    p_T = softmax(teacher_logprobs[topk] / T)      renormalised over the k ids
    q_T = softmax(z_s[topk] / T)                   renormalised over the same ids

``T^2`` keeps the gradient scale of the soft term independent of ``T``
(Hinton et al., section 2). Renormalising both distributions over the teacher's
top-k ids makes the target exact for what is stored; the student's mass outside
those ids is left to the CE term. The loss is averaged over label tokens and
added to the usual PET penalty: :class:`DistillTrainer` overrides only the task
loss of :class:`so8t.model.trainer.SO8TTrainer`, whose label-only LM head it reuses.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from so8t.distill.teacher import DistillError, TopK, label_positions
from so8t.io import DataError
from so8t.inference.hf import output_logits
from so8t.model.trainer import SO8TTrainer
from so8t.schema import IGNORE_INDEX


def topk_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(p_T || q_T)`` per position over the teacher's top-k ids (Hinton et al. 2015).

    ``p_T = softmax(teacher_logprobs / T)`` and ``q_T = softmax(student_logits[teacher_ids] / T)``,
    both renormalised over the ``k`` ids.

    Args:
        student_logits: ``(N, V)`` float logits.
        teacher_ids: ``(N, k)`` long.
        teacher_logprobs: ``(N, k)`` float (any normalisation: only differences matter).

    Returns:
        ``(N,)`` float32 KL in nats (not multiplied by ``T^2``).
    """
    log_q = torch.log_softmax(student_logits.float().gather(1, teacher_ids.long()) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)



def distill_examples(rows: list[dict], topk: TopK, source: Path) -> list[dict]:
    """Training items: ``input_ids``, ``labels`` and the teacher rows of each example.

    Raises:
        DataError: an example missing from ``rows`` or whose label positions differ
            from the stored ones (the targets are stale: rerun distill-teacher).
    """
    by_id = {r["id"]: r for r in rows}
    out = []
    for e, ex_id in enumerate(topk.example_ids):
        row = by_id.get(ex_id)
        if row is None:
            raise DataError(f"{source}: example {ex_id!r} of the teacher targets is missing (rerun distill-teacher)")
        sl = topk.rows(e)
        if not np.array_equal(label_positions(row["labels"]), topk.positions[sl]):
            raise DataError(
                f"{source}: label positions of {ex_id!r} differ from the teacher targets (rerun distill-teacher)"
            )
        out.append(
            {
                "input_ids": row["input_ids"],
                "labels": row["labels"],
                "teacher_ids": topk.ids[sl],
                "teacher_logprobs": topk.logprobs[sl],
            }
        )
    return out


class DistillCollator:
    """Right-pads ``input_ids`` / ``labels`` and stacks the teacher rows of a batch.

    The teacher rows of the batch are concatenated in example order, which is the
    row-major order of the label mask ``labels[:, 1:] != -100``: row ``j`` of
    ``teacher_ids`` belongs to the ``j``-th label position of the batch.

    Returns (per batch): ``input_ids``, ``labels``, ``attention_mask`` ``(B, T)``
    long; ``teacher_ids`` ``(N, k)`` long; ``teacher_logprobs`` ``(N, k)`` float32.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "teacher_ids": torch.from_numpy(np.concatenate([f["teacher_ids"] for f in features])).long(),
            "teacher_logprobs": torch.from_numpy(
                np.concatenate([f["teacher_logprobs"] for f in features]).astype(np.float32)
            ),
        }


class DistillTrainer(SO8TTrainer):
    """:class:`~so8t.model.trainer.SO8TTrainer` whose task loss mixes CE with the top-k KD term.

    ``task = ce_weight * CE + (1 - ce_weight) * T^2 * KL(p_T || q_T)``, summed over label
    tokens (the LM head runs only there); normalisation, PET and logging are the base class's.

    Args:
        temperature: ``T``.
        ce_weight: ``w`` in [0, 1].
        (other arguments as :class:`~so8t.model.trainer.SO8TTrainer`)
    """

    def __init__(self, *args, temperature: float = 2.0, ce_weight: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.ce_weight = ce_weight

    def task_loss(self, model, inputs: dict, outputs) -> tuple[torch.Tensor, int, dict[str, float]]:
        """KD + CE summed over the batch's label tokens; raises :class:`DistillError` on misaligned teacher rows."""
        last = outputs.hidden_states[-1]
        targets = inputs["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        n_label = int(keep.sum())
        t_ids, t_lp = inputs["teacher_ids"], inputs["teacher_logprobs"]
        if t_ids.shape[0] != n_label:
            raise DistillError(f"batch has {n_label} label positions but {t_ids.shape[0]} teacher rows")
        if n_label:
            logits = output_logits(self.accelerator.unwrap_model(model), last[:, :-1][keep])
            ce_sum = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
            kd_sum = topk_kl(logits, t_ids, t_lp, self.temperature).sum()
        else:
            ce_sum = kd_sum = last.sum() * 0.0
        objective = self.ce_weight * ce_sum + (1.0 - self.ce_weight) * self.temperature**2 * kd_sum
        n = max(n_label, 1)
        return objective, n_label, {"ce": ce_sum.detach().item() / n, "kd": kd_sum.detach().item() / n}


def train_student(model: nn.Module, examples: list[dict], pad_token_id: int, params, work_dir: Path) -> dict:
    """Train ``model`` on ``examples`` (:func:`distill_examples`) with :class:`DistillTrainer`.

    Batch size, gradient accumulation, schedule, warm-up, clipping, weight decay,
    PET and the SO8T learning rate come from ``params.train``; steps and the
    learning rate from ``params.distill``.

    Returns:
        ``{"steps", "train_seconds", "seconds_per_step", "tokens_per_s", "final_loss",
        "final_ce", "final_kd", "history": [{"step", "loss", "ce", "kd"}, ...]}``.
    """
    from so8t.model.callbacks import RichProgressCallback, quiet_trainer
    from so8t.model.pet import PETSchedule
    from so8t.model.trainer import training_arguments

    p, d = params.train, params.distill
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    # The teacher arrays are not forward() arguments: keep them in the batch.
    args = training_arguments(
        p, output_dir=work_dir, max_steps=d.max_steps, learning_rate=d.learning_rate, seed=params.seed,
        remove_unused_columns=False,
    )
    trainer = quiet_trainer(
        DistillTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=DistillCollator(pad_token_id),
            callbacks=[RichProgressCallback()],
            pet_schedule=PETSchedule(p.pet.phase_boundaries, p.pet.lambdas) if p.pet.enabled else None,
            pet_hidden_state_index=p.pet.hidden_state_index,
            pet_reduction=p.pet.reduction,
            so8t_learning_rate=p.so8t.learning_rate,
            temperature=d.temperature,
            ce_weight=d.ce_weight,
        )
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    history = [
        {k: h[k] for k in ("step", "loss", "ce", "kd", "tokens_per_s") if k in h}
        for h in trainer.state.log_history
        if "kd" in h
    ]
    last = history[-1] if history else {}
    return {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "tokens_per_s": round(float(np.mean([h["tokens_per_s"] for h in history])), 2) if history else None,
        "final_loss": last.get("loss", result.training_loss),
        "final_ce": last.get("ce"),
        "final_kd": last.get("kd"),
        "history": history,
    }
