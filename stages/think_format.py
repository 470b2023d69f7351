"""Stage think-format: render records in the base model's chat template, tokenise, split."""

from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from so8t.base_model import load_tokenizer
from so8t.console import console, run_stage, track
from so8t.io import DataError, read_jsonl, write_json, write_jsonl
from so8t.params import load_params
from so8t.schema import Record
from so8t.think_format import SPLITS, FormatStats, format_record, length_summary, split_groups

RECORDS = Path("data/synth/records.jsonl")
BASE = Path("models/base")
OUT = Path("data/formatted")


def read_records(path: Path) -> list[Record]:
    records = []
    for lineno, raw in enumerate(read_jsonl(path), start=1):
        try:
            records.append(Record.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise DataError(f"{path}:{lineno}: field {field!r}: {err['msg']}") from None
    return records


def main() -> None:
    params = load_params()
    p = params.think_format
    records = read_records(RECORDS)
    tokenizer = load_tokenizer(BASE)
    stats = FormatStats()
    formatted = [
        ex
        for r in track(records, "think-format: rendering")
        if (ex := format_record(r, tokenizer, p.style, p.max_length, stats)) is not None
    ]
    fractions = (p.train_fraction, p.val_fraction, p.test_fraction)
    assignment = split_groups(records, fractions, params.seed)
    by_split = {s: [ex for ex in formatted if assignment[ex["group"]] == s] for s in SPLITS}
    for split, examples in by_split.items():
        write_jsonl(OUT / f"{split}.jsonl", examples)
    summary = {
        "style": p.style,
        "max_length": p.max_length,
        "records_in": len(records),
        "examples_out": len(formatted),
        "shortened": dict(stats.shortened),
        "dropped": dict(stats.dropped),
        "token_lengths": length_summary(stats.lengths),
        "splits": {
            s: {
                "examples": len(ex),
                "groups": len({e["group"] for e in ex}),
                "by_task": dict(Counter(e["task"] for e in ex)),
                "by_decision": dict(Counter(e["decision"] for e in ex if e["decision"])),
            }
            for s, ex in by_split.items()
        },
    }
    write_json(OUT / "stats.json", summary)
    for s in SPLITS:
        console.print(f"think-format: {s}: {summary['splits'][s]}")
    console.print(f"think-format: shortened {dict(stats.shortened)}, dropped {dict(stats.dropped)}")


if __name__ == "__main__":
    run_stage("think-format", main)
