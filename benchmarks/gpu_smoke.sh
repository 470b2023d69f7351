#!/usr/bin/env bash
# GPU smoke run (issue 16): Gemma 3 270M, 50 steps bf16 and 50 steps QLoRA 4-bit on CUDA, bake, quantize,
# calibrate and evaluate with llama.cpp offload. Prints tokens/s, peak GPU memory and wall time per stage.
# Needs: a CUDA GPU, a CUDA torch in .venv, llama-cpp-python built with CUDA (make install LLAMA_CUDA=1).
#   bash benchmarks/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to smoke-test')"
python -c "import llama_cpp, sys; print('llama.cpp GPU offload:', llama_cpp.llama_supports_gpu_offload())"
run() {  # name, then dvc exp args
  local name=$1; shift
  local start=$SECONDS
  dvc exp run --temp -n "gpu-$name" "$@" -S train.max_steps=50 -S train.eval_steps=25 -S train.precision=auto \
    -S evaluate.train_decision_sample=30 -S evaluate.rag_decision_sample=30
  echo "== $name: $((SECONDS - start)) s wall"
  python - "$name" <<'PY'
import json, sys
from pathlib import Path
perf = {p.stem: json.loads(p.read_text()) for p in Path("reports/performance").glob("*.json")}
t = perf.get("train", {})
print(sys.argv[1], "train:", {k: t.get(k) for k in ("tokens_per_s", "seconds_per_step", "gpu_peak_bytes", "train_seconds")})
for stage in ("bake", "quantize", "evaluate"):
    print(" ", stage, {k: v for k, v in perf.get(stage, {}).items() if "seconds" in k or "per_s" in k})
PY
}
run bf16 -S train.quantization=none
run qlora4 -S train.quantization=4bit
