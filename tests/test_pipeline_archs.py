"""The whole pipeline on tiny random Qwen2, Llama 3, Phi-3 and Mistral models with their real tokenizers.

Each runs `dvc repro` from the base stage to the report with only ``base_model.source`` changed:
LoRA targets and the SO8T ``o_proj`` path from the architecture (Phi-3's fused ``qkv_proj``), stop
tokens and the chat template from the tokenizer, the bake's checks, llama.cpp's converter (which
recognises a byte-level BPE by the hash of its pre-tokenizer, and reads the SentencePiece
``tokenizer.model`` of Phi-3 and Mistral), llama.cpp loading with the same token ids on Japanese
text in quantize, calibrate and evaluate. The tokenizers are the real ones: transformers builds them
from llama.cpp's vocab-only GGUF test files (:data:`tiny.REAL_VOCABS`, which ``make install`` extracts
from the llama-cpp-python source distribution); no model hub. Gemma 3 is ``tests/test_pipeline_e2e.py``.
"""

from __future__ import annotations

import json

import pytest
from test_pipeline_e2e import _dvc, pipeline_workdir

pytestmark = pytest.mark.slow

#: Row -> (architecture, vocabulary family of :data:`tiny.REAL_VOCABS`, LoRA target modules the default
#: ``train.target_modules: null`` must pick, end-of-turn token (``None``: EOS ends the turn)).
ROWS = {
    "qwen2": ("qwen2", "qwen2", ["k_proj", "o_proj", "q_proj", "v_proj"], "<|im_end|>"),
    "llama3": ("llama", "llama3", ["k_proj", "o_proj", "q_proj", "v_proj"], "<|eot_id|>"),
    "phi3": ("phi3", "phi3", ["o_proj", "qkv_proj"], "<|end|>"),
    "mistral": ("mistral", "mistral", ["k_proj", "o_proj", "q_proj", "v_proj"], None),
}


@pytest.fixture(scope="module")
def vocab_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "real-vocab-cache"


@pytest.mark.parametrize("row", list(ROWS))
def test_dvc_repro_end_to_end(row, vocab_cache, tmp_path):
    from tiny import real_tokenizer_dir, tiny_arch_dir
    from transformers import AutoTokenizer

    arch, family, targets, end_of_turn = ROWS[row]
    tok_dir = real_tokenizer_dir(vocab_cache, family)
    work = pipeline_workdir(tmp_path / "work", tiny_arch_dir(tmp_path / f"tiny-{row}", tok_dir, arch))
    proc = _dvc(work, "repro")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    base = json.loads((work / "models/base/so8t_base.json").read_text())
    stops = [tok.eos_token_id] + ([tok.convert_tokens_to_ids(end_of_turn)] if end_of_turn else [])
    assert base["model_type"] == arch and base["stop_token_ids"] == stops
    assert (work / "models/baked/tokenizer.model").is_file() == (tok_dir / "tokenizer.model").is_file()
    adapter = json.loads((work / "models/adapter/adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == targets
    bake = json.loads((work / "models/baked/bake_report.json").read_text())
    assert bake["rotations_folded"] == 2 and bake["max_abs_diff"] < 1e-4
    assert bake["spot_check"]["max_abs_diff"] < 1e-4
    config = json.loads((work / "models/baked/config.json").read_text())
    assert config["model_type"] == arch and config["vocab_size"] == len(tok)
    quant = json.loads((work / "models/gguf/quantize_report.json").read_text())
    assert set(quant["files"]) == {"f16", "q8_0", "q4_k_m"}
    assert all(f["tokenizer_match"] and f["size_bytes"] > 0 for f in quant["files"].values()), quant
    metrics = json.loads((work / "reports/metrics.json").read_text())
    for art in ("base", "baked", "q8_0", "q4_k_m"):
        assert metrics[f"{art}.perplexity"] > 1.0
        assert f"{art}.decision.macro_f1" in metrics
    assert "Headline metrics" in (work / "reports/report.md").read_text(encoding="utf-8")
