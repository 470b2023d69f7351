"""The evaluated rows: which artifacts run, and in which engine (:mod:`so8t.eval.artifacts`)."""


def _quantize_report(folder, with_f16=True, with_base=True):
    import json

    folder.mkdir(parents=True)
    files = {}
    for name in (["f16"] if with_f16 else []) + ["q8_0", "q4_k_m"]:
        (folder / f"so8t-{name}.gguf").write_bytes(b"x")
        files[name] = {"file": f"so8t-{name}.gguf", "size_bytes": 1}
    report = {"files": files}
    if with_base:
        (folder / "base-f16.gguf").write_bytes(b"x")
        report["reference"] = {"base": {"file": "base-f16.gguf", "size_bytes": 1}}
    (folder / "quantize_report.json").write_text(json.dumps(report))


def test_every_row_runs_in_llama_cpp_when_the_f16_files_exist(tmp_path):
    from so8t.eval.artifacts import artifacts

    _quantize_report(tmp_path / "gguf")
    arts = artifacts(tmp_path / "base", tmp_path / "baked", tmp_path / "gguf")
    assert [(a.name, a.kind, a.path.name) for a in arts] == [
        ("base", "gguf", "base-f16.gguf"), ("baked", "gguf", "so8t-f16.gguf"),
        ("q8_0", "gguf", "so8t-q8_0.gguf"), ("q4_k_m", "gguf", "so8t-q4_k_m.gguf"),
    ]
    assert arts[1].hf_dir == tmp_path / "baked" and arts[2].hf_dir is None


def test_rows_without_an_f16_file_fall_back_to_transformers(tmp_path):
    from so8t.eval.artifacts import artifacts

    _quantize_report(tmp_path / "gguf", with_f16=False, with_base=False)
    arts = artifacts(tmp_path / "base", tmp_path / "baked", tmp_path / "gguf")
    assert [(a.name, a.kind) for a in arts] == [("base", "hf"), ("baked", "hf"), ("q8_0", "gguf"), ("q4_k_m", "gguf")]
