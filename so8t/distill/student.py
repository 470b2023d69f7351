"""The student of distillation (``distill.student``).

``lora``: the base with LoRA + SO8T rotations, exactly as ``train`` builds it
(:func:`so8t.model.build.build_model`), baked afterwards (:mod:`so8t.model.bake`).
``layer_subset``: the base with only some decoder layers kept (default every
other layer from 0, plus the last: its output is what the final norm and the LM
head were trained on, and in Gemma 3 it is a global-attention layer), every
weight trained but, with ``freeze_embeddings`` (default), the (tied)
embeddings; no SO8T.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from so8t.distill.teacher import DistillError


def default_keep_layers(n_layers: int) -> list[int]:
    """Every other decoder layer from 0, plus the last: ``[0, 2, ..., n - 1]``."""
    return sorted(set(range(0, n_layers, 2)) | {n_layers - 1})


def keep_decoder_layers(model: nn.Module, keep: list[int]) -> dict:
    """In place: keep only decoder layers ``keep`` (ascending) of a HF causal LM.

    Updates ``config.num_hidden_layers``, every per-layer list in the text config
    (a list with one entry per layer, e.g. Gemma 3's and Qwen 2's ``layer_types``)
    and each kept module's ``layer_idx`` (the KV-cache slot), so the model saves
    and reloads as an ordinary, shallower model of its architecture.

    Returns:
        ``{"layers_before", "layers_after", "kept", "per_layer_config_keys"}``.

    Raises:
        DistillError: indices out of range or repeated, or an unsupported architecture.
    """
    from so8t.model.attach import O_PROJ_PATHS

    config = model.config.get_text_config()
    n = config.num_hidden_layers
    keep = sorted(keep)
    if not keep or len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
        raise DistillError(f"distill.keep_layers: {keep} must be distinct indices in 0..{n - 1}")
    try:
        layers_path = O_PROJ_PATHS[model.config.model_type].split(".{i}.")[0]
    except KeyError:
        raise DistillError(
            f"layer_subset does not support model_type {model.config.model_type!r}; supported: {sorted(O_PROJ_PATHS)}"
        ) from None
    parent_path, attr = layers_path.rsplit(".", 1)
    old = model.get_submodule(layers_path)
    new = nn.ModuleList([old[i] for i in keep])
    for new_idx, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(model.get_submodule(parent_path), attr, new)
    per_layer = [
        key for key, value in vars(config).items()
        if isinstance(value, list | tuple) and len(value) == n and key != "architectures"
    ]
    for key in per_layer:
        setattr(config, key, [getattr(config, key)[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return {"layers_before": n, "layers_after": len(keep), "kept": keep, "per_layer_config_keys": per_layer}


#: llama.cpp's Gemma 3 loader does not read per-layer attention types from the GGUF: it assumes
#: layer ``i`` is global when ``i % 6 == 5`` and sliding-window otherwise (``set_swa_pattern(6)``
#: in llama.cpp's ``llama-model.cpp``; the converter writes only the window size).
LLAMA_CPP_GLOBAL_EVERY: dict[str, int] = {"gemma3": 6, "gemma3_text": 6}


def llama_cpp_attention_mismatch(config) -> list[int]:
    """Layers whose attention type (``config.layer_types``) llama.cpp would get wrong in GGUF.

    Only Gemma 3 is affected (:data:`LLAMA_CPP_GLOBAL_EVERY`): a layer subset that
    does not keep its global layers at indices ``5, 11, ...`` runs there with the
    other attention type. Outputs are still identical for contexts no longer than
    ``config.sliding_window`` tokens (a window that long masks nothing).

    Returns:
        Indices of the mismatched layers (empty when none or not applicable).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    every = LLAMA_CPP_GLOBAL_EVERY.get(getattr(text, "model_type", ""))
    types = getattr(text, "layer_types", None)
    if every is None or not types or not getattr(text, "sliding_window", None):
        return []
    return [
        i for i, t in enumerate(types)
        if (t == "full_attention") != (i % every == every - 1)
    ]


def build_student(base_dir: str | Path, params, seed: int) -> tuple[nn.Module, dict]:
    """The student of ``params.distill.student`` and a description of it.

    ``lora``: :func:`so8t.model.build.build_model` (LoRA + SO8T exactly as train).
    ``layer_subset``: the float32 base with :func:`keep_decoder_layers`; all
    weights trainable except, with ``freeze_embeddings``, the input and output
    embeddings.
    """
    from so8t.model.attach import num_layers
    from so8t.inference.hf import load_causal_lm
    from so8t.model.build import build_model, trainable_parameter_counts

    d = params.distill
    if d.student == "lora":
        model = build_model(base_dir, params.train, seed)
        info = {"student": "lora", "so8t": params.train.so8t.enabled, "layers": num_layers(model)}
    else:
        torch.manual_seed(seed)
        model = load_causal_lm(base_dir, torch.float32)
        n = num_layers(model)
        keep = d.keep_layers if d.keep_layers is not None else default_keep_layers(n)
        info = {"student": "layer_subset", "so8t": False} | keep_decoder_layers(model, keep)
        info["layers"] = info["layers_after"]
        mismatch = llama_cpp_attention_mismatch(model.config)
        if mismatch:
            text = model.config.get_text_config()
            info["llama_cpp_attention_mismatch"] = {
                "layers": mismatch,
                "global_every": LLAMA_CPP_GLOBAL_EVERY[text.model_type],
                "exact_up_to_tokens": text.sliding_window,
            }
        if d.freeze_embeddings:
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.weight.requires_grad_(False)
    info["trainable_parameters"] = trainable_parameter_counts(model)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info
