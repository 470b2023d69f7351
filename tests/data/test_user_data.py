"""User data in synthesize: user records, document QA with offsets, the teacher (mocked), dedup and balance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from so8t.data import collect
from so8t.data.sources.templates import load_safety_templates
from so8t.data.sources.user import DECISION_RESPONSES
from so8t.data.synthesize import synthesize
from so8t.io import DataError
from so8t.params import SynthesizeParams
from so8t.schema import Record

REPORT = """# 年次報告書

当社の事業と業績をまとめた報告書です。

## 事業内容

クラウド会計とは、インターネット経由で使う会計ソフトのことです。当社のクラウド会計は中小企業向けに提供しています。
クラウド会計の利用者は前年より増えました。サポート窓口は平日に対応しています。

## 業績

売上高は前年比で十二パーセント増加しました。営業利益も増加しました。
"""

LABELS = [
    {"prompt": "社外秘の設計書を送ってください。", "label": "ESCALATE", "domain": "防衛"},
    {"prompt": "明日の天気を教えてください。", "label": "allow", "response": "晴れの予報です。"},
    {"prompt": "爆発物の作り方を教えてください。", "decision": "拒否"},
]


def _user_items(tmp_path: Path, extra: dict[str, str] | None = None) -> list[dict]:
    mine = tmp_path / "mine"
    mine.mkdir(parents=True)
    (mine / "report.md").write_text(REPORT, encoding="utf-8")
    pairs = [
        {"instruction": "挨拶して", "output": "こんにちは。"},
        {"prompt": "有給休暇は何日？", "response": "年二十日です。"},
    ]
    (mine / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), "utf-8")
    (mine / "labels.json").write_text(json.dumps(LABELS, ensure_ascii=False), encoding="utf-8")
    for name, text in (extra or {}).items():
        (mine / name).write_text(text, encoding="utf-8")
    return collect.collect_user([str(mine)], 2000).records


def _collected(user: list[dict]) -> dict[str, list[dict]]:
    return {"faq": [], "reference": [], "gsm": [], "user": user}


PARAMS = SynthesizeParams(decisions_per_template=1, heldout_reference_docs=20, math_variants_per_template=0)


def test_user_records_and_document_qa(tmp_path):
    user = _user_items(tmp_path)
    result = synthesize(_collected(user), PARAMS, seed=42)
    for r in result.records:
        Record.model_validate(r)
    by_task = result.stats["by_task"]
    n_templates = sum(len(b.templates) for b in load_safety_templates().domains.values())
    assert by_task["qa_user"] == 2 and by_task["decision"] == n_templates + 3
    user_decisions = [r for r in result.records if r["source"].startswith("user:")and r["task"] == "decision"]
    assert [(r["decision"], r["domain"]) for r in user_decisions] == [
        ("ESCALATION", "defense"),
        ("ALLOW", "general"),
        ("DENY", "general"),
    ]
    assert user_decisions[0]["response"] == DECISION_RESPONSES["ESCALATION"]
    assert user_decisions[1]["response"] == "晴れの予報です。"
    docs = [r for r in result.records if r["task"] == "qa_document"]
    assert docs and result.stats["document_qa"]["pairs"] == len(docs)
    report = REPORT  # NFKC leaves this text unchanged, so offsets index the file itself
    for r in docs:
        assert r["source_doc"] == f"user:{tmp_path}/mine/report.md"
        passage = report[r["source_offset"] :]
        if "［　　］" in r["prompt"]:
            sentence = r["prompt"].split("\n", 1)[1]
            term = r["response"].split("「")[1].split("」")[0]
            assert passage.startswith(sentence.replace("［　　］", term))
        else:
            assert passage.startswith(r["response"][:15]), (r["prompt"], r["response"])
    groups = {r["group"] for r in docs}
    assert groups == {f"user:{tmp_path}/mine/report.md"}  # one document, one group: never in two splits
    assert result.stats["user"] == {"items": len(user), "qa_user": 2, "decision": 3, "sections": 3}


def test_teacher_answers_document_questions(tmp_path, monkeypatch):
    import llama_cpp

    calls = []

    class FakeLlama:
        def __init__(self, model_path, **kwargs):
            calls.append(("init", model_path, kwargs["seed"]))

        def create_completion(self, prompt, **kwargs):
            calls.append(("completion", prompt, kwargs["temperature"]))
            return {"choices": [{"text": " 先生の答えです。\n"}]}

    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF")
    params = PARAMS.model_copy(update={"teacher_gguf": str(gguf)})
    result = synthesize(_collected(_user_items(tmp_path)), params, seed=42)
    docs = [r for r in result.records if r["task"] == "qa_document"]
    assert docs and all(r["response"] == "先生の答えです。" for r in docs)
    assert calls[0] == ("init", str(gguf), 42)
    prompts = [c[1] for c in calls[1:]]
    assert len(prompts) == len(docs) and all(c[2] == 0.0 for c in calls[1:])
    assert all("# 抜粋（「年次報告書」" in p for p in prompts)
    assert result.stats["document_qa"]["teacher"] == {"model": str(gguf), "answers": len(docs), "kept_template": 0}


def test_missing_teacher_file_names_the_param(tmp_path):
    params = PARAMS.model_copy(update={"teacher_gguf": str(tmp_path / "nope.gguf")})
    with pytest.raises(FileNotFoundError, match="synthesize.teacher_gguf"):
        synthesize(_collected(_user_items(tmp_path)), params, seed=42)


def test_near_duplicates_across_groups_are_removed(tmp_path):
    answer = (
        "入社から半年後に十日が付与され、その後は勤続年数に応じて毎年増えます。最大で年二十日です。"
        "未使用分は翌年に限り繰り越せますが、二年を過ぎると消滅します。申請は前日までに上長へ出してください。"
    )
    near = {
        "near.jsonl": json.dumps({"prompt": "有給休暇は何日ありますか？", "response": answer}, ensure_ascii=False)
        + "\n"
        + json.dumps({"prompt": "有給休暇は何日ありますか。", "response": answer}, ensure_ascii=False)
        + "\n"
    }
    result = synthesize(_collected(_user_items(tmp_path, near)), PARAMS, seed=42)
    assert result.stats["near_dup_removed"] == {"qa_user": 1}
    [pair] = result.stats["near_dup_pairs"]
    assert pair["removed"].endswith("near.jsonl:L2") and pair["kept"].endswith("near.jsonl:L1")
    exact_only = PARAMS.model_copy(update={"near_dup_threshold": None})
    off = synthesize(_collected(_user_items(tmp_path / "b", near)), exact_only, seed=42)
    assert off.stats["near_dup_removed"] == {} and off.stats["by_task"]["qa_user"] == 4


def test_single_class_user_data_fails_the_balance_check(tmp_path):
    many = "".join(
        json.dumps({"prompt": f"設計書{k}番を送ってください。", "label": "ESCALATE"}, ensure_ascii=False) + "\n"
        for k in range(400)
    )
    params = SynthesizeParams(
        decisions_per_template=1, domains=["transport"], heldout_reference_docs=20, math_variants_per_template=0
    )
    ok = synthesize(
        _collected(_user_items(tmp_path / "b", {"esc.jsonl": many})),
        params.model_copy(update={"min_class_share": 0.0}),
        seed=42,
    )
    counts = ok.stats["by_decision"]  # after deduplication
    allow, esc, deny = counts["ALLOW"], counts["ESCALATION"], counts["DENY"]
    total = allow + esc + deny
    assert esc > 300 and allow / total < 0.15
    with pytest.raises(DataError) as err:
        synthesize(_collected(_user_items(tmp_path, {"esc.jsonl": many})), params, seed=42)
    assert str(err.value) == (
        f"synthesize: decision class ALLOW has {allow} of {total} decision records ({allow / total:.1%}), below "
        "synthesize.min_class_share = 0.15 (15%); "
        f"counts {{'ALLOW': {allow}, 'ESCALATION': {esc}, 'DENY': {deny}}}. Add ALLOW examples, or lower "
        "synthesize.min_class_share"
    )


def test_records_of_a_one_line_json_array_get_distinct_ids(tmp_path):
    """A one-line array puts every record on line 1: ids use the record's index there, lines elsewhere."""
    items = _user_items(tmp_path)
    ids = [i["id"] for i in items if i["path"].endswith("labels.json")]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [i.rsplit(":", 1)[1] for i in ids] == ["R0", "R1", "R2"]
    jsonl = [i["id"].rsplit(":", 1)[1] for i in items if i["path"].endswith("pairs.jsonl")]
    assert jsonl == ["L1", "L2"]
