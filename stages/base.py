"""Stage base: resolve params.base_model into a plain float32 HF folder, models/base."""

from so8t.kernels import pin_cpu_kernels

pin_cpu_kernels()  # first: ATen and MKL read their kernel settings once, when torch loads (train.deterministic)

from pathlib import Path

from so8t.model.base_model import prepare_base
from so8t.console import console, run_stage
from so8t.params import load_params

OUT = Path("models/base")


def main() -> None:
    params = load_params()
    console.print(f"base: preparing [bold]{params.base_model.source}[/] -> {OUT}")
    info = prepare_base(params.base_model.source, OUT, params.base_model.chat_template, cache_dir=Path(".cache/base"))
    console.print(
        f"base: {info['architecture']} ({info['model_type']}), {info['parameters']:,} parameters, "
        f"licence {info['licence']}, stop tokens {info['stop_token_ids']}"
    )


if __name__ == "__main__":
    run_stage("base", main)
