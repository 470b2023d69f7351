"""Attaching SO8T rotations to a Hugging Face causal LM, saving and loading them.

Placement: the rotation acts on the *input* of each chosen decoder layer's
attention output projection ``o_proj`` (the concatenated attention heads,
width ``num_heads * head_dim``)::

    o_proj(x)  ->  o_proj(x R)

It is attached with a forward pre-hook on the module found at the ``o_proj``
path, and the :class:`~so8t.model.rotation.SO8Rotation` is registered as that
module's child ``so8t_rotation``. Module names are kept, so:

* attached *after* PEFT wraps ``o_proj`` in a LoRA layer, the hook sits on the
  LoRA wrapper and both the frozen base weight and the LoRA branch see the
  rotated input: ``y = (x R)(W + s B A)^T``, which bakes exactly into
  ``W' = (W + s B A) R^T`` (:mod:`so8t.model.bake`);
* rotation parameters are saved on their own (:func:`save_rotations`) next to
  the PEFT adapter and restored onto the same paths by :func:`load_rotations`.

Supported architectures are listed in :data:`O_PROJ_PATHS` (a table, not an
if-chain); anything else is a clear error.

Computational invariance (:func:`make_invariant`, the fixed ``*_invariant`` rotations of the
ablation): a forward hook on the same layer's ``v_proj`` multiplies its output by ``R_g^T``,
per key/value head ``g``, so each attention head's output arrives at ``o_proj`` as
``x_h R_g^T`` and leaves the rotation as ``x_h R_g^T R_g = x_h``: the model computes the same
function, and bake folds the inverse into ``v_proj``'s rows (``W_v' = R_v W_v``) as well as
``R`` into ``o_proj``'s columns. This is QuaRot's value/output rotation (Ashkboos et al. 2024,
sec. 4, "R2"; SpinQuant's ``R_2``, Liu et al. 2024): attention is linear in ``V`` per head, so a
rotation within a head's ``head_dim`` commutes with the softmax weights. It needs the blocks of
the query heads that share a key/value head (GQA) to be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from so8t.errors import So8tError
from so8t.io import write_safetensors
from so8t.model.rotation import BLOCK, Parameterization, SO8Rotation

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

#: ``config.model_type`` -> path template of a decoder layer's value projection (for
#: :func:`make_invariant`). Phi-3 fuses it into ``qkv_proj`` and is not listed.
V_PROJ_PATHS: dict[str, str] = {k: v.replace(".o_proj", ".v_proj") for k, v in O_PROJ_PATHS.items() if k != "phi3"}

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
    """Remove every attached rotation (hook and child module, and the ``v_proj`` hook of an
    invariant one); returns what was removed."""
    host = host_model(model)
    removed = attached_rotations(model)
    for i, rot in removed.items():
        module = host.get_submodule(o_proj_path(model, i))
        rot._hook_handle.remove()  # type: ignore[attr-defined]
        inverse = getattr(rot, "_inverse_handle", None)
        if inverse is not None:
            inverse.remove()
            rot._inverse_handle = None  # type: ignore[attr-defined]
        delattr(module, ROTATION_ATTR)
    return removed


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of the text config.

    ``head_dim`` is the config's own when it has one (Gemma 3: 256 with hidden 640), else
    ``hidden_size // num_attention_heads``.
    """
    config = host_model(model).config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def v_proj_path(model: nn.Module, layer: int) -> str:
    """Module path of layer ``layer``'s ``v_proj`` inside the HF host model.

    Raises:
        SO8TError: for an architecture not in :data:`V_PROJ_PATHS` (e.g. Phi-3's fused ``qkv_proj``).
    """
    model_type = _model_type(model)
    try:
        return V_PROJ_PATHS[model_type].format(i=layer)
    except KeyError:
        raise SO8TError(
            f"invariant rotations need a separate v_proj; model_type {model_type!r} has none known "
            f"(supported: {sorted(V_PROJ_PATHS)})"
        ) from None


def kv_blocks(blocks: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """The blocks of each key/value head's first query head: ``(H*b, 8, 8)`` -> ``(H_kv*b, 8, 8)``.

    ``b = head_dim / 8`` blocks per head. Query head ``h`` reads key/value head ``h // (H / H_kv)``
    (Hugging Face's ``repeat_kv``), so ``(H*b, ...)`` views as ``(H_kv, H/H_kv, b, ...)`` and the
    first of each group is taken.
    """
    per_head = blocks.shape[0] // heads
    grouped = blocks.reshape(kv_heads, heads // kv_heads, per_head, *blocks.shape[1:])
    return grouped[:, 0].reshape(kv_heads * per_head, *blocks.shape[1:])


def tile_kv_generator(generator: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Repeat a ``(H_kv*b, 28)`` generator for the query heads of each key/value head: ``(H*b, 28)``.

    The inverse of :func:`kv_blocks` on a rotation whose grouped heads are equal.
    """
    per_head = generator.shape[0] // kv_heads
    grouped = generator.reshape(kv_heads, 1, per_head, generator.shape[-1])
    return grouped.expand(kv_heads, heads // kv_heads, per_head, generator.shape[-1]).reshape(-1, generator.shape[-1])


def _inverse_hook(rotation: SO8Rotation, heads: int, kv_heads: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        r = rotation.blocks(torch.float64 if output.dtype == torch.float64 else torch.float32).to(output.dtype)
        r = kv_blocks(r, heads, kv_heads)
        vb = output.reshape(*output.shape[:-1], r.shape[0], BLOCK)
        # v'_b = v_b R_b^T: (v'_b)_i = sum_j (v_b)_j (R_b)_ij.
        return torch.einsum("...bj,bij->...bi", vb, r).reshape(output.shape)

    return hook


def invariant_geometry(model: nn.Module) -> tuple[int, int, int]:
    """:func:`attention_geometry`, checked for :func:`make_invariant` on every rotated layer.

    Raises:
        SO8TError: as listed under :func:`make_invariant` (all but the last two).
    """
    rotations = attached_rotations(model)
    if not rotations:
        raise SO8TError("make_invariant: the model has no SO8T rotations attached")
    host = host_model(model)
    heads, kv_heads, head_dim = attention_geometry(model)
    if head_dim % BLOCK:
        raise SO8TError(f"make_invariant: head_dim {head_dim} is not divisible by {BLOCK}; a block would straddle two heads")
    if heads % kv_heads:
        raise SO8TError(f"make_invariant: {heads} attention heads do not split into {kv_heads} key/value groups")
    for i, rot in sorted(rotations.items()):
        path = v_proj_path(model, i)
        v_proj = host.get_submodule(path)
        attention = host.get_submodule(path.rsplit(".", 1)[0])
        if getattr(attention, "v_norm", None) is not None:
            raise SO8TError(f"{path}: a v_norm follows v_proj; a rotation of its output would not commute with it")
        width = getattr(v_proj, "out_features", None) or getattr(getattr(v_proj, "base_layer", None), "out_features", None)
        if rot.width != heads * head_dim or width != kv_heads * head_dim:
            raise SO8TError(f"{path}: o_proj input {rot.width} and v_proj output {width} do not match "
                            f"{heads} heads / {kv_heads} key/value heads of {head_dim}")
    return heads, kv_heads, head_dim


def make_invariant(model: nn.Module) -> list[int]:
    """Fold each attached rotation's inverse into its layer's ``v_proj`` output (see the module doc).

    After this the rotated model computes the unrotated one's function exactly (up to float
    rounding); :func:`so8t.model.bake.bake_model` then folds ``R_v = blockdiag_g(R_g)`` into
    ``v_proj`` (``W_v' = R_v W_v``, ``b_v' = b_v R_v^T``) next to ``W_o' = W_o R^T``. Call it after
    the rotations are set (:func:`set_generators`): the hook reads them live, so a later change
    keeps the two in step, but only rotations whose grouped heads are equal are invariant.

    Returns:
        The layers made invariant.

    Raises:
        SO8TError: no rotation attached; an architecture without a separate ``v_proj`` or with a
            ``v_norm`` between ``v_proj`` and attention (Gemma 3n); a ``head_dim`` not divisible by 8;
            widths that do not match the heads; a layer already invariant; or blocks that differ
            between the query heads of one key/value head (a rotation not made with
            :func:`tile_kv_generator`), naming the layer.
    """
    rotations = attached_rotations(model)
    heads, kv_heads, _ = invariant_geometry(model)
    host = host_model(model)
    for i, rot in sorted(rotations.items()):
        v_proj = host.get_submodule(path := v_proj_path(model, i))
        if getattr(rot, "_inverse_handle", None) is not None:
            raise SO8TError(f"{path}: layer {i}'s rotation is already invariant")
        g = rot.full_generator().detach()
        if not torch.equal(tile_kv_generator(kv_blocks(g, heads, kv_heads), heads, kv_heads), g):
            raise SO8TError(f"layer {i}: the query heads sharing a key/value head have different rotation blocks; "
                            "an invariant rotation needs one rotation per key/value head (tile_kv_generator)")
        rot._inverse_handle = v_proj.register_forward_hook(_inverse_hook(rot, heads, kv_heads))  # type: ignore[attr-defined]
    return sorted(rotations)


def is_invariant(model: nn.Module) -> bool:
    """Whether the attached rotations have their inverse folded into ``v_proj`` (:func:`make_invariant`).

    Raises:
        SO8TError: some are and some are not.
    """
    flags = {getattr(r, "_inverse_handle", None) is not None for r in attached_rotations(model).values()}
    if len(flags) > 1:
        raise SO8TError("some attached rotations are invariant (inverse in v_proj) and some are not")
    return flags == {True}


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
    metadata records the format, parameterisation, layer list and whether the rotations are
    invariant (:func:`make_invariant`; :func:`load_rotations` restores that too).

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
    if is_invariant(model):  # absent = not invariant (files from before the flag, and every learned rotation)
        metadata["invariant"] = "true"
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


def rotations_invariant(path: str | Path) -> bool:
    """Whether the rotations file at ``path`` was saved from an invariant model (:func:`make_invariant`).

    Files written before the flag existed have none and are not invariant.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("invariant", "false"))


def load_rotations(model: nn.Module, path: str | Path) -> dict[int, SO8Rotation]:
    """Attach the rotations stored in ``path`` to ``model`` (same layers, same values, and the
    ``v_proj`` inverse when they were saved invariant)."""
    generators, parameterization = read_rotations(path)
    rotations = attach_rotations(
        model, layer_indices=sorted(generators), parameterization=parameterization, generators=generators
    )
    if rotations_invariant(path):
        make_invariant(model)
    return rotations
