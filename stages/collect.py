"""Stage collect: gather the Japanese source texts into data/collected/*.jsonl + manifest.json."""

from pathlib import Path

from rich.table import Table

from so8t import collect
from so8t.console import console, progress, run_stage
from so8t.io import write_json, write_jsonl
from so8t.params import load_params

OUT = Path("data/collected")


def main() -> None:
    p = load_params().collect
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
            "user": collect.collect_user(p.user_dirs, p.max_section_chars, bar),
        }

    for name, result in results.items():
        write_jsonl(OUT / f"{name}.jsonl", result.records)
    write_json(OUT / "manifest.json", {"sources": [{"output": f"{n}.jsonl", **r.source} for n, r in results.items()]})

    table = Table(title="collect: data/collected")
    for column in ("output", "records", "chars", "version", "licence"):
        table.add_column(column, justify="right" if column in ("records", "chars") else "left", no_wrap=True)
    for name, r in results.items():
        s = r.source
        version = s.get("version") or ("-" if s["enabled"] else "skipped")
        table.add_row(f"{name}.jsonl", f"{s['records']:,}", f"{s['chars']:,}", version, s.get("licence", "-"))
    console.print(table)


if __name__ == "__main__":
    run_stage("collect", main)
