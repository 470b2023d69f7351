"""`runtime.model: auto`: the smallest GGUF that keeps the fine-tune, chosen from the evaluate stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from so8t.runtime.select import SelectionError, choose_gguf, served_model

SIZES = {"f16": 5000, "q8_0": 3000, "q4_k_m": 2000}


def _gguf_dir(root: Path) -> Path:
    folder = root / "models" / "gguf"
    folder.mkdir(parents=True)
    files = {}
    for name, size in SIZES.items():
        (folder / f"so8t-{name}.gguf").write_bytes(b"\0" * size)
        files[name] = {"type": name.upper(), "file": f"so8t-{name}.gguf", "size_bytes": size}
    (folder / "base-f16.gguf").write_bytes(b"\0" * 10)
    (folder / "quantize_report.json").write_text(json.dumps({"files": files}))
    return folder


def _metrics(root: Path, q4_agree: float, q4_ppl: float, q8_agree: float = 0.984) -> Path:
    m = {
        "baked.perplexity": 48.55, "baked.size_mb": SIZES["f16"] / 1e6,
        "q8_0.perplexity": 48.58, "q8_0.parity.decision": q8_agree, "q8_0.size_mb": SIZES["q8_0"] / 1e6,
        "q4_k_m.perplexity": q4_ppl, "q4_k_m.parity.decision": q4_agree, "q4_k_m.size_mb": SIZES["q4_k_m"] / 1e6,
    }
    path = root / "reports" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    return path


def test_q4_k_m_that_fails_parity_gives_q8_0(tmp_path):
    folder = _gguf_dir(tmp_path)
    served = choose_gguf(folder, _metrics(tmp_path, q4_agree=0.609, q4_ppl=42.53))
    assert served.path == folder / "so8t-q8_0.gguf" and served.warning is None
    assert "so8t-q8_0.gguf" in served.reason and "0.609 < 0.95" in served.reason


def test_q4_k_m_whose_perplexity_rises_more_than_2_percent_is_refused(tmp_path):
    folder = _gguf_dir(tmp_path)
    served = choose_gguf(folder, _metrics(tmp_path, q4_agree=0.99, q4_ppl=48.55 * 1.03))
    assert served.path.name == "so8t-q8_0.gguf" and "+3.0 % over F16" in served.reason


def test_q4_k_m_that_passes_is_served(tmp_path):
    folder = _gguf_dir(tmp_path)
    served = choose_gguf(folder, _metrics(tmp_path, q4_agree=0.97, q4_ppl=49.0))
    assert served.path == folder / "so8t-q4_k_m.gguf" and served.warning is None
    assert "0.970" in served.reason and "+0.9 %" in served.reason


def test_f16_when_no_quantised_file_keeps_the_fine_tune(tmp_path):
    folder = _gguf_dir(tmp_path)
    served = choose_gguf(folder, _metrics(tmp_path, q4_agree=0.5, q4_ppl=60.0, q8_agree=0.9))
    assert served.path.name == "so8t-f16.gguf" and "no quantised file keeps" in served.reason


def test_missing_metrics_fall_back_to_q8_0_with_a_warning(tmp_path):
    folder = _gguf_dir(tmp_path)
    served = choose_gguf(folder, tmp_path / "reports" / "metrics.json")
    assert served.path == folder / "so8t-q8_0.gguf"
    assert served.warning and "not found" in served.warning and "fallback" in served.reason


def test_metrics_of_other_files_count_as_missing(tmp_path):
    folder = _gguf_dir(tmp_path)
    metrics = _metrics(tmp_path, q4_agree=0.99, q4_ppl=48.6)
    (folder / "so8t-q4_k_m.gguf").write_bytes(b"\0" * 1999)  # re-quantised after the metrics were written
    served = choose_gguf(folder, metrics)
    assert served.path.name == "so8t-q8_0.gguf" and "describes other files" in served.warning


def test_no_quantize_report_is_a_clear_error(tmp_path):
    with pytest.raises(SelectionError, match="quantize_report.json not found"):
        choose_gguf(tmp_path / "models" / "gguf", tmp_path / "metrics.json")


def test_served_model_resolves_auto_and_paths_against_the_params_folder(tmp_path):
    _gguf_dir(tmp_path)
    _metrics(tmp_path, q4_agree=0.97, q4_ppl=49.0)
    assert served_model("auto", tmp_path, "reports/metrics.json").path == tmp_path / "models/gguf/so8t-q4_k_m.gguf"
    explicit = served_model("models/gguf/so8t-f16.gguf", tmp_path, "reports/metrics.json")
    assert explicit.path == tmp_path / "models/gguf/so8t-f16.gguf" and "runtime.model" in explicit.reason
