import pytest
import torch

from so8t.model.pet import PETSchedule, pet_penalty


def test_linear_trajectory_has_zero_penalty():
    t = torch.arange(10, dtype=torch.float32)
    h = torch.stack([t, 2 * t + 1], dim=-1).unsqueeze(0)  # (1, 10, 2), straight line
    assert pet_penalty(h).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_value():
    # sequence of scalars 0, 1, 4, 9 (t^2): second differences are 2, 2 -> squared 4, 4 -> mean 4
    h = torch.tensor([0.0, 1.0, 4.0, 9.0]).view(1, 4, 1)
    assert pet_penalty(h).item() == pytest.approx(4.0)


def test_masked_positions_are_excluded_not_counted_as_zero():
    # valid part 0,1,4,9 (mean 4); padded tail with huge values must not matter,
    # and must not dilute the mean either.
    h = torch.tensor([0.0, 1.0, 4.0, 9.0, 1000.0, -1000.0]).view(1, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert pet_penalty(h, mask).item() == pytest.approx(4.0)
    # a second fully valid row with zero curvature: mean over 2 + 4 valid triples
    h2 = torch.zeros(1, 6, 1)
    both = pet_penalty(torch.cat([h, h2]), torch.cat([mask, torch.ones(1, 6, dtype=torch.long)]))
    assert both.item() == pytest.approx((4 + 4) / (2 + 4))


def test_short_or_empty_sequences_give_zero_with_grad():
    h = torch.randn(2, 2, 3, requires_grad=True)
    v = pet_penalty(h)
    v.backward()
    assert v.item() == 0.0
    h3 = torch.randn(1, 5, 3, requires_grad=True)
    assert pet_penalty(h3, torch.zeros(1, 5)).item() == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="hidden"):
        pet_penalty(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        pet_penalty(torch.zeros(1, 4, 2), torch.ones(1, 5))


def test_three_phase_schedule():
    s = PETSchedule(boundaries=(0.3, 0.7), lambdas=(0.01, 0.05, 0.1))
    assert [s(p) for p in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [0.01, 0.01, 0.05, 0.05, 0.1, 0.1]
    assert [s.phase(p) for p in (0.1, 0.5, 0.9)] == [0, 1, 2]


def test_mean_reduction_divides_by_width():
    h = torch.randn(2, 7, 16)
    assert torch.allclose(pet_penalty(h, reduction="mean") * 16, pet_penalty(h, reduction="sum"), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        pet_penalty(h, reduction="max")


def test_relative_reduction_is_scale_free_and_hand_checked():
    h = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9)
    mask[1, -3:] = 0
    rel = pet_penalty(h, mask, "relative")
    assert torch.allclose(pet_penalty(h * 7.5, mask, "relative"), rel, rtol=1e-5)
    valid = mask.bool()
    energy = h.pow(2).mean(-1)[valid].mean()
    assert torch.allclose(rel, pet_penalty(h, mask, "mean") / energy, rtol=1e-5)
