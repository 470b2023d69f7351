"""Training: transformers ``Trainer`` + PEFT LoRA + SO8T rotations + the PET penalty.

The objective of one micro-batch is::

    loss = CE(labels) + lambda(progress) * PET(h, attention_mask)

* CE is the usual next-token cross-entropy over unmasked label positions, but
  the LM head is applied only where a label exists (the prompt and padding
  never reach the 262k-wide Gemma head): the same value as the model's own
  loss (tested), at a fraction of the cost.
* PET is :func:`so8t.model.pet.pet_penalty` on ``hidden_states[params.pet.hidden_state_index]``
  with the attention mask, weighted by the three-phase :class:`so8t.model.pet.PETSchedule`.
* SO8T rotations (:mod:`so8t.model.attach`) are trained with their own learning rate
  and no weight decay (a decay would pull them towards identity).

Metrics go to dvclive each step (``ce``, ``pet``, ``pet_lambda``, ``loss``,
``learning_rate``, ``tokens_per_s``), progress to a rich bar.

This module is the train stage's recipe: the run's paths (:class:`TrainPaths`), the trainer it
builds, train-or-restore and :func:`run_training`. The components live beside it:

* :mod:`so8t.model.loss`: the label-token loss;
* :mod:`so8t.model.batching`: task mixing, decision-line copies, the sampler, the collator, eval sets;
* :mod:`so8t.model.trainer`: :class:`~so8t.model.trainer.SO8TTrainer` and ``TrainingArguments``;
* :mod:`so8t.model.callbacks`: the progress bar and dvclive;
* :mod:`so8t.model.build`: the model (LoRA targets, rotations, precision);
* :mod:`so8t.model.preflight`: disk, RAM and GPU memory checks;
* :mod:`so8t.model.resume`: run identity and the checkpoint to resume from.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from so8t.io import DataError
from so8t.model.batching import (
    DecisionWeightCollator,
    choice_token_ids,
    decision_line_copies,
    eval_sets,
    mix_tasks,
    train_sampler,
)
from so8t.model.build import adapted_modules, build_model, resolve_precision, trainable_parameter_counts
from so8t.model.callbacks import RichProgressCallback, dvclive_callback, quiet_trainer, replay_logs
from so8t.model.checkpoint import PREFIX, GracefulStopCallback, TimeCheckpointCallback
from so8t.model.pet import PETSchedule
from so8t.model.preflight import gpu_preflight
from so8t.model.resume import resume_point
from so8t.model.trainer import SO8TTrainer, training_arguments


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


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        logging.append(dvclive_callback(Live(dir=str(paths.live_dir), dvcyaml=False, save_dvc_exp=False, resume=False)))
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
        replay_logs(trainer)
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
    from so8t.inference.hf import load_tokenizer

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
    resume_from, check = resume_point(params, paths, sum(counts.values()), rows)
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
