"""The label-token loss of every so8t training run: cross-entropy at the label positions only.

:func:`label_token_ce_sum` applies the LM head only where a next-token label exists (the prompt and
padding never reach the 262k-wide Gemma head) and sums the (optionally weighted) cross-entropy,
scoring the decision line's first label token among the decision labels alone where asked
(``choice_mask``). :class:`so8t.model.trainer.SO8TTrainer` normalises the sum over the label tokens
of the accumulation window.
"""

from __future__ import annotations

import torch
from torch import nn

from so8t.inference.hf import output_logits
from so8t.schema import IGNORE_INDEX


def label_token_ce_sum(
    model: nn.Module,
    last_hidden: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    choice_mask: torch.Tensor | None = None,
    choice_ids: list[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed (optionally weighted) next-token cross-entropy over label positions only.

    Position ``t`` predicts ``labels[t + 1]``; positions whose next label is
    ``-100`` are skipped before the LM head. Where ``choice_mask`` is set, the softmax runs over
    the ``choice_ids`` columns of the logits alone (a cross-entropy among the decision labels'
    first tokens: it moves the labels against each other, never against the rest of the
    vocabulary); everywhere else over the whole vocabulary.

    Args:
        last_hidden: ``(B, T, D)`` final hidden states.
        labels: ``(B, T)`` long, ``-100`` where no loss is taken.
        weights: ``(B, T)`` float weight of each token's loss (``None``: all 1).
        choice_mask: ``(B, T)`` bool, true at the label tokens scored among ``choice_ids`` only.
        choice_ids: token ids of the choices (each masked label must be one of them).

    Returns:
        (sum of ``weight * CE`` in nats as a float32 scalar tensor, number of label tokens).

    Raises:
        ValueError: a masked label that is not in ``choice_ids``.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return last_hidden.sum() * 0.0, 0
    logits = output_logits(model, last_hidden[:, :-1][keep])
    kept = targets[keep]
    if choice_mask is not None and choice_ids and bool(choice_mask[:, 1:][keep].any()):
        chosen = choice_mask[:, 1:][keep].to(kept.device)
        ids = torch.as_tensor(choice_ids, device=kept.device)
        match = kept[chosen][:, None] == ids[None, :]
        if not bool(match.any(1).all()):
            raise ValueError(f"label_token_ce_sum: a choice label is not one of choice_ids {choice_ids}")
        ce = torch.empty(kept.shape, dtype=torch.float32, device=kept.device)
        ce[~chosen] = nn.functional.cross_entropy(logits[~chosen], kept[~chosen], reduction="none").float()
        ce[chosen] = nn.functional.cross_entropy(logits[chosen][:, ids], match.float().argmax(1), reduction="none").float()
    else:
        ce = nn.functional.cross_entropy(logits, kept, reduction="none")
    if weights is not None:
        ce = ce * weights[:, 1:][keep].to(ce.dtype)
    return ce.sum(), n
