"""Baking: merge LoRA and fold SO8T rotations into ``o_proj``, leaving a plain HF model.

For a rotated projection ``y = (x R) W^T + b`` the folded weight is::

    W' = W R^T          so that   x W'^T + b = x R W^T + b

(:mod:`so8t.model.rotation`). An invariant rotation (:func:`so8t.model.attach.make_invariant`)
also has its inverse folded into the same layer's ``v_proj``: ``W_v' = R_v W_v`` and
``b_v' = b_v R_v^T`` with ``R_v = blockdiag_g(R_g)`` over the key/value heads, so that
``(x W_v^T + b_v) R_v^T = x W_v'^T + b_v'``. LoRA is merged first (``W <- W + (alpha/r) B A``,
Hu et al. 2021, via PEFT's ``merge_and_unload``) because the rotation acts on
the input of the whole LoRA-wrapped ``o_proj``. The product is computed in
float64 and cast back to the weight's dtype. Afterwards the hooks and rotation
modules are gone and the model's class and ``config.json`` are exactly the
base architecture's.

:func:`compare_logits` measures how exactly the baked model reproduces the
trained (unbaked) one on a real batch. :func:`bake_adapter` does it within
about one model's memory: merge and fold in place, keep only the final hidden
states of the trained model (not its full-vocabulary logits), free it before
reloading the saved folder, and check the fold itself in float64 on a few
layers' ``o_proj`` only.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from torch import nn

from so8t.model.attach import (
    SO8TError,
    attached_rotations,
    attention_geometry,
    detach_rotations,
    host_model,
    is_invariant,
    kv_blocks,
    o_proj_path,
    v_proj_path,
)

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


def fold_output_rotation_(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """In place: ``weight <- rotation @ weight`` and ``bias <- bias @ rotation.T``, in float64.

    The layer then computes ``(x W^T + b) R^T``: its output multiplied by ``R^T``, the inverse of
    a rotation ``R`` applied further on (the ``v_proj`` side of an invariant rotation).

    Args:
        linear: an ``nn.Linear`` with weight shape ``(d, in)``.
        rotation: ``(d, d)`` orthogonal matrix ``R``.

    Raises:
        BakeError: if the widths disagree.
    """
    w = linear.weight
    if w.shape[0] != rotation.shape[0] or rotation.shape[0] != rotation.shape[1]:
        raise BakeError(f"cannot fold a {tuple(rotation.shape)} rotation into the output of a weight of shape {tuple(w.shape)}")
    r = rotation.to(device=w.device, dtype=torch.float64)
    with torch.no_grad():
        w.copy_((r @ w.detach().to(torch.float64)).to(w.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.detach().to(torch.float64) @ r.T).to(linear.bias.dtype))


def bake_model(model: nn.Module, require_rotations: bool = True) -> nn.Module:
    """Merge LoRA (if PEFT-wrapped) and fold every attached rotation into its ``o_proj`` (and the
    inverse of an invariant one into its ``v_proj``).

    Args:
        model: a HF causal LM, optionally PEFT-wrapped, with rotations attached
            by :func:`so8t.model.attach.attach_rotations` / :func:`~so8t.model.attach.load_rotations`.
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
    attached = attached_rotations(model)
    rotations = {i: rot.matrix(torch.float64).detach() for i, rot in attached.items()}
    if require_rotations and not rotations:
        raise BakeError("no SO8T rotations are attached to this model (already baked, or trained without SO8T?)")
    inverses = {}
    if rotations and is_invariant(model):
        heads, kv_heads, _ = attention_geometry(model)
        inverses = {i: torch.block_diag(*kv_blocks(rot.blocks(torch.float64).detach(), heads, kv_heads).unbind(0))
                    for i, rot in attached.items()}
    detach_rotations(model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for i, r in rotations.items():
        linear = model.get_submodule(o_proj_path(model, i))
        if not isinstance(linear, nn.Linear):
            raise BakeError(f"{o_proj_path(model, i)} is {type(linear).__name__} after merging, expected nn.Linear")
        fold_rotation_(linear, r)
    for i, r_v in inverses.items():
        linear = model.get_submodule(v_proj_path(model, i))
        if not isinstance(linear, nn.Linear):
            raise BakeError(f"{v_proj_path(model, i)} is {type(linear).__name__} after merging, expected nn.Linear")
        fold_output_rotation_(linear, r_v)
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


class _LogitStats:
    """Running max / mean |Δ| and mean KL of pairs of ``(n, V)`` logit blocks."""

    def __init__(self) -> None:
        self.max_abs = self.abs_sum = self.kl_sum = 0.0
        self.count = self.positions = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        d = (a - b).abs()
        self.max_abs = max(self.max_abs, float(d.max()))
        self.abs_sum += float(d.sum(dtype=torch.float64))
        self.count += d.numel()
        la = torch.log_softmax(a.double(), -1)
        lb = torch.log_softmax(b.double(), -1)
        self.kl_sum += float((la.exp() * (la - lb)).sum())
        self.positions += a.shape[0]

    def result(self) -> LogitDiff:
        return LogitDiff(
            max_abs_diff=self.max_abs,
            mean_abs_diff=self.abs_sum / max(self.count, 1),
            kl=self.kl_sum / self.positions if self.positions else math.nan,
            positions=self.positions,
        )


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> LogitDiff:
    """Compare two lists of ``(n, V)`` logits from :func:`model_logits`."""
    stats = _LogitStats()
    for a, b in zip(reference, other, strict=True):
        stats.add(a, b)
    return stats.result()


@torch.no_grad()
def final_hidden(model: nn.Module, rows: list[list[int]]) -> list[torch.Tensor]:
    """Final normalised hidden states (what the LM head reads) of each token-id row.

    Args:
        model: a HF causal LM (optionally PEFT-wrapped) whose last ``hidden_states`` entry is
            the LM head's input, as for :func:`so8t.inference.hf.output_logits`.
        rows: token-id rows, each run alone (no padding).

    Returns:
        ``len(rows)`` float32 tensors of shape ``(len(row), D)``: the memory of the logits
        divided by ``V / D`` (~400 for Gemma 3), so whole-vocabulary logits are never kept.
    """
    model.eval()
    out = []
    for r in rows:
        res = model(input_ids=torch.tensor([r]), use_cache=False, output_hidden_states=True, logits_to_keep=1)
        out.append(res.hidden_states[-1][0].float())
    return out


@torch.no_grad()
def compare_hidden_logits(
    model: nn.Module, reference: list[torch.Tensor], other: list[torch.Tensor], chunk: int = 16
) -> LogitDiff:
    """:func:`compare_logits` of the logits of two lists of final hidden states through ``model``'s
    LM head (:func:`so8t.inference.hf.output_logits`), ``chunk`` positions at a time, so at most
    ``2 x chunk x V`` logits exist at once."""
    from so8t.inference.hf import output_logits

    stats = _LogitStats()
    for a, b in zip(reference, other, strict=True):
        for s in range(0, a.shape[0], chunk):
            stats.add(output_logits(model, a[s : s + chunk]), output_logits(model, b[s : s + chunk]))
    return stats.result()


def spot_layers(model: nn.Module, rotated: list[int], n: int) -> list[int]:
    """``n`` layers spread evenly over the rotated ones (all layers when none is rotated), first and last included."""
    from so8t.model.attach import num_layers

    pool = sorted(rotated) or list(range(num_layers(model)))
    if n >= len(pool):
        return pool
    return sorted({pool[round(k * (len(pool) - 1) / max(n - 1, 1))] for k in range(n)})


@torch.no_grad()
def _o_proj_references(model: nn.Module, layers: list[int], row: list[int], dtype: torch.dtype) -> dict[int, tuple]:
    """For each layer in ``layers``: the raw input ``x`` of its trained ``o_proj`` on ``row`` (before
    the rotation), and that trained module (rotation + LoRA + base weight, copied) applied to ``x`` in ``dtype``."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    host = host_model(model)
    for i in layers:
        module = host.get_submodule(o_proj_path(model, i))
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()), prepend=True
        ))
    try:
        model(input_ids=torch.tensor([row]), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        trained = copy.deepcopy(host.get_submodule(o_proj_path(model, i))).to(dtype).eval()
        x = inputs[i]
        out[i] = (x, trained(x.to(dtype)))
        del trained
    return out


def padded_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, both ``(B, T)`` long, of token-id rows."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def bake_adapter(
    base_dir,
    adapter_dir,
    out_dir,
    verify_rows: list[list[int]],
    max_abs_diff: float,
    verify_dtype: str = "float64",
    max_abs_diff_float32: float = 1.0e-3,
    spot_check_layers: int = 3,
    max_shard_size: str = "1GB",
):
    """Bake ``base_dir`` + the trained adapter (LoRA + rotations) into a plain HF folder ``out_dir``, verified.

    The trained model is rebuilt from a fresh float32 base (never a quantised QLoRA copy);
    rotations are folded when the adapter has them (``so8t_rotations.safetensors``). Two checks,
    both on the saved files (what later stages use), within about one model's memory:

    * **float32, end to end**: the final hidden states of the trained model on ``verify_rows`` are
      kept (``len x D`` floats, not ``len x V`` logits); the trained model is freed, the saved folder
      reloaded, and the logits of both compared through the LM head a chunk of positions at a time
      (all positions, the whole vocabulary), plus the last position of each row through the
      trained model's own head. Threshold ``max_abs_diff_float32`` (logit units): the float32
      summation-order noise of Gemma 3 270M alone is ~1.2e-4.
    * **``verify_dtype`` (float64), the fold itself**: on ``spot_check_layers`` layers (spread over
      the rotated ones), the trained ``o_proj`` (rotation + LoRA + base weight, copied in
      ``verify_dtype``) and the saved ``o_proj`` weight applied to the same recorded input.
      Threshold ``max_abs_diff`` (units of the ``o_proj`` output).

    The folder is written atomically and only if both pass; ``max_shard_size`` bounds the
    serialisation copy ``save_pretrained`` makes.

    Returns:
        The bake report (also ``out_dir/bake_report.json``): the float32 check's ``max_abs_diff``
        (logit units, LM-head check included), ``mean_abs_diff``, ``kl`` (nats per position),
        ``positions``, ``lm_head_max_abs_diff`` and ``threshold_float32``; ``spot_check`` (dtype,
        max |Δ| per layer, its maximum and threshold); rotations folded, architecture; the same
        for the same inputs.

    Raises:
        BakeError: a check exceeds its threshold (nothing is written).
    """
    from pathlib import Path

    from so8t.io import atomic_dir, write_json
    from so8t.model.attach import ROTATIONS_FILE, load_rotations
    from so8t.inference.hf import load_causal_lm, load_tokenizer, output_logits
    from so8t.model.base_model import copy_tokenizer_files

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    with_rotations = (adapter_dir / ROTATIONS_FILE).is_file()
    dtype = getattr(torch, verify_dtype)
    model = PeftModel.from_pretrained(load_causal_lm(base_dir, torch.float32), str(adapter_dir)).eval()
    rotated = sorted(load_rotations(model, adapter_dir / ROTATIONS_FILE)) if with_rotations else []
    layers = spot_layers(model, rotated, spot_check_layers)
    with torch.no_grad():
        reference = final_hidden(model, verify_rows)
        heads = [output_logits(model, h[-1:]) for h in reference]
        spots = _o_proj_references(model, layers, verify_rows[0], dtype)
    baked = bake_model(model, require_rotations=with_rotations)
    with atomic_dir(out_dir) as tmp:
        baked.save_pretrained(tmp, max_shard_size=max_shard_size)
        load_tokenizer(base_dir).save_pretrained(tmp)
        copy_tokenizer_files(base_dir, tmp)
        del model, baked
        gc.collect()
        reloaded = load_causal_lm(tmp, torch.float32).eval()
        with torch.no_grad():
            other = final_hidden(reloaded, verify_rows)
            diff = compare_hidden_logits(reloaded, reference, other)
            head = compare_logits(heads, [output_logits(reloaded, h[-1:]) for h in other])
            spot = {}
            for i, (x, y_ref) in spots.items():
                linear = reloaded.get_submodule(o_proj_path(reloaded, i))
                y = torch.nn.functional.linear(
                    x.to(dtype), linear.weight.to(dtype), None if linear.bias is None else linear.bias.to(dtype)
                )
                spot[str(i)] = float((y - y_ref).abs().max())
        worst32 = max(diff.max_abs_diff, head.max_abs_diff)
        worst_spot = max(spot.values(), default=0.0)
        report = {
            "max_abs_diff": worst32,
            "mean_abs_diff": diff.mean_abs_diff,
            "kl": diff.kl,
            "positions": diff.positions,
            "lm_head_max_abs_diff": head.max_abs_diff,
            "threshold_float32": max_abs_diff_float32,
            "spot_check": {"dtype": verify_dtype, "layers": spot, "max_abs_diff": worst_spot, "threshold": max_abs_diff},
            "rotations_folded": len(rotated),
            "architecture": type(reloaded).__name__,
            "model_type": reloaded.config.model_type,
        }
        if worst_spot > max_abs_diff:
            raise BakeError(
                f"the saved o_proj of layer(s) {[i for i, d in spot.items() if d > max_abs_diff]} differ from the "
                f"trained ones by {worst_spot:.3g} ({verify_dtype}) > bake.max_abs_diff = {max_abs_diff:g}; "
                "nothing was written"
            )
        if worst32 > max_abs_diff_float32:
            raise BakeError(
                f"baked logits differ from the trained model by {worst32:.3g} (float32) > "
                f"bake.max_abs_diff_float32 = {max_abs_diff_float32:g}; nothing was written"
            )
        write_json(tmp / "bake_report.json", report)
    return report
