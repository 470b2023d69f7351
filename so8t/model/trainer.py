"""The Trainer of every so8t training run (train and distill) and its ``TrainingArguments``.

:class:`SO8TTrainer` is transformers' ``Trainer`` with

* the loss: a label-only task loss (:meth:`SO8TTrainer.task_loss`, the hook distillation
  overrides) normalised over the label tokens of the accumulation window, plus scheduled PET;
* logging: the loss parts, tokens/s and the rotations' orthogonality error and largest angle;
* the optimiser groups: the SO8T rotations with their own learning rate and no weight decay;
* saving: the rotations beside every adapter and checkpoint (gathered under FSDP), checkpoints
  staged and published atomically (:mod:`so8t.model.checkpoint`), :meth:`SO8TTrainer.export`.

:func:`training_arguments` builds the ``TrainingArguments`` both stages share.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from so8t.io import WRITE_ERRNOS, write_error
from so8t.model.attach import (
    ROTATION_ATTR,
    ROTATIONS_FILE,
    attached_rotations,
    gather_generators,
    save_rotations,
    set_generators,
)
from so8t.model.build import resolve_precision
from so8t.model.checkpoint import PREFIX, STAGING, publish, rotate
from so8t.model.loss import label_token_ce_sum
from so8t.model.pet import PETSchedule, pet_penalty
from so8t.model.rotation import whole
from so8t.params import TrainParams


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
        train_sampler: the order of the training rows (e.g.
            :class:`so8t.model.batching.BalancedDecisionSampler`); ``None``: Trainer's own
            (``train_sampling_strategy``).
        choice_ids: the decision labels' first tokens (:func:`so8t.model.batching.choice_token_ids`):
            where a batch's ``choice_mask`` is set the cross-entropy runs over these alone.
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
        """Trainer's evaluation (per-task losses for a dict of datasets), then :attr:`decision_eval`.

        Runs on forked random generators (torch's CPU and CUDA generators,
        ``torch.random.fork_rng``; Python's ``random`` and NumPy's global state are saved and
        restored): each evaluation's DataLoader draws its base seed from torch's global generator,
        which would otherwise shift every later dropout mask, so how often the run is evaluated
        (``train.eval_steps``) would change the trained model.
        """
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                if eval_dataset is None and self.decision_eval is not None:
                    extra = self.decision_eval(self.model)
                    self.log(extra)
                    metrics |= extra
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
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
        gradient_checkpointing=False,  # enabled on the model itself (build.build_model), before PEFT wraps it
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
