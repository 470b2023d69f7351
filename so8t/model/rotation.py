"""SO(8) block rotations: the SO8T module.

For a feature width ``d`` with ``d % 8 == 0`` the rotation is block diagonal::

    R = blockdiag(R_1, ..., R_{d/8}),   R_i in SO(8)

and acts on the last dimension of a row-vector input as ``y = x R``.

Each block is parameterised by a skew-symmetric generator ``A_i`` (``A_i^T = -A_i``),
stored as its 28 strictly-upper-triangular entries, through either

* the exact matrix exponential ``R_i = expm(A_i)`` (``torch.linalg.matrix_exp``,
  Higham 2005 scaling-and-squaring Padé, exact for any angle), or
* the Cayley transform ``R_i = (I - A_i/2)^{-1} (I + A_i/2)`` (Cayley 1846;
  always defined for skew ``A`` because its eigenvalues are imaginary).

Both maps send skew-symmetric matrices into SO(8): ``R^T R = I`` and
``det R = +1``, so orthogonality holds by construction, not by a penalty.

Bake identity: a linear layer ``y = x W^T + b`` fed with the rotated input
``x R`` equals one with weight ``W' = W R^T`` fed with ``x``, because
``(x R) W^T = x (W R^T)^T``. :mod:`so8t.model.bake` folds rotations that way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

BLOCK = 8
#: Free parameters of one so(8) generator: 8 * 7 / 2.
GENERATOR_SIZE = BLOCK * (BLOCK - 1) // 2

Parameterization = Literal["expm", "cayley"]


class SO8Rotation(nn.Module):
    """Trainable block-diagonal rotation ``y = x R`` with ``d/8`` SO(8) blocks.

    Args:
        width (int): feature width ``d``; must be divisible by 8.
        init_scale (float): standard deviation of the generator entries at
            initialisation (default 0.0: ``R = I`` exactly). Small values start
            near identity, so the host model is unchanged at step 0.
        parameterization (str): ``"expm"`` (matrix exponential, default) or
            ``"cayley"``.
        generator (Tensor, optional): initial generator of shape
            ``(d/8, 28)``; overrides ``init_scale``.

    Shapes:
        input ``x``: ``(..., d)``, any float dtype; output: same shape and dtype.

    Attributes:
        generator (nn.Parameter): ``(d/8, 28)`` float32 upper-triangular entries
            of each skew-symmetric block ``A_i``.

    Raises:
        ValueError: if ``width`` is not a positive multiple of 8 or the
            parameterisation is unknown.
    """

    def __init__(
        self,
        width: int,
        init_scale: float = 0.0,
        parameterization: Parameterization = "expm",
        generator: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if width <= 0 or width % BLOCK != 0:
            raise ValueError(f"SO8Rotation: width {width} is not a positive multiple of {BLOCK}")
        if parameterization not in ("expm", "cayley"):
            raise ValueError(f"SO8Rotation: parameterization must be 'expm' or 'cayley', got {parameterization!r}")
        self.width = width
        self.num_blocks = width // BLOCK
        self.parameterization: Parameterization = parameterization
        if generator is None:
            generator = torch.randn(self.num_blocks, GENERATOR_SIZE) * init_scale
        if tuple(generator.shape) != (self.num_blocks, GENERATOR_SIZE):
            raise ValueError(
                f"SO8Rotation: generator shape {tuple(generator.shape)} != ({self.num_blocks}, {GENERATOR_SIZE})"
            )
        self.generator = nn.Parameter(generator.detach().to(torch.float32).clone())
        rows, cols = torch.triu_indices(BLOCK, BLOCK, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def extra_repr(self) -> str:
        return f"width={self.width}, blocks={self.num_blocks}, parameterization={self.parameterization}"

    def full_generator(self) -> torch.Tensor:
        """The ``(d/8, 28)`` generator as a plain tensor, on every rank.

        Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the parameter is a ``DTensor``
        sharded along its first dimension outside the forward pass; this gathers it
        (``DTensor.full_tensor``, a collective: every rank of the mesh must call it). Elsewhere
        it is the parameter itself.
        """
        return whole(self.generator)

    def skew(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The generators ``A_i`` as ``(d/8, 8, 8)`` skew-symmetric matrices.

        Outside the forward pass of an FSDP2-sharded model this gathers the generator
        (:meth:`full_generator`), so every rank must call it.
        """
        g = self.full_generator()
        g = g if dtype is None else g.to(dtype)
        upper = _scatter_upper(g.new_zeros(self.num_blocks, BLOCK, BLOCK), g, self._rows, self._cols)
        return upper - upper.transpose(-1, -2)

    def blocks(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rotation blocks ``R_i`` as a ``(d/8, 8, 8)`` tensor of ``dtype`` (default float32).

        The map is evaluated in float64 and rounded once, so float32 blocks are
        orthogonal to ~1e-7 even for angles near pi (the 8x8 solves are cheap).
        """
        a = self.skew(torch.float64)
        if self.parameterization == "expm":
            r = torch.linalg.matrix_exp(a)
        else:
            eye = torch.eye(BLOCK, dtype=a.dtype, device=a.device).expand_as(a)
            r = torch.linalg.solve(eye - 0.5 * a, eye + 0.5 * a)
        return r.to(dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full ``(d, d)`` block-diagonal ``R`` (for baking and tests)."""
        return torch.block_diag(*self.blocks(dtype).unbind(0))

    def orthogonality_error(self) -> torch.Tensor:
        """Diagnostic ``sum_i ||R_i^T R_i - I||_F^2`` (float32 scalar; ~0 by construction)."""
        r = self.blocks()
        eye = torch.eye(BLOCK, dtype=r.dtype, device=r.device)
        return ((r.transpose(-1, -2) @ r - eye) ** 2).sum()

    def max_angle(self) -> float:
        """Largest rotation angle (radians) over all blocks: max |imag eigenvalue| of ``A_i``."""
        with torch.no_grad():
            eig = torch.linalg.eigvals(self.skew(torch.float64))
        return float(eig.imag.abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ValueError(f"SO8Rotation: input width {x.shape[-1]} != {self.width}")
        # Blocks in the input's precision (float64 inputs get float64 blocks, so a
        # float64 check of the bake identity is not limited by float32 rounding of R).
        r = self.blocks(torch.float64 if x.dtype == torch.float64 else torch.float32).to(x.dtype)
        xb = x.reshape(*x.shape[:-1], self.num_blocks, BLOCK)
        # y_b = x_b R_b for every block b, one batched contraction.
        y = torch.einsum("...bi,bij->...bj", xb, r)
        return y.reshape(x.shape)


def _scatter_upper(
    out: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Place ``values[:, k]`` at ``out[:, rows[k], cols[k]]`` (differentiable)."""
    flat_index = (rows * BLOCK + cols).to(values.device)
    flat = out.reshape(out.shape[0], BLOCK * BLOCK)
    flat = flat.index_add(1, flat_index, values)
    return flat.reshape_as(out)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a sharded ``DTensor`` (FSDP2 parameters outside the forward).

    ``DTensor.full_tensor`` is a collective: under FSDP2 every rank of the mesh must call it, in
    the same order.
    """
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def random_generator(num_blocks: int, max_angle: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``(num_blocks, 28)`` generator whose blocks rotate by up to ``max_angle`` radians.

    Used by tests and benchmarks to get rotations far from identity. Entries are
    Gaussian, then each block is rescaled so its largest eigen-angle is a
    uniform draw in ``[max_angle/2, max_angle]``.
    """
    g = torch.randn(num_blocks, GENERATOR_SIZE, generator=generator, dtype=torch.float64)
    rot = SO8Rotation(num_blocks * BLOCK, generator=g.float())
    with torch.no_grad():
        angles = torch.linalg.eigvals(rot.skew(torch.float64)).imag.abs().amax(-1)
    target = max_angle * (0.5 + 0.5 * torch.rand(num_blocks, generator=generator, dtype=torch.float64))
    return (g * (target / angles.clamp_min(1e-12)).unsqueeze(-1)).float()


__all__ = ["SO8Rotation", "BLOCK", "GENERATOR_SIZE", "random_generator", "whole", "Parameterization"]
