"""Stage train: LoRA + SO8T + PET on the think-formatted train split."""

import os
import resource
import time
from pathlib import Path

import torch
from dvclive import Live
from transformers import DataCollatorForSeq2Seq, TrainingArguments
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from so8t.base_model import load_tokenizer
from so8t.console import console, run_stage
from so8t.io import read_jsonl, write_json
from so8t.params import load_params
from so8t.pet import PETSchedule
from so8t.train import RichProgressCallback, SO8TTrainer, build_model, trainable_parameter_counts

BASE = Path("models/base")
DATA = Path("data/formatted/train.jsonl")
OUT = Path("models/adapter")
WORK = Path(".checkpoints/train")


def main() -> None:
    params = load_params()
    p = params.train
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    tokenizer = load_tokenizer(BASE)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(DATA)]
    if not rows:
        raise ValueError(f"{DATA}: no training examples")
    from datasets import Dataset

    model = build_model(BASE, p, params.seed)
    counts = trainable_parameter_counts(model)
    console.print(f"train: {len(rows)} examples, trainable parameters {counts}")
    args = TrainingArguments(
        output_dir=str(WORK),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.per_device_train_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        learning_rate=p.learning_rate,
        weight_decay=p.weight_decay,
        warmup_steps=round(p.warmup_ratio * p.max_steps),
        lr_scheduler_type=p.lr_scheduler_type,
        max_grad_norm=p.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=params.seed,
        data_seed=params.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    live = Live(dir="dvclive", dvcyaml=False, save_dvc_exp=False)
    trainer = SO8TTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=[DVCLiveCallback(live=live), RichProgressCallback()],
        pet_schedule=PETSchedule(p.pet.phase_boundaries, p.pet.lambdas) if p.pet.enabled else None,
        pet_hidden_state_index=p.pet.hidden_state_index,
        pet_reduction=p.pet.reduction,
        so8t_learning_rate=p.so8t.learning_rate,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(OUT))  # adapter + so8t_rotations.safetensors, atomically per file
    tokens = sum(len(r["input_ids"]) for r in rows)
    summary = {
        "train_seconds": round(seconds, 1),
        "steps": result.global_step,
        "seconds_per_step": round(seconds / max(result.global_step, 1), 3),
        "final_train_loss": result.training_loss,
        "trainable_parameters": counts,
        "examples": len(rows),
        "example_tokens": tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    history = [h for h in trainer.state.log_history if "tokens_per_s" in h]
    if history:
        summary["tokens_per_s"] = round(sum(h["tokens_per_s"] for h in history) / len(history), 2)
    write_json(OUT / "train_summary.json", summary)
    console.print(f"train: {summary}")


if __name__ == "__main__":
    run_stage("train", main)
