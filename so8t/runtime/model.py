"""The language model behind the agent: a backend of the inference layer plus its chat template.

:class:`ChatModel` is what the agent needs from a model: render a conversation
with the chat template the model was trained with, stream a greedy
continuation, and give the decision logits of a context. :class:`BackendChatModel`
implements it on :mod:`so8t.inference`, the same backends, greedy loop,
repetition penalty and label scoring (:func:`so8t.inference.scoring.score_labels`)
that the calibrate and evaluate stages run, so the calibrated temperature is
applied to exactly the numbers it was fitted on. A GGUF file runs in llama.cpp
with the chat template embedded in it by the quantize stage
(``tokenizer.chat_template``), rendered with Jinja2 as transformers'
``apply_chat_template`` does (llama-cpp-python's ``Jinja2ChatFormatter``:
sandboxed, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``); a Hugging Face
folder (e.g. ``models/baked``) uses its tokenizer's template. Tests use a
deterministic fake.

Models are not thread-safe; :class:`so8t.runtime.agent.Agent` runs one request at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from so8t.errors import So8tError
from so8t.inference import Backend, InferenceError, open_backend, score_labels, stop_strings
from so8t.io import sha256_file, sha256_text

#: Control-token spellings of known chat templates, removed from untrusted text before rendering
#: so a caller or a document cannot open or close turns.
CONTROL_TOKENS: tuple[str, ...] = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<s>",
    "</s>",
)


class ModelError(So8tError, RuntimeError):
    """The model file cannot be used (missing, no chat template, prompt too long)."""


@runtime_checkable
class ChatModel(Protocol):
    """What the agent needs from a language model.

    Attributes:
        model_id: a name for responses and audit rows.
        model_sha256: hex SHA-256 of the model file (or of the weights of a folder).
        control_tokens: strings removed from untrusted text before rendering.
    """

    model_id: str
    model_sha256: str
    control_tokens: tuple[str, ...]

    def render(self, messages: list[dict]) -> str:
        """The prompt text of ``messages`` (role/content dicts) with the generation prompt.

        Raises:
            ValueError: the chat template rejects the conversation (e.g. roles not alternating).
        """

    def generate(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        """Greedy continuation of ``prompt`` as text pieces; ends at the end of the turn or the budget.

        Raises:
            ModelError: the prompt does not fit the context window.
        """

    def decision_logits(self, context: str) -> np.ndarray:
        """``(3,)`` log-likelihoods (nats) of ``判定: L`` after ``context`` (the rendered prompt) for L in
        ALLOW, ESCALATION, DENY (:func:`so8t.inference.scoring.score_labels`)."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (for usage reports)."""


class BackendChatModel:
    """A :class:`ChatModel` on an inference-layer backend (llama.cpp or Hugging Face).

    Args:
        backend: the :class:`so8t.inference.types.Backend`.
        chat_template: the Jinja chat template the model was trained with.
        bos_token, eos_token: the template's ``bos_token`` / ``eos_token`` strings.
        model_id: name in responses and audit rows.
        model_sha256: hex SHA-256 of the weights.
        repetition_penalty: CTRL penalty over the whole context (``generation.repetition_penalty``).
    """

    def __init__(
        self,
        backend: Backend,
        chat_template: str,
        bos_token: str,
        eos_token: str,
        model_id: str,
        model_sha256: str,
        repetition_penalty: float = 1.0,
        extra_control_tokens: tuple[str, ...] = (),
    ) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.backend = backend
        self.chat_template = chat_template
        self.model_id = model_id
        self.model_sha256 = model_sha256
        self.repetition_penalty = repetition_penalty
        self._formatter = Jinja2ChatFormatter(chat_template, eos_token, bos_token)
        self._stops = stop_strings(backend)
        # Every control-token spelling of the vocabulary (Gemma: 6k, <unusedN> and <start_of_image> included).
        vocab = backend.special_tokens()
        self.control_tokens = tuple(
            dict.fromkeys(t for t in (*CONTROL_TOKENS, bos_token, eos_token, *extra_control_tokens, *vocab) if t)
        )
        self._special_ids = set(vocab.values())

    def render(self, messages: list[dict]) -> str:
        """The prompt, checked to hold exactly the control tokens of the template itself.

        The same conversation with every content replaced by ``x`` gives the template's own
        control tokens; the real prompt must tokenise to exactly as many (defence in depth
        behind the agent's stripping: no text of a caller or a document becomes a control token).

        Raises:
            ValueError: the template rejects the conversation, or content became a control token.
        """
        from jinja2.exceptions import TemplateError

        try:
            prompt = self._formatter(messages=messages).prompt
            skeleton = self._formatter(messages=[{**m, "content": "x"} for m in messages]).prompt
        except TemplateError as e:
            raise ValueError(str(e)) from None
        count = lambda text: sum(t in self._special_ids for t in self.backend.tokenize(text))  # noqa: E731
        if count(prompt) != count(skeleton):
            raise ValueError("the conversation contains text that becomes a control token")
        return prompt

    def count_tokens(self, text: str) -> int:
        return len(self.backend.tokenize(text))

    def generate(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        ids = self.backend.tokenize(prompt)
        n_ctx = getattr(self.backend, "n_ctx", None)
        if n_ctx is not None and len(ids) + 8 > n_ctx:
            raise ModelError(f"prompt of {len(ids)} tokens does not fit runtime.n_ctx={n_ctx}")
        if n_ctx is not None:
            max_new_tokens = min(max_new_tokens, n_ctx - len(ids))
        try:
            yield from self.backend.stream(ids, max_new_tokens, self._stops, self.repetition_penalty)
        except InferenceError as e:
            raise ModelError(str(e)) from None

    def decision_logits(self, context: str) -> np.ndarray:
        try:
            return score_labels(self.backend, [context])[0]
        except InferenceError as e:
            raise ModelError(f"decision context: {e}") from None

    def close(self) -> None:
        """Free the model now."""
        self.backend.close()


def _weights_sha256(folder: Path) -> str:
    """One weight file: its sha256; several (sharded): the sha256 of their ``name sha256`` lines."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digests = [f"{w.name} {sha256_file(w)}" for w in weights]
    return digests[0].split()[1] if len(digests) == 1 else sha256_text("\n".join(digests))


def load_model(
    path: str | Path,
    n_ctx: int,
    n_threads: int | None,
    repetition_penalty: float,
    model_id: str | None = None,
    n_gpu_layers: int = -1,
    batch_size: int = 1,
) -> BackendChatModel:
    """A chat model for a ``.gguf`` file (llama.cpp) or a Hugging Face folder with ``config.json``.

    Args:
        n_ctx: context window (tokens).
        n_threads: llama.cpp threads; ``None`` = the cores idle right now.
        n_gpu_layers: llama.cpp layers on the GPU (``generation.n_gpu_layers``; -1 = all when supported).
        batch_size: sequences per batch (1: one request at a time; the server's batching model: more).

    Raises:
        ModelError: the path is neither, or the model has no chat template.
    """
    path = Path(path)
    try:
        backend = open_backend(path, n_ctx=n_ctx, n_threads=n_threads, batch_size=batch_size, n_gpu_layers=n_gpu_layers)
    except InferenceError as e:
        raise ModelError(f"runtime.model: {e}") from None
    if backend.kind == "gguf":
        template = backend.metadata.get("tokenizer.chat_template")
        if not template:
            backend.close()
            raise ModelError(f"{path}: no tokenizer.chat_template inside; export it with the quantize stage")
        bos = backend.piece(backend.model.token_bos()) if backend.model.token_bos() >= 0 else ""
        eos = backend.piece(backend.model.token_eos()) if backend.model.token_eos() >= 0 else ""
        return BackendChatModel(
            backend, template, bos, eos, model_id or path.stem, sha256_file(path), repetition_penalty
        )
    tok = backend.tokenizer
    if not tok.chat_template:
        backend.close()
        raise ModelError(f"{path}: the tokenizer has no chat template")
    specials = tuple(t for t in tok.all_special_tokens if t)
    return BackendChatModel(
        backend,
        tok.chat_template,
        tok.bos_token or "",
        tok.eos_token or "",
        model_id or path.name,
        _weights_sha256(path),
        repetition_penalty,
        specials,
    )
