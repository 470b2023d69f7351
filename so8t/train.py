"""Training: transformers ``Trainer`` + PEFT LoRA + SO8T rotations + the PET penalty.

The objective of one micro-batch is::

    loss = CE(labels) + lambda(progress) * PET(h, attention_mask)

* CE is the usual next-token cross-entropy over unmasked label positions, but
  the LM head is applied only where a label exists (the prompt and padding
  never reach the 262k-wide Gemma head): the same value as the model's own
  loss (tested), at a fraction of the cost.
* PET is :func:`so8t.pet.pet_penalty` on ``hidden_states[params.pet.hidden_state_index]``
  with the attention mask, weighted by the three-phase :class:`so8t.pet.PETSchedule`.
* SO8T rotations (:mod:`so8t.attach`) are trained with their own learning rate
  and no weight decay (a decay would pull them towards identity).

Metrics go to dvclive each step (``ce``, ``pet``, ``pet_lambda``, ``loss``,
``learning_rate``, ``tokens_per_s``), progress to a rich bar.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from so8t.attach import ROTATION_ATTR, attach_rotations, attached_rotations, save_rotations
from so8t.params import TrainParams
from so8t.pet import PETSchedule, pet_penalty

IGNORE_INDEX = -100


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final logit soft-capping) to ``hidden``.

    Args:
        hidden: ``(N, D)`` final normalised hidden states.

    Returns:
        ``(N, V)`` float32 logits, as the model's own forward would produce them.
    """
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def label_token_ce_sum(model: nn.Module, last_hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions only.

    Position ``t`` predicts ``labels[t + 1]``; positions whose next label is
    ``-100`` are skipped before the LM head.

    Args:
        last_hidden: ``(B, T, D)`` final hidden states.
        labels: ``(B, T)`` long, ``-100`` where no loss is taken.

    Returns:
        (sum of CE in nats as a float32 scalar tensor, number of label tokens).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return last_hidden.sum() * 0.0, 0
    logits = output_logits(model, last_hidden[:, :-1][keep])
    return nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), n


class SO8TTrainer(Trainer):
    """``Trainer`` whose loss is label-only CE plus scheduled PET.

    Args:
        pet_schedule: lambda schedule, or ``None`` to disable PET.
        pet_hidden_state_index: index into ``outputs.hidden_states``.
        pet_reduction: ``"mean"`` or ``"sum"`` over the hidden dimension.
        so8t_learning_rate: learning rate of the rotation generators.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        pet_schedule: PETSchedule | None = None,
        pet_hidden_state_index: int = -1,
        pet_reduction: str = "mean",
        so8t_learning_rate: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pet_schedule = pet_schedule
        self.pet_hidden_state_index = pet_hidden_state_index
        self.pet_reduction = pet_reduction
        self.so8t_learning_rate = so8t_learning_rate
        self._acc: dict[str, float] = {}
        self._acc_n = 0
        self._tokens = 0
        self._last_log_time = time.perf_counter()

    def progress(self) -> float:
        """Fraction of optimiser steps done, in [0, 1]."""
        return self.state.global_step / max(1, self.state.max_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = inputs["attention_mask"]
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        ce_sum, n_label = label_token_ce_sum(model, outputs.hidden_states[-1], labels)
        ga = self.current_gradient_accumulation_steps
        if num_items_in_batch is not None:
            ce = ce_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                ce = ce * self.accelerator.num_processes
        else:
            ce = ce_sum / max(n_label, 1) / ga
        loss = ce
        stats = {"ce": ce_sum.detach().item() / max(n_label, 1)}
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if attached_rotations(self.model) and self.args.should_save:
            save_rotations(self.model, Path(output_dir or self.args.output_dir) / "so8t_rotations.safetensors")


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


def build_model(base_dir: str | Path, params: TrainParams, seed: int):
    """Load the base model, wrap it with PEFT LoRA and attach SO8T rotations.

    QLoRA (``params.quantization`` 8bit/4bit) loads the base through
    bitsandbytes and calls ``prepare_model_for_kbit_training``; bake always
    merges into a fresh float32 copy of the base instead.

    Returns:
        The PEFT model (rotations attached when ``params.so8t.enabled``).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from so8t.base_model import load_causal_lm

    torch.manual_seed(seed)
    dtype = torch.float32
    model = load_causal_lm(base_dir, dtype=dtype, quantization=params.quantization)
    if params.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules),
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
    return model


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into ``lora``, ``so8t`` and ``other``."""
    counts = {"lora": 0, "so8t": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "so8t" if f"{ROTATION_ATTR}." in name else "lora" if "lora_" in name else "other"
            counts[key] += p.numel()
    return counts
