"""Per-task metrics (:mod:`so8t.eval.task_metrics`): the generated decision line and the runtime policy's
ALLOW recall."""

import pytest


def _scored(rows):
    return [{"id": i, "label": lab, "pred": pred, "logits": z} for i, (lab, pred, z) in enumerate(rows)]


def test_generated_lines_are_parsed_from_their_first_line_only():
    from so8t.eval.task_metrics import generated_decision_metrics

    scored = _scored([(0, 0, None), (1, 2, None), (2, 2, None), (0, 0, None), (2, 2, None)])
    texts = ["判定: ALLOW", "判定：ESCALATION ", "# 思考ステップ", "判定: ALLOW\n判定: DENY", "はい\n判定: DENY"]
    out = generated_decision_metrics(texts, scored, "markdown")
    assert out["labels"] == {0: "ALLOW", 1: "ESCALATION", 2: None, 3: "ALLOW", 4: None}
    assert out["agreement"] == pytest.approx(2 / 5)  # rows 0 and 3 name the scored label
    assert out["unparsed_rate"] == pytest.approx(2 / 5)
    # ALLOW f1 1, ESCALATION f1 1, DENY 0 of 2 found (no label counts as wrong, not as a 4th class)
    assert out["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="4 texts for 5"):
        generated_decision_metrics(texts[:4], scored, "markdown")


def test_generated_decision_lines_stop_at_the_line_end_and_keep_generation_speed_apart():
    import torch
    from tiny import TINY_CONFIGS, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from so8t.data.think_format import render
    from so8t.inference import HFBackend
    from so8t.eval.task_metrics import generated_decision_lines

    tok = tiny_tokenizer()
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    backend = HFBackend.from_model(model, tok, batch_size=2)
    backend.stats.generated_tokens, backend.stats.generation_seconds = 7, 1.5
    rows = [{"prompt_text": render(tok, p, None)} for p in ("あいう", "かきくけこ", "さし")]
    gens = generated_decision_lines(backend, rows, 6, 1.15)
    assert len(gens) == 3 and all("\n" not in g.text and g.n_tokens <= 6 for g in gens)
    assert (backend.stats.generated_tokens, backend.stats.generation_seconds) == (7, 1.5)


def test_allow_recall_is_the_share_of_gold_allow_the_policy_answers():
    from so8t.eval.task_metrics import policy_metrics

    # p(ALLOW) = 1 / (1 + 2 e^-1) = 0.576 for the first row; the second is decided DENY; the third
    # (gold DENY, confident ALLOW) does not count.
    scored = _scored([(0, 0, [0.0, -1.0, -1.0]), (0, 2, [-2.0, -2.0, 0.0]), (2, 0, [0.0, -9.0, -9.0])])
    assert policy_metrics(scored, 1.0, 0.5)["allow_recall"] == 0.5
    assert policy_metrics(scored, 1.0, 0.6)["allow_recall"] == 0.0  # the ALLOW becomes ESCALATION
    assert policy_metrics(scored, 10.0, 0.5)["allow_recall"] == 0.0  # a large T flattens it below 0.5
    out = policy_metrics(scored, 1.0, 0.0)
    assert out["allow_recall"] == 0.5 and out["allow_n"] == 2
    import math

    assert math.isnan(policy_metrics(scored[2:], 1.0, 0.5)["allow_recall"])
