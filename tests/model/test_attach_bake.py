import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

from so8t.model.attach import (
    SO8TError,
    attach_rotations,
    attached_rotations,
    load_rotations,
    save_rotations,
)
from so8t.model.bake import BakeError, bake_model, compare_logits, model_logits
from so8t.model.rotation import random_generator
from tiny import TINY_CONFIGS, tiny_batch, tiny_model


def _lora(model, seed=0):
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B so the LoRA branch really contributes
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def _far_rotations(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    rots = attach_rotations(model)
    with torch.no_grad():
        for rot in rots.values():
            rot.generator.copy_(random_generator(rot.num_blocks, max_angle=3.0, generator=g))
    return rots


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_attach_then_bake_reproduces_logits(arch):
    base_cls = type(tiny_model(arch))
    base_config = tiny_model(arch).config.to_dict()
    model = _lora(tiny_model(arch))
    rots = _far_rotations(model)
    assert len(rots) == 2 and all(r.max_angle() > 1.4 for r in rots.values())
    ids, mask = tiny_batch()
    ref = model_logits(model, ids, mask)
    plain = tiny_model(arch)
    assert compare_logits(ref, model_logits(plain, ids, mask)).max_abs_diff > 1e-2  # rotations + LoRA matter

    baked = bake_model(model)
    diff = compare_logits(ref, model_logits(baked, ids, mask))
    assert diff.max_abs_diff < 1e-4, diff
    assert diff.kl < 1e-8
    assert type(baked) is base_cls
    assert baked.config.to_dict() == base_config
    assert not attached_rotations(baked)
    assert not any("lora" in n or "so8t" in n for n, _ in baked.named_parameters())


def test_rotation_is_applied_before_lora_and_fold_uses_transpose():
    """The wrong fold W R (instead of W R^T) must not reproduce the logits."""
    model = _lora(tiny_model("llama"))
    rots = _far_rotations(model)
    ids, mask = tiny_batch()
    ref = model_logits(model, ids, mask)
    r0 = rots[0].matrix(torch.float64)
    baked = bake_model(model)
    o = baked.model.layers[0].self_attn.o_proj
    with torch.no_grad():  # undo W R^T, apply W R instead
        o.weight.copy_((o.weight.double() @ r0 @ r0).float())
    assert compare_logits(ref, model_logits(baked, ids, mask)).max_abs_diff > 1e-3


def test_bake_twice_is_an_error():
    model = _lora(tiny_model("qwen2"))
    _far_rotations(model)
    baked = bake_model(model)
    with pytest.raises(BakeError, match="already baked"):
        bake_model(baked)


def test_bake_without_rotations_is_an_error_unless_allowed():
    with pytest.raises(BakeError, match="no SO8T rotations"):
        bake_model(_lora(tiny_model("llama")))
    merged = bake_model(_lora(tiny_model("llama")), require_rotations=False)
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_saved_then_loaded_rotations_reproduce(tmp_path):
    model = tiny_model("gemma3_text")
    rots = _far_rotations(model, seed=5)
    ids, mask = tiny_batch()
    ref = model_logits(model, ids, mask)
    path = save_rotations(model, tmp_path / "rot.safetensors")
    fresh = tiny_model("gemma3_text")
    loaded = load_rotations(fresh, path)
    assert sorted(loaded) == sorted(rots)
    for i in rots:
        assert torch.equal(loaded[i].generator, rots[i].generator)
        assert torch.equal(loaded[i].matrix(), rots[i].matrix())
    assert compare_logits(ref, model_logits(fresh, ids, mask)).max_abs_diff == 0.0


def test_layer_indices_select_layers_and_are_validated():
    model = tiny_model("mistral")
    assert sorted(attach_rotations(model, layer_indices=[1])) == [1]
    with pytest.raises(SO8TError, match="already attached"):
        attach_rotations(model, layer_indices=[1])
    with pytest.raises(SO8TError, match="layer_indices"):
        attach_rotations(tiny_model("mistral"), layer_indices=[7])


def test_unsupported_architecture_is_a_clear_error():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=64))
    with pytest.raises(SO8TError, match="gpt2"):
        attach_rotations(gpt2)


def test_width_not_divisible_by_8_names_module_and_width():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(60, 64, bias=False)
    with pytest.raises(SO8TError, match=r"model\.layers\.0\.self_attn\.o_proj: input width 60"):
        attach_rotations(model)


def test_rotations_stay_trainable_after_peft():
    model = _lora(tiny_model("llama"))
    rots = attach_rotations(model, init_scale=0.01)
    assert all(r.generator.requires_grad for r in rots.values())
    ids, mask = tiny_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert all(r.generator.grad.abs().sum() > 0 for r in rots.values())
