"""HMAC-chained, anchored audit log: tamper detection (edited, deleted, reordered rows, a truncated or
rewritten tail, malformed values) and concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from itertools import pairwise

import pytest

from so8t.runtime.cli import main
from so8t.runtime.audit import GENESIS, AuditEntry, AuditLog, load_or_create_key, row_hash, verify_chain


def entry(i: int, user: str = "alice") -> AuditEntry:
    return AuditEntry(
        request_id=f"r{i}",
        channel="test",
        user_id=user,
        access_level="公開",
        model_id="m",
        model_sha256="0" * 64,
        input_text=f"質問 {i}",
        reasoning_text=f"推論 {i}",
        generation_text=f"生成 {i}",
        output_text=f"回答 {i}",
        decision="ALLOW",
        model_decision="ALLOW",
        confidence=0.5 + i / 1000,
        doc_ids=[f"doc{i}", f"other{i}"],
        latency_ms=1.5 * i,
        citations=[f"doc{i}"],
        grounding="cited",
    )


def filled(tmp_path, n: int = 6) -> AuditLog:
    log = AuditLog(tmp_path / "audit.sqlite3")
    for i in range(n):
        log.append(entry(i))
    return log


def sql(log: AuditLog, statement: str, *args) -> None:
    with sqlite3.connect(log.path) as conn:
        conn.execute(statement, args)


def verify(log: AuditLog, **kw):
    """verify_chain with the log's key and anchor."""
    return verify_chain(log.path, load_or_create_key(log.key_file), log.anchor, **kw)


def test_chain_links_every_row(tmp_path):
    log = filled(tmp_path)
    rows = list(log.rows())
    assert rows[0]["prev_hash"] == GENESIS
    for a, b in pairwise(rows):
        assert b["prev_hash"] == a["row_hash"]
    for r in rows:
        assert r["row_hash"] == row_hash(r, load_or_create_key(log.key_file))
        assert r["input_text"] is None  # digests only by default
    report = verify(log)
    assert report.ok and report.rows == 6 and report.head == rows[-1]["row_hash"]


def test_pragmas(tmp_path):
    log = filled(tmp_path, 1)
    conn = log._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize(
    "column, value",
    [
        ("decision", "DENY"),
        ("confidence", 0.99),
        ("user_id", "mallory"),
        ("output_sha256", "1" * 64),
        ("doc_ids", "[]"),
        ("ts", "2000-01-01T00:00:00+00:00"),
        ("citations", "[]"),
        ("citations", None),
        ("grounding", "unsupported"),
        ("grounding", None),
    ],
)
def test_edited_row_is_found(tmp_path, column, value):
    log = filled(tmp_path)
    sql(log, f"UPDATE audit SET {column} = ? WHERE id = 3", value)
    report = verify(log)
    assert not report.ok
    assert (report.findings[0].row_id, report.findings[0].kind) == (3, "edited")


def test_edited_and_rehashed_row_is_found(tmp_path):
    log = filled(tmp_path)
    row = next(r for r in log.rows() if r["id"] == 3)
    row["decision"] = "DENY"
    key = load_or_create_key(log.key_file)  # an attacker who has the key too
    sql(log, "UPDATE audit SET decision = 'DENY', row_hash = ? WHERE id = 3", row_hash(row, key))
    f = verify(log).findings
    assert [(x.row_id, x.kind) for x in f] == [(3, "edited"), (3, "edited")]  # the chain and the anchor


def test_deleted_row_is_found(tmp_path):
    log = filled(tmp_path)
    sql(log, "DELETE FROM audit WHERE id = 3")
    f = verify(log).findings
    assert [(x.row_id, x.kind) for x in f] == [(3, "deleted"), (3, "deleted")]
    assert "3 missing" in f[0].detail


def test_deleted_first_and_last_rows_are_found(tmp_path):
    log = filled(tmp_path)
    sql(log, "DELETE FROM audit WHERE id IN (1, 6)")
    f = verify(log).findings
    assert {(x.row_id, x.kind) for x in f} == {(1, "deleted"), (6, "deleted")}


def test_deleted_last_row_then_new_rows_are_found(tmp_path):
    log = filled(tmp_path)
    sql(log, "DELETE FROM audit WHERE id = 6")
    log.append(entry(7))
    f = verify(log).findings
    assert {(x.row_id, x.kind) for x in f} == {(6, "deleted")}


def test_reordered_rows_are_found(tmp_path):
    """Swap two rows' contents (hashes included) while keeping their ids."""
    log = filled(tmp_path)
    rows = {r["id"]: r for r in log.rows()}
    cols = [c for c in rows[2] if c != "id"]
    with sqlite3.connect(log.path) as conn:
        for a, b in ((2, 4), (4, 2)):
            conn.execute(
                f"UPDATE audit SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?", [rows[b][c] for c in cols] + [a]
            )
    f = verify(log).findings
    assert f and f[0].row_id == 2 and f[0].kind == "reordered"
    assert {x.kind for x in f} == {"reordered", "edited"}  # the anchor sees the rows moved


def test_renumbered_rows_are_found(tmp_path):
    log = filled(tmp_path)
    with sqlite3.connect(log.path) as conn:
        conn.execute("UPDATE audit SET id = 100 WHERE id = 2")
        conn.execute("UPDATE audit SET id = 2 WHERE id = 5")
        conn.execute("UPDATE audit SET id = 5 WHERE id = 100")
    f = verify(log).findings
    assert f[0].row_id == 2 and f[0].kind == "reordered"


def test_expect_head(tmp_path):
    log = filled(tmp_path)
    head = verify(log).head
    log.append(entry(9))
    assert verify(log, expect_head=head).ok
    assert not verify(log, expect_head="ab" * 32).ok


def test_cli_verify_exit_codes(tmp_path, capsys):
    log = filled(tmp_path)
    assert main(["audit", "verify", "--db", str(log.path)]) == 0
    assert "OK" in capsys.readouterr().out
    head = verify(log).head
    assert main(["audit", "verify", "--db", str(log.path), "--expect-head", head.upper()]) == 0
    assert "OK" in capsys.readouterr().out
    sql(log, "UPDATE audit SET decision = 'DENY' WHERE id = 4")
    assert main(["audit", "verify", "--db", str(log.path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "row 4: edited" in out
    assert main(["audit", "verify", "--db", str(tmp_path / "missing.sqlite3")]) == 2


def _write_rows(path: str, worker: int, n: int, threads: int) -> None:
    log = AuditLog(path)

    def run(t: int) -> None:
        for i in range(n):
            log.append(entry(i, user=f"w{worker}t{t}"))

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def test_concurrent_processes_and_threads_lose_no_rows(tmp_path):
    path = str(tmp_path / "audit.sqlite3")
    AuditLog(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(path, w, 15, 3)) for w in range(4)]
    for p in procs:
        p.start()
    _write_rows(path, 99, 15, 3)  # and the parent at the same time
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = AuditLog(path)
    report = verify(log)
    assert report.ok, report.findings[:3]
    assert report.rows == 5 * 3 * 15
    users = {r["user_id"] for r in AuditLog(path).rows()}
    assert len(users) == 5 * 3


# --------------------------------------------------------------------------- the tail and malformed values


def test_three_of_three_tamperings_are_detected(tmp_path):
    """A deleted tail (sqlite_sequence edited), a rewritten newest row, an edited middle row."""
    log = filled(tmp_path, 8)
    with sqlite3.connect(log.path) as conn:
        conn.execute("DELETE FROM audit WHERE id >= 7")
        conn.execute("UPDATE sqlite_sequence SET seq = 6 WHERE name = 'audit'")
    assert {(f.row_id, f.kind) for f in verify(log).findings} == {(7, "deleted")}

    log = filled(tmp_path / "b", 8)
    newest = next(r for r in log.rows() if r["id"] == 8)
    newest |= {"decision": "ALLOW", "user_id": "mallory"}
    key = load_or_create_key(log.key_file)  # even with the key, the anchor still holds the old hash
    sql(log, "UPDATE audit SET decision = 'ALLOW', user_id = 'mallory', row_hash = ? WHERE id = 8", row_hash(newest, key))
    assert [(f.row_id, f.kind) for f in verify(log).findings] == [(8, "edited")]
    sql(log, "UPDATE audit SET user_id = 'eve', row_hash = ? WHERE id = 8", "f" * 64)  # without the key
    assert (8, "edited") in {(f.row_id, f.kind) for f in verify(log).findings}

    log = filled(tmp_path / "c", 8)
    sql(log, "UPDATE audit SET confidence = 0.01 WHERE id = 4")
    assert [(f.row_id, f.kind) for f in verify(log).findings] == [(4, "edited")]


def test_a_new_key_or_a_forged_anchor_line_fails(tmp_path):
    log = filled(tmp_path)
    other = tmp_path / "other.key"
    assert not verify_chain(log.path, load_or_create_key(other), log.anchor).ok
    with open(log.anchor, "a", encoding="ascii") as fh:
        fh.write('{"id":7,"row_hash":"' + "a" * 64 + '","mac":"' + "0" * 64 + '"}\n')
    assert "anchor" in {f.kind for f in verify(log).findings}
    log.anchor.unlink()
    assert "anchor" in {f.kind for f in verify(log).findings}


@pytest.mark.parametrize("value", [b"\x00\xffbinary", "\u00e9\u4e2d\U0001f600", 12345, 1.5])
def test_malformed_or_foreign_values_are_findings_not_tracebacks(tmp_path, value):
    log = filled(tmp_path)
    sql(log, "UPDATE audit SET user_id = ? WHERE id = 2", value)
    report = verify(log)
    assert [(f.row_id, f.kind) for f in report.findings][:1] == [(2, "edited")]


def test_odd_paths_and_permissions(tmp_path, capsys):
    import os
    import stat

    folder = tmp_path / "odd #?dir"
    log = AuditLog(folder / "a#b?.sqlite3")
    log.append(entry(1))
    assert verify(log).ok
    assert main(["audit", "verify", "--db", str(log.path)]) == 0
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for f in (log.path, log.key_file, log.anchor):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_lone_surrogates_are_logged(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3", store_plaintext=True)
    bad = entry(1)
    bad.input_text = "a\ud800b"
    log.append(bad)
    assert verify(log).ok


# --------------------------------------------------------------------------- a log from before a column was added

#: The first schema (before ``citations`` and ``grounding``) and the hash its rows were written with.
FIRST_SCHEMA = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, request_id TEXT NOT NULL, channel TEXT NOT NULL,
    user_id TEXT NOT NULL, access_level TEXT NOT NULL, model_id TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    input_sha256 TEXT NOT NULL, reasoning_sha256 TEXT NOT NULL, generation_sha256 TEXT NOT NULL,
    output_sha256 TEXT NOT NULL, decision TEXT NOT NULL, model_decision TEXT, confidence REAL,
    doc_ids TEXT NOT NULL, latency_ms REAL NOT NULL, input_text TEXT, reasoning_text TEXT, output_text TEXT,
    prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL
)
"""
FIRST_COLUMNS = (
    "ts", "request_id", "channel", "user_id", "access_level", "model_id", "model_sha256", "input_sha256",
    "reasoning_sha256", "generation_sha256", "output_sha256", "decision", "model_decision", "confidence",
    "doc_ids", "latency_ms", "input_text", "reasoning_text", "output_text",
)


def first_schema_log(folder, n: int = 3):
    """An audit database, key and anchor as the first schema's code wrote them (its hash recomputed here)."""
    import hashlib
    import hmac
    import json

    from so8t.runtime.audit import anchor_mac, sha256_hex

    folder.mkdir(parents=True, exist_ok=True)
    path, anchor = folder / "audit.sqlite3", folder / "audit.sqlite3.anchor"
    key = load_or_create_key(folder / "audit.key")
    prev = GENESIS
    with sqlite3.connect(path) as conn:
        conn.execute(FIRST_SCHEMA)
        for i in range(1, n + 1):
            fields = {
                "ts": f"2024-01-0{i}T00:00:00.000000+00:00", "request_id": f"old{i}", "channel": "cli",
                "user_id": "alice", "access_level": "公開", "model_id": "m", "model_sha256": "0" * 64,
                "input_sha256": sha256_hex(f"質問 {i}"), "reasoning_sha256": sha256_hex(""),
                "generation_sha256": sha256_hex(""), "output_sha256": sha256_hex(f"回答 {i}"), "decision": "ALLOW",
                "model_decision": "ALLOW", "confidence": 0.9, "doc_ids": json.dumps(["docs/a.md"]),
                "latency_ms": 1.5, "input_text": None, "reasoning_text": None, "output_text": None,
            }
            body = json.dumps({k: fields[k] for k in FIRST_COLUMNS}, sort_keys=True, ensure_ascii=False,
                              separators=(",", ":"))
            digest = hmac.new(key, body.encode() + prev.encode(), hashlib.sha256).hexdigest()
            fields |= {"prev_hash": prev, "row_hash": digest}
            conn.execute(f"INSERT INTO audit ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                         tuple(fields.values()))
            with open(anchor, "a", encoding="ascii") as fh:
                fh.write(json.dumps({"id": i, "row_hash": digest, "mac": anchor_mac(key, i, digest)}) + "\n")
            prev = digest
    return path, key, anchor


def columns(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[1] for r in conn.execute("PRAGMA table_info(audit)")]


def test_a_first_schema_log_verifies_before_and_after_the_new_columns(tmp_path, capsys):
    path, key, anchor = first_schema_log(tmp_path)
    assert "grounding" not in columns(path)
    assert verify_chain(path, key, anchor).ok  # read as it is, without the new columns
    assert main(["audit", "verify", "--db", str(path)]) == 0

    log = AuditLog(path)  # adds the columns (NULL in the old rows)
    assert columns(path)[-2:] == ["citations", "grounding"]
    AuditLog(path)  # a second opening adds nothing
    assert columns(path).count("grounding") == 1
    log.append(entry(4))
    log.append(entry(5))
    rows = list(log.rows())
    assert [r["grounding"] for r in rows] == [None, None, None, "cited", "cited"]
    assert rows[3]["prev_hash"] == rows[2]["row_hash"]
    report = verify_chain(path, key, anchor)
    assert report.ok and report.rows == 5, report.findings
    capsys.readouterr()
    assert main(["audit", "verify", "--db", str(path)]) == 0
    assert "OK" in capsys.readouterr().out

    # Setting a new column of an old row, or clearing one of a new row, is an edit.
    sql(log, "UPDATE audit SET grounding = 'cited' WHERE id = 2")
    sql(log, "UPDATE audit SET citations = NULL WHERE id = 4")
    assert [(f.row_id, f.kind) for f in verify_chain(path, key, anchor).findings] == [(2, "edited"), (4, "edited")]


def test_new_logs_have_the_added_columns_last(tmp_path):
    log = filled(tmp_path, 1)
    names = columns(log.path)
    assert names[-2:] == ["citations", "grounding"]
    (row,) = log.rows()
    assert row["citations"] == '["doc0"]' and row["grounding"] == "cited" and row["doc_ids"] == '["doc0", "other0"]'
