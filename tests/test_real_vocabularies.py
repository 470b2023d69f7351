"""The real tokenizers of the architecture matrix (``tiny.REAL_VOCABS``): transformers' tokenizer built from
llama.cpp's vocab GGUF gives llama.cpp's own token ids on Japanese text, the chat template ends the turn
with the family's token, and the SentencePiece model rebuilt for Phi-3 / Mistral tokenises the same."""

from __future__ import annotations

import pytest

from tiny import REAL_VOCABS, real_tokenizer_dir, vocab_dir

TEXTS = [
    "日本の首都は東京です。Debian のパッケージ管理について説明してください。",
    "判定: ESCALATION\n# 思考ステップ\n輸出管理の確認が必要です。  二重スペースと\tタブ、ｶﾀｶﾅ、①②、絵文字🙂も。",
]
#: Family -> the token that closes an assistant turn in its chat template.
END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "phi3": "<|end|>", "mistral": "</s>"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "real-vocab-cache"


@pytest.mark.parametrize("family", list(REAL_VOCABS))
def test_hf_tokenizer_from_the_vocab_gguf_matches_llama_cpp(family, cache):
    import llama_cpp
    from transformers import AutoTokenizer

    from so8t.data.think_format import encode

    tok = AutoTokenizer.from_pretrained(str(real_tokenizer_dir(cache, family)))
    llm = llama_cpp.Llama(model_path=str(vocab_dir() / REAL_VOCABS[family]), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), (family, text)
            assert tok.decode(ids) == text
    finally:
        llm.close()
    enc = encode(tok, "輸送ヘリコプターの役割は？", "判定: ALLOW\n# 最終回答\n人員と物資を運びます。")
    turn_end = tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert turn_end in enc.input_ids[enc.decision_span[1]:] and enc.labels[enc.input_ids.index(turn_end, enc.decision_span[1])] == turn_end
    assert tok.decode(enc.input_ids[slice(*enc.decision_span)]).strip() == "判定: ALLOW"


@pytest.mark.parametrize("family", ["phi3", "mistral"])
def test_rebuilt_sentencepiece_model_tokenises_as_the_gguf(family, cache):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = real_tokenizer_dir(cache, family)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert sp.get_piece_size() == 32000 and sp.id_to_piece(1) == "<s>" and sp.unk_id() == 0
    for text in TEXTS:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text


def test_a_missing_vocab_file_skips_with_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("SO8T_VOCAB_DIR", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="make test-vocab"):
        real_tokenizer_dir(tmp_path / "cache", "qwen2")
