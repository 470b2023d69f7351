"""The rule that picks the served GGUF from an evaluation: the smallest file that keeps the fine-tune.

Used by the runtime (``runtime.model: auto``, :mod:`so8t.runtime.select`) and by the report, so
both name the same file.
"""

from __future__ import annotations

from so8t.eval import keys
from so8t.model.quantize import F16, metric_row

#: A quantised file serves only if its test decisions agree with F16's on at least this share...
MIN_DECISION_AGREEMENT = 0.95
#: ... and its held-out perplexity is at most this fraction above F16's.
MAX_PERPLEXITY_INCREASE = 0.02
def pick(sizes: dict[str, int], metrics: dict[str, float], names: dict[str, str] | None = None) -> tuple[str, str]:
    """The smallest entry whose test decisions agree with F16's on at least :data:`MIN_DECISION_AGREEMENT`
    (``<name>.parity.decision``) and whose held-out perplexity is at most :data:`MAX_PERPLEXITY_INCREASE`
    above F16's (``<name>.perplexity`` over ``baked.perplexity``); F16 always qualifies.

    Args:
        sizes: bytes per quantize-report entry (``{"f16": ..., "q8_0": ..., "q4_k_m": ...}``); must hold ``f16``.
        metrics: the flat ``reports/metrics.json`` (``baked.perplexity``, ``<name>.parity.decision``,
            ``<name>.perplexity``).
        names: file names for the message (default: the entry names).

    Returns:
        ``(entry name, one-line reason)``.
    """
    names = names or {n: n for n in sizes}
    ref_ppl = metrics[keys.key("baked", keys.PERPLEXITY)]
    verdicts: dict[str, str | None] = {}  # name -> None (qualifies) or why not
    for name in sizes:
        if name == F16:
            verdicts[name] = None
            continue
        agree = metrics.get(keys.key(name, keys.PARITY_DECISION))
        ppl = metrics.get(keys.key(name, keys.PERPLEXITY))
        if agree is None or ppl is None:
            verdicts[name] = "not evaluated"
        elif agree < MIN_DECISION_AGREEMENT:
            verdicts[name] = f"decisions agree with F16 on {agree:.3f} < {MIN_DECISION_AGREEMENT}"
        elif ppl > ref_ppl * (1 + MAX_PERPLEXITY_INCREASE):
            verdicts[name] = f"perplexity {ppl:.2f} is {100 * (ppl / ref_ppl - 1):+.1f} % over F16's {ref_ppl:.2f}"
        else:
            verdicts[name] = None
    best = min((n for n, v in verdicts.items() if v is None), key=lambda n: sizes[n])
    if best == F16:
        why = "no quantised file keeps the fine-tune"
    else:
        agree, ppl = metrics[keys.key(best, keys.PARITY_DECISION)], metrics[keys.key(best, keys.PERPLEXITY)]
        why = (
            f"the smallest GGUF whose test decisions agree with F16 on >= {MIN_DECISION_AGREEMENT} ({agree:.3f}) and "
            f"whose perplexity is within +{100 * MAX_PERPLEXITY_INCREASE:.0f} % of F16's ({100 * (ppl / ref_ppl - 1):+.1f} %)"
        )
    smaller = [f"{names[n]}: {v}" for n, v in verdicts.items() if v is not None and sizes[n] < sizes[best]]
    reason = f"serving {names[best]} (runtime.model: auto): {why}" + (f"; not {'; '.join(smaller)}" if smaller else "")
    return best, reason


__all__ = ["F16", "MAX_PERPLEXITY_INCREASE", "MIN_DECISION_AGREEMENT", "metric_row", "pick"]
