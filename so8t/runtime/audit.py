"""Tamper-evident audit log: one SQLite row per answered request, chained by SHA-256.

Each row stores who asked (user id, access level), which model answered (id and
the GGUF file's sha256), SHA-256 digests of the input, the private reasoning,
the raw generation and the returned answer (plaintext only when
``runtime.audit.store_plaintext`` is on), the decision and its calibrated
confidence, the retrieved document ids and the latency.

Hash chain (in the manner of a blockchain or Certificate Transparency log)::

    row_hash_i = sha256( canonical_json(fields_i) || prev_hash_i ),   prev_hash_i = row_hash_{i-1}

with ``prev_hash_1 = "0" * 64``. ``canonical_json`` is JSON with sorted keys,
no whitespace and non-ASCII kept; ``fields_i`` are every column except ``id``
and ``row_hash``. The row id is left out on purpose, so the order of the rows is
protected by the chain alone and :func:`verify_chain` can tell an edited row
(its contents no longer match its hash) from reordered rows (intact rows whose
links point at rows stored elsewhere) and deleted rows (a gap in the
``AUTOINCREMENT`` ids, or a link to a hash that no longer exists).

Durability and concurrency: the database runs in WAL mode with
``synchronous=FULL`` (each commit is fsynced), and each append runs in a
``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock before
reading the chain head; so appends from any number of threads and processes
(several server workers) serialise, chain correctly and lose no rows.

What the chain cannot show: someone with write access who rewrites a row *and*
every row after it (recomputing all hashes) leaves a valid chain. Record the
head printed by ``so8t audit verify`` elsewhere (a ticket, a signed e-mail,
a write-once medium) now and then, and pass it back with ``--expect-head`` to
pin the log up to that point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

#: ``prev_hash`` of the first row.
GENESIS = "0" * 64

#: Columns covered by the row hash, in table order (``id`` and ``row_hash`` are not).
HASHED_COLUMNS: tuple[str, ...] = (
    "ts",
    "request_id",
    "channel",
    "user_id",
    "access_level",
    "model_id",
    "model_sha256",
    "input_sha256",
    "reasoning_sha256",
    "generation_sha256",
    "output_sha256",
    "decision",
    "model_decision",
    "confidence",
    "doc_ids",
    "latency_ms",
    "input_text",
    "reasoning_text",
    "output_text",
    "prev_hash",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    request_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    user_id TEXT NOT NULL,
    access_level TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    reasoning_sha256 TEXT NOT NULL,
    generation_sha256 TEXT NOT NULL,
    output_sha256 TEXT NOT NULL,
    decision TEXT NOT NULL,
    model_decision TEXT,
    confidence REAL,
    doc_ids TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    input_text TEXT,
    reasoning_text TEXT,
    output_text TEXT,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
)
"""


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of ``text``'s UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class AuditEntry:
    """What one request leaves in the log (the plaintext fields are dropped unless enabled).

    Attributes:
        decision: ``ALLOW`` / ``ESCALATION`` / ``DENY`` as returned, or ``ERROR``.
        model_decision: the model's own argmax label before the policy (or ``None``).
        confidence: calibrated probability of ``model_decision`` in [0, 1] (or ``None``).
        doc_ids: ids of the retrieved passages put in the prompt.
        latency_ms: wall time of the request in milliseconds.
        input_text: canonical JSON of the caller's messages (hashed into ``input_sha256``).
    """

    request_id: str
    channel: str
    user_id: str
    access_level: str
    model_id: str
    model_sha256: str
    input_text: str
    reasoning_text: str
    generation_text: str
    output_text: str
    decision: str
    model_decision: str | None
    confidence: float | None
    doc_ids: list[str] = field(default_factory=list)
    latency_ms: float = 0.0


def row_hash(fields: dict) -> str:
    """``sha256(canonical_json(fields without prev_hash) || prev_hash)`` as hex.

    Args:
        fields: a row's :data:`HASHED_COLUMNS` values (``prev_hash`` included).
    """
    body = {k: fields[k] for k in HASHED_COLUMNS if k != "prev_hash"}
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8") + fields["prev_hash"].encode("ascii")).hexdigest()


class AuditLog:
    """Append-only, hash-chained audit log in one SQLite file.

    Safe to share between threads (one connection per thread) and to open from
    several processes at once.

    Args:
        path: the SQLite file (its folder is created; a new folder gets a
            ``.gitignore`` so the log is never committed by accident).
        store_plaintext: also store the input, reasoning and answer text
            (default off: digests only).
        timeout_s: how long a writer waits for the write lock (seconds).
    """

    def __init__(self, path: str | Path, store_plaintext: bool = False, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.store_plaintext = store_plaintext
        self.timeout_s = timeout_s
        self._local = threading.local()
        if not self.path.parent.exists():
            with contextlib.suppress(FileExistsError):  # another process may create it first
                self.path.parent.mkdir(parents=True)
                (self.path.parent / ".gitignore").write_text("*\n", encoding="utf-8")
        with contextlib.closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread and process (a forked child must not reuse its parent's).
        key = (os.getpid(), threading.get_ident())
        if getattr(self._local, "key", None) != key:
            self._local.conn = self._connect()
            self._local.key = key
        return self._local.conn

    def append(self, entry: AuditEntry) -> tuple[int, str]:
        """Append one row, chained to the current head; returns ``(id, row_hash)``.

        Raises:
            sqlite3.OperationalError: the write lock was not obtained within ``timeout_s``.
        """
        plain = self.store_plaintext
        fields = {
            "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
            "request_id": entry.request_id,
            "channel": entry.channel,
            "user_id": entry.user_id,
            "access_level": entry.access_level,
            "model_id": entry.model_id,
            "model_sha256": entry.model_sha256,
            "input_sha256": sha256_hex(entry.input_text),
            "reasoning_sha256": sha256_hex(entry.reasoning_text),
            "generation_sha256": sha256_hex(entry.generation_text),
            "output_sha256": sha256_hex(entry.output_text),
            "decision": entry.decision,
            "model_decision": entry.model_decision,
            "confidence": None if entry.confidence is None else round(float(entry.confidence), 6),
            "doc_ids": json.dumps(list(entry.doc_ids), ensure_ascii=False),
            "latency_ms": round(float(entry.latency_ms), 3),
            "input_text": entry.input_text if plain else None,
            "reasoning_text": entry.reasoning_text if plain else None,
            "output_text": entry.output_text if plain else None,
        }
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = conn.execute("SELECT row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            fields["prev_hash"] = head[0] if head else GENESIS
            fields["row_hash"] = row_hash(fields)
            cols = ", ".join(fields)
            marks = ", ".join("?" for _ in fields)
            cur = conn.execute(f"INSERT INTO audit ({cols}) VALUES ({marks})", tuple(fields.values()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(cur.lastrowid), fields["row_hash"]

    def count(self) -> int:
        """Number of rows."""
        return int(self._conn().execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def rows(self) -> Iterator[dict]:
        """All rows as dicts, in id order."""
        conn = self._conn()
        cur = conn.execute("SELECT * FROM audit ORDER BY id")
        names = [d[0] for d in cur.description]
        for r in cur:
            yield dict(zip(names, r))

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.key = None


@dataclass
class Finding:
    """One problem found by :func:`verify_chain`.

    Attributes:
        row_id: the first row the problem concerns.
        kind: ``edited``, ``deleted`` or ``reordered``.
        detail: a sentence for people.
    """

    row_id: int
    kind: str
    detail: str


@dataclass
class VerifyReport:
    """Result of :func:`verify_chain`: ``ok`` when ``findings`` is empty."""

    path: str
    rows: int
    head: str
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "rows": self.rows,
            "head": self.head,
            "findings": [asdict(f) for f in self.findings],
        }


def verify_chain(path: str | Path, expect_head: str | None = None) -> VerifyReport:
    """Check every row's hash and every link of the chain.

    Findings, in id order:

    * ``edited``: a row's contents do not match its ``row_hash``; or a row
      matches its own hash but the next row links to a hash no row has while
      the ids are consecutive (the row was changed and its hash recomputed).
    * ``deleted``: a gap in the ids (``AUTOINCREMENT`` never reuses an id; a
      rolled-back append consumes none), including rows missing at the end
      (``sqlite_sequence`` remembers the largest id ever used) or the start.
    * ``reordered``: an intact row links to a row that exists but is stored
      elsewhere (rows swapped or renumbered).

    Args:
        expect_head: a ``row_hash`` recorded earlier; it must still be in the log.

    Raises:
        FileNotFoundError: no database at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit database not found (set runtime.audit.db or pass --db)")
    uri = f"file:{path.resolve()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        cur = conn.execute("SELECT * FROM audit ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur]
        seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    seq = int(seq_row[0]) if seq_row else 0
    by_hash = {r["row_hash"]: r["id"] for r in rows}
    findings: list[Finding] = []
    prev_hash, prev_id = GENESIS, 0
    for r in rows:
        if row_hash(r) != r["row_hash"]:
            findings.append(Finding(r["id"], "edited", f"row {r['id']}: its contents do not match its hash"))
        if r["id"] != prev_id + 1:
            missing = f"{prev_id + 1}" if r["id"] == prev_id + 2 else f"{prev_id + 1}-{r['id'] - 1}"
            findings.append(Finding(prev_id + 1, "deleted", f"row(s) {missing} missing before row {r['id']}"))
        elif r["prev_hash"] != prev_hash:
            if r["prev_hash"] in by_hash:
                findings.append(
                    Finding(
                        r["id"],
                        "reordered",
                        f"row {r['id']} follows row {by_hash[r['prev_hash']]} in the chain "
                        f"but is stored after row {prev_id or '(start)'}",
                    )
                )
            elif prev_id:
                findings.append(
                    Finding(
                        prev_id, "edited", f"row {prev_id}: changed and re-hashed (row {r['id']} links to its old hash)"
                    )
                )
            else:
                findings.append(Finding(r["id"], "edited", f"row {r['id']}: its link to the chain start was changed"))
        prev_hash, prev_id = r["row_hash"], r["id"]
    if seq > prev_id:
        missing = f"{prev_id + 1}" if seq == prev_id + 1 else f"{prev_id + 1}-{seq}"
        findings.append(Finding(prev_id + 1, "deleted", f"row(s) {missing} missing at the end of the log"))
    if expect_head is not None and expect_head not in by_hash:
        findings.append(Finding(prev_id, "deleted", f"expected head {expect_head[:16]}... is not in the log"))
    findings.sort(key=lambda f: f.row_id)
    return VerifyReport(str(path), len(rows), prev_hash if rows else GENESIS, findings)
