"""Stage synthesize: data/collected/*.jsonl -> data/synth/records.jsonl (+ held-out reference text, lm_text documents, stats).

Fails before writing anything when a decision class is missing or below
synthesize.min_class_share once the user's data is merged.
"""

import time
from pathlib import Path

from rich.table import Table

from so8t.console import console, run_stage
from so8t.io import DataError, read_jsonl, write_json, write_jsonl
from so8t.params import load_params
from so8t.data.synthesize import synthesize

COLLECTED = Path("data/collected")
OUT = Path("data/synth")


def read_collected(name: str) -> list[dict]:
    path = COLLECTED / f"{name}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found; run the collect stage first (`dvc repro collect`)")
    return read_jsonl(path)


def main() -> None:
    params = load_params()
    collected = {name: read_collected(name) for name in ("faq", "reference", "gsm")}
    collected["user"] = read_collected("user") + read_collected("hf")
    start = time.perf_counter()
    result = synthesize(collected, params.synthesize, params.seed)
    seconds = time.perf_counter() - start

    write_jsonl(OUT / "records.jsonl", result.records)
    write_jsonl(OUT / "heldout_reference.jsonl", result.heldout_reference)
    write_jsonl(OUT / "lm_text.jsonl", result.lm_text)
    write_json(OUT / "stats.json", result.stats)

    stats = result.stats
    table = Table(title="synthesize: data/synth/records.jsonl")
    for column in ("task", "records", "share", "groups", "duplicates removed", "near-duplicates removed"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, n in stats["by_task"].items():
        table.add_row(
            task,
            str(n),
            f"{stats['balance']['task_shares'][task]:.1%}",
            str(stats["groups_by_task"][task]),
            str(stats["dedup_removed"].get(task, 0)),
            str(stats["near_dup_removed"].get(task, 0)),
        )
    console.print(table)
    math = stats["math"]
    docs = stats["document_qa"]
    console.print(
        f"synthesize: user records {stats['user']}; document QA {docs['pairs']} pairs from "
        f"{docs['sections_with_qa']}/{docs['sections']} sections {docs['by_template']}"
        + (f", answered by {docs['teacher']['model']}" if docs["teacher"] else "")
        + f"; near-duplicates removed {stats['near_dup_removed'] or 'none'}, "
        f"label conflicts {stats['label_conflicts']}; "
        f"decision shares {stats['balance']['decision_shares']}"
    )
    console.print(
        f"synthesize: decisions {stats['by_decision']}, domains {stats['by_domain']}; "
        f"math {math['originals']} originals + {math['variants']} variants "
        f"(templates short of variants: {math['templates_short_of_variants'] or 'none'}); "
        f"held-out reference docs {stats['reference']['heldout_docs']}; lm_text docs {stats['lm_text']['docs']}; synthesis took {seconds:.1f} s"
    )


if __name__ == "__main__":
    run_stage("synthesize", main)
