"""Preflight: stop a run before it starts when the machine cannot hold it.

* :func:`preflight`: free disk for the checkpoints and outputs, free RAM for the model (CPU);
* :func:`gpu_memory_estimate` / :func:`gpu_preflight`: the GPU memory a LoRA run needs, by part,
  against the free memory of the CUDA device.

Both raise :class:`PreflightError` with the numbers and what to change.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from so8t.errors import So8tError
from so8t.model.build import resolve_precision


class PreflightError(So8tError, RuntimeError):
    """The machine cannot hold the run (disk or RAM); the message gives the numbers."""


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
