"""Stage distill-teacher: the teacher GGUF (llama.cpp) scores the train/test samples once; its top-k
next-token log-probabilities at every label position go to data/distill (DVC-cached).

With `distill.enabled: false` it only writes data/distill/teacher.json = {"enabled": false}
(in a fraction of a second: nothing heavy is imported).
"""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

from pathlib import Path

from so8t.console import console, free_cores, run_stage
from so8t.io import atomic_dir, write_json
from so8t.params import load_params

OUT = Path("data/distill")
PERFORMANCE = Path("reports/performance/distill_teacher.json")


def main() -> None:
    params = load_params()
    if not params.distill.enabled:
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "teacher.json", {"enabled": False})
        write_json(PERFORMANCE, {"enabled": False})
        console.print("distill-teacher: distill.enabled is false; nothing to do")
        return
    from so8t.distill.teacher import TeacherPaths, run_teacher_pass

    summary = run_teacher_pass(params, TeacherPaths(targets=OUT, performance=PERFORMANCE), free_cores(), log=console.print)
    for split in ("train", "test"):
        s, t = summary[split], summary["timing"][split]
        console.print(
            f"distill-teacher: {split}: {s['examples']} examples, {s['label_positions']:,} label positions "
            f"in {t['seconds']:.0f} s ({t['label_tokens_per_s']:.1f} label tokens/s), top-{summary['k']} stored"
        )


if __name__ == "__main__":
    run_stage("distill-teacher", main)
