"""Stage distill: train a student on the teacher's stored top-k distributions (KD + CE), bake it,
export it to GGUF and compare teacher, student and base on the test split (reports/distill.json).

With `distill.enabled: false` it only writes {"enabled": false} markers (in a fraction of a second).
"""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

from pathlib import Path

from so8t.console import console, free_cores, run_stage
from so8t.io import atomic_dir, write_json
from so8t.params import load_params

TARGETS = Path("data/distill")
OUT = Path("models/student")
METRICS = Path("reports/distill.json")
PERFORMANCE = Path("reports/performance/distill.json")


def main() -> None:
    params = load_params()
    if not params.distill.enabled:
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "distill_summary.json", {"enabled": False})
        write_json(METRICS, {"enabled": False})
        write_json(PERFORMANCE, {"enabled": False})
        console.print("distill: distill.enabled is false; nothing to do")
        return
    from so8t.distill.pipeline import DistillPaths, run_distillation

    paths = DistillPaths(targets=TARGETS, student=OUT, metrics=METRICS, performance=PERFORMANCE)
    m = run_distillation(params, paths, free_cores(), log=console.print)
    for name in ("teacher", "student", "base"):
        line = f"distill: {name}: {m[f'{name}.size_mb']:.0f} MB, perplexity {m[f'{name}.perplexity']:.2f}"
        if f"{name}.decision.macro_f1" in m:
            line += f", macro-F1 {m[f'{name}.decision.macro_f1']:.3f}"
        if f"{name}.agreement.top1" in m:
            line += f", agreement top-1 {m[f'{name}.agreement.top1']:.3f}, KL {m[f'{name}.agreement.kl']:.3f}"
        console.print(line)


if __name__ == "__main__":
    run_stage("distill", main)
