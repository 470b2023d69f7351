import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t.model.attach import attach_rotations
from so8t.model.pet import PETSchedule, pet_penalty
from so8t.inference.hf import output_logits
from so8t.model.loss import label_token_ce_sum
from tiny import TINY_CONFIGS, tiny_batch, tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_label_only_ce_equals_model_loss(arch):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=2, target_modules=["o_proj"]))
    attach_rotations(model, init_scale=0.3)
    ids, mask = tiny_batch(batch=3, length=10)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100  # padding
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    ce_sum, n = label_token_ce_sum(model, out.hidden_states[-1], labels)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(ce_sum / n, ref, atol=1e-5)


def test_output_logits_apply_softcapping():
    model = tiny_model("gemma3_text")
    model.config.final_logit_softcapping = 2.0
    ids, mask = tiny_batch()
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(output_logits(model, out.hidden_states[-1]), full, atol=1e-5)
    assert full.abs().max() <= 2.0


def test_pet_on_model_hidden_states_ignores_padding():
    model = tiny_model("llama")
    ids, mask = tiny_batch()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = out.hidden_states[-1]
    value = pet_penalty(h, mask)
    # recompute row by row on the valid prefix only
    per_row = [(h[b, : int(mask[b].sum())]) for b in range(h.shape[0])]
    sq = torch.cat([(r[2:] - 2 * r[1:-1] + r[:-2]).pow(2).sum(-1) for r in per_row])
    assert torch.allclose(value, sq.mean(), rtol=1e-5)
    assert PETSchedule()(0.5) == 0.05


def _one_step(tmp_path, rows, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    """Trainable parameters after one SGD step over ``rows`` with ``batch`` x ``accumulation``."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from so8t.model.build import build_model
    from so8t.model.trainer import SO8TTrainer, training_arguments
    from so8t.params import TrainParams
    from tiny import tiny_base_dir, tiny_tokenizer

    base = tiny_base_dir(tmp_path / f"base-{batch}", "llama", seed=0)
    p = TrainParams(
        lora_r=2, lora_alpha=4, lora_dropout=0.0, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, warmup_ratio=0.0,
        lr_scheduler_type="constant", max_grad_norm=1e9, pet={"enabled": False}, so8t={"init_scale": 0.1},
    )
    model = build_model(base, p, seed=0)
    args = training_arguments(
        p, output_dir=tmp_path / f"out-{batch}", max_steps=1, learning_rate=0.5, seed=0,
        optim="sgd", train_sampling_strategy="sequential",
    )
    trainer = SO8TTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tiny_tokenizer(), padding="longest", label_pad_token_id=-100),
    )
    trainer.train()
    return {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}


def test_gradient_accumulation_gives_the_update_of_one_big_batch(tmp_path):
    """GA = 2 x batch 2 == batch 4: CE over the label tokens of the whole window, divided once."""
    import random

    rng = random.Random(0)
    rows = []
    for n_label in (3, 9, 5, 14):  # unequal label counts: a mean of micro-batch means would differ
        ids = [rng.randrange(6, 100) for _ in range(4 + n_label)]
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    big = _one_step(tmp_path, rows, batch=4, accumulation=1)
    acc = _one_step(tmp_path, rows, batch=2, accumulation=2)
    assert big.keys() == acc.keys() and any("so8t" in k for k in big)
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6), name


def _formatted(task, n_prompt, completion, span):
    ids = list(range(10, 10 + n_prompt + len(completion)))
    return {
        "task": task, "input_ids": ids, "labels": [-100] * n_prompt + completion,
        "decision_span": span, "decision": "DENY" if task == "decision" else None,
    }


def test_task_mixture_repeats_and_samples_by_weight():
    from so8t.model.batching import mix_tasks

    rows = [_formatted("decision", 3, [1, 2, 3], [3, 5]) for _ in range(10)] + [_formatted("math", 3, [4], [3, 4])] * 4
    mixed = mix_tasks(rows, {"decision": 1.5, "math": 0.5}, seed=0)
    assert sum(r["task"] == "decision" for r in mixed) == 15
    assert sum(r["task"] == "math" for r in mixed) == 2
    assert mix_tasks(rows, {"decision": 1.5}, seed=0) == mix_tasks(rows, {"decision": 1.5}, seed=0)


def test_decision_line_copies_end_at_the_decision_line_and_never_teach_a_stop():
    from so8t.model.batching import decision_line_copies

    full = _formatted("decision", 4, [7, 8, 9, 2, 5, 6, 1], [4, 7])  # 判定 : DENY | \n reasoning ... <eot>
    rows = [full, _formatted("math", 4, [7, 8, 9], [4, 7])]
    cut = decision_line_copies(rows, 2.0, seed=0)
    assert len(cut) == 2 and all(r["task"] == "decision_line" for r in cut)
    assert cut[0]["input_ids"] == full["input_ids"][:7]
    assert cut[0]["labels"] == [-100] * 6 + [9]  # one decision: its last span token is the label
    assert cut[0]["decision_span"] == [4, 7]
    assert full["labels"][-1] == 1 and 1 not in cut[0]["labels"]  # no end-of-turn after the cut
    assert decision_line_copies(rows, 0.0, seed=0) == []
    assert len(decision_line_copies([full] * 10, 0.5, seed=0)) == 5


def test_decision_lines_with_passages_get_their_own_passes():
    from so8t.model.batching import decision_line_copies

    bare = [_formatted("decision", 4, [7, 8, 9, 2, 5], [4, 7]) | {"rag": None, "id": f"b{i}"} for i in range(6)]
    rag = [_formatted("decision", 30, [7, 8, 9, 2, 5], [30, 33]) | {"rag": kind, "id": f"r{i}"}
           for i, kind in enumerate(["relevant", "unrelated", "relevant", "relevant"])]
    rows = bare + rag
    cut = decision_line_copies(rows, 3.0, seed=0, rag_passes=0.5)
    ids = [r["id"] for r in cut]
    assert sorted(ids[:18]) == sorted([r["id"] for r in bare] * 3)  # bare lines first, 3 passes
    assert len(ids) == 18 + 2 and set(ids[18:]) <= {r["id"] for r in rag} and len(set(ids[18:])) == 2  # half a pass
    assert all(len(r["input_ids"]) == 33 for r in cut[18:])  # the long lines are still cut after 判定: X
    assert [r for r in decision_line_copies(rows, 3.0, seed=0, rag_passes=0.0) if r.get("rag")] == []
    # None: every line alike, exactly the copies of a single pass count
    assert decision_line_copies(rows, 2.0, seed=0, rag_passes=None) == decision_line_copies(rows, 2.0, seed=0)
    assert len(decision_line_copies(rows, 2.0, seed=0)) == 20


def test_decision_line_copies_learn_the_label_not_the_shared_prefix():
    from so8t.model.batching import decision_line_copies

    def row(prompt, completion, span):
        return {"task": "decision", "input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion,
                "decision_span": span}

    deny = row([50, 51, 52, 53], [7, 8, 9, 2, 5, 6, 1], [4, 7])  # 判定 : DENY \n ...
    esc = row([60, 61, 62], [7, 8, 10, 11, 2, 5, 1], [3, 7])  # 判定 : ESC ALATION \n ...
    cut = decision_line_copies([deny, esc], 1.0, seed=0)
    by_first = {r["input_ids"][r["decision_span"][0] + 2]: r for r in cut}
    assert by_first[9]["labels"] == [-100] * 6 + [9]
    assert by_first[10]["labels"] == [-100] * 5 + [10, 11]  # every label token, neither 判定 nor :
    assert by_first[10]["input_ids"] == esc["input_ids"][:7]
    assert by_first[9]["choice_pos"] == 6 and by_first[10]["choice_pos"] == 5


def test_choice_positions_learn_among_the_label_tokens_only():
    """Where ``choice_mask`` is set the softmax runs over ``choice_ids``; elsewhere over the vocabulary."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(5, 60, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 4], labels[0, 5] = 11, 12  # a decision line: choice at 4, continuation at 5
    labels[1, 3] = 13  # a plain label
    choice = torch.zeros_like(ids, dtype=torch.bool)
    choice[0, 4] = True
    out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1]
    total, n = label_token_ce_sum(model, h, labels, None, choice, [11, 20, 30])
    logits = output_logits(model, h)
    want = (
        torch.nn.functional.cross_entropy(logits[0, 3, [11, 20, 30]][None], torch.tensor([0]))
        + torch.nn.functional.cross_entropy(logits[0, 4][None], torch.tensor([12]))
        + torch.nn.functional.cross_entropy(logits[1, 2][None], torch.tensor([13]))
    )
    assert n == 3 and torch.allclose(total, want, atol=1e-5)
    with pytest.raises(ValueError, match="choice_ids"):
        label_token_ce_sum(model, h, labels, None, choice, [20, 30])


@pytest.mark.parametrize("kind", ["hadamard", "random", "hadamard_invariant", "random_invariant"])
def test_fixed_rotations_are_set_frozen_and_left_alone_by_training(tmp_path, kind):
    """The ablation's controls: a fixed rotation is the one asked for, and a step does not move it."""
    from so8t.model.attach import attached_rotations
    from so8t.model.rotation import hadamard_block
    from so8t.model.build import build_model, trainable_parameter_counts
    from so8t.params import TrainParams
    from tiny import tiny_base_dir

    base = tiny_base_dir(tmp_path / "base", "llama", seed=0)
    p = TrainParams(lora_r=2, lora_alpha=4, lora_dropout=0.0, pet={"enabled": False}, so8t={"rotation": kind})
    model = build_model(base, p, seed=5)
    rotations = attached_rotations(model)
    assert rotations and trainable_parameter_counts(model)["so8t"] == 0
    blocks = {i: r.blocks(torch.float64) for i, r in rotations.items()}
    if kind.startswith("hadamard"):
        for b in blocks.values():
            torch.testing.assert_close(b, hadamard_block().expand_as(b), rtol=0, atol=1e-6)
    else:  # Haar draws differ between layers and are reproduced by the seed
        first, second = list(blocks.values())[:2]
        assert not torch.allclose(first, second)
        again = attached_rotations(build_model(base, p, seed=5))
        assert all(torch.equal(again[i].generator, r.generator) for i, r in rotations.items())
    rows = [{"input_ids": list(range(6, 20)), "labels": [-100] * 4 + list(range(10, 20))}] * 2
    before = {i: r.generator.detach().clone() for i, r in rotations.items()}
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from so8t.model.trainer import SO8TTrainer, training_arguments
    from tiny import tiny_tokenizer

    args = training_arguments(p, output_dir=tmp_path / "out", max_steps=1, learning_rate=0.5, seed=0, optim="sgd")
    SO8TTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                data_collator=DataCollatorForSeq2Seq(tiny_tokenizer(), padding="longest", label_pad_token_id=-100)).train()
    assert all(torch.equal(before[i], r.generator) for i, r in rotations.items())


@pytest.mark.parametrize("kind", ["hadamard_invariant", "random_invariant"])
def test_an_invariant_fixed_rotation_starts_training_from_the_base_function(tmp_path, kind):
    """The QuaRot control: far from identity, one rotation per key/value head, and the base's logits."""
    from so8t.model.attach import attached_rotations, is_invariant, kv_blocks
    from so8t.model.bake import compare_logits, model_logits
    from so8t.inference.hf import load_causal_lm
    from so8t.model.build import build_model
    from so8t.params import TrainParams
    from tiny import tiny_base_dir, tiny_batch

    base = tiny_base_dir(tmp_path / "base", "gemma3_text", seed=0)  # 4 query heads, 1 key/value head
    p = TrainParams(lora_r=2, lora_alpha=4, lora_dropout=0.0, pet={"enabled": False}, so8t={"rotation": kind})
    model = build_model(base, p, seed=5).eval()
    rotations = attached_rotations(model)
    assert is_invariant(model) and all(r.max_angle() > 1.0 for r in rotations.values())
    for r in rotations.values():  # every query head carries its key/value head's blocks
        b = r.blocks(torch.float64)
        torch.testing.assert_close(b, kv_blocks(b, 4, 1).repeat(4, 1, 1), rtol=0, atol=0)
    ids, mask = tiny_batch()
    plain = load_causal_lm(base, torch.float32).eval()
    assert compare_logits(model_logits(plain, ids, mask), model_logits(model, ids, mask)).max_abs_diff < 1e-5


def test_fixed_rotations_need_the_expm_parameterization():
    from so8t.params import TrainParams

    with pytest.raises(ValueError, match="needs parameterization 'expm'"):
        TrainParams(so8t={"rotation": "hadamard", "parameterization": "cayley"})
