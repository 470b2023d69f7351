import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t.model.attach import attach_rotations
from so8t.model.pet import PETSchedule, pet_penalty
from so8t.model.train import label_token_ce_sum, output_logits
from tiny import TINY_CONFIGS, tiny_batch, tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_label_only_ce_equals_model_loss(arch):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=2, target_modules=["o_proj"]))
    attach_rotations(model, init_scale=0.3)
    ids, mask = tiny_batch(batch=3, length=10)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100  # padding
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    ce_sum, n = label_token_ce_sum(model, out.hidden_states[-1], labels)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(ce_sum / n, ref, atol=1e-5)


def test_output_logits_apply_softcapping():
    model = tiny_model("gemma3_text")
    model.config.final_logit_softcapping = 2.0
    ids, mask = tiny_batch()
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(output_logits(model, out.hidden_states[-1]), full, atol=1e-5)
    assert full.abs().max() <= 2.0


def test_pet_on_model_hidden_states_ignores_padding():
    model = tiny_model("llama")
    ids, mask = tiny_batch()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = out.hidden_states[-1]
    value = pet_penalty(h, mask)
    # recompute row by row on the valid prefix only
    per_row = [(h[b, : int(mask[b].sum())]) for b in range(h.shape[0])]
    sq = torch.cat([(r[2:] - 2 * r[1:-1] + r[:-2]).pow(2).sum(-1) for r in per_row])
    assert torch.allclose(value, sq.mean(), rtol=1e-5)
    assert PETSchedule()(0.5) == 0.05
