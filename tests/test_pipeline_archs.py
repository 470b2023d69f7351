"""The whole pipeline on tiny random Llama, Mistral and Phi-3 models, not only Gemma.

Each runs `dvc repro` from the base stage to the report with only ``base_model.source`` changed:
LoRA targets and the SO8T ``o_proj`` path from the architecture (Phi-3's fused ``qkv_proj``), stop
tokens and the chat template from the tokenizer, the bake's checks, llama.cpp's converter (which
reads the SentencePiece ``tokenizer.model`` these families ship), llama.cpp loading in quantize,
calibrate and evaluate. The tokenizer is a real SentencePiece BPE (byte fallback, ChatML turns)
trained on the synthesize stage's Japanese templates (:func:`tiny.sp_tokenizer_dir`): no model hub.

Qwen2 is not in the list: its tokenizer is byte-level BPE, and transformers picks ``Qwen2Tokenizer``
for ``model_type: qwen2`` whatever ``tokenizer_config.json`` names (with a SentencePiece vocabulary it
drops every non-ASCII character), while llama.cpp's converter accepts a byte-level BPE only when it
recognises the vocabulary by the hash of a known tokenizer, which cannot be built offline. Qwen2's
LoRA targets, SO8T attachment and bake are covered on tiny configs in ``tests/model``.
"""

from __future__ import annotations

import json

import pytest
from test_pipeline_e2e import _dvc, pipeline_workdir

pytestmark = pytest.mark.slow

#: Architecture -> LoRA target modules the default (``train.target_modules: null``) must pick.
ARCHS = {
    "llama": ["k_proj", "o_proj", "q_proj", "v_proj"],
    "mistral": ["k_proj", "o_proj", "q_proj", "v_proj"],
    "phi3": ["o_proj", "qkv_proj"],
}


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    from tiny import sp_tokenizer_dir

    return sp_tokenizer_dir(tmp_path_factory.getbasetemp() / "sp-tokenizer-cache")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dvc_repro_end_to_end(arch, sp_dir, tmp_path):
    from tiny import tiny_arch_dir

    work = pipeline_workdir(tmp_path / "work", tiny_arch_dir(tmp_path / f"tiny-{arch}", sp_dir, arch))
    proc = _dvc(work, "repro")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    base = json.loads((work / "models/base/so8t_base.json").read_text())
    assert base["model_type"] == arch and len(base["stop_token_ids"]) == 2  # </s> and <|im_end|>
    assert (work / "models/baked/tokenizer.model").is_file()  # carried through for llama.cpp's converter
    adapter = json.loads((work / "models/adapter/adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ARCHS[arch]
    bake = json.loads((work / "models/baked/bake_report.json").read_text())
    assert bake["rotations_folded"] == 2 and bake["max_abs_diff"] < 1e-4
    assert bake["spot_check"]["max_abs_diff"] < 1e-4
    config = json.loads((work / "models/baked/config.json").read_text())
    assert config["model_type"] == arch
    quant = json.loads((work / "models/gguf/quantize_report.json").read_text())
    assert set(quant["files"]) == {"f16", "q8_0", "q4_k_m"}
    assert all(f["tokenizer_match"] and f["size_bytes"] > 0 for f in quant["files"].values()), quant
    metrics = json.loads((work / "reports/metrics.json").read_text())
    for art in ("base", "baked", "q8_0", "q4_k_m"):
        assert metrics[f"{art}.perplexity"] > 1.0
        assert f"{art}.decision.macro_f1" in metrics
    assert "Headline metrics" in (work / "reports/report.md").read_text(encoding="utf-8")
