"""Stage think-format: render records in the base model's chat template, tokenise, split.

Also writes the data card (reports/data_card.md + .json) from the collect manifest, the
synthesize stats and the token lengths measured here, and fails before writing anything
when a decision class is missing or too rare in the train split (think_format.min_class_share).
"""

from pathlib import Path

from so8t.console import console, run_stage, track
from so8t.data.datacard import build_data_card, check_class_balance, render_data_card
from so8t.data.grounding import make_grounder
from so8t.data.think_format import SPLITS, format_and_split, read_records
from so8t.io import read_json, read_jsonl, write_json, write_jsonl, write_text
from so8t.inference.hf import load_tokenizer
from so8t.params import load_params

RECORDS = Path("data/synth/records.jsonl")
LM_TEXT = Path("data/synth/lm_text.jsonl")
MANIFEST = Path("data/collected/manifest.json")
SYNTH_STATS = Path("data/synth/stats.json")
CARD = Path("reports/data_card")
BASE = Path("models/base")
OUT = Path("data/formatted")


def main() -> None:
    params = load_params()
    p = params.think_format
    tokenizer = load_tokenizer(BASE)
    grounder = make_grounder(params.retrieval, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]))
    by_split, summary = format_and_split(
        read_records(RECORDS), tokenizer, p, params.seed, lambda rs: track(rs, "think-format: rendering"), grounder,
        read_jsonl(LM_TEXT),
    )
    check_class_balance(
        (ex["decision"] for ex in by_split["train"] if ex["decision"]),
        p.min_class_share,
        "think-format: train split",
        "think_format.min_class_share",
    )
    card = build_data_card(read_json(MANIFEST), read_json(SYNTH_STATS), summary, p.min_class_share)
    for split, examples in by_split.items():
        write_jsonl(OUT / f"{split}.jsonl", examples)
    write_json(OUT / "stats.json", summary)
    write_json(CARD.with_suffix(".json"), card)
    write_text(CARD.with_suffix(".md"), render_data_card(card))
    for s in SPLITS:
        console.print(f"think-format: {s}: {summary['splits'][s]}")
    console.print(f"think-format: lm_text {summary['lm_text']}")
    console.print(f"think-format: shortened {summary['shortened']}, dropped {summary['dropped']}")
    console.print(f"think-format: data card {CARD.with_suffix('.md')} (+ .json)")


if __name__ == "__main__":
    run_stage("think-format", main)
