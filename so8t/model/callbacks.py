"""Trainer callbacks of the so8t runs: the rich progress bar and the dvclive curves.

* :class:`RichProgressCallback` and :func:`quiet_trainer`: a rich bar (tokens/s, ETA, loss, PET
  lambda) in place of transformers' tqdm and printer callbacks;
* :func:`dvclive_callback`: transformers' dvclive callback with dvclive's step pinned to the
  optimiser step (and the history logged again on resume); :func:`replay_logs` writes a restored
  run's history to dvclive.

The checkpoint callbacks (time-based saves, graceful stop on signals) are in
:mod:`so8t.model.checkpoint`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from transformers import Trainer, TrainerCallback


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


def quiet_trainer(trainer: Trainer) -> Trainer:
    """Remove transformers' own progress and print callbacks (the rich bar replaces them)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def dvclive_callback(live):
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


def replay_logs(trainer: Trainer) -> None:
    """Write a restored run's log history to dvclive again (its files are outputs DVC removed before the rerun)."""
    from transformers.integrations import DVCLiveCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, DVCLiveCallback)), None)
    if callback is None or not trainer.is_world_process_zero():
        return
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)  # replays the history
    callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
