"""Does a function-preserving rotation change quantisation loss? QuaRot's question, without training.

Takes one Hugging Face model folder (default ``models/baked``) and writes it back rotated in
several ways that all compute the same function (:func:`so8t.model.attach.make_invariant`):
the inverse of each key/value head's rotation is folded into ``v_proj``'s rows, the rotation into
``o_proj``'s columns, in every decoder layer. Then each copy is exported to F16, Q8_0 and Q4_K_M
GGUF (llama.cpp's converter and quantiser) and scored for perplexity on the held-out Japanese text
(``data/synth/heldout_reference.jsonl``), in llama.cpp:

* ``none``: the model as it is;
* ``hadamard``: H_8 / sqrt(8) in every block (QuaRot, Ashkboos et al. 2024);
* ``random``: Haar-random SO(8) blocks, ``--draws`` independent draws (SpinQuant's random init,
  Liu et al. 2024), so the spread between rotations is measured, not assumed.

A rotation's *quantisation loss* is its GGUF perplexity minus its own F16 perplexity; the F16
perplexities themselves agree to float rounding (the printed ``F16 / none`` ratio checks it). The
random draws give a mean with a 95 % t interval; a difference to ``none`` whose interval holds 0
is "no difference".

Needs a model folder and the held-out text (``dvc repro`` up to synthesize and bake), about
4 minutes per copy on 2 cores::

    python benchmarks/invariant_rotation_quantization.py [--model models/baked] [--draws 3] [--out F]

``--model`` takes any folder ``so8t.inference.hf.load_causal_lm`` reads (``models/base`` is
Gemma 3 270M dequantised from its own Q4_K_M grid; a SmolLM2-135M folder from ``prepare_base``
comes from a Q4_1 grid).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from so8t_ablation import mean_interval, verdict  # benchmarks/ is on sys.path when run as a script

DEFAULT_MODEL = Path("models/baked")
HELDOUT = Path("data/synth/heldout_reference.jsonl")
TYPES = ("F16", "Q8_0", "Q4_K_M")


def rotated_copy(model_dir: Path, tokenizer, kind: str, seed: int, out: Path) -> Path:
    """``model_dir`` with an invariant ``kind`` rotation (``hadamard`` / ``random``, drawn from
    ``seed``) folded into every layer's ``v_proj`` and ``o_proj``, saved to ``out`` with ``tokenizer``
    (``model_dir``'s, loaded once by the caller); ``none`` saves it unchanged."""
    from so8t.model.attach import attach_rotations
    from so8t.model.bake import bake_model
    from so8t.inference.hf import load_causal_lm
    from so8t.model.base_model import copy_tokenizer_files
    from so8t.model.build import fix_rotations

    model = load_causal_lm(model_dir, torch.float32)
    if kind != "none":
        attach_rotations(model)
        fix_rotations(model, f"{kind}_invariant", seed)
        model = bake_model(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    copy_tokenizer_files(model_dir, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model folder (default models/baked)")
    ap.add_argument("--draws", type=int, default=3, help="random rotations drawn (seeds 1..N)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if not args.model.is_dir():
        raise SystemExit(f"--model {args.model}: no such folder (dvc repro bake, or point it at a model folder)")
    if not HELDOUT.is_file():
        raise SystemExit(f"{HELDOUT}: missing (dvc repro synthesize)")
    with tempfile.TemporaryDirectory(prefix="so8t-invq-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, scratch: Path) -> None:
    """Score every rotated copy of ``args.model``, writing the copies and GGUF files under ``scratch``."""
    from so8t.console import free_cores
    from so8t.inference import LlamaCppBackend, perplexity_of, perplexity_windows
    from so8t.io import read_jsonl, write_json
    from so8t.inference.hf import load_tokenizer
    from so8t.model.quantize import convert_hf_to_gguf, quantize_gguf

    tokenizer = load_tokenizer(args.model)
    windows = perplexity_windows(tokenizer, [d["text"] for d in read_jsonl(HELDOUT)], args.ppl_tokens, 512)
    copies = [("none", 0), ("hadamard", 0), *(("random", s) for s in range(1, args.draws + 1))]
    threads = free_cores()
    results: dict[str, dict[str, float]] = {}
    for kind, seed in copies:
        name = kind if kind != "random" else f"random-{seed}"
        folder = rotated_copy(args.model, tokenizer, kind, seed, scratch / name)
        f32 = convert_hf_to_gguf(folder, scratch / f"{name}-f32.gguf", "f32")
        results[name] = {}
        for qtype in TYPES:
            path = quantize_gguf(f32, scratch / f"{name}-{qtype}.gguf", qtype, threads)
            backend = LlamaCppBackend(path, n_ctx=1024, n_threads=threads)
            results[name][qtype] = perplexity_of(backend, windows)["perplexity"]
            backend.close()
            path.unlink()
        f32.unlink()
        shutil.rmtree(folder)
        print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    n_tokens = sum(len(w) - 1 for w in windows)
    base = results["none"]
    loss = {name: {q: r[q] - r["F16"] for q in TYPES[1:]} for name, r in results.items()}
    print(f"\n{args.model}: held-out perplexity over {n_tokens} tokens, llama.cpp, {threads} threads")
    print(f"{'rotation':10s} {'F16 / none':>10s} {'Q8_0 loss':>10s} {'Q4_K_M loss':>12s}")
    for name, r in results.items():
        print(f"{name:10s} {r['F16'] / base['F16']:10.5f} {loss[name]['Q8_0']:10.3f} {loss[name]['Q4_K_M']:12.3f}")
    summary = {}
    for q in TYPES[1:]:
        diffs = [loss[n][q] - loss["none"][q] for n in results if n.startswith("random-")]
        ci = mean_interval(diffs)
        summary[q] = {"hadamard_minus_none": loss["hadamard"][q] - loss["none"][q], "random_minus_none": diffs,
                      "random_minus_none_mean_ci95": ci, "verdict": verdict(ci)}
        ci_text = "-" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}] {summary[q]['verdict']}"
        print(f"{q} loss, rotated minus none: hadamard {summary[q]['hadamard_minus_none']:+.3f}; "
              f"random (n = {len(diffs)} draws) {ci_text}")
    if args.out:
        write_json(args.out, {"model": str(args.model), "tokens": n_tokens, "threads": threads,
                              "perplexity": results, "loss": loss, "summary": summary})


if __name__ == "__main__":
    main()
