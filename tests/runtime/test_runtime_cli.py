"""The `so8t` command line with a fake model: ask, chat, keygen and error exits."""

from __future__ import annotations

import json

import pytest
import yaml
from fakes import ANSWER, OUTPUTS, REASONING, FakeModel, make_agent

from so8t.runtime import cli
from so8t.runtime.server import ApiKeys


@pytest.fixture
def fake_agent(tmp_path, monkeypatch):
    agent = make_agent(tmp_path, FakeModel(OUTPUTS["reopen"], piece=2))
    monkeypatch.setattr(cli, "_agent", lambda args: agent)
    return agent


def test_ask_prints_decision_answer_and_no_reasoning(fake_agent, capsys):
    assert cli.main(["ask", "質問", "--user", "bob"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("判定: ALLOW  確信度: ") and ANSWER in out and REASONING not in out
    (row,) = fake_agent.audit.rows()
    assert row["user_id"] == "bob" and row["channel"] == "cli"


def test_ask_json(fake_agent, capsys):
    assert cli.main(["ask", "質問", "--json", "--level", "機密"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["answer"].startswith(ANSWER) and ans["decision"] == "ALLOW"
    assert REASONING not in json.dumps(ans, ensure_ascii=False)
    assert next(fake_agent.audit.rows())["access_level"] == "機密"


def test_chat_keeps_only_shown_answers_in_the_context(fake_agent, monkeypatch, capsys):
    lines = iter(["一つ目", "", "二つ目", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--history", "1"]) == 0
    prompts = fake_agent.model.prompts
    assert len(prompts) == 2
    assert "一つ目" in prompts[1] and ANSWER in prompts[1] and REASONING not in prompts[1]
    assert fake_agent.audit.count() == 2 and {r["channel"] for r in fake_agent.audit.rows()} == {"chat"}
    assert capsys.readouterr().out.count("判定: ALLOW") == 2


def test_keygen_entry_loads(tmp_path, capsys):
    assert cli.main(["keygen", "--user", "carol", "--level", "confidential"]) == 0
    out = capsys.readouterr().out.splitlines()
    key, entry = out[0], "\n".join(out[1:])
    path = tmp_path / "keys.yaml"
    path.write_text(entry, encoding="utf-8")
    assert yaml.safe_load(entry)[0]["access_level"] == "機密"
    who = ApiKeys.load(path, None).lookup(key)
    assert who.user == "carol" and who.level.ja == "機密"
    assert key not in entry


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["ask", "q", "--params", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("runtime:\n  allow_threshold: 2\n", encoding="utf-8")
    assert cli.main(["ask", "q", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "runtime.allow_threshold" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text(f"runtime:\n  model: {tmp_path}/missing.gguf\n", encoding="utf-8")
    assert cli.main(["ask", "q", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    assert cli.main(["keygen", "--user", "x", "--level", "top"]) == 2
    assert cli.main(["ollama", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "so8t-*.gguf" in capsys.readouterr().err
