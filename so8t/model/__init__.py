"""Model phase: base model -> train (LoRA + SO8T + PET) -> bake -> quantize (GGUF).

* :mod:`so8t.model.rotation`, :mod:`so8t.model.attach`, :mod:`so8t.model.bake`: SO(8) rotations, attaching
  them to ``o_proj`` inputs, folding them into the weights (``W' = W R^T``).
* :mod:`so8t.model.pet`: the second-difference smoothness penalty and its 3-phase schedule.
* :mod:`so8t.model.base_model`: ``params.base_model.source`` as a plain Hugging Face folder.
* :mod:`so8t.model.train`, :mod:`so8t.model.checkpoint`: the Trainer, crash-safe checkpoints.
* :mod:`so8t.model.quantize`: llama.cpp GGUF export (F16, Q8_0, Q4_K_M) and checks.

Imports the core and :mod:`so8t.data`.
"""
