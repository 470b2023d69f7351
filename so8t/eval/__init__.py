"""Evaluation phase: calibrate, evaluate, report.

Models run through :mod:`so8t.inference` (the one inference layer: Hugging Face and llama.cpp backends,
greedy generation, label scoring, perplexity), which calibrate, evaluate, distill and the runtime share.

* :mod:`so8t.eval.metrics`, :mod:`so8t.eval.calibration`: metrics and temperature scaling.
* :mod:`so8t.eval.artifacts`: the artifacts compared (which models, how each is opened, what its run gives).
* :mod:`so8t.eval.evalsets`: the eval sets and the example selection behind them.
* :mod:`so8t.eval.task_metrics`: per-task metrics (decisions, runtime policy, math, FAQ, stability).
* :mod:`so8t.eval.comparisons`: parity between rows and runtimes, paired gains, the linear-probe comparison.
* :mod:`so8t.eval.evaluation`: the calibrate and evaluate runs, the training hook, console lines and writers.
* :mod:`so8t.eval.probe`: the linear-probe baseline on the frozen base model's hidden states (stage ``probe``).
* :mod:`so8t.eval.report`: the Markdown / HTML report.

Imports the core, :mod:`so8t.inference`, :mod:`so8t.data` and :mod:`so8t.model`.
"""
