"""Where a training step's time goes: each phase of one optimiser step of the train stage, timed.

Builds the model exactly as the train stage does (``so8t.model.build.build_model`` with
``params.yaml``'s ``train`` section: LoRA, SO8T rotations, precision, gradient checkpointing),
takes the rows it trains on (``mix_tasks`` + ``decision_line_copies``, then
``DecisionWeightCollator``) and the optimiser it uses (``SO8TTrainer.create_optimizer`` over the
Trainer's own optimiser class, ``train.max_grad_norm`` clipping, the LR schedule), and times with
wall clocks (``time.perf_counter``; CUDA synchronised at each boundary) each phase of every step:

* ``data``: collating the micro-batch (padding, decision weights) and moving it to the device;
* ``forward``: the decoder (``output_hidden_states=True, logits_to_keep=1``), as ``compute_loss``;
  it contains the SO8T rotations, shown below it (not added again): building every layer's
  ``R = blockdiag(expm(A_i))`` (in float64, once per forward per layer) and applying ``x R``;
* ``lm_head_ce``: the LM head and cross-entropy at the label positions (``label_token_ce_sum``);
* ``pet``: the PET penalty (``pet_penalty``) when ``train.pet.enabled``;
* ``backward``: ``loss.backward()`` (the rotations' backward, expm's included, is in here);
* ``optimizer``: gradient clipping, the optimiser step, the LR scheduler, ``zero_grad``;
* ``log``: the rotation diagnostics ``SO8TTrainer.log`` computes at every log, i.e. every step
  (``logging_steps=1``): ``orthogonality_error`` and ``max_angle`` (eigenvalues) of each rotation.
  The rest of a log (dvclive files, the progress bar) and the evaluations every
  ``train.eval_steps`` are not timed;
* ``other``: the rest of the step (loss arithmetic, ``.item()``, bookkeeping).

With ``train.gradient_checkpointing`` the backward recomputes the forward, rotations included:
the SO8T rows then also count that recomputation (which lies inside ``backward``). On CUDA the
synchronisation at every boundary (rotations included) costs a little overlap.

With ``train.gradient_accumulation_steps`` > 1 a step is that many micro-batches (each phase
summed over them) and one optimiser update, as in the Trainer.

Batches: the stage's own sampler when it has one (``so8t.model.batching.train_sampler``, e.g. the
label-balanced ``BalancedDecisionSampler`` of ``train.sampling: balanced_decisions``, seeded by the
run's seed: the stage's batches in the stage's order); otherwise the Trainer's sampler classes
(``LengthGroupedSampler`` of ``per_device_train_batch_size x gradient_accumulation_steps`` for
``group_by_length``, ``RandomSampler`` for ``random``) seeded with ``params.seed`` through their own
generator: the same kind of batches (length grouping, padding), not necessarily the same order.
``--tasks`` and ``--batch-size`` change the rows and batches the sampler sees, as they would the stage's.

Per step it also reports the tokens in the batch with padding, the real tokens (attention-mask
sum), the padding share, the label tokens, real tokens/s and a rough FLOP rate::

    FLOPs ~ 6 * N_body * padded_tokens + 6 * D * V * label_tokens

``N_body`` = parameters outside the input embedding and the LM head (the decoder, LoRA and
rotations); the LM head (``D x V``) runs only at label positions. ``6 = 2`` (multiply-add) ``x 3``
(forward + backward) is the full fine-tuning convention: with frozen base weights the backward
needs no weight gradients, so the work really done is nearer ``4``; attention scores are not
counted. A rough figure for comparing runs, not a hardware utilisation.

Run from the repository root (after the ``train`` stage's inputs exist)::

    .venv/bin/python benchmarks/train_profile.py --steps 6
    .venv/bin/python benchmarks/train_profile.py --tasks decision_line --json /tmp/profile.json

The first step is a warm-up (allocator, lazy initialisation, first optimiser state) and is
excluded from the means. Threads: ``--threads``, else ``train.num_threads``, else every core this
process may use. Nothing is written except the ``--json`` file (atomically).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

#: Phases that add up to the step time, in order.
PHASES = ("data", "forward", "lm_head_ce", "pet", "backward", "optimizer", "log", "other")
#: Parts of ``forward`` timed inside it (shown, not added to the step again).
INSIDE_FORWARD = ("so8t_build", "so8t_apply")
LABELS = {
    "data": "data (collate + to device)",
    "forward": "forward (decoder, hidden states)",
    "so8t_build": "  SO8T R = blockdiag(expm A) (in forward)",
    "so8t_apply": "  SO8T x R (in forward)",
    "lm_head_ce": "LM head + CE at label positions",
    "pet": "PET penalty",
    "backward": "backward",
    "optimizer": "optimizer (clip + step + schedule + zero_grad)",
    "log": "log: SO8T diagnostics (every step)",
    "other": "other (loss arithmetic, bookkeeping)",
}


class Clock:
    """Wall-clock phase timer; synchronises CUDA before each reading so the time lands in its phase."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds


def instrument_rotations(model, clock: Clock) -> int:
    """Time every attached rotation inside the forward: matrix construction and application.

    ``SO8Rotation.forward`` builds its blocks (``blocks``) and applies them; a wrapper on the
    instance's ``blocks`` times the construction, forward pre/post hooks the whole call.

    Returns:
        The number of rotations instrumented.
    """
    from so8t.model.attach import attached_rotations

    rotations = attached_rotations(model)
    for rot in rotations.values():
        state = {"inside": False}  # blocks() outside a forward (the log's diagnostics) is not counted here

        def timed_blocks(*args, _build=rot.blocks, _s=state, **kwargs):
            if not _s["inside"]:
                return _build(*args, **kwargs)
            t0 = clock.now()
            out = _build(*args, **kwargs)
            clock.add("so8t_build", clock.now() - t0)
            return out

        def enter(_m, _a, _s=state):
            _s["inside"], _s["t0"] = True, clock.now()

        def leave(_m, _a, _o, _s=state):
            _s["inside"] = False
            clock.add("so8t_call", clock.now() - _s["t0"])

        rot.blocks = timed_blocks
        rot.register_forward_pre_hook(enter)
        rot.register_forward_hook(leave)
    return len(rotations)


def parameter_counts(model) -> dict[str, int]:
    """``total``, ``body`` (outside the input embedding and LM head), ``head`` (``D x V``), ``trainable``."""
    from so8t.model.attach import host_model

    host = host_model(model)
    total = sum(p.numel() for p in model.parameters())
    emb = host.get_input_embeddings().weight
    head = host.get_output_embeddings().weight
    body = total - emb.numel() - (0 if head is emb else head.numel())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "body": body, "head": head.numel(), "trainable": trainable}


def training_rows(params, data: Path, tasks: set[str] | None) -> tuple[list[dict], dict[str, int]]:
    """The rows the train stage trains on (``run_training``), optionally only some tasks.

    Returns:
        (rows with ``input_ids``, ``labels``, ``decision_span``; rows per task before filtering).
    """
    from so8t.io import read_jsonl
    from so8t.model.batching import decision_line_copies, mix_tasks

    p = params.train
    examples = read_jsonl(data)
    if not examples:
        sys.exit(f"train_profile: {data}: no training examples")
    mixed = mix_tasks(examples, {t.value: w for t, w in p.task_weights.items()}, params.seed)
    mixed += decision_line_copies(examples, p.decision_line_passes, params.seed, p.decision_line_rag_passes)
    per_task: dict[str, int] = {}
    for r in mixed:
        per_task[r.get("task", "")] = per_task.get(r.get("task", ""), 0) + 1
    if tasks:
        mixed = [r for r in mixed if r.get("task", "") in tasks]
        if not mixed:
            sys.exit(f"train_profile: no rows of tasks {sorted(tasks)}; the mixture has {per_task}")
    rows = [
        {"input_ids": r["input_ids"], "labels": r["labels"], "decision_span": r.get("decision_span", [0, 0]),
         "task": r.get("task"), "decision": r.get("decision"), "choice_pos": r.get("choice_pos", -1)}
        for r in mixed
    ]
    return rows, per_task


def micro_batches(params, rows: list[dict]) -> tuple[object, str]:
    """Endless index lists of ``train.per_device_train_batch_size`` rows, drawn as the stage draws them.

    The stage's own sampler when it has one (``so8t.model.batching.train_sampler``, e.g.
    ``BalancedDecisionSampler`` for ``train.sampling: balanced_decisions``: seeded by the run's seed and
    the pass, so the same batches in the same order); otherwise the class the Trainer would use
    (``LengthGroupedSampler`` over mega-batches of ``batch x gradient_accumulation_steps`` for
    ``group_by_length``, ``RandomSampler`` for ``random``) with a generator seeded with ``params.seed``:
    the same kind of batches, not necessarily the Trainer's order. A new pass starts a new order.

    Returns:
        (the generator of index lists, how the batches are drawn, in words).
    """
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from so8t.model import batching as stage

    p = params.train
    batch, accumulation = p.per_device_train_batch_size, p.gradient_accumulation_steps
    own = stage.train_sampler(params, rows) if hasattr(stage, "train_sampler") else None
    if own is not None:
        how = f"the stage's own sampler ({type(own).__name__}, train.sampling {p.sampling}), the stage's order"
    else:
        kind = "LengthGroupedSampler" if p.sampling == "group_by_length" else "RandomSampler"
        how = f"Trainer's {kind} (train.sampling {p.sampling}) seeded with params.seed; order may differ from the stage's"

    def draw():
        gen = torch.Generator().manual_seed(params.seed)
        epoch = 0
        while True:
            if own is not None:
                if hasattr(own, "set_epoch"):
                    own.set_epoch(epoch)
                sampler = own
            elif p.sampling == "group_by_length":
                lengths = [len(r["input_ids"]) for r in rows]
                sampler = LengthGroupedSampler(batch * accumulation, lengths=lengths, generator=gen)
            else:
                sampler = RandomSampler(rows, generator=gen)
            order = list(sampler)
            for i in range(0, len(order), batch):  # the DataLoader's chunks (drop_last False: a last short one)
                yield order[i : i + batch]
            epoch += 1

    return draw(), how


def make_optimizer(model, args, so8t_learning_rate: float):
    """The optimiser of ``SO8TTrainer.create_optimizer`` (its parameter groups, the Trainer's optimiser class)."""
    from transformers import Trainer, get_scheduler

    from so8t.model.trainer import SO8TTrainer

    host = SimpleNamespace(
        optimizer=None, model=model, args=args, so8t_learning_rate=so8t_learning_rate,
        get_optimizer_cls_and_kwargs=Trainer.get_optimizer_cls_and_kwargs,
    )
    optimizer = SO8TTrainer.create_optimizer(host)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
        num_training_steps=args.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


def profile(args: argparse.Namespace) -> dict:
    """Run ``args.steps`` optimiser steps and return the configuration, per-step numbers and means."""
    from so8t.console import console
    from so8t.model.attach import attached_rotations
    from so8t.inference.hf import load_tokenizer
    from so8t.model.batching import DecisionWeightCollator, choice_token_ids
    from so8t.model.build import build_model, resolve_precision, trainable_parameter_counts
    from so8t.model.loss import label_token_ce_sum
    from so8t.model.pet import PETSchedule, pet_penalty
    from so8t.model.trainer import training_arguments
    from so8t.params import load_params

    params = load_params(args.params)
    if args.batch_size:  # the override reaches every use of the batch size (the stage's sampler too)
        params = params.model_copy(
            update={"train": params.train.model_copy(update={"per_device_train_batch_size": args.batch_size})}
        )
    p = params.train
    threads = args.threads or p.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    batch = p.per_device_train_batch_size
    accumulation = p.gradient_accumulation_steps
    tasks = {t for spec in args.tasks or [] for t in spec.split(",") if t} or None
    rows, per_task = training_rows(params, Path(args.data), tasks)

    tokenizer = load_tokenizer(Path(args.base))
    collator = DecisionWeightCollator(tokenizer, p.decision_weight)
    choice_ids = choice_token_ids(rows)  # the decision lines' label tokens, as the stage's trainer gets them
    precision = resolve_precision(p.precision)
    model = build_model(Path(args.base), p, params.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and p.quantization == "none":
        model.to(device)
    model.train()
    counts = parameter_counts(model)

    # The stage's TrainingArguments (nothing is written by building them).
    targs = training_arguments(
        p, output_dir="train-profile-unused", max_steps=p.max_steps, learning_rate=p.learning_rate,
        seed=params.seed, remove_unused_columns=False,
    )
    optimizer, scheduler = make_optimizer(model, targs, p.so8t.learning_rate)
    trainable = [q for q in model.parameters() if q.requires_grad]
    pet = PETSchedule(p.pet.phase_boundaries, p.pet.lambdas) if p.pet.enabled else None
    # Accelerate autocasts the model's forward for bf16 / fp16; here the whole loss runs under it.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=half)) if half is not None and device.type == "cuda" else nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None

    clock = Clock(device)
    n_rotations = instrument_rotations(model, clock)
    draw, how = micro_batches(params, rows)
    steps: list[dict] = []
    for step in range(args.steps):
        clock.totals = {}
        padded = real = n_label = 0
        lengths: list[int] = []
        start = clock.now()
        window = []
        for _ in range(accumulation):  # as Trainer.get_batch_samples: collate the window first
            t0 = clock.now()
            inputs = collator([rows[i] for i in next(draw)])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            clock.add("data", clock.now() - t0)
            window.append(inputs)
        num_items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in window)
        progress = step / max(1, p.max_steps)
        for inputs in window:
            mask = inputs["attention_mask"]
            padded += mask.numel()
            real += int(mask.sum())
            lengths.append(mask.shape[1])
            with autocast():
                t0 = clock.now()
                outputs = model(
                    input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False,
                )
                t1 = clock.now()
                clock.add("forward", t1 - t0)
                ce_sum, n = label_token_ce_sum(
                    model, outputs.hidden_states[-1], inputs["labels"], inputs["label_weights"],
                    inputs.get("choice_mask"), choice_ids,
                )
                t2 = clock.now()
                clock.add("lm_head_ce", t2 - t1)
                n_label += n
                loss = ce_sum / max(num_items, 1)
                if pet is not None:
                    t3 = clock.now()
                    penalty = pet_penalty(outputs.hidden_states[p.pet.hidden_state_index], mask, p.pet.reduction)
                    loss = loss + pet(progress) * penalty / accumulation
                    clock.add("pet", clock.now() - t3)
            t0 = clock.now()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            clock.add("backward", clock.now() - t0)
            del outputs, loss
        t0 = clock.now()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = clock.now()
        clock.add("optimizer", t1 - t0)
        rots = attached_rotations(model)
        if rots:  # as SO8TTrainer.log, called after every step
            with torch.no_grad():
                float(sum(r.orthogonality_error() for r in rots.values()))
                max(r.max_angle() for r in rots.values())
        end = clock.now()
        clock.add("log", end - t1)
        seconds = end - start
        phases = {k: clock.totals.get(k, 0.0) for k in PHASES if k != "other"}
        phases["other"] = max(0.0, seconds - sum(phases.values()))
        build_s = clock.totals.get("so8t_build", 0.0)
        phases["so8t_build"] = build_s
        phases["so8t_apply"] = max(0.0, clock.totals.get("so8t_call", 0.0) - build_s)
        flops = 6 * counts["body"] * padded + 6 * counts["head"] * n_label
        steps.append(
            {
                "step": step,
                "warmup": step == 0,
                "seconds": seconds,
                "phases": phases,
                "micro_batches": accumulation,
                "sequence_lengths": lengths,
                "padded_tokens": padded,
                "real_tokens": real,
                "padding_share": 1 - real / padded,
                "label_tokens": n_label,
                "tokens_per_s": real / seconds,
                "padded_tokens_per_s": padded / seconds,
                "flops": flops,
                "gflop_per_s": flops / seconds / 1e9,
            }
        )
        console.print(f"train_profile: step {step + 1}/{args.steps} {seconds:.3f} s" + (" (warm-up)" if step == 0 else ""))

    timed = [s for s in steps if not s["warmup"]]
    step_mean = statistics.fmean(s["seconds"] for s in timed)
    mean = {k: statistics.fmean(s["phases"][k] for s in timed) for k in PHASES + INSIDE_FORWARD}
    totals = {k: sum(s[k] for s in timed) for k in ("padded_tokens", "real_tokens", "label_tokens", "flops")}
    seconds = sum(s["seconds"] for s in timed)
    return {
        "config": {
            "base": str(args.base),
            "data": str(args.data),
            "params": str(args.params),
            "tasks": sorted(tasks) if tasks else None,
            "rows": len(rows),
            "rows_per_task": per_task,
            "batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "sampling": p.sampling,
            "batches": how,
            "seed": params.seed,
            "threads": threads,
            "device": str(device),
            "precision": precision,
            "quantization": p.quantization,
            "gradient_checkpointing": p.gradient_checkpointing,
            "optimizer": f"{type(optimizer).__name__} ({getattr(targs.optim, 'value', targs.optim)})",
            "pet": p.pet.enabled,
            "so8t_rotations": n_rotations,
            "parameters": counts,
            "trainable_parameters": trainable_parameter_counts(model),
            "flop_formula": "6 * parameters.body * padded_tokens + 6 * parameters.head * label_tokens",
        },
        "steps": steps,
        "warmup_steps": 1,
        "mean_seconds": mean,
        "share": {k: v / step_mean for k, v in mean.items()},
        "summary": {
            "timed_steps": len(timed),
            "seconds_per_step": step_mean,
            "seconds_per_step_median": statistics.median(s["seconds"] for s in timed),
            "padding_share": 1 - totals["real_tokens"] / totals["padded_tokens"],
            "real_tokens_per_step": totals["real_tokens"] / len(timed),
            "padded_tokens_per_step": totals["padded_tokens"] / len(timed),
            "label_tokens_per_step": totals["label_tokens"] / len(timed),
            "tokens_per_s": totals["real_tokens"] / seconds,
            "padded_tokens_per_s": totals["padded_tokens"] / seconds,
            "gflop_per_s": totals["flops"] / seconds / 1e9,
        },
    }


def report(result: dict) -> str:
    """Print the per-step and per-phase tables; return the one-line summary (also printed)."""
    from rich.console import Console
    from rich.table import Table

    c, s = result["config"], result["summary"]
    out = Console()
    per_step = Table(title="train_profile: steps")
    for col in ("step", "seconds", "seq lengths", "tokens (padded)", "real tokens", "padding", "label tokens", "tokens/s", "GFLOP/s"):
        per_step.add_column(col, justify="right")
    for st in result["steps"]:
        per_step.add_row(
            f"{st['step']}{' (warm-up)' if st['warmup'] else ''}", f"{st['seconds']:.3f}",
            ",".join(map(str, st["sequence_lengths"])), str(st["padded_tokens"]), str(st["real_tokens"]),
            f"{st['padding_share']:.0%}", str(st["label_tokens"]), f"{st['tokens_per_s']:.0f}", f"{st['gflop_per_s']:.2f}",
        )
    out.print(per_step)
    title = (
        f"train_profile: {s['timed_steps']} steps after 1 warm-up, batch {c['batch_size']} x {c['gradient_accumulation_steps']} "
        f"({c['sampling']}), {c['precision']} on {c['device']}, {c['threads']} threads, {c['so8t_rotations']} SO8T rotations, "
        f"PET {'on' if c['pet'] else 'off'}"
    )
    phases = Table(title=title)
    for col in ("phase", "mean s", "min s", "max s", "share of step"):
        phases.add_column(col, justify="left" if col == "phase" else "right")
    timed = [st for st in result["steps"] if not st["warmup"]]
    for k in ("data", "forward", *INSIDE_FORWARD, "lm_head_ce", "pet", "backward", "optimizer", "log", "other"):
        if k == "pet" and not c["pet"]:
            continue
        if k in (*INSIDE_FORWARD, "log") and not c["so8t_rotations"]:
            continue
        values = [st["phases"][k] for st in timed]
        style = "dim" if k in INSIDE_FORWARD else ""
        phases.add_row(
            LABELS[k], f"{result['mean_seconds'][k]:.4f}", f"{min(values):.4f}", f"{max(values):.4f}",
            f"{result['share'][k]:.1%}", style=style,
        )
    phases.add_row("[bold]step", f"{s['seconds_per_step']:.4f}", f"{min(st['seconds'] for st in timed):.4f}",
                   f"{max(st['seconds'] for st in timed):.4f}", "100.0%")
    out.print(phases)
    share = result["share"]
    line = (
        f"train_profile: {s['seconds_per_step']:.3f} s/step (median {s['seconds_per_step_median']:.3f}) | "
        f"forward {share['forward']:.0%} (SO8T {share['so8t_build'] + share['so8t_apply']:.0%}), "
        f"LM head+CE {share['lm_head_ce']:.0%}, PET {share['pet']:.0%}, backward {share['backward']:.0%}, "
        f"optimizer {share['optimizer']:.0%}, log {share['log']:.0%}, data {share['data']:.0%} | "
        f"{s['real_tokens_per_step']:.0f} real of {s['padded_tokens_per_step']:.0f} tokens/step "
        f"(padding {s['padding_share']:.0%}), {s['label_tokens_per_step']:.0f} label tokens | "
        f"{s['tokens_per_s']:.0f} tokens/s, ~{s['gflop_per_s']:.2f} GFLOP/s"
    )
    out.print(line, highlight=False, soft_wrap=True)
    return line


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/base", help="local HF model folder (default: models/base)")
    ap.add_argument("--data", default="data/formatted/train.jsonl", help="think-formatted train rows")
    ap.add_argument("--params", default="params.yaml", help="the params file (its train section is used)")
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps, the first a warm-up (default 6)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.per_device_train_batch_size")
    ap.add_argument("--tasks", nargs="*", default=None, help="only rows of these tasks (e.g. decision_line; commas allowed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: train.num_threads, else every core)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file (atomically)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    result = profile(args)
    report(result)
    if args.json:
        from so8t.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
