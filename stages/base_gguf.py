"""Stage base-gguf: the base model's F16 GGUF, checked in llama.cpp as the fine-tune's files are.

Its own stage (it reads models/base alone), so a training change never rebuilds it, and the base
rows of calibrate and evaluate, which read only this file, never rerun either."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

from pathlib import Path

from so8t.console import console, free_cores, run_stage
from so8t.data.think_format import render
from so8t.eval.artifacts import BASE_GGUF_DIR, BASE_GGUF_REPORT
from so8t.eval.gguf_check import export_reference
from so8t.inference.hf import load_tokenizer
from so8t.io import atomic_dir, write_json
from so8t.model.quantize import BASE_GGUF
from so8t.params import load_params

BASE = Path("models/base")
PERFORMANCE = Path("reports/performance/base_gguf.json")


def main() -> None:
    q = load_params().quantize
    tokenizer = load_tokenizer(BASE)
    threads = free_cores()
    with atomic_dir(BASE_GGUF_DIR) as tmp:
        entry, perf = export_reference(
            BASE, tmp / BASE_GGUF, tokenizer, q.check_text, render(tokenizer, q.check_text, None), q.check_max_tokens,
            threads, log=console.print,
        )
        write_json(tmp / BASE_GGUF_REPORT, {"base": entry, "sample_generation": perf.pop("sample_generation", None)})
    # Numbers only: DVC reads this as a metrics file (mostly-Japanese text would look binary to it).
    write_json(PERFORMANCE, {"threads": threads, "base": perf})


if __name__ == "__main__":
    run_stage("base-gguf", main)
