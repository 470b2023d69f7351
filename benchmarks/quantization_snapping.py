"""Does a quantised GGUF still carry the fine-tune? Compare it block by block with the base model's GGUF.

The embedded base model was itself distributed as Q4_K_M, so its float weights lie on the
Q4_K_M grid. Quantising base + a small fine-tuning delta back to Q4_K_M recomputes nearly the
same block scales and rounds most weights back to the base's codes: the fine-tune can vanish.
This script quantises models/base to each type of models/gguf (same llama.cpp, same settings)
and reports, per type, the share of quantisation blocks of the fine-tuned tensors (those whose
float weights differ between models/base and models/baked) that are byte-identical in the two
files, and the share of their weights whose dequantised value moved at all.

    python benchmarks/quantization_snapping.py

Reads models/base, models/baked and models/gguf (run `dvc repro` first); writes only to a
temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from so8t.console import free_cores
from so8t.model.quantize import GGUF_TYPES, export_gguf, gguf_filename


def tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf-dir", type=Path, default=Path("models/gguf"))
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    args = ap.parse_args()
    from gguf import dequantize

    threads = free_cores()
    console = Console()
    table = Table(title="Fine-tuned tensors: quantised fine-tune vs quantised base")
    for col in ("type", "fine-tuned tensors", "identical blocks", "weights that moved", "mean |Δ| / mean |w|"):
        table.add_column(col, justify="right")
    f16_tuned = tensors(args.gguf_dir / gguf_filename("F16"))
    with tempfile.TemporaryDirectory() as tmp:
        base_f16 = export_gguf(args.base, Path(tmp) / "base-f16.gguf", "F16", threads)
        base_ref = tensors(base_f16)
        changed = [
            n for n, t in f16_tuned.items()
            if n in base_ref and not np.array_equal(np.asarray(t.data), np.asarray(base_ref[n].data))
        ]
        console.print(f"{len(changed)} tensors differ between the base and the fine-tuned F16 files")
        for qtype in GGUF_TYPES:
            tuned_path = args.gguf_dir / gguf_filename(qtype)
            if qtype == "F16" or not tuned_path.is_file():
                continue
            base_q = tensors(export_gguf(args.base, Path(tmp) / f"base-{qtype}.gguf", qtype, threads))
            tuned = tensors(tuned_path)
            same_blocks = total_blocks = moved = weights = 0
            delta = scale = 0.0
            for name in changed:
                a, b = np.asarray(tuned[name].data), np.asarray(base_q[name].data)
                rows = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
                rows_b = b.reshape(rows.shape)
                same_blocks += int(np.all(rows == rows_b, axis=1).sum())
                total_blocks += rows.shape[0]
                wa = dequantize(tuned[name].data, tuned[name].tensor_type).astype(np.float64)
                wb = dequantize(base_q[name].data, base_q[name].tensor_type).astype(np.float64)
                moved += int((wa != wb).sum())
                weights += wa.size
                delta += float(np.abs(wa - wb).sum())
                scale += float(np.abs(wb).sum())
            table.add_row(qtype, str(len(changed)), f"{same_blocks / max(total_blocks, 1):.1%} (rows)",
                          f"{moved / max(weights, 1):.1%}", f"{delta / max(scale, 1e-12):.2e}")
    console.print(table)


if __name__ == "__main__":
    main()
