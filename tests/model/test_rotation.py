import math

import pytest
import torch

from so8t.model.rotation import GENERATOR_SIZE, SO8Rotation, random_generator


def _eig_expm(a: torch.Tensor) -> torch.Tensor:
    """Reference expm of a normal (skew-symmetric) matrix by eigendecomposition."""
    lam, v = torch.linalg.eig(a.to(torch.complex128))
    return (v @ torch.diag_embed(torch.exp(lam)) @ torch.linalg.inv(v)).real


@pytest.mark.parametrize("parameterization", ["expm", "cayley"])
def test_large_angle_rotation_is_orthogonal_in_fp32(parameterization):
    gen = random_generator(64, max_angle=3.0, generator=torch.Generator().manual_seed(1))
    rot = SO8Rotation(512, generator=gen, parameterization=parameterization)
    assert rot.max_angle() > 1.5  # far from identity
    r = rot.blocks()
    assert r.dtype == torch.float32
    eye = torch.eye(8)
    assert (r.transpose(-1, -2) @ r - eye).abs().max() < 1e-6
    assert torch.allclose(torch.linalg.det(r.double()), torch.ones(64, dtype=torch.float64), atol=1e-6)
    assert rot.orthogonality_error() < 1e-9


def test_expm_matches_eigendecomposition_reference():
    gen = random_generator(16, max_angle=3.1, generator=torch.Generator().manual_seed(2))
    rot = SO8Rotation(128, generator=gen)
    a = rot.skew(torch.float64)
    ref = torch.stack([_eig_expm(b) for b in a])
    got = rot.blocks(torch.float64)
    assert (got - ref).abs().max() < 1e-10


def test_cayley_formula():
    gen = random_generator(4, max_angle=2.0, generator=torch.Generator().manual_seed(3))
    rot = SO8Rotation(32, generator=gen, parameterization="cayley")
    a = rot.skew(torch.float64)
    eye = torch.eye(8, dtype=torch.float64)
    ref = torch.stack([torch.linalg.inv(eye - b / 2) @ (eye + b / 2) for b in a])
    assert (rot.blocks(torch.float64) - ref).abs().max() < 1e-12


def test_forward_is_x_times_block_diagonal_R():
    gen = random_generator(8, max_angle=3.0, generator=torch.Generator().manual_seed(4))
    rot = SO8Rotation(64, generator=gen)
    x = torch.randn(3, 5, 64)
    r = rot.matrix()
    assert r.shape == (64, 64)
    assert torch.count_nonzero(r[:8, 8:]) == 0  # block diagonal
    assert torch.allclose(rot(x), x @ r, atol=1e-5)
    assert torch.allclose(rot(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4)  # isometry


def test_zero_init_is_exact_identity_and_init_scale_sets_std():
    assert torch.equal(SO8Rotation(64).matrix(), torch.eye(64))
    torch.manual_seed(0)
    rot = SO8Rotation(8 * 1000, init_scale=0.02)
    assert rot.generator.shape == (1000, GENERATOR_SIZE)
    assert math.isclose(float(rot.generator.detach().std()), 0.02, rel_tol=0.05)


def test_gradients_reach_generator():
    rot = SO8Rotation(16, init_scale=0.1)
    rot(torch.randn(4, 16)).pow(3).sum().backward()
    assert rot.generator.grad is not None and rot.generator.grad.abs().sum() > 0


@pytest.mark.parametrize("width", [0, 12, 100])
def test_width_not_divisible_by_8_is_an_error(width):
    with pytest.raises(ValueError, match=str(width)):
        SO8Rotation(width)


def test_hadamard_block_is_in_so8_and_its_generator_reaches_it():
    from so8t.model.rotation import generator_of, hadamard_block

    h = hadamard_block()
    assert torch.allclose(h.T @ h, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.linalg.det(h).item() == pytest.approx(1.0, abs=1e-12)
    assert (torch.linalg.eigvalsh(h) < 0).sum() == 4  # four eigenvalues -1: no principal real log
    rot = SO8Rotation(16, generator=generator_of(h.expand(2, 8, 8)))
    torch.testing.assert_close(rot.blocks(torch.float64), h.expand(2, 8, 8), rtol=0, atol=1e-6)


def test_haar_blocks_are_rotations_reproducible_by_seed_and_their_generator_reaches_them():
    from so8t.model.rotation import fixed_generator, generator_of, haar_blocks

    q = haar_blocks(64, torch.Generator().manual_seed(3))
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(q.transpose(-1, -2) @ q, eye.expand_as(q), atol=1e-12)
    assert torch.allclose(torch.linalg.det(q), torch.ones(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, haar_blocks(64, torch.Generator().manual_seed(3)))
    # Haar, not near identity: E[trace] = 0 for Haar SO(8); the mean over 64 blocks is near it.
    assert abs(torch.diagonal(q, dim1=-2, dim2=-1).sum(-1).mean().item()) < 0.5
    rot = SO8Rotation(64 * 8, generator=generator_of(q))
    torch.testing.assert_close(rot.blocks(torch.float64), q, rtol=0, atol=1e-6)
    g = fixed_generator("random", 4, torch.Generator().manual_seed(3))
    assert g.shape == (4, GENERATOR_SIZE) and g.dtype == torch.float32


def test_generator_of_rejects_what_is_not_a_rotation():
    from so8t.model.rotation import fixed_generator, generator_of

    reflection = torch.eye(8, dtype=torch.float64)
    reflection[0, 0] = -1.0
    with pytest.raises(ValueError, match="block 1 is not in SO\\(8\\)"):
        generator_of(torch.stack([torch.eye(8, dtype=torch.float64), reflection]))
    with pytest.raises(ValueError, match="'random' or 'hadamard'"):
        fixed_generator("learned", 2)
