"""Does SO8T help? The ablation grid as DVC experiments, and its table.

Variants (each the whole pipeline, ``dvc exp run`` of every stage, so test decisions, held-out
perplexity and the GGUF quantisation loss are measured):

=============  ======================================================================
``lora``       LoRA alone: ``train.so8t.enabled=false train.pet.enabled=false``
``so8t``       LoRA + trained SO(8) rotations, no PET
``pet``        LoRA + PET, no rotations
``so8t_pet``   LoRA + SO8T + PET (the default)
``hadamard``   the default with a fixed 8x8 Hadamard rotation per block, not trained
``random``     the default with fixed Haar-random SO(8) blocks drawn from the seed, not trained
=============  ======================================================================

each with ``seed=S`` for every seed asked for. Queue them, run them, then tabulate::

    python benchmarks/so8t_ablation.py queue --seeds 1 2 3     # dvc exp run --queue -n abl-<variant>-s<S> ...
    dvc queue start -j 1                                        # ~1 h per run on 2 CPU cores
    python benchmarks/so8t_ablation.py table [--out F.json]    # reads `dvc exp show --json`

Per variant the table gives the mean over seeds with a 95 % t interval (n = seeds) of: test
decision macro-F1 of the baked model (``baked.decision.macro_f1``), its held-out perplexity
(``baked.perplexity``), the quantisation loss of Q8_0 and Q4_K_M (GGUF perplexity minus the F16
GGUF's, ``f16.parity.perplexity_hf * f16.parity.perplexity_ratio``), their decision agreement with
the F16 GGUF (share of every test decision given the same label, ``<q>.parity.decision``) and the
train wall time; then
the paired difference of each variant against ``lora`` with the same seed (same data, same batches),
mean and 95 % t interval over the seeds. A difference whose interval holds 0 is "no difference".
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "lora": ["train.so8t.enabled=false", "train.pet.enabled=false"],
    "so8t": ["train.so8t.enabled=true", "train.pet.enabled=false"],
    "pet": ["train.so8t.enabled=false", "train.pet.enabled=true"],
    "so8t_pet": ["train.so8t.enabled=true", "train.pet.enabled=true"],
    "hadamard": ["train.so8t.enabled=true", "train.pet.enabled=true", "train.so8t.rotation=hadamard"],
    "random": ["train.so8t.enabled=true", "train.pet.enabled=true", "train.so8t.rotation=random"],
}
NAME = re.compile(r"^abl-(?P<variant>[a-z0-9_]+)-s(?P<seed>\d+)$")
#: Columns: (label, function of the flat metrics of one run -> value or None).
COLUMNS = {
    "test macro-F1": lambda m: m.get("baked.decision.macro_f1"),
    "perplexity": lambda m: m.get("baked.perplexity"),
    "Q8_0 loss": lambda m: _quant_loss(m, "q8_0"),
    "Q4_K_M loss": lambda m: _quant_loss(m, "q4_k_m"),
    "Q8_0 agreement": lambda m: m.get("q8_0.parity.decision"),
    "Q4_K_M agreement": lambda m: m.get("q4_k_m.parity.decision"),
    "train s": lambda m: m.get("train_seconds"),
}


def _quant_loss(m: dict, name: str) -> float | None:
    """Held-out perplexity of GGUF ``name`` minus that of the F16 GGUF (llama.cpp both)."""
    q, hf, ratio = m.get(f"{name}.perplexity"), m.get("f16.parity.perplexity_hf"), m.get("f16.parity.perplexity_ratio")
    return None if None in (q, hf, ratio) else q - hf * ratio


def queue_commands(seeds: list[int], variants: list[str]) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every (variant, seed), in seed-major order."""
    return [["dvc", "exp", "run", "--queue", "-n", f"abl-{v}-s{s}", "-S", f"seed={s}",
             *[a for o in VARIANTS[v] for a in ("-S", o)]] for s in seeds for v in variants]


def runs_from_exp_show(data: list) -> dict[tuple[str, int], dict]:
    """``{(variant, seed): flat metrics}`` of the ``abl-<variant>-s<seed>`` experiments.

    Args:
        data: the parsed output of ``dvc exp show --json`` (DVC 3: a list of baseline commits,
            each with ``experiments: [{"name", "revs": [{"name", "data": {"metrics": ...}}]}]``).
            The metrics of every metrics file are merged into one flat dict (the files' keys do
            not collide: ``reports/metrics.json`` is flat, the performance files add
            ``train_seconds`` from ``reports/performance/train.json``).
    """
    runs: dict[tuple[str, int], dict] = {}

    def visit(node) -> None:
        if isinstance(node, list):
            for x in node:
                visit(x)
            return
        if not isinstance(node, dict):
            return
        match = NAME.match(str(node.get("name") or ""))
        data = node.get("data")
        if match and isinstance(data, dict) and data.get("metrics"):
            flat: dict = {}
            for path, entry in sorted(data["metrics"].items()):
                values = (entry or {}).get("data") or {}
                if path.endswith("performance/train.json"):
                    values = {"train_seconds": values.get("train_seconds")}
                elif not path.endswith("reports/metrics.json"):
                    continue
                flat.update(values)
            runs[(match["variant"], int(match["seed"]))] = flat
        for key in ("experiments", "revs"):
            visit(node.get(key))

    visit(data)
    return runs


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95 % Student-t interval (``scipy.stats.t``), or None below 2 values."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def table(runs: dict[tuple[str, int], dict], reference: str = "lora") -> dict:
    """Per variant and column: the mean with its interval, and the paired difference to ``reference``."""
    variants = [v for v in VARIANTS if any(k[0] == v for k in runs)]
    out: dict = {}
    for v in variants:
        seeds = sorted(s for (w, s) in runs if w == v)
        row: dict = {"seeds": seeds}
        for col, get in COLUMNS.items():
            values = [x for s in seeds if (x := get(runs[(v, s)])) is not None]
            row[col] = {"n": len(values), "values": values, "mean_ci95": mean_interval(values)}
            if v != reference:
                pairs = [(a, b) for s in seeds if (v, s) in runs and (reference, s) in runs
                         and (a := get(runs[(v, s)])) is not None and (b := get(runs[(reference, s)])) is not None]
                diff = [a - b for a, b in pairs]
                ci = mean_interval(diff)
                row[col]["diff_vs_" + reference] = {
                    "n": len(diff), "mean_ci95": ci,
                    "verdict": None if ci is None else ("no difference" if ci[1] <= 0 <= ci[2]
                                                        else "higher" if ci[1] > 0 else "lower"),
                }
        out[v] = row
    return out


def _fmt(ci, digits: int = 3) -> str:
    return "-" if ci is None else f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments")
    q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    q.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    t = sub.add_parser("table", help="tabulate the finished experiments")
    t.add_argument("--json", type=Path, help="a saved `dvc exp show --json` (default: run it)")
    t.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.cmd == "queue":
        for cmd in queue_commands(args.seeds, args.variants):
            print(" ".join(cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        return
    from rich.console import Console
    from rich.table import Table

    from so8t.io import write_json

    raw = (args.json.read_text(encoding="utf-8") if args.json else
           subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)
    runs = runs_from_exp_show(json.loads(raw))
    if not runs:
        sys.exit("so8t_ablation: no finished experiment named abl-<variant>-s<seed>; queue the grid first")
    result = table(runs)
    console = Console()
    grid = Table(title="SO8T ablation: mean over seeds [95 % t interval]; vs lora: paired difference, same seed")
    grid.add_column("variant")
    grid.add_column("seeds")
    for col in COLUMNS:
        grid.add_column(col)
        grid.add_column(f"{col} vs lora")
    for v, row in result.items():
        cells = [v, ",".join(map(str, row["seeds"]))]
        for col in COLUMNS:
            digits = 0 if col == "train s" else 3
            cells.append(_fmt(row[col]["mean_ci95"], digits))
            d = row[col].get("diff_vs_lora")
            cells.append("-" if not d or d["mean_ci95"] is None else f"{_fmt(d['mean_ci95'], digits)} {d['verdict']}")
        grid.add_row(*cells)
    console.print(grid)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
