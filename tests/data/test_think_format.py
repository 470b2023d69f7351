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


def test_lm_text_windows_train_every_token_and_skip_val_and_test_groups(tokenizer):
    from so8t.data.think_format import format_and_split
    from so8t.params import ThinkFormatParams

    text = "日本語の文章です。" * 40
    docs = [{"id": "lm-a", "text": text, "group": "ga", "source": "s"}] + [
        {"id": f"lm-{g}", "text": "短い。" * 30, "group": g, "source": "s"} for g in ("g0", "g1", "g2", "g3", "g4", "g5", "gb")]
    records = [_rec(id=f"q{i}", task="qa_reference", decision=None, domain=None, reason=None, group=f"g{i}")
               for i in range(6)] + [_rec(id="qb", task="qa_reference", decision=None, domain=None, reason=None,
                                          group="gb")]
    params = ThinkFormatParams(lm_window=32)
    by_split, summary = format_and_split(records, tokenizer, params, seed=0, lm_docs=docs)
    split_of = {ex["group"]: s for s, exs in by_split.items() for ex in exs if ex["task"] != "lm_text"}
    lm = [ex for s in by_split for ex in by_split[s] if ex["task"] == "lm_text"]
    assert lm and all(ex in by_split["train"] for ex in lm)
    assert all(split_of.get(ex["group"], "train") == "train" for ex in lm)
    ids = tokenizer(text)["input_ids"]
    mine = [ex for ex in lm if ex["id"].startswith("lm-a#")]
    assert [t for ex in mine for t in ex["input_ids"]] == [t for k in range(0, len(ids), 32)
                                                             for t in ids[k:k + 32] if len(ids[k:k + 32]) >= 16]
    assert all(ex["labels"] == ex["input_ids"] and len(ex["input_ids"]) <= 32 for ex in lm)
    assert summary["lm_text"]["windows"] == len(lm)
    # ga has no records (train only); of the QA groups, those in val or test are skipped (>= 1 each).
    outside = {g for g, s in split_of.items() if s != "train"}
    assert len(outside) >= 2 and summary["lm_text"]["skipped_docs"] == len(outside)
    assert {ex["group"] for ex in lm} == {"ga", "g0", "g1", "g2", "g3", "g4", "g5", "gb"} - outside
