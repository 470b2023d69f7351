import math

import numpy as np
import pytest

from so8t.eval.calibration import TemperatureFit, apply_temperature, calibration_summary, fit_temperature


def _synthetic(true_t: float, n: int = 4000, k: int = 3, seed: int = 0):
    """Logits z ~ N(0, 3^2) and labels drawn from softmax(z / true_t)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, size=(n, k))
    p = apply_temperature(z, true_t)
    # inverse-CDF sampling: label = number of cumulative probabilities below u
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(labels, k - 1)


def test_fit_recovers_known_temperature():
    z, y = _synthetic(2.0)
    fit = fit_temperature(z, y)
    assert isinstance(fit, TemperatureFit)
    assert fit.converged
    assert fit.temperature == pytest.approx(2.0, abs=0.15)
    assert fit.nll_after < fit.nll_before
    assert fit.iterations > 0


def test_fit_rejects_when_nll_cannot_improve():
    # all-zero logits: softmax is uniform for every T, NLL = ln 3 everywhere
    fit = fit_temperature(np.zeros((10, 3)), np.arange(10) % 3)
    assert (fit.temperature, fit.converged) == (1.0, False)
    assert fit.nll_after == fit.nll_before == pytest.approx(math.log(3))


def test_fit_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_temperature([[0.0, np.nan]], [0])
    with pytest.raises(ValueError, match="2-D"):
        fit_temperature([0.0, 1.0], [0])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fit_temperature([[0.0, 1.0]], [5])
    with pytest.raises(ValueError, match="max_iter"):
        fit_temperature([[0.0, 1.0]], [0], max_iter=0)


def test_apply_temperature_is_stable_and_keeps_argmax():
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = apply_temperature(z, 0.5)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p.argmax(axis=1), z.argmax(axis=1))
    # T = 2 on logits (0, 2 ln 2): softmax(0, ln 2) = (1/3, 2/3)
    np.testing.assert_allclose(apply_temperature([[0.0, 2 * math.log(2)]], 2.0), [[1 / 3, 2 / 3]])
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(z, bad)


def test_calibration_summary_improves_on_overconfident_scores():
    z, y = _synthetic(2.0, seed=1)
    t = fit_temperature(z, y).temperature
    s = calibration_summary(z, y, t)
    assert set(s) == {
        "temperature", "ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after"
    }
    assert s["ece_after"] < s["ece_before"]
    assert s["nll_after"] < s["nll_before"]
    assert s["brier_after"] < s["brier_before"]
    same = calibration_summary(z, y, 1.0)
    assert same["ece_before"] == same["ece_after"] and same["nll_before"] == same["nll_after"]
