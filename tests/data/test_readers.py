"""User data through the collect stage: what users bring is read; what cannot be read is refused
with its file, line and field, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scripts import load_script

from so8t.data import readers
from so8t.data.readers import BadRecords, Document, InputError, TextPipeline

REPO = Path(__file__).resolve().parents[2]
ENC = "UTF-8 (with or without BOM), UTF-16 with BOM, CP932/Shift_JIS or EUC-JP"
PAIR = {"prompt": "東京の人口は？", "response": "約1400万人です。"}


def _stage():
    return load_script("stages/collect.py")


def run_collect(tmp_path: Path, monkeypatch, files: dict[str, bytes | str], **params) -> Path:
    """Run the collect stage in ``tmp_path`` on a user folder ``mine`` holding ``files`` (Debian/GSM off)."""
    mine = tmp_path / "mine"
    mine.mkdir(exist_ok=True)
    for name, content in files.items():
        path = mine / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    collect = {"debian_faq": False, "debian_reference": False, "gsm_symbolic": False, "user_dirs": ["mine"], **params}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": collect}, allow_unicode=True), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    _stage().main()
    return tmp_path / "data" / "collected"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal PDF whose text layer holds ``pages`` (lines of Japanese), via a ToUnicode CMap."""
    chars = sorted({c for page in pages for line in page for c in line})
    cid = {c: i + 1 for i, c in enumerate(chars)}
    objs: list[bytes] = []

    def add(body: bytes) -> int:
        objs.append(body)
        return len(objs)

    entries = "\n".join(f"<{cid[c]:04X}> <{ord(c):04X}>" for c in chars)
    cmap = (
        "/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /X def "
        f"1 begincodespacerange <0000> <FFFF> endcodespacerange\n{len(chars)} beginbfchar\n{entries}\nendbfchar "
        "endcmap CMapName currentdict /CMap defineresource pop end end"
    ).encode()
    catalog, pages_id = add(b""), add(b"")
    unicode_map = add(b"<< /Length %d >>\nstream\n" % len(cmap) + cmap + b"\nendstream")
    desc = add(
        b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /X "
        b"/CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> >>"
    )
    font = add(
        b"<< /Type /Font /Subtype /Type0 /BaseFont /X /Encoding /Identity-H /DescendantFonts [%d 0 R] "
        b"/ToUnicode %d 0 R >>" % (desc, unicode_map)
    )
    kids = []
    for page in pages:
        ops = ["BT /F1 12 Tf 50 800 Td 14 TL", *("<" + "".join(f"{cid[c]:04X}" for c in s) + "> Tj T*" for s in page)]
        content = "\n".join([*ops, "ET"]).encode()
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 %d 0 R >> >> "
                b"/Contents %d 0 R >>" % (pages_id, font, stream)
            )
        )
    objs[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id
    objs[pages_id - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, catalog, xref)
    return bytes(out)


JA = "一行目です。\n二行目です。\n"
JSONL = json.dumps(PAIR, ensure_ascii=False) + "\n"

#: (kind, file name, content, exact message after "mine/<file name>")
BAD_INPUTS = [
    ("cp932_invalid_byte", "a.txt", JA.encode("cp932") + b"\x81\x20x\n",
     f":3: cannot decode byte 0x81 (byte 1 of the line) as CP932 (Shift_JIS) (the encoding of lines 1-2); "
     f"expected the whole file in one of {ENC}"),
    ("euc_jp_truncated", "a.txt", "会社の報告書です。\n売上は増加しました。\n費用".encode("euc_jp")[:-1],
     ":3: cannot decode byte 0xCD (byte 3 of the line) as EUC-JP (the encoding of lines 1-2); "
     "the file ends inside a character (truncated?)"),
    ("mixed_encodings", "a.txt", JA.encode() + "三行目です。\n".encode("cp932"),
     ":3: byte 0x8E (byte 1 of the line) is not UTF-8, but the file's other Japanese lines (e.g. line 1) are "
     "UTF-8: the file mixes encodings or is corrupted; save it in one encoding (UTF-8 recommended)"),
    ("bom_then_not_utf8", "a.jsonl", b"\xef\xbb\xbf" + JSONL.encode() + JSONL.encode("cp932"),
     ":2: the file starts with a UTF-8 byte-order mark but byte 0x93 is not UTF-8; save the whole file as UTF-8"),
    ("utf16_without_bom", "a.txt", JA.encode("utf-16-le"),
     f":1: binary file: NUL byte at offset 0 (UTF-16 little-endian without a byte-order mark? save it as UTF-8); "
     f"expected text in {ENC}"),
    ("binary_named_jsonl", "a.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00",
     ":1: binary file: this is a PNG image, not text"),
    ("xlsx_named_csv", "a.csv", b"PK\x03\x04\x14\x00",
     ":1: binary file: this is a ZIP archive (an .xlsx/.docx/.zip file?), not text"),
    ("empty_file", "a.jsonl", b"",
     ": empty file (0 bytes); expected records or text"),
    ("whitespace_only", "a.json", b"\n  \n",
     ": the file holds only whitespace; expected records or text"),
    ("json_array_then_jsonl", "a.json", "[" + JSONL.strip() + "]\n" + JSONL,
     ":2: more data after the JSON array that closed on line 1: the file mixes a JSON array with JSON Lines; "
     "keep one format per file (.json: one array; .jsonl: one object per line)"),
    ("jsonl_then_array", "a.jsonl", JSONL + "[" + JSONL.strip() + "]\n",
     ":2: a JSON array in a JSON Lines file: the file mixes JSON and JSON Lines; expected one JSON object per line"),
    ("pretty_objects_in_jsonl", "a.jsonl", json.dumps(PAIR, indent=1) + "\n" + json.dumps(PAIR, indent=1),
     ":5: more data after the JSON object that closed on line 4: several multi-line objects or a mix of JSON and "
     "JSON Lines; expected one object per line (.jsonl) or one array (.json)"),
    ("trailing_comma_array", "a.json", "[\n" + JSONL.strip() + ",\n" + JSONL.strip() + ",\n]\n",
     ":3: trailing comma before `]`; JSON allows no comma after the last item"),
    ("trailing_comma_object", "a.jsonl", JSONL + '{"prompt": "q", "response": "a",}\n',
     ":2: trailing comma before `}`; JSON allows no comma after the last item"),
    ("truncated_last_line", "a.jsonl", JSONL + JSONL[:25],
     ":2: invalid JSON (Unterminated string starting at): the file ends in the middle of a record (truncated?); "
     "expected a complete JSON object"),
    ("truncated_array", "a.json", "[\n" + JSONL.strip() + ",\n" + JSONL.strip(),
     ":3: the file ends before the JSON array is closed (truncated?); expected `]`"),
    ("invalid_json_line", "a.jsonl", JSONL + '{"prompt": "q" "response": "a"}\n' + JSONL,
     ":2: invalid JSON at column 16: Expecting ',' delimiter"),
    ("not_an_object", "a.jsonl", JSONL + "42\n",
     ":2: expected a JSON object, got int 42"),
    ("missing_field", "a.jsonl", JSONL + '{"prompt": "q"}\n',
     ":2: field `response`: is missing; expected a non-empty string"),
    ("null_field", "a.jsonl", '{"prompt": null, "response": "a"}\n',
     ":1: field `prompt`: is null; expected a non-empty string"),
    ("empty_field", "a.csv", "prompt,response\n質問,回答\n質問2,  \n",
     ":3: field `response`: is missing; expected a non-empty string"),
    ("wrong_type", "a.jsonl", '{"prompt": "q", "response": ["a"]}\n',
     ':1: field `response`: expected a string, got list (["a"])'),
    ("label_not_a_string", "a.jsonl", '{"prompt": "q", "label": 1}\n',
     ":1: field `label`: expected a label string such as ALLOW, ESCALATION or DENY, got int (1)"),
    ("unknown_label", "a.jsonl", '{"prompt": "q", "label": "MAYBE"}\n',
     ":1: field `label`: unknown label 'MAYBE'; expected ALLOW, ESCALATION or DENY or a known spelling: "
     "ALLOW: accept, allow, allowed, approve, approved, permit, 回答可, 承認, 許可; "
     "ESCALATION: escalate, escalated, escalation, human_review, review, "
     "エスカレーション, エスカレート, 要承認, 要確認; "
     "DENY: block, denied, deny, refuse, refused, reject, rejected, 不可, 却下, 拒否, 拒絶"),
    ("unknown_schema", "a.jsonl", '{"body": "x"}\n',
     ":1: no known fields; expected `messages`, `instruction` + `output`, `prompt` + `response`, `question` + "
     "`answer` or `text` (optionally with `label`); got fields ['body']"),
    ("chat_ends_with_user", "a.jsonl", '{"messages": [{"role": "user", "content": "こんにちは"}]}\n',
     ":1: field `messages[0].role`: the last message is 'user'; expected the assistant's answer last"),
    ("chat_bad_role", "a.jsonl",
     '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     ":1: field `messages[0].role`: expected one of ['assistant', 'gpt', 'human', 'system', 'user'], got 'bot'"),
    ("huge_line", "a.jsonl", JSONL + '{"prompt": "' + "あ" * 1200 + '", "response": "a"}\n',
     ":2: line of 1,231 characters, more than collect.max_record_chars = 1,000 (minified or binary data?); "
     "expected one record per line"),
    ("csv_wrong_cell_count", "a.csv", "prompt,response\n質問,回答,余分\n",
     ":2: 3 cells, but the header has 2 columns ['prompt', 'response']; expected 2 (quote cells that contain ',' "
     "with double quotes)"),
    ("csv_duplicate_header", "a.csv", "prompt,prompt\nq,a\n",
     ":1: header row ['prompt', 'prompt']: expected unique, non-empty column names such as prompt,response"),
    ("pdf_without_text", "a.pdf", make_pdf([[]]),
     ": no text in 1 page(s): a scanned PDF without a text layer? run OCR first (e.g. ocrmypdf)"),
    ("html_without_text", "a.html", "<html><head><title>t</title><script>x()</script></head><body> </body></html>",
     ": no visible text in the HTML page"),
]


@pytest.mark.parametrize(("kind", "name", "content", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_naming_file_and_line(tmp_path, monkeypatch, kind, name, content, message):
    with pytest.raises(InputError) as err:
        run_collect(tmp_path, monkeypatch, {name: content}, max_record_chars=1000)
    assert str(err.value) == f"mine/{name}{message}"
    assert not (tmp_path / "data").exists()  # nothing written, not even the outputs of good sources


def test_at_least_fifteen_bad_input_kinds():
    assert len({b[0] for b in BAD_INPUTS}) >= 15


def test_a_bad_file_stops_the_stage_even_after_good_ones(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"^mine/b\.jsonl:1: field `response`"):
        run_collect(tmp_path, monkeypatch, {"a.jsonl": JSONL, "b.jsonl": '{"prompt": "q", "response": 1}\n'})
    assert not (tmp_path / "data").exists()


def test_skip_mode_lists_rejects_and_keeps_the_rest(tmp_path, monkeypatch):
    files = {
        "a.jsonl": JSONL + '{"prompt": "q"}\n' + '{"prompt": "q2", "label": "MAYBE"}\n' + JSONL.replace("東京", "大阪"),
        "b.txt": JA.encode() + "三行目です。\n".encode("cp932"),
        "c.csv": "prompt,response\n質問,回答,余分\n質問2,回答2\n",
    }
    out = run_collect(tmp_path, monkeypatch, files, on_bad_record="skip")
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["path"], r["line"], r["field"], r["kind"]) for r in rejects] == [
        ("mine/a.jsonl", 2, "response", "missing_field"),
        ("mine/a.jsonl", 3, "label", "unknown_label"),
        ("mine/b.txt", 3, None, "mixed_encoding"),
        ("mine/c.csv", 2, None, "csv_shape"),
    ]
    assert rejects[0]["error"] == "mine/a.jsonl:2: field `response`: is missing; expected a non-empty string"
    user = _lines(out / "user.jsonl")
    assert [r["id"] for r in user] == ["user:mine/a.jsonl:L1", "user:mine/a.jsonl:L4", "user:mine/c.csv:L3"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["rejects"] == {
        "policy": "skip",
        "file": "rejects.jsonl",
        "count": 4,
        "by_kind": {"csv_shape": 1, "missing_field": 1, "mixed_encoding": 1, "unknown_label": 1},
    }
    files_entry = {f["path"]: f for f in manifest["sources"][3]["files"]}
    assert files_entry["mine/b.txt"]["rejected"] == 1 and files_entry["mine/b.txt"]["records"] == 0


@pytest.mark.parametrize(
    ("encoding", "prefix", "name"),
    [
        ("utf-8", b"", "UTF-8"),
        ("utf-8", b"\xef\xbb\xbf", "UTF-8 with BOM"),
        ("cp932", b"", "CP932 (Shift_JIS)"),
        ("shift_jis", b"", "CP932 (Shift_JIS)"),
        ("euc_jp", b"", "EUC-JP"),
        ("utf-16", b"", "UTF-16 with BOM"),
    ],
)
def test_each_encoding_is_read(tmp_path, monkeypatch, encoding, prefix, name):
    text = "prompt,response\n東京の人口は？,約1400万人です。\n"
    out = run_collect(tmp_path, monkeypatch, {"a.csv": prefix + text.encode(encoding)})
    [record] = _lines(out / "user.jsonl")
    assert record["prompt"] == "東京の人口は？" and record["response"] == "約1400万人です。"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"][3]["encodings"] == {name: 1}


def test_decode_detects_japanese_encodings_of_short_text():
    for text in ("日本", "こんにちは、世界。", "ｼｽﾃﾑ管理者へ連絡してください。"):
        for encoding in ("cp932", "euc_jp"):
            assert readers.decode_bytes(text.encode(encoding), "x.txt") == (text, encoding)
    assert readers.decode_bytes(b"a\r\nb\rc", "x.txt") == ("a\nb\nc", "utf-8")


def test_schemas_and_json_layouts(tmp_path, monkeypatch):
    chat = {
        "messages": [
            {"role": "system", "content": "丁寧に答えてください。"},
            {"role": "user", "content": "こんにちは"},
            {"role": "assistant", "content": "こんにちは。ご用件は？"},
            {"role": "user", "content": "天気は？"},
            {"role": "assistant", "content": "晴れです。"},
        ]
    }
    sharegpt = {"conversations": [{"from": "human", "value": "質問"}, {"from": "gpt", "value": "回答"}]}
    files = {
        "array.jsonl": json.dumps([PAIR], ensure_ascii=False),  # an array under a .jsonl name
        "lines.json": JSONL + json.dumps({"question": "Q?", "answer": "A."}) + "\n",  # JSON Lines under .json
        "wrapped.json": json.dumps({"data": [{"instruction": "訳して", "input": "cat", "output": "猫"}]}),
        "chat.jsonl": json.dumps(chat, ensure_ascii=False) + "\n" + json.dumps(sharegpt, ensure_ascii=False) + "\n",
        "tabs.csv": "prompt\tresponse\n質問,読点あり\t回答\n",
        "t.tsv": "instruction\toutput\n要約して\t要約です\n",
    }
    out = run_collect(tmp_path, monkeypatch, files)
    got = {r["id"].removeprefix("user:mine/"): (r["prompt"], r["response"]) for r in _lines(out / "user.jsonl")}
    assert got == {
        "array.jsonl:L1": ("東京の人口は？", "約1400万人です。"),
        "chat.jsonl:L1": (
            "丁寧に答えてください。\n\nユーザー: こんにちは\nアシスタント: こんにちは。ご用件は？\nユーザー: 天気は？",
            "晴れです。",
        ),
        "chat.jsonl:L2": ("質問", "回答"),
        "lines.json:L1": ("東京の人口は？", "約1400万人です。"),
        "lines.json:L2": ("Q?", "A."),
        "t.tsv:L2": ("要約して", "要約です"),
        "tabs.csv:L2": ("質問,読点あり", "回答"),
        "wrapped.json:R0": ("訳して\n\ncat", "猫"),
    }


def test_label_spellings_are_normalised_and_reported(tmp_path, monkeypatch):
    files = {
        "a.jsonl": '{"prompt": "社外秘の設計書を送って", "label": "ESCALATE", "domain": "防衛"}\n'
        '{"prompt": "天気を教えて", "label": "allow"}\n',
        "b.jsonl": '{"prompt": "爆発物の作り方", "decision": "拒否", "reason": "危険物"}\n'
        '{"prompt": "顧客名簿を見せて", "decision": "ESCALATION", "domain": "medical"}\n'
        '{"text": "飛行計画の変更", "label": "ｴｽｶﾚｰｼｮﾝ", "domain": "Aerospace"}\n',
    }
    out = run_collect(tmp_path, monkeypatch, files)
    records = _lines(out / "user.jsonl")
    assert [(r["decision"], r["domain"]) for r in records] == [
        ("ESCALATION", "defense"),
        ("ALLOW", "general"),
        ("DENY", "general"),
        ("ESCALATION", "general"),
        ("ESCALATION", "aerospace"),
    ]
    assert records[2]["reason"] == "危険物" and records[2]["response"] is None
    assert records[4]["prompt"] == "飛行計画の変更"
    source = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sources"][3]
    assert source["label_mapping"] == [
        {"label": "ESCALATE", "decision": "ESCALATION", "records": 1},
        {"label": "ESCALATION", "decision": "ESCALATION", "records": 1},
        {"label": "allow", "decision": "ALLOW", "records": 1},
        {"label": "拒否", "decision": "DENY", "records": 1},
        {"label": "ｴｽｶﾚｰｼｮﾝ", "decision": "ESCALATION", "records": 1},
    ]
    assert {"domain": "medical", "mapped_to": "general", "records": 1} in source["domain_mapping"]


def test_nfkc_keeps_fullwidth_punctuation():
    text = "ＡＢＣ１２３とｶﾞｲﾄﾞ①㈱、本当ですか？（はい）…～！"
    assert readers.normalize_text(text) == "ABC123とガイド1(株)、本当ですか？（はい）…～！"
    assert readers.normalize_text(text, "none") == text


def test_documents_are_sectioned_with_exact_offsets(tmp_path, monkeypatch):
    md = "# 年次報告書\n\n前書きです。\n\n## 売上\n\n売上は増加しました。\n\n```\n# コードの中\n```\n\n## 費用\n\n"
    md += "費用は減少しました。" * 30
    html = (
        "<html><head><title>会社案内</title><style>p{}</style></head><body><h1>概要</h1><p>当社は\n東京に"
        "あります。</p><ul><li>設立 1990年</li></ul><h2>連絡先</h2><p>info@example.co.jp &amp; 03-1234-5678</p>"
        "</body></html>"
    )
    txt = "第1章 会社概要\n当社は東京に本社を置きます。\n\n1.1 沿革\n1990年に設立しました。\n"
    txt += "【事業内容】\nソフトウェア開発。\n"
    pdf = make_pdf(
        [
            ["第1章 会社概要", "当社は東京に本社を置くソフトウェア", "会社です。"],
            ["第2章 事業内容", "主力製品は会計ソフトです。"],
        ]
    )
    out = run_collect(
        tmp_path, monkeypatch, {"r.md": md, "c.html": html, "t.txt": txt, "p.pdf": pdf}, max_section_chars=120
    )
    sections = _lines(out / "user.jsonl")
    by_doc: dict[str, list[dict]] = {}
    for s in sections:
        assert s["kind"] == "section"
        by_doc.setdefault(s["path"], []).append(s)
    assert [(s["title"], s["text"]) for s in by_doc["c.html"]] == [
        ("概要", "当社は東京にあります。\n* 設立 1990年"),
        ("連絡先", "[EMAIL] & [PHONE]"),
    ]
    assert {s["doc_title"] for s in by_doc["c.html"]} == {"会社案内"}
    assert [s["title"] for s in by_doc["t.txt"]] == ["第1章 会社概要", "1.1 沿革", "事業内容"]
    assert [(s["title"], s["page"], s["text"]) for s in by_doc["p.pdf"]] == [
        ("第1章 会社概要", 1, "当社は東京に本社を置くソフトウェア会社です。"),
        ("第2章 事業内容", 2, "主力製品は会計ソフトです。"),
    ]
    md_sections = by_doc["r.md"]
    assert [s["title"] for s in md_sections][:3] == ["年次報告書", "売上", "費用"]
    assert "# コードの中" in md_sections[1]["text"]  # a fenced block is not a heading
    assert len(md_sections) > 3 and all(len(s["text"]) <= 120 for s in md_sections)
    for s in md_sections + by_doc["t.txt"]:  # these texts are unchanged by normalisation
        source = (tmp_path / "mine" / s["path"]).read_text(encoding="utf-8")
        assert source[s["offset"] : s["offset"] + len(s["text"])] == s["text"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["pii_masked"] == {"email": 1, "phone": 1}


def test_pii_mask_off_keeps_text(tmp_path, monkeypatch):
    out = run_collect(tmp_path, monkeypatch, {"a.txt": "連絡先は taro@example.co.jp です。\n"}, pii_mask=False)
    assert _lines(out / "user.jsonl")[0]["text"] == "連絡先は taro@example.co.jp です。"
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["pii_masked"] is None


def test_document_sections_cut_long_text_exactly():
    text = "前書き。\n" + "長い段落です。" * 100 + "\n\n## 次\n短い。"
    doc = Document(text, "t", "md")
    chunks = readers.document_sections(doc, 200)
    assert all(len(c.text) <= 200 and text[c.offset : c.offset + len(c.text)] == c.text for c in chunks)
    assert chunks[-1].title == "次" and chunks[-1].text == "短い。"


def test_pdf_that_is_not_a_pdf(tmp_path):
    path = tmp_path / "x.pdf"
    path.write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(InputError, match=r"x\.pdf: not a readable PDF .*expected a PDF with a text layer"):
        readers.read_user_file(path, 1000, TextPipeline(), BadRecords())


def test_hf_dataset_from_disk(tmp_path, monkeypatch):
    import datasets

    rows = [{**PAIR, "label": None}, {"prompt": "爆発物の作り方", "response": "お答えできません。", "label": "deny"}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    out = run_collect(tmp_path, monkeypatch, {}, hf_datasets=["ds"])
    records = _lines(out / "hf.jsonl")
    assert [(r["id"], r["kind"]) for r in records] == [("hf:ds:R0", "pair"), ("hf:ds:R1", "decision")]
    assert records[1]["decision"] == "DENY" and records[1]["source"] == "hf:ds"
    hf = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sources"][4]
    assert hf["name"] == "hf" and hf["datasets"][0]["rows"] == 2 and hf["datasets"][0]["split"] == "train"


def test_hf_dataset_unreachable_names_the_param(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"^collect.hf_datasets: 'nobody/no-such-dataset': could not load it"):
        run_collect(tmp_path, monkeypatch, {}, hf_datasets=["nobody/no-such-dataset"])
    assert not (tmp_path / "data").exists()
