"""Stage report: reports/report.md with the data card, training curve, metric tables and figures."""

from pathlib import Path

from so8t.console import console, run_stage
from so8t.io import read_json, write_text
from so8t.params import Params, load_params
from so8t.report import (
    ReportInputs,
    build_markdown,
    plot_confusion,
    plot_reliability,
    plot_tradeoff,
    plot_training,
    previous_metrics,
    read_dvclive_series,
    to_html,
)

OUT = Path("reports")
FIG = OUT / "figures"
DISTILL = OUT / "distill.json"


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
    inp = ReportInputs(
        metrics=read_json(OUT / "metrics.json"),
        details=read_json(OUT / "eval" / "details.json"),
        calibration=read_json(OUT / "calibration.json"),
        manifest=read_json("data/collected/manifest.json"),
        synth_stats=read_json("data/synth/stats.json"),
        format_stats=read_json("data/formatted/stats.json"),
        train_summary=read_json("models/adapter/train_summary.json"),
        train_history=read_dvclive_series(Path("dvclive/plots/metrics"), ["loss", "ce", "pet", "pet_lambda"]),
        bake_report=read_json("models/baked/bake_report.json"),
        quantize_report=read_json("models/gguf/quantize_report.json"),
        distill=read_json(DISTILL) if DISTILL.is_file() else None,
    )
    names = list(inp.details["artifacts"])
    figures = {k: f"figures/{k}.png" for k in ("training", "reliability", "confusion", "tradeoff")}
    plot_training(inp.train_history, FIG / "training.png")
    plot_reliability(inp.details, [n for n in ("base", "baked", "q4_k_m") if n in names], FIG / "reliability.png",
                     params.calibrate.ece_bins)
    served = "q4_k_m" if "q4_k_m" in names else "baked"
    plot_confusion(inp.details["artifacts"][served]["decision"]["confusion_matrix"],
                   f"Decisions ({served}, test)", FIG / "confusion.png")
    plot_tradeoff(inp.metrics, names, FIG / "tradeoff.png")
    text = build_markdown(inp, figures, diff, previous_metrics(inp.metrics))
    write_text(OUT / "report.md", text)
    write_text(OUT / "report.html", to_html(text, OUT))
    console.print(f"report: wrote {OUT / 'report.md'}, {OUT / 'report.html'} and {len(figures)} figures in {FIG}")


if __name__ == "__main__":
    run_stage("report", main)
