"""The evaluated rows: which artifacts run, and in which engine (:mod:`so8t.eval.artifacts`)."""

import json

import pytest


def _reports(root, with_f16=True, with_base=True):
    """``root/gguf`` (the quantize stage's files and report) and ``root/base-gguf`` (the base-gguf stage's)."""
    folder = root / "gguf"
    folder.mkdir(parents=True)
    files = {}
    for name in (["f16"] if with_f16 else []) + ["q8_0", "q4_k_m"]:
        (folder / f"so8t-{name}.gguf").write_bytes(b"x")
        files[name] = {"file": f"so8t-{name}.gguf", "size_bytes": 1}
    (folder / "quantize_report.json").write_text(json.dumps({"files": files}))
    if with_base:
        (root / "base-gguf").mkdir()
        (root / "base-gguf" / "base-f16.gguf").write_bytes(b"x")
        (root / "base-gguf" / "report.json").write_text(json.dumps({"base": {"file": "base-f16.gguf", "size_bytes": 1}}))
    return {"base_dir": root / "base", "baked_dir": root / "baked", "gguf_dir": folder, "base_gguf_dir": root / "base-gguf"}


def test_every_row_runs_in_llama_cpp_when_the_f16_files_exist(tmp_path):
    from so8t.eval.artifacts import artifacts

    arts = artifacts(**_reports(tmp_path))
    assert [(a.name, a.kind, a.path.name) for a in arts] == [
        ("base", "gguf", "base-f16.gguf"), ("baked", "gguf", "so8t-f16.gguf"),
        ("q8_0", "gguf", "so8t-q8_0.gguf"), ("q4_k_m", "gguf", "so8t-q4_k_m.gguf"),
    ]
    assert arts[1].hf_dir == tmp_path / "baked" and arts[2].hf_dir is None


def test_rows_without_an_f16_file_fall_back_to_transformers(tmp_path):
    from so8t.eval.artifacts import artifacts

    arts = artifacts(**_reports(tmp_path, with_f16=False, with_base=False))
    assert [(a.name, a.kind) for a in arts] == [("base", "hf"), ("baked", "hf"), ("q8_0", "gguf"), ("q4_k_m", "gguf")]


def test_one_row_reads_only_its_own_report(tmp_path):
    """The base row needs no quantize report (evaluate@base runs before, and without, any training)."""
    from so8t.eval.artifacts import artifact
    from so8t.io import DataError

    dirs = _reports(tmp_path)
    (dirs["gguf_dir"] / "quantize_report.json").unlink()
    assert artifact("base", **dirs).path.name == "base-f16.gguf"
    with pytest.raises(DataError, match="quantize_report"):
        artifact("q8_0", **dirs)


def test_unknown_row_names_quantize_types(tmp_path):
    from so8t.eval.artifacts import artifact
    from so8t.io import DataError

    with pytest.raises(DataError, match="quantize.types"):
        artifact("q5_k", **_reports(tmp_path))


def test_a_saved_result_reads_back(tmp_path):
    from so8t.eval.artifacts import ArtifactResult, load_result, save_result
    from so8t.io import DataError

    r = ArtifactResult("q8_0", {"q8_0.perplexity": 40.0}, {"speed": {"wall_s": 1.0}}, {"a": "text"}, {"a": "ALLOW"})
    save_result(tmp_path / "r.json", r)
    assert load_result(tmp_path / "r.json") == r
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not an evaluation result"):
        load_result(tmp_path / "bad.json")
