import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import TINY_CONFIGS, tiny_batch, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from so8t.model.attach import (
    SO8TError,
    attach_rotations,
    attached_rotations,
    gather_generators,
    load_rotations,
    save_rotations,
    set_generators,
)
from so8t.model.bake import BakeError, bake_model, compare_logits, model_logits
from so8t.model.rotation import random_generator


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


def test_set_generators_copies_gathered_values_and_names_missing_layers():
    source = tiny_model("llama")
    _far_rotations(source, seed=3)
    values = gather_generators(source)
    target = tiny_model("llama")
    attach_rotations(target)
    set_generators(target, values)
    assert all(torch.equal(g, values[i]) for i, g in gather_generators(target).items())
    with pytest.raises(SO8TError, match=r"no generator for rotated layers \[1\]"):
        set_generators(target, {0: values[0]})


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


def _adapter(tmp_path, arch: str = "llama"):
    """A tiny base folder and an adapter folder with non-zero LoRA and rotations on every layer."""
    from tiny import tiny_base_dir

    from so8t.model.attach import ROTATIONS_FILE, save_rotations
    from so8t.inference.hf import load_causal_lm

    base = tiny_base_dir(tmp_path / "base", arch)
    torch.manual_seed(3)
    model = get_peft_model(
        load_causal_lm(base, torch.float32),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    attach_rotations(model, init_scale=0.3)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    save_rotations(model, adapter / ROTATIONS_FILE)
    return base, adapter, model


def test_bake_adapter_verifies_saved_files_in_float32_and_the_fold_in_float64(tmp_path):
    from so8t.model.bake import bake_adapter, final_hidden
    from so8t.inference.hf import load_causal_lm, output_logits

    base, adapter, trained = _adapter(tmp_path)
    rows = [[5, 9, 17, 33, 8, 21, 40], [7, 7, 12, 3, 60, 44, 18, 29, 11]]
    expected = model_logits(trained.eval(), torch.tensor([rows[1]]), torch.ones(1, 9, dtype=torch.long))
    report = bake_adapter(base, adapter, tmp_path / "baked", rows, 1e-6, "float64", 1e-4, 2)
    assert report["rotations_folded"] == 2 and report["positions"] == 16
    assert report["max_abs_diff"] < 1e-5 and report["kl"] < 1e-9
    assert list(report["spot_check"]["layers"]) == ["0", "1"] and report["spot_check"]["max_abs_diff"] < 1e-6
    baked = load_causal_lm(tmp_path / "baked", torch.float32)
    got = model_logits(baked, torch.tensor([rows[1]]), torch.ones(1, 9, dtype=torch.long))
    assert compare_logits(expected, got).max_abs_diff < 1e-5
    # final_hidden keeps D floats per position and reproduces the model's own logits through the head
    (h,) = final_hidden(baked, [rows[1]])
    assert h.shape == (9, baked.config.hidden_size)
    torch.testing.assert_close(output_logits(baked, h), got[0], rtol=0, atol=1e-5)


def test_bake_adapter_spot_check_catches_a_wrong_fold_and_writes_nothing(tmp_path, monkeypatch):
    from so8t.model import bake

    base, adapter, _ = _adapter(tmp_path)

    def wrong(linear, rotation):  # W R instead of W R^T
        with torch.no_grad():
            linear.weight.copy_((linear.weight.double() @ rotation.double()).float())

    monkeypatch.setattr(bake, "fold_rotation_", wrong)
    with pytest.raises(BakeError, match=r"o_proj of layer\(s\) \['0', '1'\]"):
        bake.bake_adapter(base, adapter, tmp_path / "baked", [[5, 9, 17, 33]], 1e-6, "float64", 1e9, 3)
    assert not (tmp_path / "baked").exists()
    assert not list(tmp_path.glob(".baked.*"))


def test_spot_layers_spread_over_the_rotated_layers():
    from so8t.model.bake import spot_layers

    model = tiny_model("llama")
    assert spot_layers(model, [0, 3, 5, 9, 12], 3) == [0, 5, 12]
    assert spot_layers(model, [4, 7], 3) == [4, 7]
    assert spot_layers(model, [], 1) == [0]


def _invariant(model, kind="random", seed=0):
    """Attach rotations with one Haar (or Hadamard) set of blocks per key/value head and make them invariant."""
    from so8t.model.attach import attention_geometry, make_invariant, tile_kv_generator
    from so8t.model.rotation import fixed_generator

    rots = attach_rotations(model)
    heads, kv_heads, _ = attention_geometry(model)
    g = torch.Generator().manual_seed(seed)
    set_generators(model, {i: tile_kv_generator(fixed_generator(kind, r.num_blocks * kv_heads // heads, g), heads, kv_heads)
                           for i, r in rots.items()})
    assert make_invariant(model) == sorted(rots)
    return rots


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
def test_an_invariant_rotation_keeps_the_function_and_bakes_into_v_proj_and_o_proj(arch):
    """QuaRot's computational invariance: R^T per key/value head after v_proj cancels R before o_proj."""
    from so8t.model.attach import is_invariant, o_proj_path, v_proj_path

    ids, mask = tiny_batch()
    plain = tiny_model(arch)
    ref = model_logits(plain, ids, mask)
    model = tiny_model(arch)
    rots = _invariant(model)
    assert all(r.max_angle() > 1.0 for r in rots.values())  # far from identity, yet:
    assert is_invariant(model)
    assert compare_logits(ref, model_logits(model, ids, mask)).max_abs_diff < 1e-5
    baked = bake_model(model)
    assert compare_logits(ref, model_logits(baked, ids, mask)).max_abs_diff < 1e-5
    # ... and the weights that are quantised did change: o_proj's columns and v_proj's rows are mixed.
    for path in (o_proj_path(baked, 0), v_proj_path(baked, 0)):
        w, w0 = baked.get_submodule(path).weight, plain.get_submodule(path).weight
        assert (w - w0).abs().max() > 1e-2
        torch.testing.assert_close(torch.linalg.matrix_norm(w), torch.linalg.matrix_norm(w0))  # rotated, not scaled
    if arch == "qwen2":  # v_proj's bias is rotated with its output
        b, b0 = baked.get_submodule(v_proj_path(baked, 0)).bias, plain.get_submodule(v_proj_path(baked, 0)).bias
        assert (b - b0).abs().max() > 1e-3 and torch.allclose(b.norm(), b0.norm())


def test_an_invariant_rotation_with_lora_bakes_exactly_and_survives_save_and_load(tmp_path):
    from so8t.model.attach import is_invariant, rotations_invariant

    model = _lora(tiny_model("gemma3_text"))
    _invariant(model, "hadamard")
    ids, mask = tiny_batch()
    ref = model_logits(model, ids, mask)
    assert compare_logits(ref, model_logits(tiny_model("gemma3_text"), ids, mask)).max_abs_diff > 1e-2  # LoRA acts
    save_rotations(model, tmp_path / "rot.safetensors")
    assert rotations_invariant(tmp_path / "rot.safetensors")
    other = _lora(tiny_model("gemma3_text"))
    load_rotations(other, tmp_path / "rot.safetensors")
    assert is_invariant(other)
    assert compare_logits(ref, model_logits(other, ids, mask)).max_abs_diff < 1e-6
    diff = compare_logits(ref, model_logits(bake_model(other), ids, mask))
    assert diff.max_abs_diff < 1e-5 and diff.kl < 1e-9
    plain = _lora(tiny_model("gemma3_text"))
    attach_rotations(plain)
    save_rotations(plain, tmp_path / "plain.safetensors")
    assert not rotations_invariant(tmp_path / "plain.safetensors")


def test_make_invariant_refuses_what_it_cannot_keep_invariant():
    from so8t.model.attach import detach_rotations, make_invariant

    with pytest.raises(SO8TError, match="no SO8T rotations attached"):
        make_invariant(tiny_model("llama"))
    model = tiny_model("gemma3_text")  # 4 query heads read one key/value head
    _far_rotations(model)  # independent blocks per query head
    with pytest.raises(SO8TError, match="layer 0: the query heads sharing a key/value head"):
        make_invariant(model)
    model = tiny_model("llama")
    _invariant(model)
    with pytest.raises(SO8TError, match="already invariant"):
        make_invariant(model)
    detach_rotations(model)
    assert not any(m._forward_hooks for m in model.modules())  # the v_proj hooks went with the rotations
    phi = tiny_model("phi3")
    attach_rotations(phi)
    with pytest.raises(SO8TError, match="invariant rotations need a separate v_proj; model_type 'phi3'"):
        make_invariant(phi)


def test_bake_adapter_folds_an_invariant_rotation_from_its_saved_files(tmp_path):
    from tiny import tiny_base_dir

    from so8t.model.attach import ROTATIONS_FILE
    from so8t.model.bake import bake_adapter
    from so8t.inference.hf import load_causal_lm

    base = tiny_base_dir(tmp_path / "base", "gemma3_text")
    model = _lora(load_causal_lm(base, torch.float32))
    _invariant(model)
    model.save_pretrained(tmp_path / "adapter")
    save_rotations(model, tmp_path / "adapter" / ROTATIONS_FILE)
    rows = [[5, 9, 17, 33, 8, 21, 40]]
    expected = model_logits(model.eval(), torch.tensor(rows), torch.ones(1, 7, dtype=torch.long))
    report = bake_adapter(base, tmp_path / "adapter", tmp_path / "baked", rows, 1e-6, "float64", 1e-4, 2)
    assert report["rotations_folded"] == 2 and report["max_abs_diff"] < 1e-5
    got = model_logits(load_causal_lm(tmp_path / "baked", torch.float32), torch.tensor(rows), torch.ones(1, 7, dtype=torch.long))
    assert compare_logits(expected, got).max_abs_diff < 1e-5
