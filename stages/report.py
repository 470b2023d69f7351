"""Stage report: reports/report.md + report.html with the data card, training curve, metric tables and figures."""

from pathlib import Path

from so8t.console import console, run_stage
from so8t.eval.report import build_report_inputs, write_report
from so8t.params import Params, load_params

OUT = Path("reports")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flatten(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def main() -> None:
    params = load_params()
    current, default = _flatten(params.model_dump(mode="json")), _flatten(Params().model_dump(mode="json"))
    diff = {k: (v, default.get(k)) for k, v in current.items() if v != default.get(k)}
    figures = write_report(build_report_inputs(OUT), OUT, diff, params.metrics.ece_bins)
    console.print(f"report: wrote {OUT / 'report.md'}, {OUT / 'report.html'} and {len(figures)} figures")


if __name__ == "__main__":
    run_stage("report", main)
