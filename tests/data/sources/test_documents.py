"""so8t.data.sources.documents: template questions about document sections, with offsets."""

from so8t.data.sources.documents import build_document_records, document_questions


def test_document_question_templates():
    text = (
        "クラウド会計とは、インターネット経由で使う会計ソフトのことです。当社のクラウド会計は中小企業向けです。\n"
        "クラウド会計の利用者は増えました。"
    )
    got = {c["kind"]: c for c in document_questions(text)}
    assert set(got) == {"definition", "about", "cloze", "summary"}
    assert got["definition"]["slots"] == {"term": "クラウド会計"} and got["definition"]["at"] == 0
    assert got["about"]["slots"] == {"term": "クラウド会計"}
    assert got["cloze"]["answer"] == "［　　］に入る語句は「インターネット経由」です。"
    assert got["summary"]["answer"].startswith("クラウド会計とは")
    section = {"id": "d:s0-0", "doc_id": "d", "doc_title": "報告", "title": "事業", "section": 0, "offset": 100,
               "text": text, "source": "user:x"}
    records, origins, stats = build_document_records([section], 2, seed=1)
    assert len(records) == 2 and origins == [section, section] and stats["pairs"] == 2
    assert all(r["source_offset"] >= 100 and r["prompt"].count("「報告」") == 1 for r in records)
    assert build_document_records([section], 0, seed=1)[0] == []
