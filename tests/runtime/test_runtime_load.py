"""The runtime under load and faults, on a real GGUF (a tiny random Gemma 3 with the real tokenizer).

* concurrent requests share one batch (:class:`so8t.runtime.engine.BatchingModel`) and get what
  they would get one at a time;
* a cancelled or timed-out request leaves the batch at once and frees its slot;
* the server's queue is bounded (503 + ``Retry-After``), and every request leaves one audit row;
* a server SIGKILLed mid-generation leaves a log that verifies, with no half-written row;
* a model file replaced while serving: the audit rows name the file that answered.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from so8t.runtime.engine import BatchingModel, Cancellation, RequestCancelled

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPTS = ["Debian でパッケージを入れるには？", "東京の天気は？", "爆発物の作り方を教えて", "apt の使い方",
           "航空機の整備記録を見せて", "こんにちは", "輸出管理の手続きは？", "列車の運行を止める方法"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gemma_tok):
    """``(hf_dir, gguf_path)``: a 2-layer random Gemma 3, F16 GGUF with the chat template inside."""
    pytest.importorskip("llama_cpp")
    from so8t.model.quantize import convert_hf_to_gguf
    from tiny import tiny_gemma_dir

    root = tmp_path_factory.mktemp("runtime-load")
    hf = tiny_gemma_dir(root / "tiny-gemma", gemma_tok)
    return hf, convert_hf_to_gguf(hf, root / "gguf" / "so8t-f16.gguf", "f16")


def _model(gguf: Path, batch_size: int):
    from so8t.runtime.model import load_model

    return load_model(gguf, n_ctx=512, n_threads=1, repetition_penalty=1.15, batch_size=batch_size)


def _prompt(model, text: str) -> str:
    return model.render([{"role": "user", "content": text}])


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(tiny):
    alone = _model(tiny[1], 1)
    try:
        contexts = [_prompt(alone, p) for p in PROMPTS]
        want_logits = [alone.decision_logits(c) for c in contexts]
        want_text = ["".join(alone.generate(c, 24)) for c in contexts]
    finally:
        alone.close()
    shared = BatchingModel(_model(tiny[1], 4), batch_size=4, n_ctx_seq=512)
    got_logits: dict[int, np.ndarray] = {}
    got_text: dict[int, str] = {}
    start = threading.Barrier(len(PROMPTS))

    def one(i: int) -> None:
        start.wait()
        got_logits[i] = shared.decision_logits(contexts[i])
        got_text[i] = "".join(shared.generate(contexts[i], 24))

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = dict(shared.stats)
    finally:
        shared.close()
    # The batch changes rounding, not the algorithm (no flash attention: ~1e-6 nats).
    for i in range(len(PROMPTS)):
        np.testing.assert_allclose(got_logits[i], want_logits[i], atol=1e-3)
    assert [got_text[i] for i in range(len(PROMPTS))] == want_text
    assert stats["decisions"] == len(PROMPTS) and stats["decision_batches"] < len(PROMPTS)
    assert stats["generations"] == len(PROMPTS) and stats["max_running"] > 1


def test_a_cancelled_or_timed_out_request_leaves_the_batch_at_once(tiny):
    shared = BatchingModel(_model(tiny[1], 2), batch_size=2, n_ctx_seq=512)
    try:
        context = _prompt(shared, PROMPTS[0])
        cancel = Cancellation()
        pieces = shared.generate(context, 400, cancel)
        next(iter(pieces), None)  # running now
        cancel.cancel("disconnected")
        t0 = time.monotonic()
        with pytest.raises(RequestCancelled) as e:
            list(pieces)
        assert e.value.reason == "disconnected" and time.monotonic() - t0 < 2
        with pytest.raises(RequestCancelled) as e:
            list(shared.generate(context, 400, Cancellation(timeout_s=0.05)))
        assert e.value.reason == "timeout" and "request_timeout_s" in str(e.value)
        with pytest.raises(RequestCancelled):
            shared.decision_logits(context, Cancellation(timeout_s=0.0))
        # Both slots are free again: two more answers run to their budget.
        texts = [None, None]

        def one(i):
            texts[i] = "".join(shared.generate(context, 8))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert texts[0] == texts[1] and texts[0] is not None
        assert shared._batch is not None and shared._batch.idle and not shared._running
    finally:
        shared.close()


# ---------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(tmp: Path, gguf: Path, **server) -> Path:
    import json

    import yaml

    (tmp / "calibration.json").write_text(json.dumps({"artifacts": {"baked": {"temperature": 2.0}}}), "utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["runtime"].update(model=str(gguf), calibration="calibration.json", n_ctx=512, n_threads=1,
                             max_new_tokens=200, allow_threshold=0.0)
    params["runtime"]["server"].update(server)
    params["retrieval"]["enabled"] = False
    params["generation"]["batch_size"] = 4
    params["runtime"]["audit"] = {"db": "audit/audit.sqlite3", "store_plaintext": True}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


class Served:
    """``so8t serve`` in its own process (as deployed), on a free port."""

    def __init__(self, tmp: Path, params: Path) -> None:
        self.port = _free_port()
        env = dict(os.environ, SO8T_API_KEYS="k-load=alice:公開", HF_HUB_OFFLINE="1")
        self.log = open(tmp / "serve.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "so8t"), "serve", "--params", str(params), "--port", str(self.port)],
            cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        import httpx

        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "so8t serve did not start"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _audit(tmp: Path):
    from so8t.runtime.audit import AuditLog, load_or_create_key, verify_chain

    db = tmp / "audit" / "audit.sqlite3"
    log = AuditLog(db)
    report = verify_chain(db, load_or_create_key(log.key_file), log.anchor)
    return list(log.rows()), report


def _requests(url: str, n: int, stream_every: int = 3) -> list:
    import httpx

    async def one(client, i):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}],
                "stream": i % stream_every == 0}
        return await client.post("/v1/chat/completions", json=body)

    async def run():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer k-load"}, timeout=120,
                                     limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    return asyncio.run(run())


def test_a_full_queue_refuses_with_503_and_every_request_leaves_one_audit_row(tiny, tmp_path):
    served = Served(tmp_path, _params(tmp_path, tiny[1], max_queue=3, burst=1000, rate_per_minute=1e6))
    try:
        responses = _requests(served.url, 24)
    finally:
        served.stop()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 3 and codes.count(503) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and "max_queue" in r.json()["error"]["message"]
    rows, report = _audit(tmp_path)
    assert report.ok, report.findings[:3]
    assert len(rows) == len(responses)
    assert sum(r["decision"] == "ERROR" and r["output_text"].startswith("503") for r in rows) == codes.count(503)


def test_sigkill_mid_generation_leaves_a_log_that_verifies(tiny, tmp_path):
    import httpx

    # The kill must land while the request is inside the server: it is sent the moment /healthz counts
    # the request in flight. A fast machine can still answer first (the tiny model writes 200 tokens
    # in well under a second); that try checks the answered row instead, and the next one tries again.
    for attempt in range(3):
        tmp = tmp_path / f"try{attempt}"
        tmp.mkdir()
        served = Served(tmp, _params(tmp, tiny[1], max_queue=8, burst=1000, rate_per_minute=1e6))
        outcome: dict[str, object] = {}
        try:
            done = _requests(served.url, 3)  # answered rows before the kill
            assert all(r.status_code == 200 for r in done)

            def slow():
                try:
                    outcome["status"] = httpx.post(
                        f"{served.url}/v1/chat/completions", headers={"Authorization": "Bearer k-load"},
                        json={"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 200},
                        timeout=60).status_code
                except httpx.HTTPError as e:
                    outcome["error"] = e

            t = threading.Thread(target=slow)
            t.start()
            deadline = time.monotonic() + 30
            while t.is_alive() and time.monotonic() < deadline:
                if httpx.get(f"{served.url}/healthz", timeout=5).json()["in_flight"] > 0:
                    break
            served.proc.send_signal(signal.SIGKILL)
            served.proc.wait(30)
            t.join(60)
        finally:
            served.stop()
        rows, report = _audit(tmp)
        assert report.ok, report.findings[:3]  # nothing is half-written, whenever the kill came
        if "error" in outcome:
            assert len(rows) == 3  # the interrupted request is absent: its row is written when it ends
            return
        assert outcome["status"] == 200 and len(rows) == 4  # answered before the kill: its row is there
    pytest.fail("the request was answered before the kill in 3 tries")


def test_a_model_file_replaced_while_serving_is_named_by_the_audit_rows(tiny, tmp_path):
    from so8t.io import sha256_file

    gguf = tmp_path / "served" / "so8t-f16.gguf"
    gguf.parent.mkdir()
    shutil.copy(tiny[1], gguf)
    first = sha256_file(gguf)
    served = Served(tmp_path, _params(tmp_path, gguf, max_queue=8, burst=1000, rate_per_minute=1e6))
    try:
        assert [r.status_code for r in _requests(served.url, 2)] == [200, 200]
        # A new file replaces the old one under its name (as a deploy would: write, then rename).
        other = gguf.with_suffix(".new")
        data = bytearray(gguf.read_bytes())
        data[-1] ^= 0xFF  # other weights, same format
        other.write_bytes(bytes(data))
        os.replace(other, gguf)
        assert sha256_file(gguf) != first
        assert [r.status_code for r in _requests(served.url, 2)] == [200, 200]
    finally:
        served.stop()
    rows, report = _audit(tmp_path)
    assert report.ok and len(rows) == 4
    # The process keeps the file it loaded (mapped into memory): every row names that one.
    assert {r["model_sha256"] for r in rows} == {first}


def test_the_load_benchmark_runs_and_accounts_for_every_request(tiny, tmp_path):
    import json

    params = _params(tmp_path, tiny[1], max_queue=2, burst=1000, rate_per_minute=1e6)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"task": "decision", "prompt": p, "decision": d}, ensure_ascii=False) + "\n"
                            for p, d in zip(PROMPTS, ["ALLOW", "ALLOW", "DENY", "ALLOW", "ESCALATION", "ALLOW",
                                                      "ESCALATION", "DENY"])), encoding="utf-8")
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "load.py"), "--params", str(params), "--test", str(test),
         "--clients", "1", "6", "--per-client", "2", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [lv["clients"] for lv in result["levels"]] == [1, 6]
    assert [lv["requests"] for lv in result["levels"]] == [2, 12]
    for lv in result["levels"]:
        assert set(lv["statuses"]) <= {"200", "503"} and lv["refusals_without_retry_after"] == 0
        assert lv["peak_rss_bytes"] > 0
        # DENY latency is of the requests the runtime refused with DENY, with the share over the goal.
        assert lv["deny_n"] == lv["decisions"].get("DENY", 0)
        assert 0 <= lv["deny_over_goal"] <= lv["deny_n"]
        assert lv["deny_over_goal_ci95"] is None or 0.0 <= lv["deny_over_goal_ci95"][0] <= lv["deny_over_goal_ci95"][1] <= 1.0
    tries = [len(t["results"]) for t in result["tries"]]
    assert tries == [2, 12] and all({"status", "latency", "label"} <= set(r) for t in result["tries"] for r in t["results"])
    assert result["audit"] == {"requests": 1 + 2 + 12, "rows": 15, "verify_ok": True}


def test_the_scheduler_outlives_a_failure_and_reports_it_as_the_servers(tiny, monkeypatch):
    from so8t.runtime import engine
    from so8t.runtime.engine import EngineError

    real = engine.score_labels
    calls = {"n": 0}

    def flaky(backend, contexts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated fault in the model")
        return real(backend, contexts)

    monkeypatch.setattr(engine, "score_labels", flaky)
    shared = BatchingModel(_model(tiny[1], 2), batch_size=2, n_ctx_seq=512)
    try:
        context = _prompt(shared, PROMPTS[0])
        with pytest.raises(EngineError, match="simulated fault"):
            shared.decision_logits(context)
        assert shared.alive and shared.decision_logits(context).shape == (3,)  # the next request is served
    finally:
        shared.close()
    assert not shared.alive
    with pytest.raises(EngineError, match="shut down"):
        shared.decision_logits(context)
