"""Ollama Modelfiles for the exported GGUF files, with a TEMPLATE checked against the training chat template.

Ollama (https://github.com/ollama/ollama/blob/main/docs/modelfile.md) does not
run the Jinja chat template inside a GGUF: a Modelfile gives it a Go
``text/template`` instead. A TEMPLATE that differs from the template the model
was trained with, or a missing ``PARAMETER stop`` for the end-of-turn token
(the classic cause of run-on output), quietly degrades the model. So
:func:`write_modelfiles`

1. reads the Jinja chat template, BOS/EOS and ``add_bos_token`` from each GGUF;
2. picks the Ollama TEMPLATE of its family (:data:`FAMILIES`, by marker);
3. renders both for :data:`SAMPLE_CONVERSATIONS` (the Go template with
   :mod:`so8t.runtime.gotemplate`) and refuses to write a Modelfile whose
   text differs; Ollama's tokenizer adds BOS itself when the GGUF says
   ``add_bos_token``, so the TEMPLATE leaves out the ``<bos>`` the Jinja template writes;
4. writes ``Modelfile.<type>`` with ``FROM`` (relative to the Modelfile),
   ``TEMPLATE``, one ``PARAMETER stop`` per end-of-turn string and the
   sampling parameters the runtime uses (greedy, the evaluated repetition
   penalty over the whole context).

Known difference: Gemma's Jinja template strips white space around each
message (``| trim``); Go templates cannot, so messages that start or end with
white space render differently. Ollama serves the raw model: its reasoning
section is not hidden and nothing is audited; use ``so8t serve`` where those
guarantees are needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from so8t.io import sha256_file, write_text
from so8t.model.quantize import GGUF_PREFIX
from so8t.runtime import gotemplate
from so8t.errors import So8tError


class OllamaTemplateError(So8tError, ValueError):
    """No Ollama template reproduces the model's chat template."""


@dataclass(frozen=True)
class TemplateFamily:
    """An Ollama TEMPLATE for a family of Jinja chat templates.

    Attributes:
        marker: text whose presence in the Jinja template selects this family.
        template: the Go template (messages in ``.Messages``, each with ``.Role`` and ``.Content``).
        stops: end-of-turn strings, one ``PARAMETER stop`` each.
    """

    name: str
    marker: str
    template: str
    stops: tuple[str, ...]


#: Gemma's turn format as in so8t.base_model.GEMMA_CHAT_TEMPLATE: a leading system message is
#: prepended to the first user turn with a blank line; the assistant role is called "model".
GEMMA_TEMPLATE = """{{- range $i, $m := .Messages }}
{{- if ne $m.Role "system" }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}
{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""

#: ChatML (``<|im_start|>role\\ncontent<|im_end|>``) without a default system message.
CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

FAMILIES: tuple[TemplateFamily, ...] = (
    TemplateFamily("gemma", "<start_of_turn>", GEMMA_TEMPLATE, ("<end_of_turn>",)),
    TemplateFamily("chatml", "<|im_start|>", CHATML_TEMPLATE, ("<|im_end|>",)),
)

#: Conversations both templates must render identically (contents without surrounding white space).
SAMPLE_CONVERSATIONS: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "日本の首都はどこですか？"},),
    (
        {"role": "system", "content": "あなたは社内文書に基づいて答えるアシスタントです。"},
        {"role": "user", "content": "Debian のパッケージ管理について説明してください。"},
    ),
    (
        {"role": "user", "content": "apt と dpkg の違いは?"},
        {"role": "assistant", "content": "# 最終回答\napt は依存関係を解決します。\n判定: ALLOW"},
        {"role": "user", "content": "では aptitude は？\n改行を含む質問です。"},
    ),
    (
        {"role": "system", "content": "system text"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ),
)


def render_jinja(chat_template: str, messages, bos_token: str, eos_token: str) -> str:
    """The Jinja chat template rendered as transformers does, with the generation prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(chat_template, eos_token, bos_token)(messages=list(messages)).prompt


def render_ollama(template: str, messages) -> str:
    """An Ollama TEMPLATE rendered for ``messages`` as Ollama's ``.Messages`` (``Role``, ``Content``)."""
    return gotemplate.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def family_for(chat_template: str) -> TemplateFamily:
    """The :data:`FAMILIES` entry whose marker the Jinja template contains.

    Raises:
        OllamaTemplateError: none matches.
    """
    for fam in FAMILIES:
        if fam.marker in chat_template:
            return fam
    raise OllamaTemplateError(
        f"no Ollama TEMPLATE known for this chat template (known: {', '.join(f.name for f in FAMILIES)}); "
        "write the Modelfile's TEMPLATE by hand"
    )


def check_template(
    family: TemplateFamily, chat_template: str, bos_token: str, eos_token: str, add_bos: bool, conversations=None
) -> None:
    """Render :data:`SAMPLE_CONVERSATIONS` both ways; raise on the first difference.

    The expected text is the Jinja rendering without its leading ``bos_token``
    when the tokenizer adds BOS itself (``add_bos``).

    Raises:
        OllamaTemplateError: showing the conversation and both renderings.
    """
    for conv in conversations or SAMPLE_CONVERSATIONS:
        expected = render_jinja(chat_template, conv, bos_token, eos_token)
        if add_bos and bos_token and expected.startswith(bos_token):
            expected = expected[len(bos_token) :]
        got = render_ollama(family.template, conv)
        if got != expected:
            raise OllamaTemplateError(
                f"the {family.name} Ollama TEMPLATE does not reproduce the chat template for {list(conv)}:\n"
                f"chat template: {expected!r}\nOllama:        {got!r}"
            )


@dataclass(frozen=True)
class GGUFTemplate:
    """What a GGUF says about its chat format."""

    chat_template: str
    bos_token: str
    eos_token: str
    add_bos: bool


def read_gguf_template(path: str | Path) -> GGUFTemplate:
    """Chat template, BOS/EOS text and ``add_bos_token`` of a GGUF (vocabulary only, ~1 s).

    Raises:
        OllamaTemplateError: the GGUF has no chat template.
    """
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise OllamaTemplateError(f"{path}: no tokenizer.chat_template inside")

        def piece(t: int) -> str:
            return llm.detokenize([t], special=True).decode("utf-8", errors="replace") if t >= 0 else ""

        add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") == "true"
        return GGUFTemplate(template, piece(llm.token_bos()), piece(llm.token_eos()), add_bos)
    finally:
        llm.close()


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf: Path, out_dir: Path, family: TemplateFamily, parameters: dict[str, float | int]) -> str:
    """The Modelfile for ``gguf`` written into ``out_dir`` (``FROM`` relative to it)."""
    if '"""' in family.template:
        raise OllamaTemplateError('the TEMPLATE contains """, which a Modelfile cannot quote')
    rel = os.path.relpath(gguf.resolve(), out_dir.resolve())
    lines = [
        f"# Written by `so8t ollama` from {gguf.name} (sha256 {sha256_file(gguf)}).",
        f"# TEMPLATE: the {family.name} turn format, checked against the chat template inside the GGUF.",
        "# Ollama shows the model's raw output, reasoning section included, and keeps no audit log;",
        "# use `so8t serve` where the reasoning must stay private and requests must be audited.",
        f"FROM {rel}",
        f'TEMPLATE """{family.template}"""',
        *[f"PARAMETER stop {_quote(s)}" for s in family.stops],
        *[f"PARAMETER {k} {v}" for k, v in parameters.items()],
    ]
    return "\n".join(lines) + "\n"


def sampling_parameters(params) -> dict[str, float | int]:
    """Ollama PARAMETERs matching the runtime: greedy, the evaluated repetition penalty over the whole context."""
    return {
        "temperature": 0,
        "repeat_penalty": params.generation.repetition_penalty,
        "repeat_last_n": -1,  # -1 = num_ctx: the whole context, as in evaluation
        "num_ctx": params.runtime.n_ctx,
        "num_predict": params.runtime.max_new_tokens,
    }


def modelfile_name(gguf: Path) -> str:
    """``so8t-q4_k_m.gguf`` -> ``Modelfile.q4_k_m`` (the file's own type, not its calibration key)."""
    return f"Modelfile.{Path(gguf).stem.removeprefix(GGUF_PREFIX)}"


def write_modelfiles(ggufs: list[Path], out_dir: str | Path, parameters: dict[str, float | int]) -> list[Path]:
    """Check and write one Modelfile per GGUF into ``out_dir`` (atomic writes).

    Raises:
        FileNotFoundError: a GGUF is missing.
        OllamaTemplateError: unknown family, or a TEMPLATE that does not reproduce the chat template.
    """
    out_dir = Path(out_dir)
    written = []
    for gguf in ggufs:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"{gguf}: GGUF file not found (run the quantize stage)")
        info = read_gguf_template(gguf)
        family = family_for(info.chat_template)
        check_template(family, info.chat_template, info.bos_token, info.eos_token, info.add_bos)
        path = out_dir / modelfile_name(gguf)
        write_text(path, modelfile_text(gguf, out_dir, family, parameters))
        written.append(path)
    return written
