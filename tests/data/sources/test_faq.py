"""so8t.data.sources.faq: qa_faq records from the Debian FAQ."""

import pytest

from so8t.data import collect
from so8t.data.sources.faq import build_faq_records

pytestmark = pytest.mark.skipif(not collect.FAQ_PATH.exists(), reason="Debian package debian-faq-ja not installed")


@pytest.fixture(scope="module")
def collected() -> dict[str, list[dict]]:
    return {"faq": collect.collect_faq().records}


def test_faq_records(collected):
    records = build_faq_records(collected["faq"])
    assert 100 <= len(records) <= len(collected["faq"])
    by_group = {r["group"]: r for r in records}
    assert by_group["faq-8.1.1"]["prompt"] == "Debian の「dpkg」について教えてください。"
    for r in records:
        assert len(r["response"]) <= 400 and r["thinking"].startswith("Debian FAQ の「")
        assert r["response"].split("\n")[0].rstrip("…") in r["final_answer"]
