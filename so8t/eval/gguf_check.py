"""Exporting the baked model to GGUF and checking every file in llama.cpp (the quantize stage's work).

Each type is quantised from one float32 GGUF (:mod:`so8t.model.quantize`), then
loaded through the inference layer (:class:`so8t.inference.llamacpp.LlamaCppBackend`):
its tokenisation of a Japanese check text must equal the Hugging Face
tokenizer's, its embedded chat template must equal the tokenizer's, and a short
greedy generation from a chat prompt is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from so8t.inference import open_backend, stop_strings
from so8t.model.quantize import (
    QuantizeError,
    artifact_name,
    convert_hf_to_gguf,
    gguf_filename,
    inspect_gguf,
    quantize_gguf,
)

#: GGML types a Q4_K_M file is made of when no tensor falls back.
K_QUANT_EXPECTED = {"Q4_K", "Q6_K", "F32"}


@dataclass
class GGUFCheck:
    """Result of loading one GGUF in llama.cpp (:func:`check_gguf`)."""

    tokens_match: bool
    llama_tokens: list[int]
    hf_tokens: list[int]
    generated: str
    generated_tokens: int
    tokens_per_s: float


def check_gguf(path: Path, tokenizer, text: str, prompt_text: str, max_tokens: int, n_threads: int) -> GGUFCheck:
    """Load ``path`` in llama.cpp, compare its tokenisation of ``text`` with the HF tokenizer, generate greedily.

    Args:
        tokenizer: the HF tokenizer the model was trained with.
        text: Japanese text tokenised both ways (BOS added as the HF tokenizer does; control
            tokens as plain text).
        prompt_text: a chat-template-rendered prompt to generate from.
        n_threads: llama.cpp threads (keep at or below free cores).
    """
    backend = open_backend(path, n_ctx=1024, n_threads=n_threads, batch_size=1)
    try:
        hf = tokenizer(text)["input_ids"]
        add_bos = bool(hf) and hf[0] == tokenizer.bos_token_id
        ll = backend.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        (gen,) = backend.generate([backend.tokenize(prompt_text)], max_tokens, stop_strings(backend))
    finally:
        backend.close()
    return GGUFCheck(ll == hf, ll, hf, gen.text, gen.n_tokens, gen.n_tokens / max(gen.seconds, 1e-9))


def check_file(
    path: Path, qtype: str, tokenizer, check_text: str, prompt_text: str, max_tokens: int, n_threads: int,
    seconds: float, log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
    """Check one written GGUF (:func:`check_gguf`, the embedded chat template, K-quant fallbacks).

    Returns:
        (its report entry: file, type, size, bits/weight, tensor types, fallbacks; its performance
        entry: the sample generation, ``seconds`` spent writing it, generation tokens/s).

    Raises:
        QuantizeError: llama.cpp tokenises the check text differently, or the chat template was not embedded.
    """
    info = inspect_gguf(path)
    check = check_gguf(path, tokenizer, check_text, prompt_text, max_tokens, n_threads)
    if not check.tokens_match:
        raise QuantizeError(
            f"{path}: llama.cpp tokenises the check text differently from the HF tokenizer:\n"
            f"  llama.cpp {check.llama_tokens}\n  HF        {check.hf_tokens}"
        )
    if info.chat_template != tokenizer.chat_template:
        raise QuantizeError(f"{path}: the embedded chat template differs from the tokenizer's")
    size = path.stat().st_size
    fallback = {t: ty for t, ty in info.tensor_types.items() if ty not in K_QUANT_EXPECTED} if qtype == "Q4_K_M" else {}
    entry = {
        "type": qtype,
        "file": path.name,
        "size_bytes": size,
        "bits_per_weight": round(size * 8 / info.n_weights, 3),
        "n_weights": info.n_weights,
        "tensor_types": info.type_counts,
        "k_quant_fallback_tensors": fallback,
        "tokenizer_match": True,
        "chat_template_embedded": True,
    }
    perf = {
        "sample_generation": check.generated,
        "quantize_seconds": round(seconds, 2),
        "generation_tokens_per_s": round(check.tokens_per_s, 1),
    }
    log(
        f"quantize: {path.name}: {size / 1e6:.1f} MB, {size * 8 / info.n_weights:.2f} bits/weight, "
        f"types {info.type_counts}, {check.tokens_per_s:.0f} tok/s: {check.generated[:60]!r}"
    )
    return entry, perf


def export_reference(
    hf_dir: Path, out_path: Path, tokenizer, check_text: str, prompt_text: str, max_tokens: int, n_threads: int,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
    """The F16 GGUF of another model (the base), made and checked exactly as the fine-tune's F16.

    The evaluate stage scores the base model through it, so base and fine-tune are compared on
    the engine users run.

    Returns:
        (the report entry, the performance entry) of :func:`check_file`.

    Raises:
        QuantizeError: conversion, quantisation or a check failed.
    """
    from so8t.model.quantize import export_gguf

    t0 = time.perf_counter()
    export_gguf(hf_dir, out_path, "F16", n_threads)
    return check_file(out_path, "F16", tokenizer, check_text, prompt_text, max_tokens, n_threads,
                      time.perf_counter() - t0, log)


def export_and_check(
    hf_dir: Path,
    out_dir: Path,
    types: list[str],
    tokenizer,
    check_text: str,
    prompt_text: str,
    max_tokens: int,
    n_threads: int,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
    """Write ``so8t-<type>.gguf`` for each of ``types`` into ``out_dir`` and check each (:func:`check_file`).

    Returns:
        (the report: per artifact its file, type, size, bits/weight, tensor types and K-quant
        fallbacks, the same for the same inputs; the run's figures: seconds, tokens/s and the
        sample generation per file).

    Raises:
        QuantizeError: conversion or quantisation failed, llama.cpp tokenises the check text
            differently, or the chat template was not embedded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / ".so8t-f32.gguf"
    start = time.perf_counter()
    convert_hf_to_gguf(hf_dir, f32, "f32")
    performance: dict = {"convert_seconds": round(time.perf_counter() - start, 2), "threads": n_threads, "files": {}}
    report: dict = {"files": {}}
    try:
        for qtype in types:
            name, path = artifact_name(qtype), out_dir / gguf_filename(qtype)
            t0 = time.perf_counter()
            quantize_gguf(f32, path, qtype, n_threads=n_threads)
            report["files"][name], performance["files"][name] = check_file(
                path, qtype, tokenizer, check_text, prompt_text, max_tokens, n_threads, time.perf_counter() - t0, log
            )
    finally:
        f32.unlink(missing_ok=True)
    return report, performance
