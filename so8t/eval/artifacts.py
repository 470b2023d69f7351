"""The artifacts the pipeline compares: which models are evaluated, how each is opened, what its run gives.

Artifacts (:func:`artifacts`), all run through llama.cpp, the engine users run: ``base`` (the
base model's F16 GGUF, ``models/base-gguf/base-f16.gguf``, its own stage so a training change never
rebuilds it), ``baked`` (the fine-tune's F16 GGUF, ``so8t-f16.gguf``) and each other GGUF the
quantize stage wrote (``q8_0``, ``q4_k_m``; listed in ``models/gguf/quantize_report.json``). Every
metric key in ``reports/metrics.json`` starts with the artifact name (:mod:`so8t.eval.keys`).

:class:`ArtifactResult` is what evaluating one artifact gives
(:func:`so8t.eval.evaluation.evaluate_artifact`); each ``evaluate@<row>`` stage saves its own
(:func:`save_result`) and the ``gather`` stage reads them all back (:func:`load_result`) for the
comparisons between rows (:mod:`so8t.eval.comparisons`) and the writers
(:func:`so8t.eval.evaluation.write_evaluation`).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path

from so8t.inference import Backend, open_backend
from so8t.io import DataError, read_json, write_json
from so8t.model.quantize import BAKED_ROW, F16, metric_row

BASE_DIR = Path("models/base")
BAKED_DIR = Path("models/baked")
GGUF_DIR = Path("models/gguf")
QUANTIZE_REPORT = "quantize_report.json"
#: The base model's F16 GGUF and its check report (the ``base-gguf`` stage).
BASE_GGUF_DIR = Path("models/base-gguf")
BASE_GGUF_REPORT = "report.json"


@dataclass(frozen=True)
class Artifact:
    """One model the pipeline produced (or started from).

    Attributes:
        name: the metric-key prefix (``base``, ``baked``, ``q8_0``...).
        kind: ``"gguf"`` (llama.cpp) or ``"hf"`` (transformers).
        path: the ``.gguf`` file or the HF folder that is evaluated.
        hf_dir: the HF folder a GGUF row was converted from (``base``, ``baked``), else ``None``.
    """

    name: str
    kind: str  # "hf" or "gguf"
    path: Path
    hf_dir: Path | None = None

    def size_bytes(self) -> int:
        """Bytes of the weights (safetensors files of a folder, or the GGUF file)."""
        if self.kind == "gguf":
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))


def artifacts(
    base_dir: Path = BASE_DIR, baked_dir: Path = BAKED_DIR, gguf_dir: Path = GGUF_DIR,
    base_gguf_dir: Path = BASE_GGUF_DIR, rows: set[str] | None = None,
) -> list[Artifact]:
    """The evaluated rows, in order: ``base``, ``baked``, then every other GGUF of the quantize report.

    ``base`` is the base model's F16 GGUF (``models/base-gguf``) and ``baked`` the fine-tune's F16
    GGUF (the quantize report's ``f16`` file): the same engine as the quantised rows. Where no F16
    was written (``quantize.types`` without ``F16``, no base GGUF) that row is the HF folder.

    Args:
        rows: only these rows (``None``: all); the reports of rows left out are not read, so
            ``evaluate@base`` needs neither the baked model nor the quantize report.

    Raises:
        DataError: a report is missing or lists a file that is not there.
    """

    def gguf(report_path: Path, info: dict) -> Path:
        path = report_path.parent / info["file"]
        if not path.is_file():
            raise DataError(f"{report_path}: lists {path}, which does not exist (rerun `dvc repro`)")
        return path

    out = []
    if rows is None or "base" in rows:
        base_report = base_gguf_dir / BASE_GGUF_REPORT
        base_info = read_json(base_report).get("base") if base_report.is_file() else None
        out.append(Artifact("base", "gguf", gguf(base_report, base_info), base_dir) if base_info
                   else Artifact("base", "hf", base_dir))
    if rows is None or rows - {"base"}:
        report_path = gguf_dir / QUANTIZE_REPORT
        files = read_json(report_path)["files"]
        out.append(Artifact(BAKED_ROW, "gguf", gguf(report_path, files[F16]), baked_dir) if F16 in files
                   else Artifact(BAKED_ROW, "hf", baked_dir))
        out += [Artifact(metric_row(n), "gguf", gguf(report_path, info)) for n, info in files.items() if n != F16]
    return [a for a in out if rows is None or a.name in rows]


def artifact(name: str, **dirs) -> Artifact:
    """The one row ``name`` of :func:`artifacts` (``dirs``: its folder arguments).

    Raises:
        DataError: no such row (a quantize type that ``quantize.types`` does not export).
    """
    found = artifacts(rows={name}, **dirs)
    if not found:
        raise DataError(f"no artifact {name!r}: the quantize report lists no such file (check quantize.types)")
    return found[0]


def open_artifact(
    artifact: Artifact, n_threads: int, batch_size: int, n_ctx: int = 1024, n_gpu_layers: int = -1,
    hf_batch_size: int | None = None,
) -> Backend:
    """The inference backend of ``artifact`` (HF float32, on CUDA when present, or llama.cpp);
    ``batch_size`` for llama.cpp, ``hf_batch_size`` (default ``batch_size``) for HF."""
    return open_backend(
        artifact.path, n_ctx=n_ctx, n_threads=n_threads, batch_size=batch_size, n_gpu_layers=n_gpu_layers,
        hf_batch_size=hf_batch_size,
    )


def close_backend(backend: Backend) -> None:
    """Free a backend's model memory before the next artifact is loaded."""
    backend.close()
    gc.collect()


@dataclass
class ArtifactResult:
    """What evaluating one artifact gives: flat metrics, the details behind them and its speed.

    Attributes:
        name: the row.
        flat: ``{metric key: value}`` (keys start with ``name``).
        details: the per-example rows and tables behind them (``details["speed"]``: wall times).
        texts: greedy answer per example id (for text parity between rows).
        decisions: scored decision label per example id (for decision parity between rows).
    """

    name: str
    flat: dict[str, float]
    details: dict
    texts: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


def save_result(path: Path, result: ArtifactResult) -> None:
    """Write ``result`` as JSON (atomically): the output of one ``evaluate@<row>`` stage."""
    write_json(path, dataclasses.asdict(result))


def load_result(path: Path) -> ArtifactResult:
    """An :class:`ArtifactResult` written by :func:`save_result`.

    Raises:
        DataError: the file is missing or not such a result.
    """
    raw = read_json(path)
    try:
        return ArtifactResult(raw["name"], raw["flat"], raw["details"], raw.get("texts", {}), raw.get("decisions", {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not an evaluation result ({e}); rerun its evaluate stage") from None


__all__ = [
    "BAKED_DIR",
    "BASE_DIR",
    "BASE_GGUF_DIR",
    "BASE_GGUF_REPORT",
    "GGUF_DIR",
    "QUANTIZE_REPORT",
    "Artifact",
    "ArtifactResult",
    "artifact",
    "artifacts",
    "close_backend",
    "load_result",
    "open_artifact",
    "save_result",
]
