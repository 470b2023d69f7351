"""The linear-probe baseline on tiny random models: prompts, features, the grid, and template-disjoint splits."""

import numpy as np
import pytest
import torch

from so8t.data.think_format import render
from so8t.eval.probe import (
    MAX_C_EXTENSIONS,
    check_templates,
    decision_rows,
    hidden_features,
    probe_layers,
    prompt_ids,
    run_probe,
    select,
)
from so8t.io import DataError
from so8t.params import MetricsParams, ProbeParams
from so8t.schema import DECISIONS

M = MetricsParams(bootstrap_resamples=200)
P = ProbeParams(layer_stride=1, c_grid=[0.1, 1.0], batch_size=4)


@pytest.fixture(scope="module")
def tok():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from tiny import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS["llama"]()
    config.vocab_size, config.max_position_embeddings = len(tok), 1024
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


#: Label-specific words: a random model's hidden states separate them, so the probe must.
WORDS = {"ALLOW": "あいうえお", "ESCALATION": "かきくけこ", "DENY": "さしすせそ"}
FILLER = "たちつてとなにぬねのはひふへほまみむめも"


def _rows(tok, split: str, n_templates: int, per_template: int = 2) -> list[dict]:
    rows = []
    for label in DECISIONS:
        for t in range(n_templates):
            for k in range(per_template):
                filler = FILLER[(t + 3 * k) % 10 : (t + 3 * k) % 10 + 5 + k]
                prompt = f"{filler}{WORDS[label]}{filler[::-1]}"
                rows.append({
                    "id": f"{split}-{label}-{t}-{k}", "task": "decision", "decision": label,
                    "group": f"safety-{split}-{label}-{t}", "prompt_text": render(tok, prompt, None),
                })
    return rows


def _splits(tok):
    return {"train": _rows(tok, "train", 6), "val": _rows(tok, "val", 2), "test": _rows(tok, "test", 2)}


def test_probe_layers_every_stride_and_the_last():
    assert probe_layers(18, 4) == [4, 8, 12, 16, 18]
    assert probe_layers(8, 4) == [4, 8]
    assert probe_layers(2, 4) == [2]
    assert probe_layers(2, 1) == [1, 2]
    with pytest.raises(ValueError):
        probe_layers(0, 4)


def test_prompt_ids_end_where_the_label_is_scored(tok, model):
    from so8t.inference import HFBackend

    rows = _rows(tok, "test", 1, 1)
    ids = prompt_ids(HFBackend.from_model(model, tok), rows)
    for r, p in zip(rows, ids):
        # The labels' shared token prefix: the prompt and "判定: " (character tokens here).
        assert p == tok(r["prompt_text"] + "判定: ", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="probe.max_length"):
        prompt_ids(HFBackend.from_model(model, tok), rows, max_length=5)


def test_features_do_not_depend_on_padding_or_batch(tok, model):
    prompts = [tok(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in _rows(tok, "val", 1, 2)]
    assert len({len(p) for p in prompts}) > 1  # padding happens
    feats = hidden_features(model, prompts, [1, 2], ["last", "mean"], batch_size=3, pad_id=tok.pad_token_id)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            states = model.get_decoder()(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
        for layer in (1, 2):
            h = states[layer][0]
            np.testing.assert_allclose(feats[(layer, "last")][i], h[-1].numpy(), atol=1e-5)
            np.testing.assert_allclose(feats[(layer, "mean")][i], h.mean(0).numpy(), atol=1e-5)
    assert feats[(2, "last")].dtype == np.float32 and feats[(2, "last")].shape == (len(prompts), 64)
    with pytest.raises(ValueError, match="pooling"):
        hidden_features(model, prompts, [1], ["max"])


def test_the_probe_learns_a_separable_signal_and_scores_every_test_decision(tok, model):
    splits = _splits(tok)
    out = run_probe(model, tok, splits, P, M)
    dec = out["probe"]["decision"]
    assert out["n_train"] == 36 and out["n_val"] == 12 and out["n_test"] == dec["n"] == 12
    assert out["layers"] == [1, 2] and len([r for r in out["grid"] if not r["extension"]]) == 2 * 2 * 2
    assert len(out["grid"]) <= 2 * 2 * 2 + 2 * 3  # and the extensions that bracket the best C
    best = max(out["grid"], key=lambda r: r["val_macro_f1"])
    assert out["val_macro_f1"] == best["val_macro_f1"]
    assert (out["layer"], out["pooling"], out["C"]) in {(r["layer"], r["pooling"], r["C"]) for r in out["grid"]}
    assert isinstance(out["C_at_bound"], bool)
    assert dec["macro_f1"] >= 0.9 and dec["macro_f1_ci_low"] <= dec["macro_f1"] <= dec["macro_f1_ci_high"]
    assert [p["id"] for p in out["predictions"]] == [r["id"] for r in splits["test"]]
    for r, p in zip(splits["test"], out["predictions"]):
        assert p["label"] == r["decision"] and p["pred"] in DECISIONS and abs(sum(p["probs"]) - 1) < 1e-4
    assert out["templates"] == {"train": 18, "val": 6, "test": 6}


def test_selection_prefers_the_higher_val_macro_f1_then_the_smaller_c():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    signal = np.eye(3)[y] * 5 + rng.normal(0, 0.1, (30, 3))
    noise = rng.normal(0, 1, (30, 3))
    train = {(1, "last"): noise, (2, "last"): signal}
    grid, best = select(train, y, train, y, [10.0, 0.01])
    # the best C is the grid's smallest: C / 10 is tried at its layer; a tie keeps 0.01, now bracketed
    assert [(r["layer"], r["C"], r["extension"]) for r in grid] == [
        (1, 0.01, False), (1, 10.0, False), (2, 0.01, False), (2, 10.0, False), (2, 0.001, True)
    ]
    assert (best["layer"], best["C"]) == (2, 0.01) and best["val_macro_f1"] == 1.0 and not best["C_at_bound"]


def test_a_best_c_on_the_grid_edge_is_bracketed_or_flagged():
    """Weak signal wants strong regularisation: the grid [1, 10] ends on its bound, so smaller C values are
    tried (at most MAX_C_EXTENSIONS); with no extensions allowed the fit is flagged ``C_at_bound``."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    x = np.eye(40)[y] * 0.4 + rng.normal(0, 1, (120, 40))
    yv = np.repeat(np.arange(3), 40)
    xv = np.eye(40)[yv] * 0.4 + rng.normal(0, 1, (120, 40))
    grid, best = select({(0, "last"): x}, y, {(0, "last"): xv}, yv, [1.0, 10.0])
    ext = [r["C"] for r in grid if r["extension"]]
    assert ext and ext[0] == pytest.approx(0.1) and len(ext) <= 2 * MAX_C_EXTENSIONS
    tried = sorted(r["C"] for r in grid)
    assert best["C_at_bound"] == (best["C"] in (tried[0], tried[-1]))
    assert best["val_macro_f1"] == max(r["val_macro_f1"] for r in grid)
    _, flagged = select({(0, "last"): x}, y, {(0, "last"): xv}, yv, [1.0], max_extensions=0)
    assert flagged["C_at_bound"] and flagged["C"] == 1.0
    with pytest.raises(ValueError, match="probe.c_grid"):
        select({(0, "last"): x}, y, {(0, "last"): xv}, yv, [0.0, 1.0])


def test_no_test_template_is_in_the_probe_fit_data(tok):
    """Real safety templates through think-format's grouped split: the probe's train and val (what it is
    fitted and selected on) hold no template of its test split, and leaking splits are refused."""
    from so8t.data.sources.templates import build_decision_records, load_safety_templates
    from so8t.data.think_format import format_and_split
    from so8t.params import ThinkFormatParams
    from so8t.schema import Record

    records = [Record.model_validate(r) for r in build_decision_records(load_safety_templates(), 2, ["transport"], 3)]
    by_split, _ = format_and_split(records, tok, ThinkFormatParams(max_length=4096), seed=3)
    splits = {s: decision_rows(rows, f"data/formatted/{s}.jsonl") for s, rows in by_split.items()}
    fit = {r["group"] for s in ("train", "val") for r in splits[s]}
    test = {r["group"] for r in splits["test"]}
    assert test and fit and not fit & test
    assert check_templates(splits)["test"] == len(test)
    leaked = splits | {"train": splits["train"] + [splits["test"][0]]}
    with pytest.raises(DataError, match="both train and test"):
        check_templates(leaked)
    with pytest.raises(DataError, match="both train and test"):
        run_probe(None, tok, leaked, P, M)  # refused before the model runs


def test_bad_rows_name_the_file_and_the_row(tok):
    good = _rows(tok, "val", 1, 1)
    assert [r["id"] for r in decision_rows(good + [{"task": "math", "id": "m"}], "val.jsonl")] == sorted(r["id"] for r in good)
    with pytest.raises(DataError, match=r"val.jsonl:1: decision row 'x' has no \['group'\]"):
        decision_rows([{"task": "decision", "id": "x", "prompt_text": "p", "decision": "ALLOW"}], "val.jsonl")
    with pytest.raises(DataError, match="label 'MAYBE'"):
        decision_rows([{"task": "decision", "id": "x", "prompt_text": "p", "decision": "MAYBE", "group": "g"}], "v")
    splits = _splits(tok)
    no_deny = splits | {"train": [r for r in splits["train"] if r["decision"] != "DENY"]}
    with pytest.raises(DataError, match="DENY"):
        run_probe(None, tok, no_deny, P, M)
    with pytest.raises(DataError, match="val.jsonl: no decision examples"):
        run_probe(None, tok, splits | {"val": []}, P, M)


def test_probe_params_are_validated():
    from so8t.params import Params

    assert Params().probe == ProbeParams()
    with pytest.raises(ValueError):
        ProbeParams(poolings=["last", "last"])
    with pytest.raises(ValueError):
        ProbeParams(c_grid=[])
    assert ProbeParams().poolings == ["last", "mean"] and ProbeParams().layer_stride == 4


def test_the_train_eval_hook_scores_val_decisions_with_an_interval(tok, model):
    """train's ``decision_eval`` hook: the val macro-F1 a sweep reads, with its bootstrap interval."""
    from so8t.eval.evaluation import decision_eval

    val = _rows(tok, "val", 2)
    metrics = decision_eval(tok, val, 6, 4, None, M)(model)
    assert metrics["eval_decision_n"] == 6 and "eval_heldout_perplexity" not in metrics
    lo, f1, hi = (metrics[f"eval_decision_macro_f1{s}"] for s in ("_ci_low", "", "_ci_high"))
    assert 0.0 <= lo <= hi <= 1.0 and 0.0 <= f1 <= 1.0
    assert set(decision_eval(tok, val, 6, 4)(model)) == {"eval_decision_accuracy", "eval_decision_macro_f1", "eval_decision_n"}
