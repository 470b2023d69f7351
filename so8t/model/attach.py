"""Attaching SO8T rotations to a Hugging Face causal LM, saving and loading them.

Placement: the rotation acts on the *input* of each chosen decoder layer's
attention output projection ``o_proj`` (the concatenated attention heads,
width ``num_heads * head_dim``)::

    o_proj(x)  ->  o_proj(x R)

It is attached with a forward pre-hook on the module found at the ``o_proj``
path, and the :class:`~so8t.rotation.SO8Rotation` is registered as that
module's child ``so8t_rotation``. Module names are kept, so:

* attached *after* PEFT wraps ``o_proj`` in a LoRA layer, the hook sits on the
  LoRA wrapper and both the frozen base weight and the LoRA branch see the
  rotated input: ``y = (x R)(W + s B A)^T``, which bakes exactly into
  ``W' = (W + s B A) R^T`` (:mod:`so8t.model.bake`);
* rotation parameters are saved on their own (:func:`save_rotations`) next to
  the PEFT adapter and restored onto the same paths by :func:`load_rotations`.

Supported architectures are listed in :data:`O_PROJ_PATHS` (a table, not an
if-chain); anything else is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from so8t.io import write_safetensors
from so8t.model.rotation import BLOCK, Parameterization, SO8Rotation
from so8t.errors import So8tError

#: ``config.model_type`` -> path template of a decoder layer's attention output projection.
O_PROJ_PATHS: dict[str, str] = {
    "llama": "model.layers.{i}.self_attn.o_proj",
    "mistral": "model.layers.{i}.self_attn.o_proj",
    "qwen2": "model.layers.{i}.self_attn.o_proj",
    "qwen3": "model.layers.{i}.self_attn.o_proj",
    "phi3": "model.layers.{i}.self_attn.o_proj",
    "gemma": "model.layers.{i}.self_attn.o_proj",
    "gemma2": "model.layers.{i}.self_attn.o_proj",
    "gemma3_text": "model.layers.{i}.self_attn.o_proj",
    "gemma3": "model.language_model.layers.{i}.self_attn.o_proj",
}

ROTATION_ATTR = "so8t_rotation"
ROTATIONS_FILE = "so8t_rotations.safetensors"
_FORMAT = "so8t-rotations-v1"


class SO8TError(So8tError, ValueError):
    """Unsupported model, bad width or inconsistent rotation state."""


def host_model(model: nn.Module) -> nn.Module:
    """The Hugging Face ``PreTrainedModel`` inside a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _model_type(model: nn.Module) -> str:
    config = getattr(host_model(model), "config", None)
    if config is None:
        raise SO8TError(f"{type(model).__name__} has no Hugging Face config; cannot locate o_proj")
    return config.model_type


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers of a (possibly PEFT-wrapped) HF causal LM."""
    return host_model(model).config.get_text_config().num_hidden_layers


def o_proj_path(model: nn.Module, layer: int) -> str:
    """Module path of layer ``layer``'s ``o_proj`` inside the HF host model.

    Raises:
        SO8TError: for an architecture not in :data:`O_PROJ_PATHS`.
    """
    model_type = _model_type(model)
    try:
        template = O_PROJ_PATHS[model_type]
    except KeyError:
        raise SO8TError(
            f"SO8T does not support model_type {model_type!r} ({type(host_model(model)).__name__}): "
            f"no attention o_proj path is known. Supported: {sorted(O_PROJ_PATHS)}"
        ) from None
    return template.format(i=layer)


def _o_proj_width(module: nn.Module, path: str) -> int:
    width = getattr(module, "in_features", None)
    if width is None:
        base = getattr(module, "base_layer", None)
        width = getattr(base, "in_features", None)
    if not isinstance(width, int):
        raise SO8TError(f"{path}: {type(module).__name__} has no in_features; expected a Linear o_proj")
    if width % BLOCK != 0:
        raise SO8TError(f"{path}: input width {width} is not divisible by {BLOCK}; SO8T needs d % 8 == 0")
    return width


def _resolve_layers(model: nn.Module, layer_indices: list[int] | None) -> list[int]:
    n = num_layers(model)
    if layer_indices is None:
        return list(range(n))
    bad = [i for i in layer_indices if not 0 <= i < n]
    if bad:
        raise SO8TError(f"train.so8t.layer_indices: {bad} out of range for a model with {n} layers (0..{n - 1})")
    return sorted(set(layer_indices))


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    rotation: SO8Rotation = getattr(module, ROTATION_ATTR)
    return (rotation(args[0]), *args[1:])


def attach_rotations(
    model: nn.Module,
    layer_indices: list[int] | None = None,
    init_scale: float = 0.0,
    parameterization: Parameterization = "expm",
    generators: dict[int, torch.Tensor] | None = None,
) -> dict[int, SO8Rotation]:
    """Attach a trainable :class:`SO8Rotation` to the input of ``o_proj`` in each chosen layer.

    Call it after ``peft.get_peft_model`` when LoRA targets ``o_proj`` (PEFT freezes
    parameters it does not own; rotations attached later stay trainable).

    Args:
        model: a Hugging Face causal LM, optionally PEFT-wrapped.
        layer_indices: decoder layers to rotate; ``None`` = all.
        init_scale: std of the generator entries (0 = identity).
        parameterization: ``"expm"`` or ``"cayley"``.
        generators: optional ``{layer: (d/8, 28) tensor}`` initial values.

    Returns:
        ``{layer index: rotation module}``.

    Raises:
        SO8TError: unsupported architecture, width not divisible by 8, bad layer
            index, or a layer that already has a rotation.
    """
    rotations: dict[int, SO8Rotation] = {}
    host = host_model(model)
    for i in _resolve_layers(model, layer_indices):
        path = o_proj_path(model, i)
        module = host.get_submodule(path)
        if hasattr(module, ROTATION_ATTR):
            raise SO8TError(f"{path}: an SO8T rotation is already attached")
        width = _o_proj_width(module, path)
        ref = next(module.parameters())
        gen = None if generators is None else generators[i]
        rot = SO8Rotation(width, init_scale=init_scale, parameterization=parameterization, generator=gen)
        rot.to(device=ref.device)
        module.add_module(ROTATION_ATTR, rot)
        rot._hook_handle = module.register_forward_pre_hook(_pre_hook)  # type: ignore[attr-defined]
        rotations[i] = rot
    return rotations


def attached_rotations(model: nn.Module) -> dict[int, SO8Rotation]:
    """``{layer index: rotation}`` currently attached to ``model`` (empty if none)."""
    host = host_model(model)
    found: dict[int, SO8Rotation] = {}
    model_type = _model_type(model)
    if model_type not in O_PROJ_PATHS:
        return found
    for i in range(num_layers(model)):
        module = host.get_submodule(o_proj_path(model, i))
        rot = getattr(module, ROTATION_ATTR, None)
        if rot is not None:
            found[i] = rot
    return found


def detach_rotations(model: nn.Module) -> dict[int, SO8Rotation]:
    """Remove every attached rotation (hook and child module); returns what was removed."""
    host = host_model(model)
    removed = attached_rotations(model)
    for i, rot in removed.items():
        module = host.get_submodule(o_proj_path(model, i))
        rot._hook_handle.remove()  # type: ignore[attr-defined]
        delattr(module, ROTATION_ATTR)
    return removed


def gather_generators(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{layer: (d/8, 28) float32 CPU tensor}`` of the attached rotations, whole.

    Under FSDP2 each generator is sharded across ranks; this gathers them
    (:meth:`SO8Rotation.full_generator`, a collective), so every rank must call it, in the
    same order. Unsharded models return the parameters' values.
    """
    with torch.no_grad():
        return {i: r.full_generator().detach().cpu().contiguous() for i, r in attached_rotations(model).items()}


def set_generators(model: nn.Module, generators: dict[int, torch.Tensor]) -> None:
    """Copy whole ``(d/8, 28)`` generators into the attached rotations, in place.

    A sharded (FSDP2 ``DTensor``) generator takes its own shard of the value
    (``torch.distributed.tensor.distribute_tensor`` over the parameter's mesh and placements).

    Raises:
        SO8TError: when a rotated layer has no value in ``generators``.
    """
    rotations = attached_rotations(model)
    missing = sorted(set(rotations) - set(generators))
    if missing:
        raise SO8TError(f"set_generators: no generator for rotated layers {missing}")
    with torch.no_grad():
        for i, rot in rotations.items():
            param = rot.generator
            value = generators[i].to(dtype=param.dtype)
            mesh = getattr(param, "device_mesh", None)
            if mesh is not None:
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(mesh.device_type), mesh, param.placements)
            param.copy_(value)


def save_rotations(model: nn.Module, path: str | Path, generators: dict[int, torch.Tensor] | None = None) -> Path:
    """Write the attached rotations' generators to a safetensors file, atomically.

    The file maps ``layers.{i}.generator`` to ``(d/8, 28)`` float32 tensors; its
    metadata records the format, parameterisation and layer list.

    Args:
        generators: the values to write, from :func:`gather_generators` (default: gathered
            here). A sharded (FSDP2) model gathers on every rank and writes on one, so it
            passes what every rank gathered.

    Raises:
        SO8TError: when no rotation is attached.
    """
    rotations = attached_rotations(model)
    if not rotations:
        raise SO8TError("save_rotations: the model has no SO8T rotations attached")
    kinds = {r.parameterization for r in rotations.values()}
    if len(kinds) != 1:
        raise SO8TError(f"save_rotations: mixed parameterisations {sorted(kinds)}")
    generators = gather_generators(model) if generators is None else generators
    tensors = {f"layers.{i}.generator": generators[i].detach().cpu().float().contiguous() for i in rotations}
    metadata = {
        "format": _FORMAT,
        "parameterization": kinds.pop(),
        "layer_indices": json.dumps(sorted(rotations)),
        "model_type": _model_type(model),
    }
    path = Path(path)
    write_safetensors(path, tensors, metadata)
    return path


def read_rotations(path: str | Path) -> tuple[dict[int, torch.Tensor], Parameterization]:
    """Read a rotations file: ``({layer: generator}, parameterization)``.

    Raises:
        SO8TError: missing file or unknown format.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SO8TError(f"{path}: rotations file not found")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise SO8TError(f"{path}: not an SO8T rotations file (format {meta.get('format')!r}, expected {_FORMAT!r})")
    tensors = load_file(str(path))
    generators = {int(k.split(".")[1]): v for k, v in tensors.items()}
    return generators, meta["parameterization"]  # type: ignore[return-value]


def load_rotations(model: nn.Module, path: str | Path) -> dict[int, SO8Rotation]:
    """Attach the rotations stored in ``path`` to ``model`` (same layers, same values)."""
    generators, parameterization = read_rotations(path)
    return attach_rotations(
        model, layer_indices=sorted(generators), parameterization=parameterization, generators=generators
    )
