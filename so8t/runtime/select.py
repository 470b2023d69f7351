"""Which GGUF the runtime serves: ``runtime.model: auto`` picks it by measurement.

The rule (:func:`so8t.eval.selection.pick`, applied to the files on disk by :func:`choose_gguf`), read from the last ``reports/metrics.json`` of the evaluate stage:
the **smallest** of the fine-tune's GGUF files (``models/gguf/quantize_report.json``) whose test
decisions agree with the F16 file's on at least :data:`MIN_DECISION_AGREEMENT` of the test split
(``<artifact>.parity.decision``) and whose held-out perplexity is at most
:data:`MAX_PERPLEXITY_INCREASE` above F16's (``<artifact>.perplexity`` against ``baked.perplexity``,
the baked model's row, which is its F16 GGUF). F16 itself always qualifies. Metrics that do not
describe the files on disk (their ``size_mb`` differs) count as missing.

Without usable metrics the runtime falls back to Q8_0 (:data:`FALLBACK`), with a warning: on this
project's default base (itself a dequantised Q4_K_M) a re-quantised Q4_K_M rounds the fine-tune
back onto the base's grid, and only a measurement can say when Q4_K_M keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from so8t.errors import So8tError
from so8t.eval import keys
from so8t.eval.selection import F16, MAX_PERPLEXITY_INCREASE, MIN_DECISION_AGREEMENT, metric_row, pick
from so8t.io import read_json
from so8t.model.quantize import GGUF_PREFIX

#: ``runtime.model`` value that asks for the measured choice.
AUTO = "auto"
#: Where the fine-tune's GGUF files and their quantize report are, relative to params.yaml's folder.
GGUF_DIR = Path("models/gguf")
QUANTIZE_REPORT = "quantize_report.json"
#: The file served when no metrics say otherwise.
FALLBACK = f"{GGUF_PREFIX}q8_0.gguf"


class SelectionError(So8tError, ValueError):
    """No GGUF can be served (none written, or the fallback is missing)."""


@dataclass(frozen=True)
class ServedModel:
    """The model the runtime loads and why.

    Attributes:
        path: the ``.gguf`` file (or the folder ``runtime.model`` names).
        reason: one line for the user: which file and why.
        warning: set when the choice is a fallback (no usable metrics).
    """

    path: Path
    reason: str
    warning: str | None = None


def choose_gguf(gguf_dir: str | Path, metrics_path: str | Path) -> ServedModel:
    """The smallest qualifying GGUF in ``gguf_dir`` by the metrics in ``metrics_path`` (module docstring).

    Raises:
        SelectionError: ``gguf_dir`` has no quantize report, or there are no metrics and no Q8_0 file.
    """
    gguf_dir, metrics_path = Path(gguf_dir), Path(metrics_path)
    report_path = gguf_dir / QUANTIZE_REPORT
    if not report_path.is_file():
        raise SelectionError(f"runtime.model: auto: {report_path} not found (run `dvc repro quantize`, or set runtime.model)")
    files = {
        name: gguf_dir / info["file"]
        for name, info in read_json(report_path)["files"].items()
        if (gguf_dir / info["file"]).is_file()
    }
    if not files:
        raise SelectionError(f"runtime.model: auto: none of the files listed in {report_path} exists (rerun quantize)")
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    stale = [] if metrics is None else [
        n for n, p in files.items()
        if not math.isclose(metrics.get(keys.key(metric_row(n), keys.SIZE_MB), -1.0) * 1e6, p.stat().st_size, abs_tol=0.5)
    ]
    ref_ppl = None if metrics is None else metrics.get(keys.key("baked", keys.PERPLEXITY))
    if metrics is None or stale or F16 not in files or ref_ppl is None:
        why = (
            f"{metrics_path} not found" if metrics is None
            else f"{metrics_path} describes other files than {', '.join(files[n].name for n in stale)}" if stale
            else f"no F16 file or baked.perplexity in {metrics_path} to compare with"
        )
        fallback = gguf_dir / FALLBACK
        if not fallback.is_file():
            raise SelectionError(f"runtime.model: auto: {why}, and the fallback {fallback} does not exist")
        return ServedModel(
            fallback, f"serving {fallback.name} (runtime.model: auto, fallback: no usable evaluation metrics)",
            f"runtime.model: auto: {why}; serving {fallback.name}. Run `dvc repro evaluate` to choose by measurement.",
        )
    name, reason = pick({n: p.stat().st_size for n, p in files.items()}, metrics, {n: p.name for n, p in files.items()})
    return ServedModel(files[name], reason)


def served_model(model: str, base_dir: str | Path, metrics: str | Path) -> ServedModel:
    """``runtime.model`` resolved against ``base_dir`` (params.yaml's folder): ``auto`` by
    :func:`choose_gguf` (``models/gguf``, ``metrics``), anything else as the path it names."""
    base_dir = Path(base_dir)
    if model == AUTO:
        metrics_path = Path(metrics) if Path(metrics).is_absolute() else base_dir / metrics
        return choose_gguf(base_dir / GGUF_DIR, metrics_path)
    path = Path(model) if Path(model).is_absolute() else base_dir / model
    return ServedModel(path, f"serving {path.name} (runtime.model)")


__all__ = [
    "AUTO",
    "FALLBACK",
    "MAX_PERPLEXITY_INCREASE",
    "MIN_DECISION_AGREEMENT",
    "SelectionError",
    "ServedModel",
    "choose_gguf",
    "served_model",
]
