"""Stage collect: gather the Japanese source texts into data/collected/*.jsonl + manifest.json.

Nothing is written unless every source was read: a malformed user file stops the stage
(naming file, line and field) before any output exists, or, with
``collect.on_bad_record: skip``, is listed in data/collected/rejects.jsonl.
"""

from pathlib import Path

from rich.table import Table

from so8t.console import console, progress, run_stage
from so8t.data.collect import collect_all
from so8t.io import write_json, write_jsonl
from so8t.params import load_params

OUT = Path("data/collected")


def main() -> None:
    p = load_params().collect
    with progress() as bar:
        results, rejects, manifest = collect_all(p, bar)
    for name, result in results.items():
        write_jsonl(OUT / f"{name}.jsonl", result.records)
    write_jsonl(OUT / "rejects.jsonl", rejects)
    write_json(OUT / "manifest.json", manifest)

    table = Table(title="collect: data/collected")
    for column in ("output", "records", "chars", "version", "licence"):
        table.add_column(column, justify="right" if column in ("records", "chars") else "left", no_wrap=True)
    for name, r in results.items():
        s = r.source
        version = s.get("version") or ("-" if s["enabled"] else "skipped")
        table.add_row(f"{name}.jsonl", f"{s['records']:,}", f"{s['chars']:,}", version, s.get("licence", "-"))
    console.print(table)
    mapped = [
        f"{m['label']}→{m['decision']} ×{m['records']}"
        for r in (results["user"], results["hf"])
        for m in r.source["label_mapping"]
    ]
    console.print(
        f"collect: personal data masked {manifest['pii_masked'] if p.pii_mask else 'off (collect.pii_mask: false)'}; "
        f"labels mapped {', '.join(mapped) or 'none'}; rejected {len(rejects)} (policy {p.on_bad_record}"
        + (f", see {OUT / 'rejects.jsonl'})" if rejects else ")")
    )
    if results["user"].source["ignored_files"]:
        console.print(f"collect: ignored (unsupported suffix): {results['user'].source['ignored_files']}")


if __name__ == "__main__":
    run_stage("collect", main)
