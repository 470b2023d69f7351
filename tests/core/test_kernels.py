"""train.deterministic: the CPU kernel pin reaches torch when set before it loads."""

import subprocess
import sys

import pytest

from so8t.kernels import PINNED_ENV, pin_cpu_kernels


def _params(tmp_path, deterministic: bool):
    p = tmp_path / "params.yaml"
    p.write_text(f"train:\n  deterministic: {str(deterministic).lower()}\n", encoding="utf-8")
    return p


def test_switch_sets_and_overrides_the_env(tmp_path, capsys):
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert pin_cpu_kernels(_params(tmp_path, True), env) == PINNED_ENV
    assert env == PINNED_ENV
    assert "ATEN_CPU_CAPABILITY=avx512 replaced by avx2" in capsys.readouterr().err


def test_switch_off_leaves_the_env(tmp_path):
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert pin_cpu_kernels(_params(tmp_path, False), env) == {}
    assert env == {"ATEN_CPU_CAPABILITY": "avx512"}


def test_after_torch_is_an_error(tmp_path):
    import torch  # noqa: F401

    with pytest.raises(RuntimeError, match="after torch was imported"):
        pin_cpu_kernels(_params(tmp_path, True))


def test_torch_runs_the_pinned_kernels(tmp_path):
    code = (
        "import sys; from so8t.kernels import pin_cpu_kernels; pin_cpu_kernels(sys.argv[1]); "
        "import torch; print(torch.backends.cpu.get_cpu_capability())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(_params(tmp_path, True))],
                         capture_output=True, text=True, check=True)
    # AVX2 on an AVX-512 or AVX2 machine; ATen's fallback on a CPU without AVX2.
    assert out.stdout.strip() in {"AVX2", "DEFAULT"}
