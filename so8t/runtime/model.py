"""The language model behind the agent: a small interface and its llama.cpp / Hugging Face implementations.

:class:`ChatModel` is what the agent needs from a model: render a
conversation with the chat template the model was trained with, stream a
greedy continuation, and score given continuations (the decision labels). The
default implementation, :class:`LlamaCppModel`, runs a GGUF file in llama.cpp
and takes the chat template from the GGUF itself (``tokenizer.chat_template``,
embedded by the quantize stage), rendered with Jinja2 exactly as
transformers' ``apply_chat_template`` does (llama-cpp-python's
``Jinja2ChatFormatter``: sandboxed, ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``). :class:`HFModel` runs a Hugging Face folder (e.g.
``models/baked``) with transformers. Tests use a deterministic fake.

Models are not thread-safe; :class:`so8t.runtime.agent.Agent` runs one request at a time.

Label scoring follows :func:`so8t.scoring.score_decisions`, which the
calibrate stage used to fit the temperature: each label ``L`` is scored by
``sum_t log p(token_t | context, tokens_<t)`` (nats) over the tokens of
``context + L`` after the longest token prefix the alternatives share.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from so8t.io import sha256_file, sha256_text

#: End-of-turn strings of known chat templates (generation also stops at the model's EOG tokens).
END_OF_TURN: tuple[str, ...] = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
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


class ModelError(RuntimeError):
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
        """Greedy continuation of ``prompt`` as text pieces; stops at end of turn or the budget.

        Raises:
            ModelError: the prompt does not fit the context window.
        """

    def label_logprobs(self, context: str, labels: list[str]) -> list[float]:
        """Log-likelihood (nats) of each ``context + label`` continuation, after the shared token prefix."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (for usage reports)."""


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    n = min(map(len, seqs))
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


class LlamaCppModel:
    """A GGUF file run by llama.cpp (llama-cpp-python), greedy, with the CTRL repetition penalty.

    Args:
        path: the ``.gguf`` file (with ``tokenizer.chat_template`` embedded).
        n_ctx: context window (tokens).
        n_threads: llama.cpp threads (keep at or below free cores).
        repetition_penalty: CTRL penalty over the whole context (1.0 = off), as in evaluation.
        model_id: name in responses and audit rows (default: the file name without ``.gguf``).

    Raises:
        ModelError: missing file or no chat template in it.
    """

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 2048,
        n_threads: int = 1,
        repetition_penalty: float = 1.0,
        model_id: str | None = None,
    ) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: GGUF file not found (run the quantize stage, or set runtime.model)")
        self.model_id = model_id or self.path.stem
        self.model_sha256 = sha256_file(self.path)
        self.repetition_penalty = repetition_penalty
        self.n_ctx = n_ctx
        # The penalty window spans the whole context, as in so8t.scoring (and Hugging Face).
        self.llm = Llama(str(self.path), n_ctx=n_ctx, n_threads=n_threads, last_n_tokens_size=n_ctx, verbose=False)
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")
        if not self.chat_template:
            raise ModelError(f"{self.path}: no tokenizer.chat_template inside; export it with the quantize stage")
        self.bos_token = self._piece(self.llm.token_bos())
        self.eos_token = self._piece(self.llm.token_eos())
        self._formatter = Jinja2ChatFormatter(self.chat_template, self.eos_token, self.bos_token)
        self.control_tokens = tuple(dict.fromkeys((*CONTROL_TOKENS, self.bos_token, self.eos_token)))

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text: special tokens parsed, no BOS added (the template writes it)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def render(self, messages: list[dict]) -> str:
        return self._formatter(messages=messages).prompt

    def generate(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        ids = self.tokenize(prompt)
        room = self.n_ctx - len(ids)
        if room < 8:
            raise ModelError(f"prompt of {len(ids)} tokens does not fit runtime.n_ctx={self.n_ctx}")
        stream = self.llm.create_completion(
            ids,
            max_tokens=min(max_new_tokens, room),
            temperature=0.0,
            repeat_penalty=self.repetition_penalty,
            stream=True,
        )
        try:
            for chunk in stream:
                yield chunk["choices"][0]["text"]
        finally:
            stream.close()

    def _last_logprobs(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return _log_softmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)))

    def label_logprobs(self, context: str, labels: list[str]) -> list[float]:
        fulls = [self.tokenize(context + label) for label in labels]
        start = common_prefix_len(fulls)
        if max(map(len, fulls)) > self.n_ctx:
            raise ModelError(f"decision context of {max(map(len, fulls))} tokens exceeds runtime.n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(fulls[0][:start])
        first = self._last_logprobs()
        scores = []
        for full in fulls:
            suffix = full[start:]
            total = float(first[suffix[0]])
            self.llm.n_tokens = start  # drop the previous label from the KV cache
            for prev, nxt in pairwise(suffix):
                self.llm.eval([prev])
                total += float(self._last_logprobs()[nxt])
            scores.append(total)
        return scores

    def close(self) -> None:
        """Free the llama.cpp model now."""
        self.llm.close()


class HFModel:
    """A Hugging Face model folder (e.g. ``models/baked``) run by transformers, float32.

    Generation is greedy with the CTRL repetition penalty through
    :class:`so8t.scoring.HFBackend` and arrives as one piece (no token streaming);
    the chat template is the tokenizer's own.

    Raises:
        ModelError: the folder has no chat template.
    """

    def __init__(self, path: str | Path, repetition_penalty: float = 1.0, model_id: str | None = None) -> None:
        from so8t.base_model import load_tokenizer
        from so8t.scoring import DECISION_MARKER, HFBackend

        self.path = Path(path)
        self.tokenizer = load_tokenizer(self.path)
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.path}: the tokenizer has no chat template")
        self.backend = HFBackend(self.path, self.tokenizer, batch_size=1, repetition_penalty=repetition_penalty)
        self.model_id = model_id or self.path.name
        weights = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        # One file: its sha256; several (sharded): the sha256 of their "name sha256" lines.
        digests = [f"{w.name} {sha256_file(w)}" for w in weights]
        self.model_sha256 = digests[0].split()[1] if len(digests) == 1 else sha256_text("\n".join(digests))
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        self.control_tokens = tuple(dict.fromkeys((*CONTROL_TOKENS, *specials)))
        self._marker = DECISION_MARKER

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def render(self, messages: list[dict]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            raise ValueError(str(e)) from None

    def generate(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        (g,) = self.backend.generate([self.tokenize(prompt)], max_new_tokens, [self._marker])
        # HFBackend cuts the text before the stop string; give it back so the agent sees it.
        yield g.text + (g.stop or "")

    def label_logprobs(self, context: str, labels: list[str]) -> list[float]:
        fulls = [self.tokenize(context + label) for label in labels]
        start = common_prefix_len(fulls)
        return self.backend.continuation_logprobs(fulls[0][:start], [f[start:] for f in fulls])

    def close(self) -> None:
        self.backend.close()


def load_model(
    path: str | Path, n_ctx: int, n_threads: int | None, repetition_penalty: float, model_id: str | None = None
) -> ChatModel:
    """A :class:`LlamaCppModel` for a ``.gguf`` file, an :class:`HFModel` for a folder with ``config.json``.

    Args:
        n_threads: llama.cpp threads; ``None`` = the cores idle right now
            (:func:`so8t.console.free_cores`).

    Raises:
        ModelError: neither exists.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return HFModel(path, repetition_penalty, model_id)
    if path.suffix == ".gguf":
        if n_threads is None:
            from so8t.console import free_cores

            n_threads = free_cores()
        return LlamaCppModel(path, n_ctx, n_threads, repetition_penalty, model_id)
    raise ModelError(f"runtime.model: {path} is neither a .gguf file nor a Hugging Face folder with config.json")
