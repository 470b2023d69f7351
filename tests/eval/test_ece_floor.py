"""benchmarks/ece_floor.py: the ECE a perfectly calibrated model shows at a given n."""

from __future__ import annotations

import json

import numpy as np
from scripts import load_script


def _load():
    return load_script("benchmarks/ece_floor.py")


def _probs(n: int, rng) -> np.ndarray:
    logits = rng.normal(size=(n, 3)) * 3.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_the_floor_is_positive_shrinks_with_n_and_holds_a_calibrated_sample():
    ece = _load()
    rng = np.random.default_rng(1)
    small, large = _probs(192, rng), _probs(4000, rng)
    f_small, f_large = ece.ece_floor(small, 300, 15), ece.ece_floor(large, 100, 15)
    assert f_small.min() > 0 and np.median(f_large) < np.median(f_small) / 3  # ~1/sqrt(n)
    # outcomes drawn calibrated once more: their ECE falls inside the floor, not above it
    from so8t.eval.metrics import expected_calibration_error

    draw = ece.ece_floor(small, 1, 15, seed=99)[0]
    assert draw <= np.quantile(f_small, 0.995)
    # a model confidently wrong half the time is far above the floor
    labels = np.where(rng.random(192) < 0.5, small.argmax(axis=1), (small.argmax(axis=1) + 1) % 3)
    assert expected_calibration_error(small, labels) > np.quantile(f_small, 0.99)


def test_calibrated_probs_divide_the_logits_by_the_fitted_temperature():
    ece = _load()
    details = {"artifacts": {"baked": {"decision": {"temperature": 2.0},
                                       "decision_rows": [{"logits": [2.0, 0.0, 0.0], "label": 0},
                                                         {"logits": [0.0, 4.0, 0.0], "label": 2}]}}}
    probs, labels, t = ece.calibrated_probs(json.loads(json.dumps(details)), "baked")
    assert t == 2.0 and labels.tolist() == [0, 2]
    np.testing.assert_allclose(probs[0], np.exp([1.0, 0, 0]) / np.exp([1.0, 0, 0]).sum())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
