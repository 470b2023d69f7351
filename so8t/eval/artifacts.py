"""The artifacts the pipeline compares: which models are evaluated, how each is opened, what its run gives.

Artifacts (:func:`artifacts`), all run through llama.cpp, the engine users run: ``base`` (the
base model's F16 GGUF, ``models/gguf/base-f16.gguf``), ``baked`` (the fine-tune's F16 GGUF,
``so8t-f16.gguf``) and each other GGUF the quantize stage wrote (``q8_0``, ``q4_k_m``; listed in
``models/gguf/quantize_report.json``). Every metric key in ``reports/metrics.json`` starts with
the artifact name (:mod:`so8t.eval.keys`).

:class:`ArtifactResult` is what evaluating one artifact gives
(:func:`so8t.eval.evaluation.evaluate_artifact`); the comparisons between rows
(:mod:`so8t.eval.comparisons`) and the writers (:func:`so8t.eval.evaluation.write_evaluation`)
read it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from so8t.inference import Backend, open_backend
from so8t.io import DataError, read_json
from so8t.model.quantize import BAKED_ROW, F16, metric_row

BASE_DIR = Path("models/base")
BAKED_DIR = Path("models/baked")
GGUF_DIR = Path("models/gguf")
QUANTIZE_REPORT = "quantize_report.json"


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


def artifacts(base_dir: Path = BASE_DIR, baked_dir: Path = BAKED_DIR, gguf_dir: Path = GGUF_DIR) -> list[Artifact]:
    """The evaluated rows, in order: ``base``, ``baked``, then every other GGUF of the quantize report.

    ``base`` is the base model's F16 GGUF (the report's ``reference.base``) and ``baked`` the
    fine-tune's F16 GGUF (its ``f16`` file): the same engine as the quantised rows. Where the
    quantize stage wrote no F16 (``quantize.types`` without ``F16``, or a report from before
    the base GGUF existed) that row is the HF folder.

    Raises:
        DataError: the quantize report is missing or lists a file that is not there.
    """
    report_path = gguf_dir / QUANTIZE_REPORT
    report = read_json(report_path)

    def gguf(info: dict) -> Path:
        path = gguf_dir / info["file"]
        if not path.is_file():
            raise DataError(f"{report_path}: lists {path}, which does not exist (rerun quantize)")
        return path

    files = report["files"]
    base_info = report.get("reference", {}).get("base")
    out = [
        Artifact("base", "gguf", gguf(base_info), base_dir) if base_info else Artifact("base", "hf", base_dir),
        Artifact(BAKED_ROW, "gguf", gguf(files[F16]), baked_dir) if F16 in files else Artifact(BAKED_ROW, "hf", baked_dir),
    ]
    out += [Artifact(metric_row(name), "gguf", gguf(info)) for name, info in files.items() if name != F16]
    return out


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
    """What evaluating one artifact gives: flat metrics, the details behind them and its speed."""

    name: str
    flat: dict[str, float]
    details: dict
    texts: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


__all__ = [
    "BAKED_DIR",
    "BASE_DIR",
    "GGUF_DIR",
    "QUANTIZE_REPORT",
    "Artifact",
    "ArtifactResult",
    "artifacts",
    "close_backend",
    "open_artifact",
]
