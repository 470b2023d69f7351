"""Training: transformers ``Trainer`` + PEFT LoRA + SO8T rotations + the PET penalty.

The objective of one micro-batch is::

    loss = CE(labels) + lambda(progress) * PET(h, attention_mask)

* CE is the usual next-token cross-entropy over unmasked label positions, but
  the LM head is applied only where a label exists (the prompt and padding
  never reach the 262k-wide Gemma head): the same value as the model's own
  loss (tested), at a fraction of the cost.
* PET is :func:`so8t.pet.pet_penalty` on ``hidden_states[params.pet.hidden_state_index]``
  with the attention mask, weighted by the three-phase :class:`so8t.pet.PETSchedule`.
* SO8T rotations (:mod:`so8t.model.attach`) are trained with their own learning rate
  and no weight decay (a decay would pull them towards identity).

Metrics go to dvclive each step (``ce``, ``pet``, ``pet_lambda``, ``loss``,
``learning_rate``, ``tokens_per_s``), progress to a rich bar.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from so8t.model.attach import (
    ROTATION_ATTR,
    ROTATIONS_FILE,
    attach_rotations,
    attached_rotations,
    gather_generators,
    save_rotations,
    set_generators,
)
from so8t.model.checkpoint import (
    PREFIX,
    STAGING,
    GracefulStopCallback,
    TimeCheckpointCallback,
    fingerprint,
    latest_good_checkpoint,
    prepare_root,
    publish,
    rotate,
)
from so8t.errors import So8tError
from so8t.io import WRITE_ERRNOS, DataError, write_error
from so8t.params import TrainParams
from so8t.model.base_model import output_logits
from so8t.model.pet import PETSchedule, pet_penalty
from so8t.model.rotation import whole
from so8t.schema import IGNORE_INDEX


def label_token_ce_sum(
    model: nn.Module,
    last_hidden: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    choice_mask: torch.Tensor | None = None,
    choice_ids: list[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed (optionally weighted) next-token cross-entropy over label positions only.

    Position ``t`` predicts ``labels[t + 1]``; positions whose next label is
    ``-100`` are skipped before the LM head. Where ``choice_mask`` is set, the softmax runs over
    the ``choice_ids`` columns of the logits alone (a cross-entropy among the decision labels'
    first tokens: it moves the labels against each other, never against the rest of the
    vocabulary); everywhere else over the whole vocabulary.

    Args:
        last_hidden: ``(B, T, D)`` final hidden states.
        labels: ``(B, T)`` long, ``-100`` where no loss is taken.
        weights: ``(B, T)`` float weight of each token's loss (``None``: all 1).
        choice_mask: ``(B, T)`` bool, true at the label tokens scored among ``choice_ids`` only.
        choice_ids: token ids of the choices (each masked label must be one of them).

    Returns:
        (sum of ``weight * CE`` in nats as a float32 scalar tensor, number of label tokens).

    Raises:
        ValueError: a masked label that is not in ``choice_ids``.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return last_hidden.sum() * 0.0, 0
    logits = output_logits(model, last_hidden[:, :-1][keep])
    kept = targets[keep]
    if choice_mask is not None and choice_ids and bool(choice_mask[:, 1:][keep].any()):
        chosen = choice_mask[:, 1:][keep].to(kept.device)
        ids = torch.as_tensor(choice_ids, device=kept.device)
        match = kept[chosen][:, None] == ids[None, :]
        if not bool(match.any(1).all()):
            raise ValueError(f"label_token_ce_sum: a choice label is not one of choice_ids {choice_ids}")
        ce = torch.empty(kept.shape, dtype=torch.float32, device=kept.device)
        ce[~chosen] = nn.functional.cross_entropy(logits[~chosen], kept[~chosen], reduction="none").float()
        ce[chosen] = nn.functional.cross_entropy(logits[chosen][:, ids], match.float().argmax(1), reduction="none").float()
    else:
        ce = nn.functional.cross_entropy(logits, kept, reduction="none")
    if weights is not None:
        ce = ce * weights[:, 1:][keep].to(ce.dtype)
    return ce.sum(), n


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


class SO8TTrainer(Trainer):
    """``Trainer`` whose loss is a label-only task loss plus scheduled PET.

    The task loss is the hook :meth:`task_loss` (label-token cross-entropy here;
    distillation overrides it with KD + CE). :meth:`compute_loss` normalises it
    over the label tokens of the whole gradient-accumulation window, adds PET and
    logs the statistics, so every subclass scales losses the same way.

    Args:
        pet_schedule: lambda schedule, or ``None`` to disable PET.
        pet_hidden_state_index: index into ``outputs.hidden_states``.
        pet_reduction: ``"relative"``, ``"mean"`` or ``"sum"`` over the hidden dimension.
        so8t_learning_rate: learning rate of the rotation generators.
        keep_checkpoints: newest verified checkpoints kept.
        decision_eval: called with the model at each evaluation; returns metrics to log (e.g.
            ``eval_decision_macro_f1``), or ``None``.
        train_sampler: the order of the training rows (e.g. :class:`BalancedDecisionSampler`);
            ``None``: Trainer's own (``train_sampling_strategy``).
        choice_ids: the decision labels' first tokens (:func:`choice_token_ids`): where a batch's
            ``choice_mask`` is set the cross-entropy runs over these alone.
    """

    def __init__(
        self,
        *args,
        pet_schedule: PETSchedule | None = None,
        pet_hidden_state_index: int = -1,
        pet_reduction: str = "relative",
        so8t_learning_rate: float = 1e-3,
        keep_checkpoints: int = 5,
        decision_eval=None,
        train_sampler=None,
        choice_ids: list[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.decision_eval = decision_eval
        self.train_sampler = train_sampler
        self.choice_ids = choice_ids
        # Have Trainer count the label tokens of each accumulation window (num_items_in_batch) for
        # every model; compute_loss normalises by them, so training_step must not divide by the
        # accumulation steps again (Trainer reads loss_is_scaled_for_ga).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.keep_checkpoints = keep_checkpoints
        self._staging: Path | None = None
        # Rotations gathered on every rank by save_model / export, written by the saving rank's _save.
        self._rotations_to_save: dict[int, torch.Tensor] | None = None
        self.pet_schedule = pet_schedule
        self.pet_hidden_state_index = pet_hidden_state_index
        self.pet_reduction = pet_reduction
        self.so8t_learning_rate = so8t_learning_rate
        self._acc: dict[str, float] = {}
        self._acc_n = 0
        self._tokens = 0
        self._last_log_time = time.perf_counter()

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def progress(self) -> float:
        """Fraction of optimiser steps done, in [0, 1]."""
        return self.state.global_step / max(1, self.state.max_steps)

    def task_loss(self, model, inputs: dict, outputs) -> tuple[torch.Tensor, int, dict[str, float]]:
        """The task loss of one micro-batch, summed over its label tokens (the hook subclasses override).

        Args:
            model: the (possibly DDP-wrapped) model.
            inputs: the collated batch (``labels`` ``(B, T)`` long, ``-100`` where no loss is taken).
            outputs: the forward's output with ``hidden_states``.

        Returns:
            (summed loss in nats as a float32 scalar tensor, number of label tokens, per-token
            statistics to log, e.g. ``{"ce": ...}``).
        """
        # The LM head is frozen, so applying it outside the DDP wrapper needs no gradient sync.
        unwrapped = self.accelerator.unwrap_model(model)
        ce_sum, n = label_token_ce_sum(
            unwrapped, outputs.hidden_states[-1], inputs["labels"], inputs.get("label_weights"),
            inputs.get("choice_mask"), self.choice_ids,
        )
        return ce_sum, n, {"ce": ce_sum.detach().item() / max(n, 1)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``task_sum / N + lambda * PET / GA``: ``N`` = label tokens of the accumulation window.

        With ``num_items_in_batch`` (label tokens of the whole window, counted by
        ``Trainer``) gradient accumulation over ``GA`` micro-batches of ``b`` gives
        the same CE gradient as one batch of ``GA * b`` (tested); without it, the
        micro-batch mean is divided by ``GA``. PET is a per-micro-batch mean,
        averaged over the window.
        """
        mask = inputs["attention_mask"]
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        task_sum, n_label, stats = self.task_loss(model, inputs, outputs)
        if not model.training:  # evaluation: the task loss per label token, no PET, no training stats
            loss = task_sum / max(n_label, 1)
            return (loss, outputs) if return_outputs else loss
        ga = self.current_gradient_accumulation_steps
        if num_items_in_batch is not None:
            loss = task_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = task_sum / max(n_label, 1) / ga
        if self.pet_schedule is not None:
            lam = self.pet_schedule(self.progress())
            pet = pet_penalty(outputs.hidden_states[self.pet_hidden_state_index], mask, self.pet_reduction)
            loss = loss + lam * pet / ga
            stats |= {"pet": pet.detach().item(), "pet_lambda": lam, "pet_phase": self.pet_schedule.phase(self.progress())}
        for k, v in stats.items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._acc_n += 1
        self._tokens += int(mask.sum())
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation (per-task losses for a dict of datasets), then :attr:`decision_eval`."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.decision_eval is not None:
            extra = self.decision_eval(self.model)
            self.log(extra)
            metrics |= extra
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._acc_n and "loss" in logs:
            logs.update({k: round(v / self._acc_n, 6) for k, v in self._acc.items()})
            now = time.perf_counter()
            logs["tokens_per_s"] = round(self._tokens / max(now - self._last_log_time, 1e-9), 2)
            rots = attached_rotations(self.model)
            if rots:
                with torch.no_grad():
                    logs["so8t_orthogonality_error"] = float(sum(r.orthogonality_error() for r in rots.values()))
                    logs["so8t_max_angle"] = max(r.max_angle() for r in rots.values())
            self._acc, self._acc_n, self._tokens, self._last_log_time = {}, 0, 0, now
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            rotation, decay, no_decay = [], [], []
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                if f"{ROTATION_ATTR}." in name:
                    rotation.append(p)
                elif p.ndim < 2 or "bias" in name:
                    no_decay.append(p)
                else:
                    decay.append(p)
            groups = [
                {"params": decay, "weight_decay": self.args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
            if rotation:
                groups.append({"params": rotation, "weight_decay": 0.0, "lr": self.so8t_learning_rate})
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Gather the rotations on every rank first: under FSDP2 they are sharded and gathering
        # is a collective, while ``_save`` runs on the saving rank only.
        self._rotations_to_save = gather_generators(self.model) if attached_rotations(self.model) else None
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._rotations_to_save = None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if attached_rotations(self.model) and self.args.should_save:
            save_rotations(self.model, Path(output_dir or self.args.output_dir) / ROTATIONS_FILE,
                           self._rotations_to_save)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def export(self, output_dir: str) -> None:
        """Write the trained adapter and ``so8t_rotations.safetensors`` to ``output_dir``; every rank calls it.

        Unsharded runs (one process, DDP) use :meth:`save_model`. Under FSDP the parameters are
        sharded and Trainer's ``save_model`` writes nothing for ``SHARDED_STATE_DICT``: the
        trainable tensors and the rotations are gathered whole on every rank, and the main
        process writes a standard PEFT adapter from them.
        """
        if not self.is_fsdp_enabled:
            self.save_model(output_dir)
            return
        # The trainable tensors (PEFT picks the adapter's keys, as in an unsharded save), each gathered
        # whole on every rank, in the same order.
        with torch.no_grad():
            state_dict = {
                name: whole(p).detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad
            }
        self._rotations_to_save = gather_generators(self.model) if attached_rotations(self.model) else None
        try:
            if self.args.should_save:
                self._save(output_dir, state_dict=state_dict)
        finally:
            self._rotations_to_save = None

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, then publish it atomically with a manifest.

        The rotations file is in every checkpoint; FSDP's sharded checkpoints
        (``pytorch_model_fsdp_0``) do not call ``save_model``, so it is gathered and written here.
        """
        root = Path(self.args.output_dir)
        self._staging = root / STAGING
        staged = root / STAGING / f"{PREFIX}{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            if self.is_fsdp_enabled and attached_rotations(self.model):
                generators = gather_generators(self.model)
                if self.args.should_save and not (staged / ROTATIONS_FILE).is_file():
                    save_rotations(self.model, staged / ROTATIONS_FILE, generators)
        except OSError as e:  # e.g. a full disk: the half-written checkpoint goes, the published ones stay
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            if e.errno in WRITE_ERRNOS:
                raise write_error(staged, e) from e
            raise
        finally:
            self._staging = None
        if self.args.should_save:
            publish(staged, root)
            rotate(root, self.keep_checkpoints)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / ROTATIONS_FILE
        if attached_rotations(self.model):
            from so8t.model.attach import read_rotations

            set_generators(self.model, read_rotations(path)[0])


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with tokens/s, ETA, loss and PET lambda (replaces tqdm)."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from so8t.console import progress

            self._bar = progress()
            self._bar.start()
            self._task = self._bar.add_task("train", total=state.max_steps, info="", completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is not None and logs and "loss" in logs:
            info = f"loss {logs['loss']:.3f}"
            if "pet_lambda" in logs:
                info += f" | pet {logs.get('pet', math.nan):.3g} x λ {logs['pet_lambda']:.3g}"
            if "tokens_per_s" in logs:
                info += f" | {logs['tokens_per_s']:.0f} tok/s"
            self._bar.update(self._task, info=info)

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


#: LoRA target modules per architecture (``train.target_modules: null``): every attention projection.
#: Phi-3 / Phi-3.5 / Phi-4-mini fuse q, k and v into ``qkv_proj``: ``[q_proj, k_proj, v_proj, o_proj]``
#: would silently adapt ``o_proj`` alone there.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}


class TargetModulesError(So8tError, ValueError):
    """``train.target_modules`` names modules the model does not have."""


def lora_targets(model: nn.Module, requested: list[str] | str | None) -> list[str] | str:
    """The LoRA targets for ``model``: the table's for its architecture (``None``), PEFT's ``all-linear``,
    or the requested names, each of which must exist in the model.

    Raises:
        TargetModulesError: a requested name matches no module (e.g. ``q_proj`` on Phi-3, whose
            attention is one fused ``qkv_proj``), or an architecture without a table entry.
    """
    if requested == "all-linear":
        return "all-linear"
    model_type = model.config.model_type
    if requested is None:
        if model_type not in LORA_TARGETS:
            raise TargetModulesError(
                f"train.target_modules: no default for model_type {model_type!r}; name the modules "
                f"(e.g. [q_proj, v_proj]) or use all-linear (known: {sorted(LORA_TARGETS)})"
            )
        requested = LORA_TARGETS[model_type]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in requested if t not in names]
    if missing:
        hint = f"; this {model_type} model has {sorted(n for n in names if n.endswith('_proj'))}"
        raise TargetModulesError(f"train.target_modules: {missing} match no module{hint}")
    return list(requested)


def resolve_precision(precision: str) -> str:
    """``train.precision`` on this machine: ``auto`` is bf16 on a CUDA device that supports it, fp16
    (with loss scaling) on one that does not, fp32 on CPU (bf16 matmuls are ~60x slower there).

    Raises:
        So8tError: bf16 or fp16 asked for without a CUDA device.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise So8tError(f"train.precision: {precision} needs a CUDA device (this machine has none); use auto or fp32")
    return precision


def build_model(base_dir: str | Path, params: TrainParams, seed: int):
    """Load the base model, wrap it with PEFT LoRA and attach SO8T rotations.

    QLoRA (``params.quantization`` 8bit/4bit) loads the base through bitsandbytes
    (nf4 with double quantisation) and calls ``prepare_model_for_kbit_training``;
    bake always merges into a fresh float32 copy of the base instead. On CUDA the
    attention runs through PyTorch's SDPA kernels. The rotations' generators stay
    float32 whatever the precision; their blocks are computed in float64 and cast
    once per step (:class:`so8t.model.rotation.SO8Rotation`).

    Returns:
        The PEFT model (rotations attached when ``params.so8t.enabled``).

    Raises:
        TargetModulesError: as :func:`lora_targets`.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from so8t.model.base_model import load_causal_lm

    torch.manual_seed(seed)
    precision = resolve_precision(params.precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]
    model = load_causal_lm(
        base_dir, dtype=dtype, quantization=params.quantization,
        attn_implementation="sdpa" if torch.cuda.is_available() else None,
    )
    if params.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=lora_targets(model, params.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if params.so8t.enabled:
        torch.manual_seed(seed + 1)
        attach_rotations(
            model,
            layer_indices=params.so8t.layer_indices,
            init_scale=params.so8t.init_scale,
            parameterization=params.so8t.parameterization,
        )
        if params.so8t.rotation != "learned":
            fix_rotations(model, params.so8t.rotation, seed)
    return model


def fix_rotations(model: nn.Module, kind: str, seed: int) -> None:
    """Set every attached rotation to a fixed ``random`` or ``hadamard`` one and stop training it.

    ``random`` draws independent Haar SO(8) blocks for each layer from ``seed + 1``
    (:func:`so8t.model.rotation.fixed_generator`). The generator keeps ``requires_grad=False``,
    so the optimiser never sees it; it is saved, checkpointed and folded by bake as a trained one.

    ``random_invariant`` / ``hadamard_invariant`` draw one set of blocks per key/value head, give
    it to every query head that reads that head (:func:`so8t.model.attach.tile_kv_generator`) and
    fold the inverse into ``v_proj`` (:func:`so8t.model.attach.make_invariant`): the model then
    computes the base's function, and only the weights bake writes (and quantisation sees) change.
    """
    from so8t.model.attach import invariant_geometry, make_invariant, tile_kv_generator
    from so8t.model.rotation import fixed_generator

    draw = torch.Generator().manual_seed(seed + 1)
    rotations = attached_rotations(model)
    if kind.endswith("_invariant"):
        heads, kv_heads, _ = invariant_geometry(model)
        set_generators(model, {i: tile_kv_generator(fixed_generator(kind, r.num_blocks * kv_heads // heads, draw),
                                                    heads, kv_heads)
                               for i, r in sorted(rotations.items())})
        make_invariant(model)
    else:
        set_generators(model, {i: fixed_generator(kind, r.num_blocks, draw) for i, r in sorted(rotations.items())})
    for r in rotations.values():
        r.generator.requires_grad_(False)


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (last component) of the modules that carry LoRA weights, sorted: what was really adapted."""
    return sorted({name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name})


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into ``lora``, ``so8t`` and ``other``."""
    counts = {"lora": 0, "so8t": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "so8t" if f"{ROTATION_ATTR}." in name else "lora" if "lora_" in name else "other"
            counts[key] += p.numel()
    return counts


def training_arguments(
    p: TrainParams,
    *,
    output_dir: str | Path,
    max_steps: int,
    learning_rate: float,
    seed: int,
    checkpoint_steps: int = 0,
    **overrides,
):
    """The ``TrainingArguments`` of every so8t training run (train and distill).

    Batch size, gradient accumulation, warm-up (``warmup_ratio * max_steps``), schedule,
    weight decay and clipping come from ``p``; logging every step, no Trainer-side
    checkpoint rotation (ours keeps only verified checkpoints), no tqdm, CPU when no
    CUDA device is present, gloo for DDP on CPU.

    Args:
        checkpoint_steps: also save every this many steps (0 = only when asked by a callback).
        overrides: further ``TrainingArguments`` fields (e.g. ``remove_unused_columns=False``).
    """
    from transformers import TrainingArguments

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    precision = resolve_precision(p.precision)
    kwargs = dict(
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=False,  # enabled on the model itself (build_model), before PEFT wraps it
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=p.per_device_train_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=p.weight_decay,
        warmup_steps=round(p.warmup_ratio * max_steps),
        lr_scheduler_type=p.lr_scheduler_type,
        max_grad_norm=p.max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if checkpoint_steps else "no",
        save_steps=checkpoint_steps or None,
        save_total_limit=None,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
    )
    return TrainingArguments(**(kwargs | overrides))


def quiet_trainer(trainer: Trainer) -> Trainer:
    """Remove transformers' own progress and print callbacks (the rich bar replaces them)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclass
class TrainPaths:
    """Files and folders of one training run.

    ``out`` receives only what is the same for the same inputs (adapter, rotations,
    ``train_summary.json``); wall times, memory and resume history go to
    ``performance`` (a DVC metric outside the cached outputs).
    """

    base: Path
    data: Path
    out: Path
    live_dir: Path = Path("dvclive")
    performance: Path = Path("reports/performance/train.json")
    #: The val split for the evaluations of ``train.eval_steps`` (``None``: none).
    val: Path | None = None


class PreflightError(So8tError, RuntimeError):
    """The machine cannot hold the run (disk or RAM); the message gives the numbers."""


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_memory_estimate(
    n_params: int,
    n_trainable: int,
    precision: str,
    quantization: str,
    batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    vocab: int,
    checkpointing: bool,
) -> dict[str, int]:
    """Bytes of GPU memory a LoRA run needs, by part (an estimate to stop early, not a promise).

    * weights: ``n_params`` x 4 (fp32), 2 (bf16 / fp16: fp16 keeps fp32 master copies only for
      the trainable part), 1 (8-bit) or 0.5 + 0.06 (nf4 with double-quantised scales);
    * trainable state: ``n_trainable`` x 16 (fp32 weight, gradient, two Adam moments);
    * activations: ``batch x seq_len x hidden x layers x`` 34 bytes at 16 bits (x 2 at fp32;
      Korthikanti et al. 2022, eq. 1 without the attention scores SDPA never stores), or one
      layer's worth plus the layer inputs with gradient checkpointing;
    * logits: the LM head at the label positions, ``batch x seq_len x vocab x`` 4 bytes x 2 (fp32
      logits and their gradient);
    * 10% for the CUDA context, allocator fragmentation and kernels' workspace.
    """
    per_weight = {"none": {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[precision], "8bit": 1.0, "4bit": 0.56}[quantization]
    act_bytes = 34 * (2 if precision == "fp32" else 1)
    acts = batch * seq_len * hidden * act_bytes * (1 if checkpointing else layers)
    if checkpointing:
        acts += batch * seq_len * hidden * 2 * layers
    parts = {
        "weights": int(n_params * per_weight),
        "trainable_state": n_trainable * 16,
        "activations": int(acts),
        "logits": batch * seq_len * vocab * 4 * 2,
    }
    parts["overhead"] = int(0.1 * sum(parts.values()))
    parts["total"] = sum(parts.values())
    return parts


def gpu_preflight(base: Path, params) -> dict[str, int] | None:
    """On a CUDA device: stop before loading the model when :func:`gpu_memory_estimate` exceeds the free memory.

    Returns:
        The estimate (``None`` without CUDA).

    Raises:
        PreflightError: with the estimate by part, the free memory and what to change.
    """
    if not torch.cuda.is_available():
        return None
    from transformers import AutoConfig

    p = params.train
    text = AutoConfig.from_pretrained(str(base), local_files_only=True).get_text_config()
    n_params = sum(f.stat().st_size for f in Path(base).glob("*.safetensors")) // 4  # the base is saved in fp32
    # LoRA on every attention projection of every layer, both matrices (a generous bound).
    n_trainable = 4 * 2 * p.lora_r * text.hidden_size * text.num_hidden_layers
    est = gpu_memory_estimate(
        n_params, n_trainable, resolve_precision(p.precision), p.quantization, p.per_device_train_batch_size,
        params.think_format.max_length, text.hidden_size, text.num_hidden_layers, text.vocab_size,
        p.gradient_checkpointing,
    )
    free, _ = torch.cuda.mem_get_info()
    if est["total"] > free:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in est.items() if k != "total")
        raise PreflightError(
            f"preflight: the run needs about {est['total'] / 2**30:.1f} GiB of GPU memory ({parts} GiB) but "
            f"{free / 2**30:.1f} GiB are free; use train.quantization: 4bit, train.gradient_checkpointing: true, "
            "or a smaller train.per_device_train_batch_size / think_format.max_length"
        )
    return est | {"free": free}


def preflight(model_dir: Path, checkpoint_root: Path, out_dir: Path, n_trainable: int, keep: int) -> dict[str, int]:
    """Fail early when disk or RAM cannot hold the run.

    Estimates (bytes): one checkpoint = trainable parameters x 4 (weights) x 3
    (two Adam moments) + 1 MiB of state; output = trainable x 4; model RAM =
    2.5 x the weight files (weights, gradients of the adapter, activations).

    Raises:
        PreflightError: naming the free and the needed bytes.
    """
    import psutil

    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    ckpt = n_trainable * 4 * 3 + (1 << 20)
    need_disk = keep * ckpt + n_trainable * 4 + (64 << 20)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    free_disk = min(shutil.disk_usage(checkpoint_root).free, shutil.disk_usage(out_dir.parent).free)
    if free_disk < need_disk:
        raise PreflightError(
            f"preflight: {free_disk / 1e9:.2f} GB free on disk, need {need_disk / 1e9:.2f} GB "
            f"({keep} checkpoints of {ckpt / 1e6:.1f} MB + outputs); free space or lower checkpoint.keep"
        )
    need_ram = int(weights * 2.5)
    free_ram = psutil.virtual_memory().available
    if torch.cuda.is_available() is False and free_ram < need_ram:
        raise PreflightError(
            f"preflight: {free_ram / 1e9:.2f} GB RAM available, the model needs about {need_ram / 1e9:.2f} GB "
            f"({weights / 1e9:.2f} GB of weights); close other programs or use train.quantization"
        )
    return {"free_disk": free_disk, "need_disk": need_disk, "free_ram": free_ram, "need_ram": need_ram}


def run_fingerprint(params, paths: TrainPaths, rows: list[dict] | None = None) -> dict[str, str]:
    """Ingredients that make checkpoints belong to one run: training params, data, the rows trained on
    (as the code builds them from the data: a change in how they are built is another run), base model."""
    import hashlib
    import json

    from so8t.io import sha256_file

    base = Path(paths.base)
    built = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() if rows is not None else None
    return fingerprint(
        {
            "train params": params.train.model_dump(mode="json") | {"num_threads": None},
            "seed": params.seed,
            "dataset": sha256_file(paths.data),
            "rows": built,
            "base model": {
                "config": (base / "config.json").read_text(encoding="utf-8"),
                "weights": sorted((p.name, p.stat().st_size) for p in base.glob("*.safetensors")),
            },
        }
    )


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
    (``choice_pos``) is learnt among the labels' first tokens only (:func:`label_token_ce_sum`
    with ``choice_mask``), the rest of the label over the whole vocabulary. A softmax over the
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
    shared = _common_prefix_length(spans)
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


def _common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix all ``seqs`` share (0 for none)."""
    if not seqs:
        return 0
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


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


def _resume_point(params, paths: TrainPaths, n_trainable: int, rows: list[dict] | None = None) -> tuple[str | None, dict]:
    """The checkpoint to resume from (``None``: start fresh) and the preflight numbers (rank 0 decides)."""
    from so8t.console import console

    c = params.checkpoint
    root = Path(c.dir)
    resume_from, check = None, {}
    if int(os.environ.get("RANK", "0")) == 0:
        check = preflight(paths.base, root, paths.out, n_trainable, c.keep)
        same_run = prepare_root(root, run_fingerprint(params, paths, rows), log=console.print)
        if same_run and c.resume:
            ckpt = latest_good_checkpoint(root, warn=lambda m: console.print(f"[yellow]train: {m}[/]"))
            resume_from = str(ckpt) if ckpt else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        resume_from = _broadcast_resume(resume_from)
    return resume_from, check


def _dvclive_callback(live):
    """transformers' dvclive callback, with dvclive's step set to the optimiser step before each log.

    The stock callback advances dvclive's step on every log call, so each evaluation (one log per
    val dataset, plus the decision metrics) would push later training steps off their x position.
    """
    from transformers.integrations import DVCLiveCallback

    class StepAligned(DVCLiveCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            """On resume, log the checkpoint's history (``trainer_state.json``) again first: the dvclive
            folder starts empty (``dvc repro`` removes a stage's outputs before it runs), and the
            curves must hold every step, not only those after the checkpoint."""
            super().on_train_begin(args, state, control, model=model, **kwargs)
            for entry in state.log_history:
                at = SimpleNamespace(global_step=entry["step"], is_world_process_zero=state.is_world_process_zero)
                logs = {k: v for k, v in entry.items() if k != "step"}
                self.on_log(args, at, control, model=model, logs=logs)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if self._initialized:
                self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    return StepAligned(live=live)


def train_sampler(params, rows: list[dict]) -> BalancedDecisionSampler | None:
    """The sampler ``train.sampling`` asks for: :class:`BalancedDecisionSampler` over the cut decision
    lines (``task`` ``decision_line``, balanced by ``decision``) for ``balanced_decisions``, else ``None``
    (Trainer's own ``random`` / ``group_by_length``)."""
    p = params.train
    if p.sampling != "balanced_decisions":
        return None
    labels = [r.get("decision") if r.get("task") == "decision_line" else None for r in rows]
    return BalancedDecisionSampler(labels, [len(r["input_ids"]) for r in rows], p.per_device_train_batch_size, params.seed)


def _make_trainer(params, paths: TrainPaths, model, tokenizer, rows: list[dict], decision_eval=None):
    """The :class:`SO8TTrainer` of the train stage with dvclive, progress, time checkpoints and signals."""
    from datasets import Dataset
    from dvclive import Live

    from so8t.io import read_jsonl

    p, c = params.train, params.checkpoint
    evaluating = bool(p.eval_steps) and paths.val is not None and paths.val.is_file()
    args = training_arguments(
        p, output_dir=c.dir, max_steps=p.max_steps, learning_rate=p.learning_rate, seed=params.seed,
        checkpoint_steps=c.steps, remove_unused_columns=False,
        train_sampling_strategy="random" if p.sampling == "balanced_decisions" else p.sampling,
        eval_strategy="steps" if evaluating else "no", eval_steps=p.eval_steps or None,
        per_device_eval_batch_size=p.per_device_train_batch_size,
    )
    eval_dataset = None
    if evaluating:
        sets = eval_sets(read_jsonl(paths.val), p.eval_examples_per_task, params.seed)
        eval_dataset = {task: Dataset.from_list(items) for task, items in sets.items() if items}
    # Never dvclive's own resume: a resumed run rebuilds the curves from the checkpoint's history
    # (steps logged after the checkpoint and before a crash are trained and logged again).
    # Rank 0 alone owns the folder: ``Live(resume=False)`` empties it, so a second rank's Live
    # would delete rank 0's files while it writes them.
    logging = []
    if int(os.environ.get("RANK", "0")) == 0:
        logging.append(_dvclive_callback(Live(dir=str(paths.live_dir), dvcyaml=False, save_dvc_exp=False, resume=False)))
    stopper = GracefulStopCallback()
    trainer = SO8TTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=eval_dataset,
        decision_eval=decision_eval if evaluating else None,
        train_sampler=train_sampler(params, rows),
        choice_ids=choice_token_ids(rows),
        data_collator=DecisionWeightCollator(tokenizer, p.decision_weight),
        callbacks=[*logging, RichProgressCallback(), TimeCheckpointCallback(c.minutes), stopper],
        pet_schedule=PETSchedule(p.pet.phase_boundaries, p.pet.lambdas) if p.pet.enabled else None,
        pet_hidden_state_index=p.pet.hidden_state_index,
        pet_reduction=p.pet.reduction,
        so8t_learning_rate=p.so8t.learning_rate,
        keep_checkpoints=c.keep,
    )
    return quiet_trainer(trainer), stopper


def _train_or_restore(trainer: SO8TTrainer, resume_from: str | None, max_steps: int) -> float:
    """Train (resuming when asked); a run that already finished is restored instead.

    Returns:
        The mean logged training loss (nats per token).
    """
    from transformers import TrainerState

    resumed_step = int(Path(resume_from).name[len(PREFIX) :]) if resume_from else 0
    if resumed_step >= max_steps:
        # The run already finished: Trainer would take one more step, so restore instead.
        trainer._load_from_checkpoint(resume_from)
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        _replay_logs(trainer)
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    # From the log history in both cases, so a restored run reports the same number as the run itself.
    return _last_loss(trainer.state)


def _warn_unsharded(trainer: SO8TTrainer) -> None:
    """Say so when an FSDP launch (``configs/accelerate_fsdp.yaml``) trains unsharded.

    accelerate enables FSDP only on accelerator devices (CUDA, XPU, NPU, ...); on CPU the same
    launch runs DDP, every rank holding the whole model.
    """
    from so8t.console import console

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and trainer.is_world_process_zero():
        console.print(
            f"[yellow]train: FSDP is not active: accelerate shards only on accelerator devices, and this run is "
            f"{trainer.accelerator.distributed_type.value} on {trainer.args.device.type}; every rank holds the "
            "whole model (DDP)[/]"
        )


def _canonical_adapter_config(path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes run to run: sort it."""
    from so8t.io import read_json, write_json

    if path.is_file():
        config = read_json(path)
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        write_json(path, config)


def _replay_logs(trainer: SO8TTrainer) -> None:
    """Write a restored run's log history to dvclive again (its files are outputs DVC removed before the rerun)."""
    from transformers.integrations import DVCLiveCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, DVCLiveCallback)), None)
    if callback is None or not trainer.is_world_process_zero():
        return
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)  # replays the history
    callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)


def run_training(params, paths: TrainPaths, decision_eval=None) -> dict:
    """Train LoRA + SO8T + PET with crash-safe checkpoints; save adapter and rotations to ``paths.out``.

    Args:
        decision_eval: called with the model at each evaluation (``train.eval_steps``); returns
            metrics to log with the per-task val losses (the decision learning curve).

    Resumes from the newest good checkpoint of the same run (see
    :mod:`so8t.model.checkpoint`); SIGINT/SIGTERM save and stop (exit code 128 + signal
    is returned as ``summary["exit_code"]``). Works unchanged under
    ``torchrun`` / ``accelerate launch`` (DDP; rank 0 writes).

    Returns:
        The run summary: ``paths.out / "train_summary.json"`` (what the same inputs always give:
        steps, final loss, parameter counts) plus the performance figures written to
        ``paths.performance`` (wall time, tokens/s, memory, resume point).
    """
    from so8t.console import console
    from so8t.io import read_jsonl, write_json
    from so8t.model.base_model import load_tokenizer

    p = params.train
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    examples = read_jsonl(paths.data)
    if not examples:
        raise DataError(f"{paths.data}: no training examples")
    mixed = mix_tasks(examples, {t.value: w for t, w in p.task_weights.items()}, params.seed)
    mixed += decision_line_copies(examples, p.decision_line_passes, params.seed, p.decision_line_rag_passes)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"], "decision_span": r.get("decision_span", [0, 0]),
             "task": r.get("task"), "decision": r.get("decision"), "choice_pos": r.get("choice_pos", -1)}
            for r in mixed]
    tokenizer = load_tokenizer(paths.base)
    gpu = gpu_preflight(paths.base, params)
    model = build_model(paths.base, p, params.seed)
    counts = trainable_parameter_counts(model)
    resume_from, check = _resume_point(params, paths, sum(counts.values()), rows)
    console.print(
        f"train: {len(rows)} examples, trainable parameters {counts}"
        + (f", resuming from {resume_from}" if resume_from else ", starting fresh")
    )
    trainer, stopper = _make_trainer(
        params, paths, model, tokenizer, rows, decision_eval=decision_eval
    )
    _warn_unsharded(trainer)
    resumed_step = int(Path(resume_from).name[len(PREFIX) :]) if resume_from else 0
    stopper.install()
    start = time.perf_counter()
    try:
        final_loss = _train_or_restore(trainer, resume_from, p.max_steps)
    finally:
        stopper.uninstall()
    seconds = time.perf_counter() - start
    done_steps = trainer.state.global_step - resumed_step
    summary = {
        "steps": trainer.state.global_step,
        "final_train_loss": final_loss,
        "trainable_parameters": counts,
        "adapted_modules": adapted_modules(model),
        "precision": resolve_precision(p.precision),
        "examples": len(examples),
        "examples_per_pass": len(rows),
        "world_size": trainer.args.world_size,
    }
    history = [h["tokens_per_s"] for h in trainer.state.log_history if "tokens_per_s" in h]
    performance = {
        "exit_code": stopper.exit_code,
        "train_seconds": round(seconds, 1),
        "steps_this_session": done_steps,
        "resumed_from": resume_from,
        "seconds_per_step": round(seconds / max(done_steps, 1), 3),
        "tokens_per_s": round(sum(history) / len(history), 2) if history else None,
        "peak_rss_bytes": _peak_rss_bytes(),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "preflight": check | ({"gpu": gpu} if gpu else {}),
    }
    if stopper.exit_code is None:
        trainer.export(str(paths.out))  # adapter + so8t_rotations.safetensors (every rank gathers)
    if stopper.exit_code is None and trainer.args.should_save:
        # Trainer pickles its arguments beside the adapter; they hold run-specific values (a logging
        # folder named by the time) and are not needed to use the adapter: same inputs, same bytes.
        (paths.out / "training_args.bin").unlink(missing_ok=True)
        _canonical_adapter_config(paths.out / "adapter_config.json")
        write_json(paths.out / "train_summary.json", summary)
        write_json(paths.performance, performance)
    if trainer.args.world_size > 1:
        # Every rank leaves the process group together. Without this, gloo's worker threads are
        # still joinable when the interpreter exits and a rank can die with "terminate called
        # without an active exception" (SIGABRT) after its work is done (seen once in CI).
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    return summary | performance


def _last_loss(state) -> float:
    """Mean logged training loss of a finished run (what ``Trainer.train`` reports)."""
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    return float(sum(losses) / len(losses)) if losses else float("nan")


def _broadcast_resume(path: str | None) -> str | None:
    """Rank 0's resume decision, shared with every rank (DDP)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]
