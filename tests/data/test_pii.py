from collections import Counter

import pytest

from so8t.data.pii import mask_record, mask_text


@pytest.mark.parametrize(
    ("text", "masked", "kind"),
    [
        ("連絡先: taro.yamada@example.co.jp まで", "連絡先: [EMAIL] まで", "email"),
        ("メールは taro＠example．com へ", "メールは [EMAIL] へ", "email"),
        ("電話 03-1234-5678 です", "電話 [PHONE] です", "phone"),
        ("携帯 090-1234-5678", "携帯 [PHONE]", "phone"),
        ("携帯 09012345678", "携帯 [PHONE]", "phone"),
        ("フリーダイヤル 0120-123-456", "フリーダイヤル [PHONE]", "phone"),
        ("国際 +81-90-1234-5678", "国際 [PHONE]", "phone"),
        ("代表 (03)1234-5678", "代表 [PHONE]", "phone"),
        ("全角 090－1234－5678", "全角 [PHONE]", "phone"),
        ("番号 1234 5678 9012 を", "番号 [MY_NUMBER] を", "my_number"),
        ("番号123456789012を", "番号[MY_NUMBER]を", "my_number"),
    ],
)
def test_personal_data_is_masked(text, masked, kind):
    counts = Counter()
    assert mask_text(text, counts) == masked
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3 と IP 192.168.0.1、日付 2023-01-15",
        "プロンプト user@host:~$ ls",
        "ID 12345678901234 と 0.5.5 と 1-2-3 と 10-20-300",
        "答え: 1200 円、#### 42",
        "12345678901",  # 11 digits not starting with 0
    ],
)
def test_lookalikes_are_left_alone(text):
    counts = Counter()
    assert mask_text(text, counts) == text and not counts


def test_mask_record_keeps_ids_and_walks_nested_text():
    counts = Counter()
    record = {"id": "a@b.co", "path": "x/090-1234-5678.txt", "text": "a@b.co", "template": {"q": ["03-1234-5678"]}}
    assert mask_record(record, counts) == {
        "id": "a@b.co",
        "path": "x/090-1234-5678.txt",
        "text": "[EMAIL]",
        "template": {"q": ["[PHONE]"]},
    }
    assert counts == {"email": 1, "phone": 1}
