"""Evaluation phase: inference backends, calibrate, evaluate, report.

* :mod:`so8t.eval.inference`: the one inference layer (Hugging Face and llama.cpp backends, greedy generation,
  label scoring, perplexity) used by calibrate, evaluate, distill and the runtime.
* :mod:`so8t.eval.metrics`, :mod:`so8t.eval.calibration`: metrics and temperature scaling.
* :mod:`so8t.eval.evaluation`: the artifacts compared and the per-task evaluations.
* :mod:`so8t.eval.probe`: the linear-probe baseline on the frozen base model's hidden states (stage ``probe``).
* :mod:`so8t.eval.report`: the Markdown / HTML report.

Imports the core, :mod:`so8t.data` and :mod:`so8t.model`.
"""
