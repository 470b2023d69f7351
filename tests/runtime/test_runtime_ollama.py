"""Ollama Modelfiles: the Go TEMPLATE renders what the tokenizer's chat template renders."""

from __future__ import annotations

import pytest
from tiny import tiny_tokenizer

from so8t.params import Params
from so8t.runtime import gotemplate
from so8t.runtime.gotemplate import GoTemplateError
from so8t.runtime.ollama import (
    FAMILIES,
    GEMMA_TEMPLATE,
    SAMPLE_CONVERSATIONS,
    OllamaTemplateError,
    check_template,
    family_for,
    modelfile_name,
    modelfile_text,
    render_ollama,
    sampling_parameters,
)

MORE_CONVERSATIONS = [
    [{"role": "user", "content": "# 思考ステップ を含む質問\n\n二段落目"}],
    [
        {"role": "system", "content": "複数行の\nシステム"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ],
    [{"role": "user", "content": "{{ .Content }} と {% raw %} はただの文字列"}],
]


@pytest.mark.parametrize("conv", [*SAMPLE_CONVERSATIONS, *MORE_CONVERSATIONS])
def test_gemma_template_matches_the_tokenizer(conv):
    tok = tiny_tokenizer()  # Gemma's turn template, as the base stage gives Gemma models
    expected = tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)
    assert expected.startswith(tok.bos_token)
    # Ollama's tokenizer adds BOS itself (add_bos_token), so the TEMPLATE does not write it.
    assert tok.bos_token + render_ollama(GEMMA_TEMPLATE, conv) == expected


def test_check_template_accepts_gemma_and_rejects_a_wrong_family():
    tok = tiny_tokenizer()
    gemma = family_for(tok.chat_template)
    assert gemma.name == "gemma" and gemma.stops == ("<end_of_turn>",)
    check_template(gemma, tok.chat_template, "<bos>", "<eos>", add_bos=True)
    chatml = next(f for f in FAMILIES if f.name == "chatml")
    with pytest.raises(OllamaTemplateError, match="does not reproduce"):
        check_template(chatml, tok.chat_template, "<bos>", "<eos>", add_bos=True)
    with pytest.raises(OllamaTemplateError, match="does not reproduce"):
        check_template(gemma, tok.chat_template, "<bos>", "<eos>", add_bos=False)  # BOS would be missing
    with pytest.raises(OllamaTemplateError, match="no Ollama TEMPLATE"):
        family_for("{{ messages }}")


def test_chatml_template():
    jinja = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    fam = family_for(jinja)
    check_template(fam, jinja, "", "<|im_end|>", add_bos=False)
    # SmolLM2's template adds a default system prompt: refused rather than silently different.
    smol = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(OllamaTemplateError):
        check_template(fam, smol, "", "<|im_end|>", add_bos=False)


def test_modelfile_text(tmp_path):
    gguf = tmp_path / "gguf" / "so8t-q4_k_m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "ollama"
    out.mkdir()
    text = modelfile_text(gguf, out, FAMILIES[0], sampling_parameters(Params()))
    lines = text.splitlines()
    assert "FROM ../gguf/so8t-q4_k_m.gguf" in lines
    assert f'TEMPLATE """{GEMMA_TEMPLATE}"""' in text
    assert 'PARAMETER stop "<end_of_turn>"' in lines
    assert "PARAMETER temperature 0" in lines and "PARAMETER repeat_penalty 1.0" in lines
    assert "PARAMETER repeat_last_n -1" in lines and "PARAMETER num_ctx 2048" in lines
    assert modelfile_name(gguf) == "Modelfile.q4_k_m"


@pytest.mark.parametrize(
    "template, data, expected",
    [
        ("a {{ .X }} b", {"X": 1}, "a 1 b"),
        ("a  {{- .X -}}  \n b", {"X": "x"}, "axb"),
        ("{{ if .A }}yes{{ else if .B }}b{{ else }}no{{ end }}", {"A": "", "B": [1]}, "b"),
        ("{{ if not .A }}none{{ end }}", {"A": []}, "none"),
        ("{{ range $i, $m := .L }}{{ $i }}={{ $m.V }};{{ end }}", {"L": [{"V": "a"}, {"V": "b"}]}, "0=a;1=b;"),
        ("{{ range .L }}{{ . }}{{ else }}empty{{ end }}", {"L": []}, "empty"),
        ("{{ range .L }}{{ $.P }}{{ . }}{{ end }}", {"L": ["x", "y"], "P": "-"}, "-x-y"),
        ('{{ if eq .R "a" "b" }}hit{{ end }}', {"R": "b"}, "hit"),
        ('{{ if and (eq .N 1) (ne .R "x") }}ok{{ end }}', {"N": 1, "R": "y"}, "ok"),
        ("{{ or .A .B }}", {"A": "", "B": "bee"}, "bee"),
        ("{{ (index .L 1).V }}", {"L": [{"V": "a"}, {"V": "b"}]}, "b"),
        ("{{ len .L }}", {"L": [1, 2, 3]}, "3"),
        ('{{ "a\\nb" }}', {}, "a\nb"),
    ],
)
def test_go_template_subset(template, data, expected):
    assert gotemplate.render(template, data) == expected


@pytest.mark.parametrize(
    "template",
    [
        '{{ printf "%s" .X }}',
        "{{ if .X }}open",
        "{{ end }}",
        "{{ .X | upper }}",
        "{{ .Missing }}",
        "{{ $nope }}",
        "{{ .X ",
    ],
)
def test_go_template_errors(template):
    with pytest.raises(GoTemplateError):
        gotemplate.render(template, {"X": "x"})
