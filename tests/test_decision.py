"""The decision format's one owner: writing, parsing and locating the ``判定: X`` line."""

from __future__ import annotations

import numpy as np
import pytest

from so8t.decision import (
    ALLOW_INDEX,
    DECISION_LINE,
    DECISION_MARKER,
    LABELS,
    answer_context,
    common_prefix_length,
    decision_line,
    label_index,
    label_positions,
    parse_decision,
    strip_decision_lines,
)
from so8t.schema import IGNORE_INDEX


def test_written_lines_parse_back():
    for label in LABELS:
        assert parse_decision(decision_line(label) + "# 思考ステップ\n...") == label
    assert LABELS[ALLOW_INDEX] == "ALLOW"


def test_an_unknown_label_is_refused():
    with pytest.raises(ValueError, match="ALLOW"):
        decision_line("MAYBE")


@pytest.mark.parametrize("text, label", [
    ("判定：DENY", "DENY"),
    ("前置き\n判定 :  ESCALATION\n", "ESCALATION"),
    ("判定: ALLOWED", None),  # a longer word is not a label
    ("判定: allow", None),
    ("判定なし", None),
])
def test_parse_spellings(text, label):
    assert parse_decision(text) == label


def test_strip_removes_the_first_or_every_line():
    text = "判定: ALLOW\nA\n判定: DENY\nB"
    assert strip_decision_lines(text, count=1) == "\nA\n判定: DENY\nB"
    assert DECISION_LINE.search(strip_decision_lines(text)) is None


def test_the_marker_finds_spaced_and_full_width_spellings():
    for text in ("判定:", "判 定 ：", "判\n定:"):
        assert DECISION_MARKER.search(text)
    assert not DECISION_MARKER.search("判断: ALLOW")


def test_answer_context_ends_with_the_allow_line():
    assert answer_context("P") == "P判定: ALLOW\n"


def test_label_index_treats_a_benign_task_as_allow():
    assert label_index(None) == ALLOW_INDEX
    assert label_index("DENY") == LABELS.index("DENY")
    with pytest.raises(ValueError):
        label_index("MAYBE")


@pytest.mark.parametrize("seqs, n", [
    ([[1, 2, 3], [1, 2, 4], [1, 2]], 2),
    ([[5, 6], [5, 6]], 2),
    ([[1], [2]], 0),
    ([], 0),
])
def test_common_prefix_length(seqs, n):
    assert common_prefix_length(seqs) == n


def test_label_positions_are_the_positions_predicting_a_label():
    labels = [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9]
    pos = label_positions(labels)
    assert pos.dtype == np.int32 and pos.tolist() == [1, 2, 4]
