"""Faults: the audit database locked by another process, a full disk under the audit log, the
reports and other artifacts. Each leaves the previous good state and an error that names the file.

A full disk is made real with ``RLIMIT_FSIZE`` in a child process (the kernel refuses to grow a
file past the limit: ``EFBIG``, the same failed ``write`` as ``ENOSPC``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fastapi.testclient import TestClient
from fakes import make_agent

from so8t.runtime.audit import AuditLog, load_or_create_key, verify_chain
from so8t.params import ServerParams
from so8t.runtime.server import ApiKeys, create_app

KEY = "k-alice-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _keys() -> ApiKeys:
    k = ApiKeys()
    k.add(KEY, "alice", "公開")
    return k


def _child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


FULL_DISK = """
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
    def full_disk(limit):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""


def test_audit_db_locked_by_another_process_is_a_clear_503(tmp_path):
    agent = make_agent(tmp_path)
    agent.audit.timeout_s = 0.3
    client = TestClient(create_app(agent, _keys(), ServerParams()), raise_server_exceptions=False)
    assert client.post("/v1/decide", headers=AUTH, json={"prompt": "質問"}).status_code == 200
    locker = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, sys, time
            c = sqlite3.connect({str(agent.audit.path)!r}, isolation_level=None)
            c.execute("BEGIN IMMEDIATE")  # the write lock, held
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = client.post("/v1/decide", headers=AUTH, json={"prompt": "質問"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        message = r.json()["error"]["message"]
        assert str(agent.audit.path) in message and "locked" in message and "not answered" in message
        assert "Traceback" not in r.text and time.monotonic() - t0 < 10
    finally:
        locker.kill()
        locker.wait()
    assert client.post("/v1/decide", headers=AUTH, json={"prompt": "質問"}).status_code == 200
    log = agent.audit
    report = verify_chain(log.path, load_or_create_key(log.key_file), log.anchor)
    assert report.ok and report.rows == 2  # the refused answer was never shown, and left no row


def test_disk_full_under_the_audit_log_keeps_the_chain_whole(tmp_path):
    AuditLog(tmp_path / "audit.sqlite3")  # created (and its key) before the disk fills
    out = _child(FULL_DISK + f"""
    import os, sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from so8t.runtime.audit import AuditEntry, AuditError, AuditLog
    log = AuditLog("audit.sqlite3")
    def entry(i):
        return AuditEntry(request_id=str(i), channel="test", user_id="alice", access_level="公開",
                          model_id="m", model_sha256="0" * 64, input_text="x" * 300, reasoning_text="", generation_text="",
                          output_text="y", decision="DENY", model_decision="DENY", confidence=0.9)
    log.append(entry(0))
    sizes = (os.path.getsize("audit.sqlite3"), os.path.getsize("audit.sqlite3.anchor"))
    full_disk(max(sizes) + 1500)
    written, error = 1, None
    for i in range(1, 400):
        try:
            log.append(entry(i))
            written += 1
        except AuditError as e:
            error = str(e)
            break
    print(written, error, sep="\\n")
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    written, error = out.stdout.splitlines()[:2]
    assert "the row was not written" in error and ("audit.sqlite3" in error)
    log = AuditLog(tmp_path / "audit.sqlite3")
    report = verify_chain(log.path, load_or_create_key(log.key_file), log.anchor)
    assert report.ok, report.findings[:3]
    assert report.rows == int(written) >= 1  # every row before the failure, no half row after it


def test_disk_full_while_writing_a_report_keeps_the_previous_one(tmp_path):
    previous = {"macro_f1": 0.86, "n": 192}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(previous))
    out = _child(FULL_DISK + """
    from so8t.io import WriteError, write_json
    full_disk(4096)
    try:
        write_json("reports/metrics.json", {"rows": list(range(5000))})
    except WriteError as e:
        print(e.errno, e.filename, str(e), sep="\\n")
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    code, filename, message = out.stdout.splitlines()[:3]
    assert int(code) in (27, 28) and filename == "reports/metrics.json"  # EFBIG / ENOSPC
    assert "cannot write reports/metrics.json" in message and "unchanged" in message
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == previous
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["metrics.json"]  # no temporary file left


def test_disk_full_while_writing_a_model_folder_keeps_the_previous_one(tmp_path):
    (tmp_path / "models" / "baked").mkdir(parents=True)
    (tmp_path / "models" / "baked" / "config.json").write_text("{}")
    out = _child(FULL_DISK + """
    import os
    from so8t.io import WriteError, atomic_dir
    full_disk(4096)
    try:
        with atomic_dir("models/baked") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(os.urandom(100_000))
    except WriteError as e:
        print(e.filename, str(e), sep="\\n")
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    filename, message = out.stdout.splitlines()[:2]
    assert filename == "models/baked" and "cannot write models/baked" in message
    assert [p.name for p in (tmp_path / "models" / "baked").iterdir()] == ["config.json"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["baked"]
