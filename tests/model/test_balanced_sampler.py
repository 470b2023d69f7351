"""The label-balanced decision sampler (``train.sampling: balanced_decisions``)."""

from collections import Counter
from types import SimpleNamespace

import pytest

from so8t.model.batching import BalancedDecisionSampler, train_sampler


def _rows(n_allow=30, n_esc=7, n_deny=13, n_other=23, seed=0):
    import random

    rng = random.Random(seed)
    labels = ["ALLOW"] * n_allow + ["ESCALATION"] * n_esc + ["DENY"] * n_deny + [None] * n_other
    lengths = [rng.randint(20, 60) if x else rng.randint(100, 400) for x in labels]
    return labels, lengths


@pytest.mark.parametrize("batch_size", [3, 6, 12, 4, 5])
def test_every_decision_batch_holds_every_label(batch_size):
    labels, lengths = _rows()
    s = BalancedDecisionSampler(labels, lengths, batch_size, seed=1)
    batches = s.batches(0)
    decision = [b for b in batches if labels[b[0]] is not None]
    assert decision, "no decision batches"
    per_label = Counter()
    for b in decision:
        assert len(b) == batch_size
        names = [labels[i] for i in b]
        assert None not in names, "decision and other rows mixed in one batch"
        counts = Counter(names)
        assert set(counts) == {"ALLOW", "ESCALATION", "DENY"}, counts
        assert max(counts.values()) - min(counts.values()) <= 1
        per_label.update(counts)
    # over a pass every label is drawn equally often (rotating extra slots), and the largest is covered
    assert max(per_label.values()) - min(per_label.values()) <= 1
    drawn = {i for b in decision for i in b}
    assert {i for i, x in enumerate(labels) if x == "ALLOW"} <= drawn
    assert {i for i, x in enumerate(labels) if x in ("ESCALATION", "DENY")} <= drawn


def test_other_rows_once_each_and_only_the_last_batch_short():
    labels, lengths = _rows()
    s = BalancedDecisionSampler(labels, lengths, 6, seed=1)
    batches = s.batches(0)
    others = [i for b in batches for i in b if labels[i] is None]
    assert sorted(others) == [i for i, x in enumerate(labels) if x is None]
    assert all(len(b) == 6 for b in batches[:-1])
    assert len(list(iter(s))) == len(s) == sum(map(len, batches))


def test_batches_group_similar_lengths():
    labels, lengths = _rows(n_allow=60, n_esc=60, n_deny=60, n_other=0)
    s = BalancedDecisionSampler(labels, lengths, 6, seed=3)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in s.batches(0)]
    # random batches of 6 from lengths 20..60 have a spread of ~28 on average; grouped ones a few tokens
    assert sum(spread) / len(spread) < 10


def test_order_is_seeded_and_changes_with_the_epoch():
    labels, lengths = _rows()
    a, b = BalancedDecisionSampler(labels, lengths, 6, seed=1), BalancedDecisionSampler(labels, lengths, 6, seed=1)
    assert a.batches(0) == b.batches(0)
    assert a.batches(0) != a.batches(1)
    a.set_epoch(1)
    assert list(iter(a)) == [i for batch in b.batches(1) for i in batch]


def test_batches_smaller_than_the_label_set_rotate_labels():
    labels, lengths = _rows()
    batches = BalancedDecisionSampler(labels, lengths, 2, seed=0).batches(0)
    decision = [b for b in batches if labels[b[0]] is not None]
    for b in decision:
        assert len({labels[i] for i in b}) == 2  # two different labels in every batch of 2
    counts = Counter(labels[i] for b in decision for i in b)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert counts["ALLOW"] >= 30


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        BalancedDecisionSampler(["ALLOW", "DENY", "ESCALATION"], [1, 2, 3], 0, seed=0)
    with pytest.raises(ValueError, match="differ in length"):
        BalancedDecisionSampler(["ALLOW"], [1, 2], 3, seed=0)


def test_train_sampler_balances_only_decision_lines():
    rows = [
        {"task": "decision_line", "decision": "ALLOW", "input_ids": [1, 2]},
        {"task": "decision_line", "decision": "DENY", "input_ids": [1, 2, 3]},
        {"task": "decision_line", "decision": "ESCALATION", "input_ids": [1]},
        {"task": "decision", "decision": "DENY", "input_ids": [1] * 9},  # full example: an "other" row
        {"task": "math", "decision": "ALLOW", "input_ids": [1] * 7},
    ]
    params = SimpleNamespace(seed=0, train=SimpleNamespace(sampling="balanced_decisions", per_device_train_batch_size=3))
    s = train_sampler(params, rows)
    assert s.labels == ["ALLOW", "DENY", "ESCALATION", None, None]
    params.train.sampling = "group_by_length"
    assert train_sampler(params, rows) is None
