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


#: How the rotations are chosen: ``learned`` (trained from near identity, the SO8T default) or a
#: fixed one that is not trained: ``random`` (Haar-random SO(8) blocks) or ``hadamard`` (the
#: normalised 8x8 Sylvester-Hadamard matrix in every block), the untrained rotations of QuaRot
#: (Ashkboos et al. 2024) and SpinQuant's random init (Liu et al. 2024), in SO8T's block layout.
#: The ``_invariant`` kinds are the same blocks with their inverse folded into ``v_proj`` as well
#: (:func:`so8t.model.attach.make_invariant`), which keeps the model's function, as those papers do.
RotationKind = Literal["learned", "random", "hadamard", "random_invariant", "hadamard_invariant"]


def hadamard_block() -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix ``H_8 / sqrt(8)``, ``(8, 8)`` float64.

    ``H_8 = H_2 (x) H_2 (x) H_2`` with ``H_2 = [[1, 1], [1, -1]]`` (Sylvester 1867); divided by
    ``sqrt(8)`` it is orthogonal and symmetric, with ``det = +1`` (``det H_2^{(x)3}`` is
    ``(-2)^{12} > 0`` before scaling), so it lies in SO(8).
    """
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(torch.kron(h2, h2), h2) / 8**0.5


def haar_blocks(num_blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_blocks`` independent Haar-random SO(8) matrices, ``(num_blocks, 8, 8)`` float64.

    QR of a Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri 2007, "How to
    generate random matrices from the classical compact groups") gives Haar-random O(8); a
    matrix with ``det = -1`` has its first column negated, a fixed right multiplication, which
    carries Haar measure on that coset onto SO(8).
    """
    g = torch.randn(num_blocks, BLOCK, BLOCK, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def generator_of(blocks: torch.Tensor) -> torch.Tensor:
    """The ``expm`` generator of given SO(8) blocks: ``(n, 8, 8)`` -> ``(n, 28)`` float32.

    A real logarithm through the real Schur form ``R = Z T Z^T`` (``scipy.linalg.schur``; ``T``
    is block diagonal for an orthogonal ``R``): each 2x2 block ``[[c, -s], [s, c]]`` becomes
    ``[[0, -t], [t, 0]]`` with ``t = atan2(s, c)``; eigenvalues ``-1`` (an even number of them,
    as ``det R = +1``) are paired into rotations by pi; ``+1`` gives 0. Then ``A = Z log(T) Z^T``
    is skew-symmetric and ``expm(A) = R``. Unlike the principal ``logm`` this is real also for
    eigenvalues ``-1``, which the Hadamard block has four of.

    Raises:
        ValueError: a block is not in SO(8), or ``expm(A)`` misses it by more than 1e-8.
    """
    import numpy as np
    from scipy.linalg import expm, schur

    out = []
    for k, r in enumerate(blocks.detach().to(torch.float64).cpu().numpy()):
        if np.abs(r.T @ r - np.eye(BLOCK)).max() > 1e-8 or np.linalg.det(r) < 0:
            raise ValueError(f"generator_of: block {k} is not in SO(8)")
        t, z = schur(r, output="real")
        log_t, negative, i = np.zeros_like(t), [], 0
        while i < BLOCK:
            if i + 1 < BLOCK and abs(t[i + 1, i]) > 1e-12:
                angle = np.arctan2(t[i + 1, i], t[i, i])
                log_t[i + 1, i], log_t[i, i + 1] = angle, -angle
                i += 2
            else:
                if t[i, i] < 0:
                    negative.append(i)
                i += 1
        for a, b in zip(negative[::2], negative[1::2]):
            log_t[b, a], log_t[a, b] = np.pi, -np.pi
        a_k = z @ log_t @ z.T
        a_k = 0.5 * (a_k - a_k.T)
        if len(negative) % 2 or np.abs(expm(a_k) - r).max() > 1e-8:
            raise ValueError(f"generator_of: no real logarithm found for block {k}")
        rows, cols = np.triu_indices(BLOCK, k=1)
        out.append(a_k[rows, cols])
    return torch.tensor(np.stack(out), dtype=torch.float32)


def fixed_generator(kind: RotationKind, num_blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``(num_blocks, 28)`` generator of a fixed rotation: ``random`` (Haar) or ``hadamard``.

    ``random_invariant`` and ``hadamard_invariant`` draw the same blocks (whether the inverse is
    folded into ``v_proj`` too is :func:`so8t.model.attach.make_invariant`'s business).

    Raises:
        ValueError: ``kind`` is ``learned`` or unknown.
    """
    kind = kind.removesuffix("_invariant")  # type: ignore[assignment]
    if kind == "hadamard":
        return generator_of(hadamard_block().expand(num_blocks, BLOCK, BLOCK))
    if kind == "random":
        return generator_of(haar_blocks(num_blocks, generator))
    raise ValueError(f"fixed_generator: kind must be 'random' or 'hadamard', got {kind!r}")


__all__ = ["SO8Rotation", "BLOCK", "GENERATOR_SIZE", "random_generator", "whole", "Parameterization",
           "RotationKind", "hadamard_block", "haar_blocks", "generator_of", "fixed_generator"]
