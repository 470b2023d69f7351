"""Training-step overhead of SO8T + PET against plain PEFT LoRA (goal: under 5%).

Same model (models/base), same real batch (the first examples of
data/formatted/train.jsonl, padded to one length), same optimiser; the
configurations are interleaved step by step so machine noise hits all alike.
Prints the median seconds per step of each configuration and the overhead.

    python benchmarks/so8t_overhead.py [--steps 10] [--batch 4] [--length 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from so8t.io import read_jsonl
from so8t.params import PETParams, SO8TParams, TrainParams
from so8t.model.build import build_model
from so8t.model.loss import label_token_ce_sum
from so8t.model.pet import PETSchedule, pet_penalty


def batch(n: int, length: int) -> dict[str, torch.Tensor]:
    rows = read_jsonl("data/formatted/train.jsonl")[:n]
    ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, r in enumerate(rows):
        k = min(length, len(r["input_ids"]))
        ids[i, :k] = torch.tensor(r["input_ids"][:k])
        labels[i, :k] = torch.tensor(r["labels"][:k])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def step_fn(model, inputs, pet: PETSchedule | None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        t0 = time.perf_counter()
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        ce, n = label_token_ce_sum(model, out.hidden_states[-1], inputs["labels"])
        loss = ce / n
        if pet is not None:
            penalty = pet_penalty(out.hidden_states[-1], inputs["attention_mask"], PETParams().reduction)
            loss = loss + pet(0.5) * penalty
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    inputs = batch(args.batch, args.length)
    configs = {
        "lora": (TrainParams(so8t=SO8TParams(enabled=False), pet=PETParams(enabled=False)), None),
        "lora+so8t": (TrainParams(pet=PETParams(enabled=False)), None),
        "lora+so8t+pet": (TrainParams(), PETSchedule()),
    }
    steps = {}
    for name, (p, pet) in configs.items():
        model = build_model("models/base", p, seed=0)
        model.train()
        steps[name] = step_fn(model, inputs, pet)
        steps[name]()  # warm-up (allocator, first optimiser step)
        steps[name]()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            times[name].append(fn())
    base = statistics.median(times["lora"])
    print(f"batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, {args.steps} steps each")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(
            f"{name:15s} median {med:6.3f} s/step  overhead {100 * (med / base - 1):+6.2f} %  "
            f"(min {low:.3f}: {100 * (low / min(times['lora']) - 1):+6.2f} %)  ({', '.join(f'{t:.2f}' for t in ts)})"
        )


if __name__ == "__main__":
    main()
