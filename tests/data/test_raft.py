"""Issue 38: RAFT-style grounded QA targets, no val/test document in training, stable QA sets."""

import json
import random

import pytest

from so8t.data.grounding import (
    ABSTAIN_ANSWER,
    Grounder,
    cite,
    cited,
    doc_key,
    doc_unit,
    holds_answer,
    is_abstention,
    sentence_support,
    support,
)
from so8t.data.retrieval import Retriever, Root
from so8t.params import ThinkFormatParams
from so8t.schema import Record

TOPICS = ["りんご", "みかん", "ぶどう", "もも", "なし", "かき", "すいか", "めろん", "いちご", "ばなな",
          "れもん", "くり", "うめ", "びわ", "あんず", "ざくろ", "きうい", "ゆず", "すもも", "いちじく"]


@pytest.fixture(scope="module")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture()
def corpus(tmp_path):
    """20 FAQ entries, one topic each; the answer sentence is inside the entry's text."""
    entries = []
    for k, t in enumerate(TOPICS):
        answer = f"{t}は{k + 1}ばんのくだものです。"
        text = f"{answer}{t}はあまいです。{t}はおいしいです。"
        entries.append({"id": f"faq-{k}", "question": f"{t}とはなんですか?", "answer": text})
    (tmp_path / "faq.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    retriever = Retriever([Root(str(tmp_path), patterns=("faq.jsonl",))], "bigram", top_k=3)
    records = [
        Record(id=f"qa-{e['id']}", task="qa_faq", prompt=e["question"], thinking="かんがえ。",
               response=e["answer"].split("。")[0] + "。", group=e["id"], source="faq")
        for e in entries
    ]
    return retriever, records


def test_answer_checks():
    answer = cite("りんごは1ばんのくだものです。", 2)
    assert answer.endswith("【資料 2】") and cited(answer + "【資料１】【資料 2】") == [2, 1]
    assert is_abstention(ABSTAIN_ANSWER) and is_abstention("資料には記載がありません。")
    assert not is_abstention(answer)
    for ordinary in ("資料によると、この操作は必要ありません。【資料 1】", "【資料 1】によると、再起動は必要ありません。",
                     "ドキュメントをインストールする必要はありません。"):
        assert not is_abstention(ordinary), ordinary
    assert is_abstention("該当する記述は見つかりませんでした。") and is_abstention("文書に答えはありません。")
    assert support(answer, ["りんごは1ばんのくだものです。"]) == (1, 1)
    assert support("ばななはあおいやさいであります。", ["りんごは1ばんのくだものです。"]) == (0, 1)
    assert support(ABSTAIN_ANSWER, ["なにか"]) == (0, 0)
    assert sentence_support("りんごはあかい", "りんごはあかいです") == 1.0
    assert holds_answer("まえおき。りんごは 1ばんの くだものです。", "りんごは1ばんのくだものです。")
    assert doc_key("collected/faq.jsonl#faq-1.1") == "faq-1.1" and doc_key("docs/a.md") == "docs/a.md"
    # a held reference section or user document is held whole: every piece of it
    assert doc_unit("ref-5.3-0") == doc_unit("ref-5.3-2") == "ref-5.3" and doc_unit("notes.md:s2-1") == "notes.md"
    assert doc_unit("faq-1.1") == "faq-1.1"


def test_raft_targets_and_no_held_document_in_training(corpus, tokenizer):
    from so8t.data.think_format import format_and_split

    retriever, records = corpus
    grounder = Grounder(retriever, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]), 400)
    params = ThinkFormatParams(max_length=2048, qa_rag_share=1.0, qa_gold_share=0.5, train_fraction=0.6, val_fraction=0.2,
                               test_fraction=0.2)
    by_split, summary = format_and_split(records, tokenizer, params, seed=0, grounder=grounder)
    held = {e["group"] for s in ("val", "test") for e in by_split[s]}
    assert held and by_split["train"]
    kinds = {e["rag"] for e in by_split["train"]}
    assert {"gold", "abstain"} <= kinds
    texts = {p.doc_id: p.text for p in retriever.passages}
    for e in by_split["train"]:
        assert not {doc_key(d) for d in e["passages"]} & held, e["id"]  # no val / test document shown
        record = next(r for r in records if r.id == e["id"])
        if e["rag"] == "gold":
            n = e["cited"]
            assert f"【資料 {n}】" in e["completion_text"]
            assert holds_answer(texts[e["passages"][n - 1]], record.response)
        elif e["rag"] == "abstain":
            assert ABSTAIN_ANSWER in e["completion_text"]
            assert e["passages"] and record.group not in {doc_key(d) for d in e["passages"]}
            assert not any(holds_answer(texts[d], record.response) for d in e["passages"])
    for s in ("val", "test"):
        assert all(e["rag"] is None for e in by_split[s])


def test_qa_set_is_stable_and_unanswerable_questions_lack_their_document(corpus, tokenizer):
    from so8t.data.think_format import format_and_split
    from so8t.eval.qa import build_qa_set

    retriever, records = corpus
    grounder = Grounder(retriever, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]), 400)
    params = ThinkFormatParams(max_length=2048, train_fraction=0.6, val_fraction=0.2, test_fraction=0.2)
    test = format_and_split(records, tokenizer, params, seed=0, grounder=grounder)[0]["test"]
    first, again = build_qa_set(test, grounder, tokenizer), build_qa_set(test, grounder, tokenizer)
    assert first == again
    answerable = [r for r in first if r["answerable"]]
    assert len(answerable) == len(test)
    assert all(r["gold"] for r in answerable)  # every topic's own entry is retrieved
    removed = [r for r in first if r["kind"] == "removed"]
    assert removed
    for r in removed:
        assert r["group"] not in {doc_key(p[0]) for p in r["passages"]}


def test_question_generation_is_seeded():
    from so8t.data.sources.faq import build_faq_records

    text = "アプトとは、パッケージ管理の道具です。アプトはパッケージを入れます。アプトは便利です。"
    faq = [{"id": f"f{k}", "question": f"質問{k}?", "answer": text, "chapter": "c", "source": "s"} for k in range(5)]
    assert build_faq_records(faq, 3, 1) == build_faq_records(faq, 3, 1)
    records = build_faq_records(faq, 3, 1)
    assert len(records) > len(faq)
    assert {r["group"] for r in records} == {f"f{k}" for k in range(5)}
    assert all(r["response"] in text or r["response"] == text for r in records)
    random.Random(0)
