"""Personal-data guard: find and mask e-mail addresses, phone numbers and My Number-like digit strings.

Patterns (a table, :data:`PII_PATTERNS`; each match is replaced by its mask):

* ``email``: ``local@domain.tld`` (RFC 5322 dot-atom subset: letters, digits and
  ``._%+-`` in the local part; the domain needs a dot and a 2+ letter TLD, so shell
  prompts like ``user@host:~$`` are not masked); full-width ``＠`` and ``．`` count too, as
  the NFKC step keeps full-width punctuation.
* ``phone``: Japanese numbers as written in Japan: ``0X-XXXX-XXXX`` style with hyphens,
  spaces or brackets (10 or 11 digits in all), the same run together (``09012345678``,
  ``0312345678``), and international ``+81`` forms. Digit counts follow the Japanese
  numbering plan (総務省「電気通信番号計画」: 10 digits for fixed lines and 0120, 11
  for mobile, IP and 0800 numbers).
* ``my_number``: any 12-digit string, optionally grouped 4-4-4 (the individual number
  of 番号法, Act No. 27 of 2013). The check digit is deliberately not verified: made-up
  numbers in user data are personal-data-shaped too, and masking them is harmless.

A digit pattern only matches a whole digit run (no digit, letter, ``.`` or ``-`` right
before or after), so version numbers, IP addresses, dates and longer IDs are left alone.
Full-width digits are matched as well (user text is NFKC-normalised before masking,
Debian text is not).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

#: Replacement text per kind.
PII_MASKS: dict[str, str] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "my_number": "[MY_NUMBER]",
}

_D = "[0-9０-９]"
_EDGE_BEFORE = r"(?<![0-9０-９A-Za-z.\-])"
_EDGE_AFTER = r"(?![0-9０-９A-Za-z\-]|\.[0-9０-９])"
_SEP = r"[-‐－ー\s]?"
_SEP_REQ = r"[-‐－ー\s]"

#: Kind -> compiled pattern. Order matters: ``my_number`` (12 digits) is tried before
#: ``phone`` so a 4-4-4 group is never read as a phone number.
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(
        r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+[@＠][A-Za-z0-9\-]+(?:[.．][A-Za-z0-9\-]+)*[.．][A-Za-z]{2,}\b"
    ),
    "my_number": re.compile(rf"{_EDGE_BEFORE}{_D}{{4}}[-\s]?{_D}{{4}}[-\s]?{_D}{{4}}{_EDGE_AFTER}"),
    "phone": re.compile(
        rf"{_EDGE_BEFORE}(?:"
        rf"(?:\+81[-\s]?(?:\(0\))?{_D}{{1,4}}|\([0０]{_D}{{1,4}}\)|[0０]{_D}{{1,4}}){_SEP}{_D}{{1,4}}{_SEP_REQ}{_D}{{3,4}}"
        rf"|[0０]{_D}{{9,10}}"
        rf"){_EDGE_AFTER}"
    ),
}

_DIGIT = re.compile(_D)


def _phone_digits_ok(match: str) -> bool:
    digits = len(_DIGIT.findall(match))
    if match.startswith("+81"):
        return digits in (11, 12)  # 81 + 9 or 10 national digits
    return digits in (10, 11)


def mask_text(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with every personal-data match replaced by its mask (:data:`PII_MASKS`).

    Args:
        counts: incremented per kind (``email``, ``phone``, ``my_number``) for each mask.
    """
    for kind, pattern in PII_PATTERNS.items():
        mask = PII_MASKS[kind]

        def replace(m: re.Match[str], kind: str = kind, mask: str = mask) -> str:
            if kind == "phone" and not _phone_digits_ok(m.group(0)):
                return m.group(0)
            if counts is not None:
                counts[kind] += 1
            return mask

        text = pattern.sub(replace, text)
    return text


#: Record keys that are identifiers, paths or hashes, never free text.
_NOT_TEXT = frozenset({"id", "source", "path", "sha256", "doc_id", "group", "encoding", "template_id", "id_orig"})


def mask_record(record: dict[str, Any], counts: Counter[str]) -> dict[str, Any]:
    """A copy of ``record`` with every free-text string (nested too) masked; ids and paths kept."""

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return mask_text(value, counts)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: v if k in _NOT_TEXT else walk(v) for k, v in value.items()}
        return value

    return {k: v if k in _NOT_TEXT else walk(v) for k, v in record.items()}
