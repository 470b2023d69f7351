"""so8t.data.sources.text: trimming at a sentence end and lead sentences."""

from so8t.data.sources.text import lead_sentences, trim_at_sentence


def test_text_helpers():
    assert trim_at_sentence("一文目。二文目。三文目。", 9) == "一文目。二文目。"
    assert lead_sentences("最初の文。次の文。\n$ ls -l\nコードの後の文。") == "最初の文。次の文。"
    assert lead_sentences("English only.\n日本語の文。") == "日本語の文。"
