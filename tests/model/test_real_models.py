"""Issue 16: what a real 3-8B base model on a CUDA GPU needs, checked on tiny random configs on CPU."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t.errors import So8tError
from so8t.model.attach import attach_rotations
from so8t.model.rotation import SO8Rotation, random_generator
from so8t.model.build import LORA_TARGETS, TargetModulesError, adapted_modules, lora_targets, resolve_precision
from so8t.model.preflight import gpu_memory_estimate
from tiny import TINY_CONFIGS, tiny_batch, tiny_model

GiB = 2**30


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_default_targets_adapt_every_attention_projection(arch):
    model = tiny_model(arch)
    targets = lora_targets(model, None)
    assert targets == LORA_TARGETS[model.config.model_type]
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    adapted = adapted_modules(peft_model)
    assert adapted == sorted(targets)
    # Every layer's attention input projection(s) and o_proj carry LoRA weights.
    n_layers = model.config.num_hidden_layers
    n_lora_a = sum(1 for name, _ in peft_model.named_parameters() if name.endswith("lora_A.default.weight"))
    assert n_lora_a == n_layers * len(targets)


def test_phi3_split_projection_names_are_refused_with_the_fused_names():
    model = tiny_model("phi3")
    with pytest.raises(TargetModulesError, match=r"\['q_proj', 'k_proj', 'v_proj'\].*qkv_proj"):
        lora_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"])


def test_all_linear_is_passed_to_peft():
    model = tiny_model("phi3")
    targets = lora_targets(model, "all-linear")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert set(adapted_modules(peft_model)) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_unknown_architecture_without_targets_is_an_error():
    model = tiny_model("llama")
    model.config.model_type = "falcon_mamba"
    with pytest.raises(TargetModulesError, match="no default for model_type 'falcon_mamba'"):
        lora_targets(model, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU resolution")
def test_precision_auto_is_fp32_on_cpu_and_half_precision_needs_cuda():
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("fp32") == "fp32"
    for half in ("bf16", "fp16"):
        with pytest.raises(So8tError, match=f"train.precision: {half} needs a CUDA device"):
            resolve_precision(half)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_auto_is_half_precision_on_cuda():
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def _phi35(precision, quantization, batch=1, checkpointing=True):
    # Phi-3.5-mini: 3.82e9 parameters, hidden 3072, 32 layers, vocabulary 32064.
    return gpu_memory_estimate(
        n_params=3_821_079_552, n_trainable=2 * 4 * 16 * 3072 * 32, precision=precision,
        quantization=quantization, batch=batch, seq_len=448, hidden=3072, layers=32, vocab=32064,
        checkpointing=checkpointing,
    )


def test_gpu_estimate_parts_and_orders_of_magnitude():
    qlora = _phi35("bf16", "4bit")
    assert qlora["total"] == sum(v for k, v in qlora.items() if k != "total")
    assert qlora["weights"] == int(3_821_079_552 * 0.56)
    # QLoRA 4-bit with checkpointing fits a 12 GB card; fp32 without checkpointing does not fit 24 GB.
    assert qlora["total"] < 12 * GiB
    assert _phi35("fp32", "none", batch=4, checkpointing=False)["total"] > 24 * GiB
    # Checkpointing, quantisation and batch each move the estimate the right way.
    assert _phi35("bf16", "none", checkpointing=False)["activations"] > _phi35("bf16", "none")["activations"]
    assert _phi35("bf16", "8bit")["weights"] < _phi35("bf16", "none")["weights"]
    assert _phi35("bf16", "4bit", batch=4)["total"] > qlora["total"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotation_stays_orthogonal_in_half_precision_over_many_steps(dtype):
    """Blocks are computed in float64 from a float32 generator and cast once per forward, so the
    rotation applied in half precision is the exact rotation rounded once (no drift accumulates)."""
    g = torch.Generator().manual_seed(0)
    rot = SO8Rotation(64)
    with torch.no_grad():
        rot.generator.copy_(random_generator(rot.num_blocks, max_angle=0.5, generator=g))
    opt = torch.optim.AdamW(rot.parameters(), lr=1e-2)
    x = torch.randn(16, 64, generator=g)
    for _ in range(200):
        opt.zero_grad()
        rot(x.to(dtype)).float().pow(3).mean().backward()
        opt.step()
    assert rot.generator.dtype == torch.float32
    r64 = rot.matrix(torch.float64)
    # The float64 rotation is orthogonal to float64 rounding after 200 half-precision steps.
    assert (r64.T @ r64 - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-12
    # What the half-precision forward applies is that rotation rounded once: norms kept to dtype eps.
    y = rot(x.to(dtype)).double()
    eps = torch.finfo(dtype).eps
    rel = ((y.norm(dim=-1) - x.to(dtype).double().norm(dim=-1)).abs() / x.norm(dim=-1).double()).max()
    assert rel < 8 * eps


def test_rotations_attach_to_fused_phi3_attention():
    model = tiny_model("phi3")
    rots = attach_rotations(model)
    assert len(rots) == model.config.num_hidden_layers
    ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
