import subprocess
import sys

import pytest

from so8t.params import Params, ParamsError, load_params


def _write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_repository_params_yaml_is_valid_and_equals_defaults(repo_root):
    assert load_params(repo_root / "params.yaml") == Params()


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lora_rank: 8\n", "train.lora_rank: unknown key"),
        ("train:\n  lora_r: eight\n", "train.lora_r"),
        ("train:\n  lora_r: 0\n", "train.lora_r"),
        ("train:\n  so8t:\n    parameterization: qr\n", "train.so8t.parameterization"),
        ("train:\n  pet:\n    phase_boundaries: [0.8, 0.2]\n", "train.pet"),
        ("think_format:\n  train_fraction: 0.9\n", "think_format"),
        ("synthesize:\n  domains: [space]\n", "synthesize.domains"),
        ("quantize:\n  types: [Q3_K]\n", "quantize.types"),
        ("probe:\n  poolings: [max]\n", "probe.poolings"),
        ("probe:\n  poolings: [last, last]\n", "probe.poolings"),
        ("probe:\n  c_grid: [0]\n", "probe.c_grid"),
        ("probe:\n  layer_stride: 0\n", "probe.layer_stride"),
        ("evaluate:\n  decision_line_max_new_tokens: 2\n", "evaluate.decision_line_max_new_tokens"),
        ("bogus: 1\n", "bogus: unknown key"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, key):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, text))
    assert key in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_stops_before_any_work_on_bad_params(tmp_path, repo_root):
    _write(tmp_path, "collect:\n  debian_faqq: true\n")
    proc = subprocess.run(
        [sys.executable, str(repo_root / "stages" / "collect.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "collect.debian_faqq: unknown key" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()
