"""Access levels of documents and callers: 公開 < 取扱注意 < 機密 < 極秘.

A caller with level ``L`` may retrieve a document of level ``D`` only when
``D <= L``. Levels are data (an ordered table), defined once here and imported
by params validation, retrieval, the server's API keys and the CLI.
"""

from __future__ import annotations

import unicodedata
from enum import IntEnum


class AccessLevel(IntEnum):
    """Ordered access levels; the integer order is the clearance order."""

    PUBLIC = 0  # 公開
    RESTRICTED = 1  # 取扱注意
    CONFIDENTIAL = 2  # 機密
    SECRET = 3  # 極秘

    @property
    def ja(self) -> str:
        """The Japanese name (``公開``, ``取扱注意``, ``機密``, ``極秘``)."""
        return LEVEL_JA[self]


#: Japanese display names, the canonical spelling in params, metadata and audit rows.
LEVEL_JA: dict[AccessLevel, str] = {
    AccessLevel.PUBLIC: "公開",
    AccessLevel.RESTRICTED: "取扱注意",
    AccessLevel.CONFIDENTIAL: "機密",
    AccessLevel.SECRET: "極秘",
}

#: Accepted spellings (compared after NFKC and case folding) -> level.
LEVEL_ALIASES: dict[str, AccessLevel] = {
    "公開": AccessLevel.PUBLIC,
    "public": AccessLevel.PUBLIC,
    "取扱注意": AccessLevel.RESTRICTED,
    "取り扱い注意": AccessLevel.RESTRICTED,
    "restricted": AccessLevel.RESTRICTED,
    "機密": AccessLevel.CONFIDENTIAL,
    "confidential": AccessLevel.CONFIDENTIAL,
    "極秘": AccessLevel.SECRET,
    "secret": AccessLevel.SECRET,
}

#: Canonical names in clearance order, for error messages and params validation.
ACCESS_LEVELS: tuple[str, ...] = tuple(LEVEL_JA[lv] for lv in AccessLevel)


def parse_level(value: str | AccessLevel) -> AccessLevel:
    """An :class:`AccessLevel` from its Japanese or English name.

    Raises:
        ValueError: unknown name, listing the valid ones.
    """
    if isinstance(value, AccessLevel):
        return value
    key = unicodedata.normalize("NFKC", str(value)).strip().casefold()
    try:
        return LEVEL_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown access level {value!r}; use one of {', '.join(ACCESS_LEVELS)} "
            "(or public / restricted / confidential / secret)"
        ) from None
