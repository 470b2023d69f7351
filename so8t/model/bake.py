"""Baking: merge LoRA and fold SO8T rotations into ``o_proj``, leaving a plain HF model.

For a rotated projection ``y = (x R) W^T + b`` the folded weight is::

    W' = W R^T          so that   x W'^T + b = x R W^T + b

(:mod:`so8t.model.rotation`). LoRA is merged first (``W <- W + (alpha/r) B A``,
Hu et al. 2021, via PEFT's ``merge_and_unload``) because the rotation acts on
the input of the whole LoRA-wrapped ``o_proj``. The product is computed in
float64 and cast back to the weight's dtype. Afterwards the hooks and rotation
modules are gone and the model's class and ``config.json`` are exactly the
base architecture's.

:func:`compare_logits` measures how exactly the baked model reproduces the
trained (unbaked) one on a real batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from torch import nn

from so8t.model.attach import SO8TError, attached_rotations, detach_rotations, host_model, o_proj_path

_BAKED_FLAG = "_so8t_baked"


class BakeError(SO8TError):
    """Baking was asked for something it must not do (e.g. bake twice)."""


def fold_rotation_(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """In place: ``linear.weight <- linear.weight @ rotation.T`` in float64.

    Args:
        linear: an ``nn.Linear`` whose input was rotated as ``x R``; weight
            shape ``(out, d)``.
        rotation: ``(d, d)`` matrix ``R``.

    Raises:
        BakeError: if the widths disagree.
    """
    w = linear.weight
    if w.shape[1] != rotation.shape[0] or rotation.shape[0] != rotation.shape[1]:
        raise BakeError(f"cannot fold a {tuple(rotation.shape)} rotation into a weight of shape {tuple(w.shape)}")
    with torch.no_grad():
        folded = w.detach().to(torch.float64) @ rotation.to(device=w.device, dtype=torch.float64).T
        w.copy_(folded.to(w.dtype))


def bake_model(model: nn.Module, require_rotations: bool = True) -> nn.Module:
    """Merge LoRA (if PEFT-wrapped) and fold every attached rotation into its ``o_proj``.

    Args:
        model: a HF causal LM, optionally PEFT-wrapped, with rotations attached
            by :func:`so8t.attach.attach_rotations` / :func:`~so8t.attach.load_rotations`.
            Its weights must be 16/32-bit (never bake into a 4-bit base).
        require_rotations: raise if no rotation is attached (a model that was
            trained with SO8T must never be saved without its rotations).

    Returns:
        The plain HF ``PreTrainedModel`` (the same objects, modified in place).

    Raises:
        BakeError: when baking twice, when rotations are required but absent,
            or when the base weights are quantised.
    """
    host = host_model(model)
    if getattr(host, _BAKED_FLAG, False):
        raise BakeError("this model is already baked; baking twice would fold the rotations a second time")
    for name, p in host.named_parameters():
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise BakeError(f"{name} has dtype {p.dtype}; bake needs a 16/32-bit base (reload the base unquantised)")
    rotations = {i: rot.matrix(torch.float64).detach() for i, rot in attached_rotations(model).items()}
    if require_rotations and not rotations:
        raise BakeError("no SO8T rotations are attached to this model (already baked, or trained without SO8T?)")
    detach_rotations(model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for i, r in rotations.items():
        linear = model.get_submodule(o_proj_path(model, i))
        if not isinstance(linear, nn.Linear):
            raise BakeError(f"{o_proj_path(model, i)} is {type(linear).__name__} after merging, expected nn.Linear")
        fold_rotation_(linear, r)
    setattr(model, _BAKED_FLAG, True)
    return model


@dataclass
class LogitDiff:
    """Agreement of two models' logits over the valid positions of a batch.

    Attributes:
        max_abs_diff: max |z_a - z_b| over positions and vocabulary (logit units).
        mean_abs_diff: mean |z_a - z_b|.
        kl: mean over positions of KL(softmax z_a || softmax z_b), nats.
        positions: number of compared (unmasked) positions.
    """

    max_abs_diff: float
    mean_abs_diff: float
    kl: float
    positions: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Full-vocabulary logits of each sequence's unmasked positions.

    Args:
        input_ids, attention_mask: ``(B, T)`` long tensors.

    Returns:
        ``B`` float32 tensors of shape ``(n_valid_b, V)``.
    """
    model.eval()
    out = []
    for b in range(input_ids.shape[0]):
        mask = attention_mask[b].bool()
        ids = input_ids[b][mask].unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        out.append(logits)
    return out


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> LogitDiff:
    """Compare two lists of ``(n, V)`` logits from :func:`model_logits`."""
    max_abs = 0.0
    abs_sum = 0.0
    kl_sum = 0.0
    count = 0
    n_pos = 0
    for a, b in zip(reference, other, strict=True):
        d = (a - b).abs()
        max_abs = max(max_abs, float(d.max()))
        abs_sum += float(d.sum(dtype=torch.float64))
        count += d.numel()
        la = torch.log_softmax(a.double(), -1)
        lb = torch.log_softmax(b.double(), -1)
        kl_sum += float((la.exp() * (la - lb)).sum())
        n_pos += a.shape[0]
    return LogitDiff(
        max_abs_diff=max_abs,
        mean_abs_diff=abs_sum / max(count, 1),
        kl=kl_sum / max(n_pos, 1) if n_pos else math.nan,
        positions=n_pos,
    )


def padded_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, both ``(B, T)`` long, of token-id rows."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def bake_adapter(base_dir, adapter_dir, out_dir, verify_rows: list[list[int]], max_abs_diff: float, verify_dtype: str):
    """Bake ``base_dir`` + the trained adapter (LoRA + rotations) into a plain HF folder ``out_dir``, verified.

    The trained model is rebuilt from a fresh float32 base (never a quantised QLoRA
    copy); rotations are folded when the adapter has them (``so8t_rotations.safetensors``).
    The saved folder is reloaded and its logits on ``verify_rows`` compared with the
    trained model's in ``verify_dtype`` (and in float32), written atomically only if the
    difference is within ``max_abs_diff``.

    Returns:
        The bake report (also ``out_dir/bake_report.json``): differences, positions,
        threshold, rotations folded, architecture; the same for the same inputs.

    Raises:
        BakeError: the baked logits differ by more than ``max_abs_diff`` (nothing is written).
    """
    from pathlib import Path

    from so8t.io import atomic_dir, write_json
    from so8t.model.attach import ROTATIONS_FILE, load_rotations
    from so8t.model.base_model import load_causal_lm, load_tokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    with_rotations = (adapter_dir / ROTATIONS_FILE).is_file()
    dtype = getattr(torch, verify_dtype)
    ids, mask = padded_batch(verify_rows)
    model = PeftModel.from_pretrained(load_causal_lm(base_dir, torch.float32), str(adapter_dir))
    n_rot = len(load_rotations(model, adapter_dir / ROTATIONS_FILE)) if with_rotations else 0
    reference = model_logits(model.to(dtype), ids, mask)
    reference_fp32 = model_logits(model.float(), ids, mask) if dtype != torch.float32 else reference
    baked = bake_model(model, require_rotations=with_rotations)
    with atomic_dir(out_dir) as tmp:
        baked.save_pretrained(tmp)
        load_tokenizer(base_dir).save_pretrained(tmp)
        # Verify the saved files, not the in-memory model: they are what later stages use.
        reloaded = load_causal_lm(tmp, torch.float32)
        diff32 = compare_logits(reference_fp32, model_logits(reloaded, ids, mask))
        diff = compare_logits(reference, model_logits(reloaded.to(dtype), ids, mask))
        report = {
            "max_abs_diff": diff.max_abs_diff,
            "mean_abs_diff": diff.mean_abs_diff,
            "kl": diff.kl,
            "verify_dtype": verify_dtype,
            "float32": diff32.to_dict(),
            "positions": diff.positions,
            "threshold": max_abs_diff,
            "rotations_folded": n_rot,
            "architecture": type(reloaded).__name__,
            "model_type": reloaded.config.model_type,
        }
        if diff.max_abs_diff > max_abs_diff:
            raise BakeError(
                f"baked logits differ from the trained model by {diff.max_abs_diff:.3g} ({verify_dtype}) > "
                f"bake.max_abs_diff = {max_abs_diff:g}; nothing was written"
            )
        write_json(tmp / "bake_report.json", report)
    return report
