"""so8t: reproducible Japanese LLM fine-tuning with LoRA, SO(8) rotations (SO8T) and PET.

The package holds the math (``rotation``, ``attach``, ``pet``, ``bake``), the data
pipeline (``collect``, ``synthesize``, ``think_format``) and the product glue used
by the thin stage scripts in ``stages/``.
"""

__version__ = "0.1.0"
