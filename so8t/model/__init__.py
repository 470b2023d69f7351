"""Model phase: base model -> train (LoRA + SO8T + PET) -> bake -> quantize (GGUF).

* :mod:`so8t.model.rotation`, :mod:`so8t.model.attach`, :mod:`so8t.model.bake`: SO(8) rotations, attaching
  them to ``o_proj`` inputs, folding them into the weights (``W' = W R^T``).
* :mod:`so8t.model.pet`: the second-difference smoothness penalty and its 3-phase schedule.
* :mod:`so8t.model.base_model`: ``params.base_model.source`` as a plain Hugging Face folder.
* :mod:`so8t.model.train`: the train stage's recipe (the run); its components :mod:`so8t.model.loss`,
  :mod:`so8t.model.batching`, :mod:`so8t.model.trainer` (the Trainer), :mod:`so8t.model.callbacks`,
  :mod:`so8t.model.build`, :mod:`so8t.model.preflight`, :mod:`so8t.model.resume`;
  :mod:`so8t.model.checkpoint`: crash-safe checkpoints.
* :mod:`so8t.model.quantize`: llama.cpp GGUF export (F16, Q8_0, Q4_K_M) and checks.

Imports the core and :mod:`so8t.data`.
"""
