"""Does the learned SO8T rotation change quantisation error? Q8_0 / Q4_K_M perplexity in llama.cpp.

Three models, each exported as F16, Q8_0 and Q4_K_M GGUF and scored for
perplexity on the held-out Japanese reference text:

* ``trained``: models/baked (LoRA merged, trained rotations folded into o_proj);
* ``identity``: the same adapter merged without its rotations (R = I);
* ``no_so8t``: a LoRA trained with the same params but ``train.so8t.enabled=false``.

Prints the table (perplexity and the increase over the model's own F16) and
which tensors fell back from K-quants. Needs the pipeline's outputs
(``dvc repro`` up to quantize) and ~15 minutes on 2 cores (mostly the extra
training run; ``--train-steps`` shortens it, ``--skip-no-so8t`` skips it).

    python benchmarks/rotation_quantization.py [--train-steps 120] [--skip-no-so8t]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from so8t.inference.hf import load_causal_lm, load_tokenizer
from so8t.console import free_cores
from so8t.io import read_jsonl
from so8t.params import load_params
from so8t.model.quantize import convert_hf_to_gguf, inspect_gguf, quantize_gguf
from so8t.inference import LlamaCppBackend, perplexity_of, perplexity_windows

BASE = Path("models/base")
ADAPTER = Path("models/adapter")
BAKED = Path("models/baked")
TYPES = ("F16", "Q8_0", "Q4_K_M")


def merged_without_rotations(adapter: Path, out: Path) -> Path:
    model = PeftModel.from_pretrained(load_causal_lm(BASE, torch.float32), str(adapter)).merge_and_unload()
    model.save_pretrained(out)
    load_tokenizer(BASE).save_pretrained(out)
    return out


def train_without_so8t(steps: int, scratch: Path) -> Path:
    from so8t.model.train import TrainPaths, run_training

    params = load_params()
    data = params.model_dump()
    data["train"]["so8t"]["enabled"] = False
    data["train"]["max_steps"] = steps
    data["checkpoint"]["dir"] = str(scratch / "ckpt")
    params = type(params).model_validate(data)
    paths = TrainPaths(base=BASE, data=Path("data/formatted/train.jsonl"), out=scratch / "adapter",
                       live_dir=scratch / "live", performance=scratch / "perf.json")
    run_training(params, paths)
    return merged_without_rotations(paths.out, scratch / "no_so8t")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--skip-no-so8t", action="store_true")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    args = ap.parse_args()
    params = load_params()
    scratch = Path(tempfile.mkdtemp(prefix="so8t-rotq-"))
    tokenizer = load_tokenizer(BAKED)
    windows = perplexity_windows(
        tokenizer, [d["text"] for d in read_jsonl("data/synth/heldout_reference.jsonl")], args.ppl_tokens, 512
    )
    models = {"trained": BAKED, "identity": merged_without_rotations(ADAPTER, scratch / "identity")}
    if not args.skip_no_so8t:
        models["no_so8t"] = train_without_so8t(args.train_steps or params.train.max_steps, scratch)
    threads = free_cores()
    results: dict[str, dict[str, float]] = {}
    fallbacks: dict[str, int] = {}
    for name, folder in models.items():
        f32 = scratch / f"{name}-f32.gguf"
        convert_hf_to_gguf(folder, f32, "f32")
        results[name] = {}
        for t in TYPES:
            path = scratch / f"{name}-{t}.gguf"
            quantize_gguf(f32, path, t, threads)
            if t == "Q4_K_M":
                info = inspect_gguf(path)
                fallbacks[name] = sum(1 for ty in info.tensor_types.values() if ty not in ("Q4_K", "Q6_K", "F32"))
            backend = LlamaCppBackend(path, n_ctx=1024, n_threads=threads)
            results[name][t] = perplexity_of(backend, windows)["perplexity"]
            backend.close()
            path.unlink()
        f32.unlink()
    print(f"held-out perplexity ({sum(len(w) - 1 for w in windows)} tokens), llama.cpp, {threads} threads")
    print(f"{'model':10s} {'F16':>8s} {'Q8_0':>14s} {'Q4_K_M':>14s}  Q4_K_M fallback tensors")
    for name, r in results.items():
        f16 = r["F16"]
        cells = [f"{r['F16']:8.3f}"] + [f"{r[t]:8.3f} ({r[t] - f16:+.3f})" for t in ("Q8_0", "Q4_K_M")]
        print(f"{name:10s} {' '.join(cells)}  {fallbacks[name]}")
    print(f"scratch folder {scratch} (delete it when done)")


if __name__ == "__main__":
    main()
