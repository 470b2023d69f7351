"""Building the model a run trains: the base with PEFT LoRA and SO8T rotations, and its precision.

* :func:`build_model`: load the base (QLoRA through bitsandbytes when asked), wrap it with LoRA on
  :func:`lora_targets` (:data:`LORA_TARGETS` per architecture), attach the rotations, fix them
  (:func:`fix_rotations`) unless they are learned;
* :func:`resolve_precision`: ``train.precision`` on this machine;
* :func:`adapted_modules`, :func:`trainable_parameter_counts`: what was adapted, and how much.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from so8t.errors import So8tError
from so8t.model.attach import ROTATION_ATTR, attach_rotations, attached_rotations, set_generators
from so8t.params import TrainParams

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

    from so8t.inference.hf import load_causal_lm

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
