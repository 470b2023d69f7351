"""Temperature scaling of decision scores (Guo et al. 2017).

The decision head's scores are ``logits``: an ``(N, K)`` float array of
unnormalised scores, here the log-likelihoods the model gives the K = 3
decision labels (ALLOW / ESCALATION / DENY). Temperature scaling divides them
by one scalar ``T > 0`` before the softmax::

    p = softmax(z / T)

``T > 1`` softens over-confident predictions, ``T < 1`` sharpens them; the
argmax (and so accuracy) never changes. ``T`` is fitted by minimising the NLL
on held-out data (Guo et al. 2017, "On Calibration of Modern Neural Networks",
section 4.2, https://arxiv.org/abs/1706.04599).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from so8t.eval.metrics import brier_score, expected_calibration_error, nll_from_logits

#: Search range for T: log T is searched in [log 0.05, log 20].
T_BOUNDS: tuple[float, float] = (0.05, 20.0)

#: An optimum of ``log T`` closer than this to a bound of :data:`T_BOUNDS` is on the bound.
BOUND_TOLERANCE = 1e-3

#: A fitted T must lower the mean NLL by more than this (nats) to be kept;
#: smaller differences are floating-point noise.
MIN_NLL_GAIN = 1e-12


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`.

    Attributes:
        temperature: fitted ``T > 0`` (1.0 when the fit was rejected).
        nll_before: mean NLL in nats of ``softmax(z)`` (T = 1).
        nll_after: mean NLL in nats of ``softmax(z / temperature)``.
        converged: True when the optimiser reported success, the optimum lies strictly
            inside :data:`T_BOUNDS` and the fitted T lowered the NLL; False means
            ``temperature`` is the fallback 1.0.
        iterations: optimiser iterations used.
        at_bound: the optimum was on a bound of :data:`T_BOUNDS`: a failed fit (the scores
            carry too little information, or the optimum lies outside the range), never
            reported as converged.
    """

    temperature: float
    nll_before: float
    nll_after: float
    converged: bool
    iterations: int
    at_bound: bool = False


def fit_temperature(logits, labels, max_iter: int = 200) -> TemperatureFit:
    """Fit the temperature that minimises the NLL of ``softmax(logits / T)``.

    Minimises ``NLL(t) = -1/N sum_i log softmax(z_i / exp(t))[y_i]`` over
    ``t = log T`` in ``[log 0.05, log 20]`` with scipy's bounded Brent search
    (``minimize_scalar(method="bounded")``), so ``T > 0`` by construction
    (Guo et al. 2017, section 4.2). The NLL is convex in ``1/T``, so the 1-D
    search finds the optimum inside the range; an optimum beyond it lands on the
    nearest bound, which counts as a failed fit.

    If the optimum is on a bound, the optimiser does not report success, or the fitted T does not lower
    the NLL below its value at T = 1 by more than :data:`MIN_NLL_GAIN`
    (as when the scores carry no information), the fit is rejected: ``temperature`` is
    1.0, ``nll_after == nll_before`` and ``converged`` is False.

    Args:
        logits: ``(N, K)`` float unnormalised scores (finite).
        labels: ``(N,)`` int true class indices in ``[0, K)``.
        max_iter: maximum optimiser iterations (positive int).

    Returns:
        :class:`TemperatureFit`.

    Raises:
        ValueError: bad shapes, empty input, non-finite logits, labels
            outside ``[0, K)``, or ``max_iter < 1``.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"fit_temperature: max_iter must be a positive integer, got {max_iter!r}")
    nll_before = nll_from_logits(logits, labels)  # validates shapes, finiteness and labels
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    res = minimize_scalar(
        lambda log_t: nll_from_logits(z / math.exp(log_t), y),
        bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])),
        method="bounded",
        options={"maxiter": max_iter, "xatol": 1e-6},
    )
    iterations = int(getattr(res, "nit", getattr(res, "nfev", 0)))
    nll_after = float(res.fun)
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    at_bound = bool(min(res.x - lo, hi - res.x) < BOUND_TOLERANCE)
    if at_bound or not res.success or not nll_after < nll_before - MIN_NLL_GAIN:
        return TemperatureFit(1.0, nll_before, nll_before, False, iterations, at_bound)
    return TemperatureFit(float(math.exp(res.x)), nll_before, nll_after, True, iterations)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(logits / T)``.

    Uses scipy's max-shifted softmax, so large logits do not overflow.

    Args:
        logits: ``(N, K)`` float unnormalised scores (finite).
        temperature: ``T``, finite and > 0.

    Returns:
        ``(N, K)`` float64 probabilities, rows summing to 1.

    Raises:
        ValueError: logits not 2-D, empty or non-finite; ``T`` not finite or <= 0.
    """
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"apply_temperature: temperature must be finite and > 0, got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"apply_temperature: logits must be a non-empty (N, K >= 2) array, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("apply_temperature: logits contains NaN or inf")
    return softmax(z / t, axis=1)


def calibration_summary(logits, labels, temperature: float, n_bins: int = 15) -> dict:
    """ECE, Brier and NLL before (T = 1) and after temperature scaling.

    ECE: :func:`so8t.eval.metrics.expected_calibration_error` (Guo et al. 2017,
    eq. 3); Brier: :func:`so8t.eval.metrics.brier_score` (Brier 1950); NLL:
    :func:`so8t.eval.metrics.nll_from_logits` (nats).

    Args:
        logits: ``(N, K)`` float unnormalised scores (finite).
        labels: ``(N,)`` int true class indices in ``[0, K)``.
        temperature: ``T`` to evaluate (finite, > 0), e.g.
            ``fit_temperature(...).temperature`` fitted on other data.
        n_bins: ECE bins (positive int).

    Returns:
        ``{"temperature", "ece_before", "ece_after", "brier_before",
        "brier_after", "nll_before", "nll_after"}``, all floats.

    Raises:
        ValueError: as :func:`apply_temperature` and
            :func:`so8t.eval.metrics.expected_calibration_error`.
    """
    before = apply_temperature(logits, 1.0)
    after = apply_temperature(logits, temperature)
    z = np.asarray(logits, dtype=np.float64)
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
        "brier_before": brier_score(before, labels),
        "brier_after": brier_score(after, labels),
        "nll_before": nll_from_logits(z, labels),
        "nll_after": nll_from_logits(z / float(temperature), labels),
    }
