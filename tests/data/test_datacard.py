import json

import pytest

from so8t.data.datacard import build_data_card, check_class_balance, render_data_card
from so8t.io import DataError


def test_balance_passes_and_reports_shares():
    assert check_class_balance(["ALLOW"] * 2 + ["ESCALATION"] * 1 + ["DENY"] * 1, 0.15, "x", "synthesize.min_class_share") == {
        "ALLOW": 0.5,
        "ESCALATION": 0.25,
        "DENY": 0.25,
    }
    assert check_class_balance([], 0.15, "x", "synthesize.min_class_share") == {"ALLOW": 0.0, "ESCALATION": 0.0, "DENY": 0.0}
    assert check_class_balance(["ALLOW"] * 5, 0.0, "x", "synthesize.min_class_share")["ALLOW"] == 1.0  # 0 turns the check off


def test_missing_class_fails_naming_class_and_param():
    with pytest.raises(DataError) as err:
        check_class_balance(["ALLOW"] * 5 + ["DENY"] * 5, 0.15, "think-format: train split", "synthesize.min_class_share")
    assert str(err.value) == (
        "think-format: train split: decision class ESCALATION is missing (0 of 10 decision records; counts "
        "{'ALLOW': 5, 'DENY': 5}); synthesize.min_class_share = 0.15 requires each of ALLOW, ESCALATION, DENY. "
        "Add ESCALATION examples, or set synthesize.min_class_share: 0 to train on it anyway"
    )


def test_rare_class_fails_with_its_share():
    with pytest.raises(DataError, match=r"decision class DENY has 1 of 21 decision records \(4\.8%\), below "
                                        r"synthesize\.min_class_share = 0\.15"):
        check_class_balance(["ALLOW"] * 10 + ["ESCALATION"] * 10 + ["DENY"], 0.15, "synthesize", "synthesize.min_class_share")


MANIFEST = {
    "sources": [
        {"name": "debian-faq-ja", "kind": "debian-package", "enabled": True, "version": "12.1", "licence": "GPL-2+",
         "records": 120, "chars": 50_000, "files": [{"path": "x"}], "pii_masked": {"email": 15}},
        {"name": "user", "kind": "user-folder", "enabled": True, "version": None, "licence": "user-provided",
         "records": 3, "chars": 90, "files": [{"path": "a"}, {"path": "b"}], "encodings": {"CP932 (Shift_JIS)": 1,
         "UTF-8": 1}, "pii_masked": {"phone": 1},
         "label_mapping": [{"label": "ESCALATE", "decision": "ESCALATION", "records": 2},
                           {"label": "DENY", "decision": "DENY", "records": 1}]},
    ],
    "normalize": "nfkc",
    "pii_mask": True,
    "pii_masked": {"email": 15, "phone": 1},
    "rejects": {"policy": "skip", "count": 2, "by_kind": {"missing_field": 2}},
}
SYNTH = {
    "records": 400, "by_task": {"decision": 300, "qa_user": 100}, "by_decision": {"ALLOW": 100, "DENY": 100,
    "ESCALATION": 100}, "by_domain": {"general": 300}, "user": {"items": 5, "qa_user": 2, "decision": 3, "sections": 0},
    "document_qa": {"documents": 0, "sections": 0, "sections_with_qa": 0, "pairs": 0, "by_template": {},
                    "teacher": None},
    "dedup_removed": {"qa_user": 2}, "near_dup_removed": {"qa_user": 1}, "near_dup_threshold": 0.9,
    "label_conflicts": 1,
}
FORMAT = {
    "style": "markdown", "max_length": 384, "shortened": {"qa_user": 3}, "dropped": {"qa_user": 1},
    "token_lengths": {"decision": {"count": 300, "min": 50, "mean": 80.5, "p50": 79.0, "p95": 120.0, "max": 150}},
    "splits": {"train": {"examples": 320, "groups": 200, "by_task": {}, "by_decision": {"ALLOW": 80, "DENY": 80,
               "ESCALATION": 80}},
               "val": {"examples": 40, "groups": 20, "by_task": {}, "by_decision": {}},
               "test": {"examples": 39, "groups": 20, "by_task": {}, "by_decision": {}}},
}


def test_data_card_numbers_and_markdown():
    card = build_data_card(MANIFEST, SYNTH, FORMAT, 0.15)
    json.dumps(card)  # a valid DVC metric file
    assert card["sources"]["debian-faq-ja"] == {"kind": "debian-package", "enabled": True, "version": "12.1",
                                                "licence": "GPL-2+", "records": 120, "chars": 50_000, "files": 1,
                                                "pii_masked": 15}
    c = card["collect"]
    assert c["records"] == 123 and c["rejects"] == 2 and c["rejects_by_kind"] == {"missing_field": 2}
    assert c["labels_mapped"] == {"ESCALATE": "ESCALATION", "DENY": "DENY"} and c["label_records_mapped"] == 2
    assert c["encodings"] == {"CP932 (Shift_JIS)": 1, "UTF-8": 1} and c["pii_masked"] == {"email": 15, "phone": 1}
    assert card["synthesize"]["task_shares"] == {"decision": 0.75, "qa_user": 0.25}
    assert card["dedup"] == {"exact_removed": 2, "exact_removed_by_task": {"qa_user": 2}, "near_removed": 1,
                             "near_removed_by_task": {"qa_user": 1}, "near_dup_threshold": 0.9, "label_conflicts": 1}
    assert card["balance"]["train_decision_shares"] == {"ALLOW": 0.3333, "DENY": 0.3333, "ESCALATION": 0.3333}
    assert card["lengths"]["shortened"] == {"qa_user": 3} and card["splits"]["test"] == {"examples": 39, "groups": 20}
    md = render_data_card(card)
    assert md.startswith("# Data card\n")
    for text in ("| debian-faq-ja | debian-package | 12.1 | GPL-2+ | 120 | 50000 | 1 | 15 |",
                 "ESCALATE → ESCALATION", "Rejected input (policy `skip`): 2 (missing_field 2)",
                 "| decision | 300 | 50 | 80.5 | 79.0 | 120.0 | 150 | 0 | 0 |",
                 "Duplicates removed: 2 exact (qa_user 2), 1 near", "| train | 320 | 200 |"):
        assert text in md, text
