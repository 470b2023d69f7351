"""Stage quantize: baked HF model -> GGUF F16 / Q8_0 / Q4_K_M, each loaded and checked in llama.cpp."""

import time
from pathlib import Path

from so8t.base_model import load_tokenizer
from so8t.console import console, free_cores, run_stage, track
from so8t.io import write_json
from so8t.params import load_params
from so8t.quantize import (
    GGUF_TYPES,
    QuantizeError,
    check_gguf,
    convert_hf_to_gguf,
    inspect_gguf,
    quantize_gguf,
)
from so8t.think_format import render

BAKED = Path("models/baked")
OUT = Path("models/gguf")
K_QUANT_EXPECTED = {"Q4_K", "Q6_K", "F32"}


def main() -> None:
    params = load_params()
    q = params.quantize
    tokenizer = load_tokenizer(BAKED)
    threads = free_cores()
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = OUT / ".so8t-f32.gguf"
    start = time.perf_counter()
    convert_hf_to_gguf(BAKED, f32, "f32")
    console.print(f"quantize: converted {BAKED} to F32 GGUF in {time.perf_counter() - start:.1f} s")
    prompt_ids = tokenizer(render(tokenizer, q.check_text, None), add_special_tokens=False)["input_ids"]
    report = {"threads": threads, "files": {}}
    try:
        for qtype in track(q.types, "quantize: GGUF types"):
            name = GGUF_TYPES[qtype][1]
            path = OUT / f"so8t-{name}.gguf"
            t0 = time.perf_counter()
            quantize_gguf(f32, path, qtype, n_threads=threads)
            seconds = time.perf_counter() - t0
            info = inspect_gguf(path)
            counts, n_weights, types = info.type_counts, info.n_weights, info.tensor_types
            check = check_gguf(path, tokenizer, q.check_text, prompt_ids, q.check_max_tokens, threads)
            if not check.tokens_match:
                raise QuantizeError(
                    f"{path}: llama.cpp tokenises the check text differently from the HF tokenizer:\n"
                    f"  llama.cpp {check.llama_tokens}\n  HF        {check.hf_tokens}"
                )
            if info.chat_template != tokenizer.chat_template:
                raise QuantizeError(f"{path}: the embedded chat template differs from the tokenizer's")
            size = path.stat().st_size
            fallback = (
                {t: ty for t, ty in types.items() if ty not in K_QUANT_EXPECTED} if qtype == "Q4_K_M" else {}
            )
            report["files"][name] = {
                "type": qtype,
                "path": str(path),
                "size_bytes": size,
                "bits_per_weight": round(size * 8 / n_weights, 3),
                "n_weights": n_weights,
                "tensor_types": counts,
                "k_quant_fallback_tensors": fallback,
                "tokenizer_match": True,
                "chat_template_embedded": True,
                "sample_generation": check.generated,
                "generation_tokens_per_s": round(check.tokens_per_s, 1),
                "quantize_seconds": round(seconds, 2),
            }
            console.print(
                f"quantize: {qtype}: {size / 1e6:.1f} MB, {size * 8 / n_weights:.2f} bits/weight, "
                f"types {counts}, {check.tokens_per_s:.0f} tok/s: {check.generated[:60]!r}"
            )
    finally:
        f32.unlink(missing_ok=True)
    write_json(OUT / "quantize_report.json", report)


if __name__ == "__main__":
    run_stage("quantize", main)
