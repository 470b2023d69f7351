"""PET: a second-difference smoothness penalty on hidden states along the sequence.

For hidden states ``h`` of shape ``(B, T, D)`` and an attention mask ``m`` of
shape ``(B, T)``::

    PET(h, m) = sum_{b,t} v[b,t] * ||h[b,t+2] - 2 h[b,t+1] + h[b,t]||_2^2  /  sum_{b,t} v[b,t]

    v[b,t] = m[b,t] * m[b,t+1] * m[b,t+2]

i.e. the mean over *valid* triples (all three positions unmasked) of the
squared L2 norm of the discrete second difference (the finite-difference
curvature of the trajectory). Masked and padded positions are excluded from
the mean, not counted as zeros. With ``reduction="mean"`` the squared norm is
divided by ``D`` (a constant factor, so the same penalty with lambda / D); with
``reduction="relative"`` that mean is further divided by the (gradient-detached)
mean squared activation ``sum_{b,t} m[b,t] ||h[b,t]||^2 / (D sum m)`` of the
valid states, a dimensionless curvature whose size does not depend on the
model's activation scale. The training loss adds ``lambda * PET``,
where ``lambda`` follows a three-phase schedule over training progress
(:class:`PETSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pet_penalty(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, reduction: str = "sum"
) -> torch.Tensor:
    """Mean squared second difference of ``hidden`` over valid positions.

    Args:
        hidden: ``(B, T, D)`` hidden states, any float dtype (computed in float32).
        attention_mask: ``(B, T)`` 1/0 (or bool) mask; ``None`` = all valid.
        reduction: over the hidden dimension, ``"sum"`` (the squared L2 norm,
            the formula above), ``"mean"`` (divided by ``D``) or ``"relative"``
            (the mean divided by the mean squared activation).

    Returns:
        float32 scalar tensor; 0.0 when no valid triple exists (``T < 3`` or
        fully masked), with gradients flowing to ``hidden``.

    Raises:
        ValueError: if the shapes disagree.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pet_penalty: hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    b, t, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
    if tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"pet_penalty: attention_mask shape {tuple(attention_mask.shape)} != {(b, t)}")
    if reduction not in ("sum", "mean", "relative"):
        raise ValueError(f"pet_penalty: reduction must be 'sum', 'mean' or 'relative', got {reduction!r}")
    if t < 3:
        return hidden.float().sum() * 0.0
    h = hidden.float()
    second = h[:, 2:] - 2.0 * h[:, 1:-1] + h[:, :-2]
    m = attention_mask.bool()
    valid = (m[:, 2:] & m[:, 1:-1] & m[:, :-2]).to(h.dtype)
    count = valid.sum()
    sq = second.pow(2).sum(-1) if reduction == "sum" else second.pow(2).mean(-1)
    total = (sq * valid).sum()
    value = total / count.clamp_min(1.0)
    if reduction == "relative":
        # Divide by the mean squared norm per dimension of the valid states themselves:
        # a dimensionless curvature, independent of the model's activation scale.
        mf = m.to(h.dtype)
        energy = (h.pow(2).mean(-1) * mf).sum() / mf.sum().clamp_min(1.0)
        value = value / energy.detach().clamp_min(1e-12)
    return value


@dataclass(frozen=True)
class PETSchedule:
    """Three-phase lambda schedule over training progress ``p`` in [0, 1].

    ``p < b1``: exploration (``lambdas[0]``); ``b1 <= p < b2``: transition
    (``lambdas[1]``); ``p >= b2``: stabilisation (``lambdas[2]``).
    """

    boundaries: tuple[float, float] = (0.3, 0.7)
    lambdas: tuple[float, float, float] = (0.01, 0.05, 0.1)

    def phase(self, progress: float) -> int:
        """Phase index 0, 1 or 2 at ``progress`` (fraction of optimiser steps done)."""
        b1, b2 = self.boundaries
        if progress < b1:
            return 0
        if progress < b2:
            return 1
        return 2

    def __call__(self, progress: float) -> float:
        return float(self.lambdas[self.phase(progress)])
