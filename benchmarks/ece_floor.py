"""How small can a measured ECE be at this n? The sampling floor of the calibrated test ECE.

ECE with equal-width bins is biased upward on a finite sample: even a perfectly calibrated model
shows a positive ECE, and how large depends on n and on where its confidences fall (Kumar, Liang &
Ma 2019, "Verified uncertainty calibration"; Roelofs et al. 2022, "Mitigating bias in calibration
error estimation"). This script measures that floor for the pipeline's own test decisions: it
takes an artifact's calibrated probabilities from ``reports/eval/details.json`` (the decision
logits of every test request divided by the fitted temperature), draws outcomes from a model that
is calibrated by construction (its top label is right with probability equal to its confidence;
otherwise one of the other labels, uniformly), and computes
:func:`so8t.eval.metrics.expected_calibration_error` with the same bins, ``--draws`` times.

It prints the observed calibrated ECE, the floor's mean, median and 95th percentile, and the share
of draws at or below ``--goal``: the chance that a perfectly calibrated model meets the goal at
this n. An observed ECE above the floor's 95th percentile is evidence of real miscalibration; one
inside the floor is not.

    python benchmarks/ece_floor.py [--artifact baked] [--draws 2000] [--goal 0.05] [--bins 15]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from so8t.eval.metrics import expected_calibration_error


def calibrated_probs(details: dict, artifact: str) -> tuple[np.ndarray, np.ndarray, float]:
    """``(probs (n, K) float64, labels (n,) int, T)`` of an artifact's test decisions.

    Raises:
        KeyError: ``artifact`` has no decision rows or temperature in ``details``.
    """
    art = details["artifacts"][artifact]
    rows, temperature = art["decision_rows"], float(art["decision"]["temperature"])
    logits = np.array([r["logits"] for r in rows], dtype=np.float64) / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), np.array([r["label"] for r in rows]), temperature


def ece_floor(probs: np.ndarray, draws: int, n_bins: int, seed: int = 0) -> np.ndarray:
    """ECE of ``draws`` outcome sets drawn from a model calibrated by construction.

    Args:
        probs: ``(n, K)`` float64 class probabilities, rows summing to 1.
        draws: how many outcome sets to draw; n_bins: equal-width bins of the ECE.

    Returns:
        ``(draws,)`` float64 ECEs (unitless, in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    n, k = probs.shape
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    out = np.empty(draws)
    for i in range(draws):
        right = rng.random(n) < conf
        other = (pred + 1 + rng.integers(0, k - 1, n)) % k
        out[i] = expected_calibration_error(probs, np.where(right, pred, other), n_bins)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--details", type=Path, default=Path("reports/eval/details.json"))
    ap.add_argument("--artifact", nargs="+", default=["baked", "q8_0", "q4_k_m"])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--goal", type=float, default=0.05)
    ap.add_argument("--bins", type=int, default=15)
    args = ap.parse_args()
    details = json.loads(args.details.read_text(encoding="utf-8"))
    for name in args.artifact:
        probs, labels, temperature = calibrated_probs(details, name)
        observed = expected_calibration_error(probs, labels, args.bins)
        floor = ece_floor(probs, args.draws, args.bins)
        print(f"{name}: n {len(labels)}, T {temperature:.3f}, calibrated ECE {observed:.4f}; a calibrated model "
              f"at these confidences: mean {floor.mean():.4f}, median {np.median(floor):.4f}, "
              f"p95 {np.quantile(floor, 0.95):.4f}, ECE <= {args.goal} in {np.mean(floor <= args.goal):.3f} of "
              f"{args.draws} draws; observed above {np.mean(floor < observed):.3f} of them")


if __name__ == "__main__":
    main()
