"""Peak memory of bake (merge + fold + verify) and of the GGUF export, as a multiple of the fp32 model.

Two models, each step in its own child process (peak RSS from ``os.wait4``, which includes the
child's own children, e.g. llama.cpp's converter):

* ``gemma3-270m``: this pipeline's ``models/base`` + ``models/adapter`` with the bake stage's
  settings (``bake.verify_dtype``, ``bake.verify_examples`` rows of ``data/formatted/val.jsonl``);
* ``gemma3-1b-random``: Gemma 3 1B's shapes (hidden 1152, 26 layers, MLP 6912, 262k vocabulary),
  randomly initialised from a config (nothing is downloaded), with a random LoRA (r 16 on
  q/k/v/o_proj) and random SO8T rotations on every ``o_proj``, verified on the same rows.

The export step is what the quantize stage does per type: HF folder -> F32 GGUF (llama.cpp's
``convert_hf_to_gguf``) -> ``Q8_0``. The ratio is peak RSS / (4 bytes x parameters).

    python benchmarks/bake_memory.py [--skip-1b] [--workdir /tmp]

Run after ``dvc repro`` (it reads models/ and data/formatted/). The 1B case is built in a child
process of its own (a child forked from a parent holding it would count the parent's pages), writes
~10 GB to a temporary folder under ``--workdir`` and peaks at ~5.3 GB of RAM (measured 5.23 GB in
bake); it is removed afterwards. Measured (2 cores): Gemma 3 270M bake 2.08 GB = 1.94x (0.46 GB of it
is the interpreter with torch and transformers loaded), export 1.17x; 1B-shaped bake 1.31x, export 0.46x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAKE = """
import json, sys
from so8t.model.bake import bake_adapter
a = json.loads(sys.argv[1])
rows = json.load(open(a["rows"]))
bake_adapter(a["base"], a["adapter"], a["out"], rows, a["max_abs_diff"], a["verify_dtype"],
             a["max_abs_diff_float32"], a["spot_check_layers"])
"""

RANDOM_1B = """
import json, sys
from pathlib import Path
a = json.loads(sys.argv[1])
sys.path.insert(0, a["benchmarks"])
from bake_memory import _random_1b
_random_1b(Path(a["work"]))
"""

EXPORT = """
import json, sys
from so8t.model.quantize import export_gguf
a = json.loads(sys.argv[1])
export_gguf(a["hf"], a["out"], "Q8_0", n_threads=1)
"""


def _child(code: str, args: dict) -> tuple[float, int]:
    """Run ``code`` in a fresh interpreter; return (seconds, peak RSS bytes of it and its children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed (exit {proc.returncode}): {code.strip().splitlines()[1]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open is not iterable)
    return n


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _random_1b(work: Path) -> tuple[Path, Path]:
    """A randomly initialised Gemma 3 1B-shaped base (+ Gemma tokenizer) and a random LoRA + SO8T adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from so8t.model.attach import ROTATIONS_FILE, attach_rotations, save_rotations

    torch.manual_seed(0)
    base = work / "base-1b"
    config = AutoConfig.from_pretrained(ROOT / "models/base")
    shape = {"hidden_size": 1152, "num_hidden_layers": 26, "intermediate_size": 6912, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 256, "layer_types": None}  # None: re-derive the layer pattern
    config = type(config).from_dict(config.to_dict() | shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (ROOT / "models/base" / name).is_file():
            shutil.copy(ROOT / "models/base" / name, base / name)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01)
    attach_rotations(lora, init_scale=0.05)
    adapter = work / "adapter-1b"
    lora.save_pretrained(adapter)
    save_rotations(lora, adapter / ROTATIONS_FILE)
    del model, lora
    return base, adapter


def _measure(name: str, base: Path, adapter: Path, rows: Path, work: Path, bake) -> dict:
    n = _parameters(base)
    baked = work / f"baked-{name}"
    bake_s, bake_rss = _child(BAKE, {"base": str(base), "adapter": str(adapter), "out": str(baked), "rows": str(rows),
                                     "max_abs_diff": bake.max_abs_diff, "verify_dtype": bake.verify_dtype,
                                     "max_abs_diff_float32": bake.max_abs_diff_float32,
                                     "spot_check_layers": bake.spot_check_layers})
    export_s, export_rss = _child(EXPORT, {"hf": str(baked), "out": str(work / f"{name}-q8_0.gguf")})
    fp32 = 4 * n
    return {"model": name, "parameters": n, "fp32_gb": fp32 / 1e9, "bake_s": bake_s, "bake_peak_gb": bake_rss / 1e9,
            "bake_ratio": bake_rss / fp32, "export_s": export_s, "export_peak_gb": export_rss / 1e9,
            "export_ratio": export_rss / fp32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-1b", action="store_true", help="only the 270M pipeline model")
    ap.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from so8t.io import read_jsonl
    from so8t.params import load_params

    bake = load_params(ROOT / "params.yaml").bake
    for need in ("models/base", "models/adapter", "data/formatted/val.jsonl"):
        if not (ROOT / need).exists():
            raise SystemExit(f"{need} is missing: run `dvc repro` first")
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        rows = work / "rows.json"
        rows.write_text(json.dumps([r["input_ids"] for r in read_jsonl(ROOT / "data/formatted/val.jsonl")[: bake.verify_examples]]))
        results.append(_measure("gemma3-270m", ROOT / "models/base", ROOT / "models/adapter", rows, work, bake))
        if not args.skip_1b:
            # Built in a child of its own: a child forked from a parent holding the 1B model would
            # count the parent's pages in its own peak RSS.
            _child(RANDOM_1B, {"work": str(work), "benchmarks": str(ROOT / "benchmarks")})
            base, adapter = work / "base-1b", work / "adapter-1b"
            results.append(_measure("gemma3-1b-random", base, adapter, rows, work, bake))
    table = Table(title=f"bake (verify {bake.verify_dtype}, {bake.verify_examples} rows) and GGUF export (F32 -> Q8_0): peak RSS")
    for col in ("model", "parameters", "fp32 GB", "bake s", "bake peak GB", "bake / fp32", "export s", "export peak GB", "export / fp32"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(r["model"], f"{r['parameters'] / 1e6:.0f}M", f"{r['fp32_gb']:.2f}", f"{r['bake_s']:.0f}",
                      f"{r['bake_peak_gb']:.2f}", f"{r['bake_ratio']:.2f}x", f"{r['export_s']:.0f}",
                      f"{r['export_peak_gb']:.2f}", f"{r['export_ratio']:.2f}x")
    Console().print(table)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
