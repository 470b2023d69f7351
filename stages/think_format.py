"""Stage think-format: render records in the base model's chat template, tokenise, split.

Also writes the data card (reports/data_card.md + .json) from the collect manifest, the
synthesize stats and the token lengths measured here, and fails before writing anything
when a decision class is missing or too rare in the train split (synthesize.min_class_share).
"""

from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from so8t.base_model import load_tokenizer
from so8t.console import console, run_stage, track
from so8t.datacard import build_data_card, check_class_balance, render_data_card
from so8t.io import DataError, read_json, read_jsonl, write_json, write_jsonl, write_text
from so8t.params import load_params
from so8t.schema import Record
from so8t.think_format import SPLITS, FormatStats, format_record, length_summary, split_groups

RECORDS = Path("data/synth/records.jsonl")
MANIFEST = Path("data/collected/manifest.json")
SYNTH_STATS = Path("data/synth/stats.json")
CARD = Path("reports/data_card")
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
    manifest, synth_stats = read_json(MANIFEST), read_json(SYNTH_STATS)
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
    check_class_balance(
        (ex["decision"] for ex in by_split["train"] if ex["decision"]),
        params.synthesize.min_class_share,
        "think-format: train split",
    )
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
    card = build_data_card(manifest, synth_stats, summary, params.synthesize.min_class_share)
    for split, examples in by_split.items():
        write_jsonl(OUT / f"{split}.jsonl", examples)
    write_json(OUT / "stats.json", summary)
    write_json(CARD.with_suffix(".json"), card)
    write_text(CARD.with_suffix(".md"), render_data_card(card))
    for s in SPLITS:
        console.print(f"think-format: {s}: {summary['splits'][s]}")
    console.print(f"think-format: shortened {dict(stats.shortened)}, dropped {dict(stats.dropped)}")
    console.print(f"think-format: data card {CARD.with_suffix('.md')} (+ .json)")


if __name__ == "__main__":
    run_stage("think-format", main)
