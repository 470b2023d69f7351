"""Stage quantize: baked HF model -> GGUF F16 / Q8_0 / Q4_K_M, each loaded and checked in llama.cpp
(the base model's F16 GGUF is the base-gguf stage's, so a training change never rebuilds it)."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

from pathlib import Path

from so8t.console import console, free_cores, run_stage
from so8t.data.think_format import render
from so8t.eval.gguf_check import export_and_check
from so8t.io import write_json
from so8t.inference.hf import load_tokenizer
from so8t.params import load_params

BAKED = Path("models/baked")
OUT = Path("models/gguf")
PERFORMANCE = Path("reports/performance/quantize.json")


def main() -> None:
    q = load_params().quantize
    threads = free_cores()
    tokenizer = load_tokenizer(BAKED)
    report, performance = export_and_check(
        BAKED, OUT, q.types, tokenizer, q.check_text, render(tokenizer, q.check_text, None), q.check_max_tokens,
        threads, log=console.print,
    )
    write_json(OUT / "quantize_report.json", report)
    write_json(PERFORMANCE, performance)


if __name__ == "__main__":
    run_stage("quantize", main)
