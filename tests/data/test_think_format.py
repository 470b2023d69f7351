import pytest

from so8t.schema import Record
from so8t.data.think_format import (
    FormatStats,
    assistant_text,
    encode,
    format_record,
    parse_assistant,
    split_groups,
)


@pytest.fixture(scope="module")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


def _rec(**kw):
    base = dict(id="r1", task="decision", prompt="しつもん", thinking="かんがえ。りゆう。", response="かいとう",
                decision="DENY", domain="defense", reason="りゆう", group="g1", source="s")
    base.update(kw)
    return Record(**base)


def test_markdown_assistant_starts_with_the_decision_line():
    text = assistant_text(_rec(), "markdown")
    assert text == "判定: DENY\n# 思考ステップ\nかんがえ。りゆう。\n# 最終回答\nかいとう"
    assert parse_assistant(text, "markdown") == ("# 思考ステップ\nかんがえ。りゆう。", "かいとう", "DENY")


def test_every_task_states_a_decision_and_benign_tasks_are_allow():
    faq = _rec(task="qa_faq", decision=None, domain=None, reason=None)
    assert assistant_text(faq, "markdown").startswith("判定: ALLOW\n# 思考ステップ\n")


def test_tags_style_has_safety_and_policy_sections():
    text = assistant_text(_rec(), "tags")
    assert text.startswith(
        "判定: DENY\n<think-safety>\nかんがえ。りゆう。\n</think-safety>\n<think-policy>\nりゆう\n</think-policy>\n<final>\n"
    )
    assert text.endswith("かいとう\n</final>")
    assert parse_assistant(text, "tags")[1:] == ("かいとう", "DENY")


def test_parse_without_final_marker_never_returns_reasoning_as_answer():
    assert parse_assistant("# 思考ステップ\nひみつ", "markdown") == ("# 思考ステップ\nひみつ", "", None)


def test_labels_mask_the_prompt_and_cover_the_answer(tokenizer):
    enc = encode(tokenizer, "しつもん", assistant_text(_rec(), "markdown"))
    n_prompt = len(tokenizer(enc.prompt_text, add_special_tokens=False)["input_ids"])
    assert all(label == -100 for label in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    answer = "".join(tokenizer.convert_ids_to_tokens([t for t in enc.labels if t != -100]))
    assert answer == enc.completion_text
    assert answer.startswith("判定: DENY\n") and answer.endswith("かいとう<end_of_turn>\n")


def test_truncation_shortens_reasoning_first_then_drops(tokenizer):
    stats = FormatStats()
    rec = _rec(thinking="ながいかんがえ。" * 30)
    full = format_record(rec, tokenizer, "markdown", 10_000, stats)
    short = format_record(rec, tokenizer, "markdown", full["n_tokens"] - 20, stats)
    assert short is not None and short["shortened"]
    assert short["completion_text"].startswith("判定: DENY\n")
    assert short["completion_text"].rstrip().endswith("かいとう<end_of_turn>")
    assert format_record(rec, tokenizer, "markdown", 10, stats) is None
    assert stats.shortened["decision"] == 1 and stats.dropped["decision"] == 1


def test_split_is_grouped_and_stratified():
    recs = []
    for label in ("ALLOW", "ESCALATION", "DENY"):
        for g in range(10):
            for k in range(3):
                recs.append(_rec(id=f"{label}-{g}-{k}", decision=label, group=f"{label}-{g}"))
    for g in range(20):
        recs.append(_rec(id=f"m{g}", task="math", decision=None, domain=None, group=f"gsm-{g}"))
    assign = split_groups(recs, (0.8, 0.1, 0.1), seed=1)
    assert set(assign) == {r.group for r in recs}  # every group gets exactly one split
    for label in ("ALLOW", "ESCALATION", "DENY"):
        splits = [assign[f"{label}-{g}"] for g in range(10)]
        assert splits.count("train") == 8 and splits.count("val") == 1 and splits.count("test") == 1
    maths = [assign[f"gsm-{g}"] for g in range(20)]
    assert maths.count("train") == 16 and maths.count("val") == 2 and maths.count("test") == 2
    assert split_groups(recs, (0.8, 0.1, 0.1), seed=1) == assign


def test_decision_split_is_stratified_by_domain_with_its_own_fractions():
    recs = []
    for domain in ("defense", "aerospace", "transport", "general"):
        for label in ("ALLOW", "ESCALATION", "DENY"):
            for g in range(20):
                recs += [_rec(id=f"{domain}-{label}-{g}-{k}", decision=label, domain=domain, group=f"{domain}-{label}-{g}")
                         for k in range(2)]
    assign = split_groups(recs, (0.8, 0.1, 0.1), seed=3, fractions_by_task={"decision": (0.7, 0.15, 0.15)})
    for domain in ("defense", "aerospace", "transport", "general"):
        for label in ("ALLOW", "ESCALATION", "DENY"):
            splits = [assign[f"{domain}-{label}-{g}"] for g in range(20)]
            assert (splits.count("train"), splits.count("val"), splits.count("test")) == (14, 3, 3)
