"""Knowledge distillation from a GGUF teacher (stages ``distill-teacher`` and ``distill``).

* :mod:`so8t.distill.teacher`: teacher resolution, the shared-tokenizer check, llama.cpp label-position logits,
  top-k storage.
* :mod:`so8t.distill.student`: the student (LoRA or a layer subset).
* :mod:`so8t.distill.trainer`: the KD + CE loss, collator and training loop.
* :mod:`so8t.distill.pipeline`: the two stages' orchestration, export and comparison.

Imports the core, :mod:`so8t.data`, :mod:`so8t.model` and :mod:`so8t.eval`.
"""
