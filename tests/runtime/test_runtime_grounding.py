"""Citations are the passages the answer cites (【資料 n】, n as numbered in the prompt), and every ALLOW
carries a grounding flag (cited, abstained, uncited, unsupported, no_passages), in the answer, the audit
row, the HTTP responses and the CLI."""

from __future__ import annotations

import json

import pytest
from fakes import ALICE, REASONING, FakeModel, make_agent
from fastapi.testclient import TestClient

from so8t.access import parse_level
from so8t.data.grounding import ABSTAIN_ANSWER, PASSAGE_FORMAT, fit_passages
from so8t.data.retrieval import Passage
from so8t.runtime import cli
from so8t.runtime.agent import AgentInputError, grounded
from so8t.runtime.audit import load_or_create_key, verify_chain
from so8t.runtime.server import ApiKeys, create_app

APT = "apt install でパッケージを導入します。更新は apt upgrade で行います。"
DNF = "Fedora では dnf install でパッケージを導入します。"
ZYPPER = "openSUSE では zypper install を使います。"
UNSUPPORTED = "社内規程により、毎週月曜日の朝に全サーバーを再起動します。"


def passage(doc_id: str, text: str, n: int = 0) -> Passage:
    return Passage(doc_id, f"{doc_id}@{n}" if n else doc_id, doc_id.split("/")[-1], text, parse_level("公開"), doc_id)


#: Retrieved, best first: the first two fit the budget below, the third does not.
FOUND = [passage("docs/apt.md", APT), passage("docs/dnf.md", DNF), passage("docs/zypper.md", ZYPPER)]


def budget(passages: list[Passage], whole: int) -> int:
    """A ``max_passage_tokens`` that fits the first ``whole`` passages and leaves too little (< 16) to cut the next."""
    blocks = [
        len(PASSAGE_FORMAT.format(n=n, doc_id=p.doc_id, title=p.title, text=p.text))
        for n, p in enumerate(passages, start=1)
    ]
    return sum(blocks[:whole]) + 10


class FixedRetriever:
    """A retriever that finds ``passages`` for every question and level."""

    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages

    def search(self, query, level, k=None):
        return list(self.passages)


def said(answer: str) -> str:
    """A model output whose final answer is ``answer``."""
    return f"# 思考ステップ\n{REASONING}\n# 最終回答\n{answer}\n判定: ALLOW"


def agent_for(tmp_path, answer: str, passages=FOUND, logits=(0.0, -4.0, -4.0), whole: int = 2):
    model = FakeModel(said(answer), logits)
    retriever = FixedRetriever(passages) if passages is not None else None
    return make_agent(tmp_path, model, retriever=retriever, max_passage_tokens=budget(passages or [], whole))


def verified(agent) -> bool:
    return verify_chain(agent.audit.path, load_or_create_key(agent.audit.key_file), agent.audit.anchor).ok


def test_the_budget_fits_two_of_three_passages():
    fitted = fit_passages([(p.doc_id, p.title, p.text) for p in FOUND], len, budget(FOUND, 2))
    assert [d for d, _, _ in fitted] == ["docs/apt.md", "docs/dnf.md"]


@pytest.mark.parametrize("citation", ["【資料 2】", "【資料２】", "【 資料 2 】", "【資料 2: docs/dnf.md】"])
def test_citations_are_the_cited_passages_only(tmp_path, citation):
    agent = agent_for(tmp_path, f"Fedora では dnf install で導入します。{citation}")
    ans = agent.ask("パッケージを入れるには？", ALICE)
    assert ans.decision == "ALLOW" and citation in ans.answer
    assert ans.citations == ["docs/dnf.md"] and ans.grounding == "cited"
    prompt = agent.model.prompts[0]
    assert "【資料 2: docs/dnf.md】" in prompt and "docs/zypper.md" not in prompt
    (row,) = agent.audit.rows()
    assert json.loads(row["citations"]) == ["docs/dnf.md"] and row["grounding"] == "cited"
    # The retrieved documents stay in doc_ids, the one that did not fit the prompt too.
    assert json.loads(row["doc_ids"]) == ["docs/apt.md", "docs/dnf.md", "docs/zypper.md"]
    assert verified(agent)


def test_citations_keep_the_answers_order_without_repeats(tmp_path):
    ans = agent_for(tmp_path, "dnf を使います【資料 2】。apt も使えます【資料 1】【資料 2】。").ask("q", ALICE)
    assert ans.citations == ["docs/dnf.md", "docs/apt.md"] and ans.grounding == "cited"


def test_two_passages_of_one_document_are_cited_once(tmp_path):
    pieces = [passage("docs/apt.md", APT, 1), passage("docs/apt.md", "apt remove で削除します。", 2)]
    ans = agent_for(tmp_path, "apt で導入し【資料 2】、削除します【資料 1】。", pieces).ask("q", ALICE)
    assert ans.citations == ["docs/apt.md"]


@pytest.mark.parametrize("bad", ["【資料 3】", "【資料 0】", "【資料 9】", "【資料 3】【資料 0】【資料 99】"])
def test_a_citation_outside_the_prompts_passages_is_ignored(tmp_path, bad):
    """Passage 3 was retrieved but did not fit the prompt: its number cites nothing."""
    agent = agent_for(tmp_path, f"{UNSUPPORTED}{bad}")
    ans = agent.ask("q", ALICE)
    assert ans.citations == [] and ans.grounding == "unsupported"
    ans = agent_for(tmp_path / "b", f"apt で導入します。{bad}【資料 1】").ask("q", ALICE)
    assert ans.citations == ["docs/apt.md"] and ans.grounding == "cited"


def test_an_uncited_answer_not_in_the_passages_is_unsupported_and_audited(tmp_path):
    agent = agent_for(tmp_path, UNSUPPORTED)
    ans = agent.ask("再起動の予定は？", ALICE)
    assert ans.decision == "ALLOW" and ans.answer == UNSUPPORTED
    assert ans.citations == [] and ans.grounding == "unsupported"
    assert ans.to_dict()["grounding"] == "unsupported"
    json.dumps(ans.to_dict(), ensure_ascii=False)  # JSON-ready
    (row,) = agent.audit.rows()
    assert row["grounding"] == "unsupported" and json.loads(row["citations"]) == []
    assert verified(agent)


def test_an_uncited_answer_taken_from_the_passages_is_uncited(tmp_path):
    ans = agent_for(tmp_path, DNF).ask("q", ALICE)
    assert ans.citations == [] and ans.grounding == "uncited"


def test_an_uncited_answer_from_a_passage_that_did_not_fit_is_unsupported(tmp_path):
    """Support is checked against the passages as the prompt showed them, not every retrieved one."""
    ans = agent_for(tmp_path, ZYPPER).ask("q", ALICE)
    assert ans.grounding == "unsupported"


def test_an_answer_too_short_to_check_is_unsupported(tmp_path):
    ans = agent_for(tmp_path, "はい。").ask("q", ALICE)
    assert ans.citations == [] and ans.grounding == "unsupported"


@pytest.mark.parametrize("answer", [ABSTAIN_ANSWER, "申し訳ありませんが、資料には該当する記載がありません。"])
def test_an_abstention_is_abstained(tmp_path, answer):
    agent = agent_for(tmp_path, answer)
    ans = agent.ask("q", ALICE)
    assert ans.decision == "ALLOW" and ans.citations == [] and ans.grounding == "abstained"
    assert next(agent.audit.rows())["grounding"] == "abstained"


@pytest.mark.parametrize("logits, decision", [((-5, -5, 0), "DENY"), ((-5, 0, -5), "ESCALATION")])
def test_deny_and_escalation_have_no_citations_nor_grounding(tmp_path, logits, decision):
    agent = agent_for(tmp_path, "dnf を使います。【資料 2】", logits=logits)
    ans = agent.ask("q", ALICE)
    assert ans.decision == decision and ans.citations == [] and ans.grounding is None
    assert ans.to_dict()["grounding"] is None
    (row,) = agent.audit.rows()
    assert row["grounding"] is None and json.loads(row["citations"]) == []
    assert json.loads(row["doc_ids"]) == ["docs/apt.md", "docs/dnf.md", "docs/zypper.md"]
    assert verified(agent)


@pytest.mark.parametrize("passages", [None, []], ids=["retrieval off", "nothing found"])
def test_no_passages(tmp_path, passages):
    agent = agent_for(tmp_path, "dnf を使います。【資料 1】", passages)
    ans = agent.ask("q", ALICE)
    assert ans.citations == [] and ans.grounding == "no_passages"
    assert next(agent.audit.rows())["grounding"] == "no_passages"


def test_no_passage_fits_the_budget(tmp_path):
    ans = agent_for(tmp_path, "apt で導入します。【資料 1】", whole=0).ask("q", ALICE)
    assert "【資料 1:" not in ans.answer and ans.citations == [] and ans.grounding == "no_passages"


def test_an_error_row_has_no_citations(tmp_path):
    agent = agent_for(tmp_path, "x")
    with pytest.raises(AgentInputError):
        agent.answer([{"role": "robot", "content": "x"}], ALICE)
    (row,) = agent.audit.rows()
    assert row["decision"] == "ERROR" and row["grounding"] is None and json.loads(row["citations"]) == []


def test_grounded_directly():
    fitted = [(p.doc_id, p.title, p.text) for p in FOUND[:2]]
    assert grounded("x【資料 2】", FOUND, fitted) == (["docs/dnf.md"], "cited")
    assert grounded(f"{DNF}【資料 3】", FOUND, fitted) == ([], "uncited")
    assert grounded(ABSTAIN_ANSWER, FOUND, fitted) == ([], "abstained")
    assert grounded(UNSUPPORTED, FOUND, fitted) == ([], "unsupported")
    assert grounded(f"{DNF}{UNSUPPORTED}", FOUND, fitted) == ([], "unsupported")  # one sentence of two
    assert grounded("x【資料 1】", FOUND, []) == ([], "no_passages")


# --------------------------------------------------------------------------- HTTP and CLI


def test_grounding_over_http(tmp_path):
    agent = agent_for(tmp_path, UNSUPPORTED)
    keys = ApiKeys()
    keys.add("k-1", "alice", "公開")
    client = TestClient(create_app(agent, keys))
    auth = {"Authorization": "Bearer k-1"}
    body = client.post("/v1/decide", headers=auth, json={"prompt": "q"}).json()
    assert body["citations"] == [] and body["grounding"] == "unsupported"
    msgs = [{"role": "user", "content": "q"}]
    body = client.post("/v1/chat/completions", headers=auth, json={"messages": msgs}).json()
    assert body["so8t"]["grounding"] == "unsupported" and body["so8t"]["citations"] == []
    with client.stream("POST", "/v1/chat/completions", headers=auth, json={"messages": msgs, "stream": True}) as r:
        raw = "".join(r.iter_text())
    last = json.loads([e for e in raw.split("\n\n") if e.startswith("data: {")][-1][len("data: ") :])
    assert last["so8t"]["grounding"] == "unsupported"

    cited = agent_for(tmp_path / "b", "dnf を使います。【資料 2】")
    body = TestClient(create_app(cited, keys)).post("/v1/decide", headers=auth, json={"prompt": "q"}).json()
    assert body["citations"] == ["docs/dnf.md"] and body["grounding"] == "cited"


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_warns_of_an_unsupported_answer(tmp_path, monkeypatch, capsys, as_json):
    agent = agent_for(tmp_path, UNSUPPORTED)
    monkeypatch.setattr(cli, "_agent", lambda args: agent)
    assert cli.main(["ask", "q", *(["--json"] if as_json else [])]) == 0
    out, err = capsys.readouterr()
    assert cli.UNSUPPORTED_WARNING in err and "warning" in err and cli.UNSUPPORTED_WARNING not in out
    if as_json:
        assert json.loads(out)["grounding"] == "unsupported"
    else:
        assert UNSUPPORTED in out and "出典" not in out


def test_cli_prints_the_cited_documents_without_a_warning(tmp_path, monkeypatch, capsys):
    agent = agent_for(tmp_path, "dnf を使います。【資料 2】")
    monkeypatch.setattr(cli, "_agent", lambda args: agent)
    assert cli.main(["ask", "q"]) == 0
    out, err = capsys.readouterr()
    assert "出典: docs/dnf.md\n" in out and "docs/apt.md" not in out and cli.UNSUPPORTED_WARNING not in err
