"""The runtime on a real GGUF: a tiny random Gemma 3 with the real Gemma 3 tokenizer, converted by llama.cpp.

Its output is gibberish, but the chat template, tokenisation, label scoring,
the answer's structure, the audit row and the no-reasoning guarantee are
those of the real model. ``so8t ask``, ``so8t audit verify`` and ``so8t
ollama`` run as the console script would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from so8t.model.base_model import GEMMA_CHAT_TEMPLATE
from so8t.runtime.ollama import SAMPLE_CONVERSATIONS, render_ollama
from so8t.schema import DECISIONS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUESTION = "Debian でパッケージを入れるには？"


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gemma_tok):
    """``(hf_dir, gguf_path, tokenizer)``: a 2-layer random Gemma 3, F16 GGUF with the chat template inside."""
    pytest.importorskip("llama_cpp")
    from so8t.model.quantize import convert_hf_to_gguf
    from tiny import tiny_gemma_dir

    root = tmp_path_factory.mktemp("runtime-gguf")
    hf = tiny_gemma_dir(root / "tiny-gemma", gemma_tok)
    gguf = convert_hf_to_gguf(hf, root / "gguf" / "so8t-f16.gguf", "f16")
    return hf, gguf, gemma_tok


@pytest.fixture(scope="module")
def llama_model(tiny):
    from so8t.runtime.model import load_model

    model = load_model(tiny[1], n_ctx=512, n_threads=1, repetition_penalty=1.15)
    yield model
    model.close()


def test_chat_template_and_tokens_match_the_hf_tokenizer(tiny, llama_model):
    _, _, tok = tiny
    assert llama_model.chat_template == GEMMA_CHAT_TEMPLATE
    for conv in SAMPLE_CONVERSATIONS:
        text = tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)
        assert llama_model.render(list(conv)) == text
        assert llama_model.backend.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
        # and the Ollama TEMPLATE, behind the BOS the tokenizer adds
        assert tok.bos_token + render_ollama(_ollama_template(llama_model), conv) == text


def _ollama_template(model):
    from so8t.runtime.ollama import family_for

    return family_for(model.chat_template).template


@pytest.mark.parametrize("budget", [24, 3])
def test_the_runtime_probability_is_the_calibrate_stages(tiny, llama_model, tmp_path, budget):
    """The agent's probabilities for a request equal softmax(z / T) of the logits calibrate scores."""
    from so8t.eval.calibration import apply_temperature
    from so8t.inference import score_decisions
    from so8t.runtime.agent import Agent, Policy, Principal
    from so8t.runtime.audit import AuditLog

    messages = [{"role": "user", "content": QUESTION}]
    prompt_text = tiny[2].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the labels are scored right after the prompt, so the generation budget does not change them
    (row,) = score_decisions(llama_model.backend, [{"id": "q", "decision": "ALLOW", "prompt_text": prompt_text}])
    agent = Agent(
        llama_model, style="markdown", temperature=1.7, policy=Policy("esc", "deny"),
        audit=AuditLog(tmp_path / "a.sqlite3"), max_new_tokens=budget,
    )
    ans = agent.ask(QUESTION, Principal.of("u", "公開"))
    expected = apply_temperature(np.array([row["logits"]]), 1.7)[0]
    assert [ans.probabilities[d] for d in DECISIONS] == pytest.approx(expected.tolist(), abs=1e-6)


def test_generation_streams_and_stops(llama_model):
    prompt = llama_model.render([{"role": "user", "content": QUESTION}])
    pieces = list(llama_model.generate(prompt, 8))
    assert all(isinstance(p, str) for p in pieces)
    assert 1 <= len([p for p in pieces if p]) <= 8  # the last chunk may be empty (finish reason only)
    assert llama_model.count_tokens(prompt) > 5


def _params(tmp: Path, gguf: Path) -> Path:
    docs = tmp / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "apt.md").write_text("# apt\nDebian では apt install でパッケージを入れます。", encoding="utf-8")
    (tmp / "calibration.json").write_text(json.dumps({"artifacts": {"baked": {"temperature": 2.0}}}), "utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["runtime"].update(
        model=str(gguf),
        calibration="calibration.json",
        n_ctx=1024,
        n_threads=1,
        max_new_tokens=24,
        ollama_dir="ollama",
    )
    params["retrieval"]["roots"] = [{"path": "docs", "access_level": "公開", "patterns": ["*.md"]}]
    params["runtime"]["audit"] = {"db": "audit/audit.sqlite3", "store_plaintext": True}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


def _so8t(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [str(BIN / "so8t"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_so8t_ask_end_to_end(tiny, tmp_path):
    params = _params(tmp_path, tiny[1])
    proc = _so8t("ask", QUESTION, "--json", "--user", "tester", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ans = json.loads(proc.stdout)
    assert ans["decision"] in DECISIONS and ans["model_decision"] in DECISIONS
    assert 0.0 <= ans["confidence"] <= 1.0 and abs(sum(ans["probabilities"].values()) - 1) < 1e-4
    assert ans["model_id"] == "so8t-f16"
    assert "serving so8t-f16.gguf (runtime.model)" in proc.stderr  # which file, and why
    assert "no temperature" not in proc.stderr  # so8t-f16.gguf is the baked row of calibration.json
    from so8t.params import Params

    policy = Params().runtime.policy
    if ans["decision"] != "ALLOW":
        assert ans["answer"] == {"ESCALATION": policy.escalation, "DENY": policy.deny}[ans["decision"]]

    from so8t.io import sha256_file
    from so8t.runtime.audit import AuditLog, sha256_hex

    (row,) = AuditLog(tmp_path / "audit" / "audit.sqlite3").rows()
    assert row["user_id"] == "tester" and row["channel"] == "cli" and row["decision"] == ans["decision"]
    assert row["model_sha256"] == sha256_file(tiny[1])
    assert json.loads(row["doc_ids"]) == ["docs/apt.md"]
    assert row["output_sha256"] == sha256_hex(ans["answer"])
    # Nothing of what the model wrote before its answer reaches the caller.
    for sentence in re.split(r"(?<=[。．！？!?\n])", row["reasoning_text"]):
        if len(sentence.strip()) >= 6:
            assert sentence.strip() not in proc.stdout

    verify = _so8t("audit", "verify", "--params", str(params), cwd=tmp_path)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr


def test_so8t_ollama_writes_a_checked_modelfile(tiny, tmp_path):
    params = _params(tmp_path, tiny[1])
    proc = _so8t("ollama", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modelfile = tmp_path / "ollama" / "Modelfile.f16"
    assert proc.stdout.strip() == str(modelfile)
    text = modelfile.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("FROM "))
    assert (modelfile.parent / line[5:]).resolve() == tiny[1].resolve()
    assert 'PARAMETER stop "<end_of_turn>"' in text


def test_hf_model_folder_runs_too(tiny, tmp_path):
    from so8t.runtime.agent import Agent, Policy, Principal
    from so8t.runtime.audit import AuditLog
    from so8t.runtime.model import load_model

    model = load_model(tiny[0], n_ctx=512, n_threads=1, repetition_penalty=1.15)
    assert model.render([{"role": "user", "content": QUESTION}]) == tiny[2].apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    agent = Agent(
        model,
        style="markdown",
        temperature=2.0,
        policy=Policy("esc", "deny"),
        audit=AuditLog(tmp_path / "a.sqlite3"),
        max_new_tokens=8,
    )
    ans = agent.ask(QUESTION, Principal.of("u", "公開"))
    assert ans.decision in DECISIONS and ans.model_id == "tiny-gemma"
