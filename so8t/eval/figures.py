"""The report's figures (matplotlib, Agg backend): training curve, reliability diagram, confusion
matrix and the size / perplexity trade-off of the GGUF files. Each reads what a stage wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from so8t.eval.calibration import apply_temperature  # noqa: E402
from so8t.eval.metrics import reliability_bins  # noqa: E402
from so8t.schema import DECISIONS  # noqa: E402


def _save(fig, path: Path) -> None:
    from so8t.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training(history: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Loss / CE and the val losses (left), the decision learning curve (middle), PET and its lambda (right)."""
    fig, (ax1, ax_dec, ax2) = plt.subplots(1, 3, figsize=(14, 3.5))
    for name in sorted(history):
        if name in ("loss", "ce") or (name.startswith("eval_") and name.endswith("_loss")):
            s, v = zip(*history[name])
            ax1.plot(s, v, label=name, marker="o" if name.startswith("eval_") else None, ms=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats / token")
    ax1.set_title("Training loss, val loss per task")
    ax1.legend(fontsize=7)
    for name in ("eval_decision_macro_f1", "eval_decision_accuracy"):
        if name in history:
            s, v = zip(*history[name])
            ax_dec.plot(s, v, "o-", label=name.removeprefix("eval_decision_"))
    ax_dec.set_ylim(0, 1)
    ax_dec.set_xlabel("step")
    ax_dec.set_title("Val decisions during training")
    ax_dec.legend(fontsize=8)
    if "pet" in history:
        s, v = zip(*history["pet"])
        ax2.plot(s, v, color="tab:green", label="PET")
        ax2.set_ylabel("PET penalty")
    if "pet_lambda" in history:
        ax3 = ax2.twinx()
        s, v = zip(*history["pet_lambda"])
        ax3.step(s, v, color="tab:red", where="post", label="lambda")
        ax3.set_ylabel("lambda")
    ax2.set_xlabel("step")
    ax2.set_title("PET penalty and its 3-phase lambda")
    _save(fig, path)


def plot_reliability(details: dict, names: list[str], path: Path, n_bins: int) -> None:
    """Reliability diagram (accuracy vs confidence per bin) after temperature scaling."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for n in names:
        art = details["artifacts"].get(n)
        if not art:
            continue
        rows = art["decision_rows"]
        logits = np.array([r["logits"] for r in rows])
        labels = np.array([r["label"] for r in rows])
        probs = apply_temperature(logits, art["decision"]["temperature"])
        bins = [b for b in reliability_bins(probs, labels, n_bins) if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=n)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability (test, calibrated)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> None:
    """Confusion matrix heat map (rows true, columns predicted)."""
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(DECISIONS)), DECISIONS, rotation=20)
    ax.set_yticks(range(len(DECISIONS)), DECISIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title)
    _save(fig, path)


def plot_tradeoff(metrics: dict[str, float], names: list[str], path: Path) -> None:
    """Model size (MB) against held-out perplexity per artifact."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in names:
        x, y = metrics.get(f"{n}.size_mb"), metrics.get(f"{n}.perplexity")
        if x is None or y is None:
            continue
        ax.scatter([x], [y])
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 3))
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity (held-out ja)")
    ax.set_title("Quantisation: size vs quality")
    _save(fig, path)
