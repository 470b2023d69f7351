"""CPU kernel pinning for ``train.deterministic``: one model on every x86 machine class.

torch on CPU picks its vectorised kernels at load time from the instruction set: ATen's
``ATEN_CPU_CAPABILITY`` (``default`` / ``avx2`` / ``avx512``; the highest the CPU has unless set)
and MKL's Conditional Numerical Reproducibility switch ``MKL_CBWR`` (Intel oneMKL developer guide,
"Obtaining Numerically Reproducible Results"). An AVX-512 and an AVX2-only machine therefore
reduce in different orders and train different adapters from the same seed (issue 39;
``benchmarks/determinism.py`` and ``reports/determinism/``: the runs part at train step 1, and
``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine gives the AVX2-only machine's step-1 loss).

Both variables are read once, when torch loads, so :func:`pin_cpu_kernels` must run before the
first ``import torch`` of a stage process; the torch stages call it first thing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: What ``train.deterministic: true`` sets: AVX2 kernels in ATen and MKL, the widest set every
#: x86-64 machine of the last decade has (a CPU without AVX2 falls back to ATen's ``default``).
PINNED_ENV: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels(params_file: str | Path = "params.yaml", env=None) -> dict[str, str]:
    """Set :data:`PINNED_ENV` in ``env`` when ``train.deterministic`` is true in ``params_file``.

    A value the user set already is overwritten (with a note on stderr): the switch is what makes
    runs comparable, and ``train.deterministic: false`` is the way to choose kernels by hand.

    Args:
        params_file: the pipeline's params (validated: a bad file stops the stage here).
        env: the environment to change (default ``os.environ``).

    Returns:
        The variables set (empty when the switch is off).

    Raises:
        RuntimeError: torch is already imported in this process (the settings would not apply).
        so8t.params.ParamsError: ``params_file`` is missing or invalid.
    """
    from so8t.params import load_params

    env = os.environ if env is None else env
    if not load_params(params_file).train.deterministic:
        return {}
    if "torch" in sys.modules and env is os.environ:
        raise RuntimeError(
            "train.deterministic: pin_cpu_kernels() ran after torch was imported; "
            "call it before any import that loads torch"
        )
    for key, value in PINNED_ENV.items():
        if env.get(key, value) != value:
            print(f"train.deterministic: {key}={env[key]} replaced by {value}", file=sys.stderr)
        env[key] = value
    return dict(PINNED_ENV)
