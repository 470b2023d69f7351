"""Tamper-evident audit log: one SQLite row per answered request, chained by HMAC-SHA256, anchored outside.

Each row stores who asked (user id, access level), which model answered (id and
the GGUF file's sha256), SHA-256 digests of the input, the private reasoning,
the raw generation and the returned answer (plaintext only when
``runtime.audit.store_plaintext`` is on), the decision and its calibrated
confidence, the retrieved document ids, the documents the answer cites and
whether the answer is grounded in them (:class:`so8t.runtime.agent.Answer`),
and the latency.

Keyed hash chain (HMAC, RFC 2104, over a blockchain-style chain)::

    row_hash_i = HMAC-SHA256(key, canonical_json(fields_i) || prev_hash_i),   prev_hash_i = row_hash_{i-1}

with ``prev_hash_1 = "0" * 64``. ``canonical_json`` is JSON with sorted keys, no
whitespace and non-ASCII kept; ``fields_i`` are the columns of :data:`HASHED_COLUMNS`
(every column of the first schema except ``id`` and ``row_hash``) and those of
:data:`ADDED_COLUMNS` (added later) that are not NULL. Rows written before a
column was added hold NULL there and keep their hash, so an old log still
verifies after it is opened by a newer version (which adds the columns); a row
that has a value there is hashed with it, so setting it, changing it or
clearing it is an edit like any other. The key (32 random bytes, hex) lives
in its own file outside the database (``runtime.audit.key_file``, created
0600 on first use): without it
nobody can write a row whose hash verifies. The row id is left out on purpose, so
:func:`verify_chain` can tell an edited row from reordered and deleted rows.

Anchor (outside the database, ``runtime.audit.anchor``): every append also adds a
line ``{"id", "row_hash", "mac"}`` (``mac = HMAC(key, "id:row_hash")``) to an
append-only file, while the database's write lock is held. Deleting the newest
rows (and editing ``sqlite_sequence``), or rewriting the newest row and
recomputing its hash, leaves rows that no longer match their anchor lines:
:func:`verify_chain` reports them. Keep the anchor on storage the database's
writers cannot rewrite (another host, a WORM volume, a log shipper) to make that
hold against someone with write access to the database folder.

What is not protected: someone holding the key *and* write access to both the
database and the anchor file can rewrite history consistently; someone who can
delete the anchor file too can hide a truncation (``verify`` then reports the
anchor missing). A crash between a commit and its anchor line leaves one
``unanchored`` row, reported as such.

Durability and concurrency: the database runs in WAL mode with
``synchronous=FULL`` (each commit is fsynced), and each append runs in a
``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock before
reading the chain head; so appends from any number of threads and processes
(several server workers) serialise, chain correctly and lose no rows. The
database and key are created 0600 in a 0700 folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from so8t.errors import So8tError

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
#: Columns added after the first schema (``ALTER TABLE ... ADD COLUMN`` on an older database, NULL in its
#: rows), each covered by the row hash where it is not NULL; in the order they were added.
ADDED_COLUMNS: tuple[str, ...] = (
    "citations",
    "grounding",
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
    row_hash TEXT NOT NULL,
    citations TEXT,
    grounding TEXT
)
"""


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of ``text``'s UTF-8 bytes (lone surrogates encoded as themselves, never an error)."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def load_or_create_key(path: str | Path) -> bytes:
    """The audit HMAC key in ``path`` (64 hex digits); a missing file is created 0600 with a new key.

    Raises:
        ValueError: the file exists but does not hold 64 hex digits.
    """
    path = Path(path)
    if not path.exists():
        _private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"{path}: not an audit key (expected 64 hex digits; `so8t audit keygen` makes one)")
    return bytes.fromhex(text)


def _private_dir(path: Path) -> None:
    """Create ``path`` (and a ``.gitignore``) 0700 if missing."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process may create it first
            path.mkdir(parents=True, mode=0o700)
            os.chmod(path, 0o700)
            (path / ".gitignore").write_text("*\n", encoding="utf-8")


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
        citations: ids of the documents the returned answer cites (``Answer.citations``; stored as
            a JSON list, ``[]`` when it cites none or nothing was answered).
        grounding: ``Answer.grounding`` (``cited``, ``abstained``, ``uncited``, ``unsupported``,
            ``no_passages``), or ``None`` when nothing was answered (stored as NULL).
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
    citations: list[str] = field(default_factory=list)
    grounding: str | None = None


def row_hash(fields: dict, key: bytes) -> str:
    """``HMAC-SHA256(key, canonical_json(fields without prev_hash) || prev_hash)`` as hex.

    Args:
        fields: a row's :data:`HASHED_COLUMNS` values (``prev_hash`` included), and those of
            :data:`ADDED_COLUMNS` it has (missing or ``None``: left out of the hash, as in a row
            written before the column existed).
        key: the audit key.

    Raises:
        TypeError, ValueError: a value that is not text, a number or ``None`` (e.g. a BLOB).
    """
    body = {k: fields[k] for k in HASHED_COLUMNS if k != "prev_hash"}
    body.update({k: fields[k] for k in ADDED_COLUMNS if fields.get(k) is not None})
    for k, v in body.items():
        if not (v is None or isinstance(v, str | int | float)):
            raise TypeError(f"column {k} holds a {type(v).__name__}, not text or a number")
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    message = canonical.encode("utf-8", errors="surrogatepass") + str(fields["prev_hash"]).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def anchor_mac(key: bytes, row_id: int, digest: str) -> str:
    """``HMAC-SHA256(key, "id:row_hash")`` of an anchor line, hex."""
    return hmac.new(key, f"{row_id}:{digest}".encode(), hashlib.sha256).hexdigest()


class AuditError(So8tError, RuntimeError):
    """A row could not be written (the database locked by another process too long, a full disk);
    the message names the file."""


class AuditLog:
    """Append-only, HMAC-chained audit log in one SQLite file, anchored in an append-only file.

    Safe to share between threads (one connection per thread) and to open from
    several processes at once.

    Args:
        path: the SQLite file (its folder is created 0700 with a ``.gitignore``, the
            file 0600).
        store_plaintext: also store the input, reasoning and answer text
            (default off: digests only).
        key_file: the HMAC key (default: ``audit.key`` next to the database; created
            0600 when missing).
        anchor: the anchor file (default: ``<path>.anchor``).
        timeout_s: how long a writer waits for the write lock (seconds).
    """

    def __init__(
        self,
        path: str | Path,
        store_plaintext: bool = False,
        key_file: str | Path | None = None,
        anchor: str | Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.store_plaintext = store_plaintext
        self.timeout_s = timeout_s
        self.key_file = Path(key_file) if key_file else self.path.with_name("audit.key")
        self.anchor = Path(anchor) if anchor else self.path.with_name(self.path.name + ".anchor")
        self._local = threading.local()
        _private_dir(self.path.parent)
        self._key = load_or_create_key(self.key_file)
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with contextlib.closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            _add_columns(conn)
            conn.execute("CREATE INDEX IF NOT EXISTS audit_output ON audit (output_sha256, user_id)")

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

    def _anchor_line(self, line: dict) -> None:
        """Append one line to the anchor, or nothing: a failed write (a full disk) is cut off again."""
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode("ascii")
        fd = os.open(self.anchor, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write", str(self.anchor))
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def append(self, entry: AuditEntry) -> tuple[int, str]:
        """Append one row, chained to the current head and anchored; returns ``(id, row_hash)``.

        Raises:
            AuditError: the write lock was not obtained within ``timeout_s``, or the database or the
                anchor could not be written (a full disk); nothing of the row is kept.
        """
        try:
            return self._append(entry)
        except (sqlite3.Error, OSError) as e:
            where = self.anchor if isinstance(e, OSError) else self.path
            raise AuditError(f"audit log {where}: {e} (the row was not written)") from e

    def _append(self, entry: AuditEntry) -> tuple[int, str]:
        plain = self.store_plaintext
        fields = {
            "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
            "request_id": entry.request_id,
            "channel": entry.channel,
            "user_id": _text(entry.user_id),
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
            "doc_ids": json.dumps([_text(d) for d in entry.doc_ids], ensure_ascii=False),
            "latency_ms": round(float(entry.latency_ms), 3),
            "input_text": _text(entry.input_text) if plain else None,
            "reasoning_text": _text(entry.reasoning_text) if plain else None,
            "output_text": _text(entry.output_text) if plain else None,
            "citations": json.dumps([_text(d) for d in entry.citations], ensure_ascii=False),
            "grounding": entry.grounding,
        }
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        anchor_size = self.anchor.stat().st_size if self.anchor.exists() else 0
        try:
            head = conn.execute("SELECT row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            fields["prev_hash"] = head[0] if head else GENESIS
            fields["row_hash"] = row_hash(fields, self._key)
            cols = ", ".join(fields)
            marks = ", ".join("?" for _ in fields)
            cur = conn.execute(f"INSERT INTO audit ({cols}) VALUES ({marks})", tuple(fields.values()))
            row_id = int(cur.lastrowid)
            # Anchored while the write lock is held, so anchor lines follow the rows' order.
            self._anchor_line(
                {"id": row_id, "row_hash": fields["row_hash"], "mac": anchor_mac(self._key, row_id, fields["row_hash"])}
            )
            anchored = row_id
            conn.execute("COMMIT")
        except BaseException:
            if "anchored" in locals():
                # Still under the write lock (before the ROLLBACK): no other writer has appended since,
                # so the row's anchor line is cut off again; where the anchor cannot be truncated (an
                # append-only file), a signed rollback line says the row never was.
                try:
                    os.truncate(self.anchor, anchor_size)
                except OSError:
                    with contextlib.suppress(OSError):
                        self._anchor_line({"rollback": anchored, "mac": anchor_mac(self._key, anchored, "rollback")})
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return row_id, fields["row_hash"]

    def issued(self, answer: str, user_id: str) -> bool:
        """True when a request of ``user_id`` was answered with exactly ``answer`` (by its digest)."""
        row = self._conn().execute(
            "SELECT 1 FROM audit WHERE output_sha256 = ? AND user_id = ? AND decision != 'ERROR' LIMIT 1",
            (sha256_hex(answer), _text(user_id)),
        ).fetchone()
        return row is not None

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


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the :data:`ADDED_COLUMNS` an older database lacks (NULL in its rows, so their hashes hold).

    Runs under the write lock (``BEGIN IMMEDIATE``) and looks again there, so processes opening the
    same old database at once add each column once.
    """

    def missing() -> list[str]:
        have = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
        return [c for c in ADDED_COLUMNS if c not in have]

    if not missing():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for column in missing():
            conn.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _text(value: str) -> str:
    """``value`` storable as UTF-8 (a lone surrogate becomes its ``\\udXXX`` escape)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", errors="backslashreplace").decode("utf-8")


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


def _read_rows(path: Path) -> tuple[list[dict], int]:
    """Every row (id order) and ``sqlite_sequence``'s largest id, read-only; text kept as bytes where not UTF-8."""
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        conn.text_factory = lambda b: b.decode("utf-8", errors="surrogateescape")
        cur = conn.execute("SELECT * FROM audit ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur]
        seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    return rows, int(seq_row[0]) if seq_row else 0


def _read_anchor(path: Path, key: bytes) -> tuple[dict[int, str], list[Finding]]:
    """``{id: row_hash}`` of the anchor's valid lines, and findings for lines that are not."""
    anchored: dict[int, str] = {}
    findings: list[Finding] = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            item = json.loads(line)
            if "rollback" in item:
                if hmac.compare_digest(item["mac"], anchor_mac(key, int(item["rollback"]), "rollback")):
                    anchored.pop(int(item["rollback"]), None)
                    continue
                raise ValueError("bad mac")
            row_id, digest = int(item["id"]), str(item["row_hash"])
            if not hmac.compare_digest(str(item["mac"]), anchor_mac(key, row_id, digest)):
                raise ValueError("bad mac")
            anchored[row_id] = digest
        except (ValueError, KeyError, TypeError, AttributeError):
            findings.append(Finding(0, "anchor", f"{path.name} line {n}: not a valid anchor line (edited?)"))
    return anchored, findings


def verify_chain(
    path: str | Path,
    key: bytes,
    anchor: str | Path | None = None,
    expect_head: str | None = None,
) -> VerifyReport:
    """Check every row's keyed hash, every link of the chain and the anchor file.

    Findings, in id order (any finding means the log was tampered with or damaged):

    * ``edited``: a row's contents do not match its ``row_hash`` (without the key no
      hash can be recomputed), a value is malformed (a BLOB, bytes that are not UTF-8),
      or a row matches its own hash but the next row links to a hash no row has (the
      row was changed and its hash recomputed with the key); or a row differs from
      its anchor line.
    * ``deleted``: a gap in the ids (``AUTOINCREMENT`` never reuses an id), rows
      missing at the end (``sqlite_sequence``, or anchor lines past the last row:
      truncation with ``sqlite_sequence`` edited too) or the start.
    * ``reordered``: an intact row links to a row that exists but is stored elsewhere.
    * ``unanchored``: rows after the anchor's last line (a crash between commit and
      anchor, or rows written without the anchor).
    * ``anchor``: the anchor file is missing or has a line whose MAC does not verify.

    Args:
        key: the audit key (:func:`load_or_create_key`).
        anchor: the anchor file (``None``: not checked).
        expect_head: a ``row_hash`` recorded earlier (any case); it must still be in the log.

    Raises:
        FileNotFoundError: no database at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit database not found (set runtime.audit.db or pass --db)")
    rows, seq = _read_rows(path)
    by_hash = {r["row_hash"]: r["id"] for r in rows if isinstance(r["row_hash"], str)}
    findings: list[Finding] = []
    prev_hash, prev_id = GENESIS, 0
    for r in rows:
        try:
            intact = hmac.compare_digest(row_hash(r, key), str(r["row_hash"]))
            problem = "its contents do not match its hash"
        except (TypeError, ValueError, UnicodeError) as e:
            intact, problem = False, f"malformed value ({e})"
        if not intact:
            findings.append(Finding(r["id"], "edited", f"row {r['id']}: {problem}"))
        if r["id"] != prev_id + 1:
            missing = f"{prev_id + 1}" if r["id"] == prev_id + 2 else f"{prev_id + 1}-{r['id'] - 1}"
            findings.append(Finding(prev_id + 1, "deleted", f"row(s) {missing} missing before row {r['id']}"))
        elif r["prev_hash"] != prev_hash:
            if r["prev_hash"] in by_hash:
                findings.append(Finding(r["id"], "reordered", f"row {r['id']} follows row {by_hash[r['prev_hash']]} "
                                        f"in the chain but is stored after row {prev_id or '(start)'}"))
            elif prev_id:
                findings.append(Finding(prev_id, "edited", f"row {prev_id}: changed and re-hashed "
                                        f"(row {r['id']} links to its old hash)"))
            else:
                findings.append(Finding(r["id"], "edited", f"row {r['id']}: its link to the chain start was changed"))
        prev_hash, prev_id = r["row_hash"], r["id"]
    last = max(seq, prev_id)
    if anchor is not None:
        anchor = Path(anchor)
        if not anchor.is_file():
            findings.append(Finding(0, "anchor", f"{anchor}: anchor file missing"))
        else:
            anchored, bad = _read_anchor(anchor, key)
            findings += bad
            stored = {r["id"]: r["row_hash"] for r in rows}
            for row_id, digest in sorted(anchored.items()):
                if row_id not in stored:
                    if row_id > prev_id:
                        last = max(last, row_id)
                    else:
                        findings.append(Finding(row_id, "deleted", f"row {row_id}: anchored but missing"))
                elif stored[row_id] != digest:
                    findings.append(Finding(row_id, "edited", f"row {row_id}: differs from its anchor line "
                                            "(rewritten and re-hashed)"))
            top = max(anchored, default=0)
            if prev_id > top:
                findings.append(Finding(top + 1, "unanchored", f"row(s) {top + 1}-{prev_id} have no anchor line"))
    if last > prev_id:
        missing = f"{prev_id + 1}" if last == prev_id + 1 else f"{prev_id + 1}-{last}"
        findings.append(Finding(prev_id + 1, "deleted", f"row(s) {missing} missing at the end of the log"))
    if expect_head is not None and expect_head.strip().lower() not in by_hash:
        findings.append(Finding(prev_id, "deleted", f"expected head {expect_head[:16]}... is not in the log"))
    findings.sort(key=lambda f: f.row_id)
    return VerifyReport(str(path), len(rows), prev_hash if rows else GENESIS, findings)
