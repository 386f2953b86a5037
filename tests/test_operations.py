"""Operations through a running `p402 serve` and the CLI: probes, request ids, the store's upkeep."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx

from conftest import run_cli
from helpers import Served


def test_live_and_ready_need_no_key_and_name_the_failing_check(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db))
    try:
        assert run_cli("keys", "create", "--name", "ops", "--db", str(db)).returncode == 0
        assert httpx.get(f"{served.url}/v1/models").status_code == 401  # keys are in force now
        live = httpx.get(f"{served.url}/health/live")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        ready = httpx.get(f"{served.url}/health/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready" and body["failing"] == []
        assert body["checks"]["store"]["ok"] and body["checks"]["providers"]["usable"] > 0
        store = body["checks"]["store"]  # the runtime's writer asked: real-time, or why not
        assert isinstance(store["realtime_writer"], bool) and (store["realtime_writer"] or store["realtime_writer_reason"])
        # Another P402 moved the file to a schema this one does not know: not ready, the store named.
        with sqlite3.connect(db) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version={version + 1}")
        unready = httpx.get(f"{served.url}/health/ready")
        assert unready.status_code == 503 and unready.json()["failing"] == ["store"]
        assert "schema version" in unready.json()["checks"]["store"]["reason"]
        with sqlite3.connect(db) as conn:
            conn.execute(f"PRAGMA user_version={version}")
        assert httpx.get(f"{served.url}/health/ready").status_code == 200
    finally:
        assert served.stop() == 0


def test_ready_is_503_without_a_provider(tmp_path):
    home = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d")}
    served = Served(env=home)
    try:
        ready = httpx.get(f"{served.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["failing"] == ["providers"]
        assert ready.json()["checks"]["store"]["ok"]
        assert httpx.get(f"{served.url}/health/live").status_code == 200
        document = httpx.get(f"{served.url}/openapi.json").json()
        assert document["paths"]["/health/ready"]["get"]["security"] == []
        assert set(document["paths"]["/health/ready"]["get"]["responses"]) == {"200", "503"}
        assert document["paths"]["/health/live"]["get"]["security"] == []
    finally:
        assert served.stop() == 0


HELLO = {"messages": [{"role": "user", "content": "Say hello to the gateway."}]}


def test_x_request_id_is_echoed_on_every_answer_and_kept_in_the_ledger(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db))
    try:
        chat = f"{served.url}/v1/chat/completions"
        mine = httpx.post(chat, json=HELLO, headers={"x-request-id": "client-abc.123"}, timeout=30)
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-abc.123"
        ours = httpx.post(chat, json=HELLO, timeout=30)
        assert ours.headers["x-request-id"].startswith("req")  # none sent: the ledger's own id
        with httpx.stream("POST", chat, json={**HELLO, "stream": True}, headers={"x-request-id": "s-1"}) as stream:
            assert stream.status_code == 200 and stream.headers["x-request-id"] == "s-1"
            stream.read()
        strange = httpx.post(chat, json=HELLO, headers={"x-request-id": "a b<script>"}, timeout=30)
        assert strange.headers["x-request-id"].startswith("req")  # unsafe: ignored, ours instead
        too_long = httpx.post(chat, json=HELLO, headers={"x-request-id": "x" * 129}, timeout=30)
        assert too_long.headers["x-request-id"].startswith("req")
        messages = httpx.post(
            f"{served.url}/v1/messages", headers={"x-request-id": "anthropic-7"}, timeout=30,
            json={"model": "anthropic/claude-sonnet-4-5-20250929", "max_tokens": 50, **HELLO},
        )  # fmt: skip
        assert messages.status_code == 200 and messages.headers["x-request-id"] == "anthropic-7", messages.text
        embeddings = httpx.post(
            f"{served.url}/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "hi"}, headers={"x-request-id": "emb-1"}, timeout=30
        )
        assert embeddings.status_code == 200 and embeddings.headers["x-request-id"] == "emb-1"
        bad = httpx.post(chat, content=b"{", headers={"x-request-id": "bad-1"}, timeout=30)
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"
    finally:
        assert served.stop() == 0
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT id, client_request_id FROM requests").fetchall())
    assert sorted(v for v in rows.values() if v) == ["anthropic-7", "client-abc.123", "emb-1", "s-1"]
    assert rows[ours.headers["x-request-id"]] is None and len(rows) == 7


def test_x_request_id_rides_on_refusals(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db))
    try:
        assert run_cli("keys", "create", "--name", "ops", "--db", str(db)).returncode == 0
        refused = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, headers={"x-request-id": "r-9"})
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "r-9"
    finally:
        assert served.stop() == 0


def test_db_status_migrate_and_prune_through_the_cli(tmp_path):
    from p402_tui.store.db import MIGRATIONS, SCHEMA_VERSION, migration_sql, statements

    db = tmp_path / "p402.db"
    with sqlite3.connect(db) as conn:  # a file an older P402 wrote: every migration but the last
        for number, script in enumerate(MIGRATIONS[:-1], 1):
            for statement in statements(migration_sql(script, "sqlite")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
    before = json.loads(run_cli("db", "status", "--db", str(db), "--json").stdout)
    assert before["engine"] == "sqlite" and before["schema_version"] == SCHEMA_VERSION - 1
    assert not before["up_to_date"] and before["rows"]["requests"] == 0 and before["size_bytes"] > 0
    text = run_cli("db", "status", "--db", str(db))
    assert text.returncode == 0 and "behind: run `p402 db migrate`" in text.stdout
    migrated = run_cli("db", "migrate", "--db", str(db), "--json")
    assert json.loads(migrated.stdout)["to_version"] == SCHEMA_VERSION, migrated.stderr
    assert json.loads(run_cli("db", "status", "--db", str(db), "--json").stdout)["up_to_date"]

    served = Served("--sim", "--db", str(db))
    try:
        for _ in range(3):
            assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
    finally:
        assert served.stop() == 0
    old = time.time() - 40 * 86400
    with sqlite3.connect(db) as conn:  # 1,200 rows from 40 days ago beside today's three: several batches
        conn.execute(
            "INSERT INTO requests (id, ts, status) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 1200) SELECT 'old' || i, ?, 'ok' FROM n", (old,),
        )
        conn.execute("UPDATE router_decisions SET ts = ? WHERE rowid = (SELECT MIN(rowid) FROM router_decisions)", (old,))
    status = json.loads(run_cli("db", "status", "--db", str(db), "--json").stdout)
    decisions = status["rows"]["router_decisions"]
    assert status["rows"]["requests"] == 1203 and decisions >= 1
    pruned = run_cli("db", "prune", "--older-than", "30d", "--db", str(db), "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["removed"]["requests"] == 1200 and report["removed"]["router_decisions"] == 1
    assert report["total"] == 1201
    after = json.loads(run_cli("db", "status", "--db", str(db), "--json").stdout)
    assert after["rows"]["requests"] == 3 and after["rows"]["router_decisions"] == decisions - 1
    again = run_cli("db", "prune", "--older-than", "30d", "--db", str(db))
    assert again.returncode == 0 and again.stdout.startswith("removed 0 rows older than 30d")


def test_db_commands_refuse_bad_input_in_one_line(tmp_path):
    bad_age = run_cli("db", "prune", "--older-than", "soon", "--db", str(tmp_path / "p402.db"))
    assert bad_age.returncode == 1 and bad_age.stderr.strip().count("\n") == 0 and "not an age" in bad_age.stderr
    missing = run_cli("db", "prune", "--older-than", "1d", "--db", str(tmp_path / "none.db"))
    assert missing.returncode == 1 and "no P402 database" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "none.db").exists()
    (tmp_path / "junk.db").write_text("not a database")
    junk = run_cli("db", "status", "--db", str(tmp_path / "junk.db"))
    assert junk.returncode == 1 and "Traceback" not in junk.stderr and "junk.db" in junk.stderr
    fresh = run_cli("db", "status", "--db", str(tmp_path / "new.db"))
    assert fresh.returncode == 0 and "no database" in fresh.stdout and not (tmp_path / "new.db").exists()


def test_retention_days_prunes_old_history_in_the_background(tmp_path):
    db = tmp_path / "p402.db"
    assert run_cli("db", "migrate", "--db", str(db)).returncode == 0
    old, recent = time.time() - 40 * 86400, time.time() - 5 * 86400
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO requests (id, ts, status) VALUES (?, ?, 'ok')",
                         [(f"old{i}", old) for i in range(700)] + [("recent", recent)])  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text("[store]\nretention_days = 30\n")
    served = Served("--sim", "--db", str(db), env={"P402_CONFIG": str(config)})
    try:
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(db) as conn:
                ids = [row[0] for row in conn.execute("SELECT id FROM requests")]
            if ids == ["recent"]:
                break
            assert time.monotonic() < deadline, len(ids)
            time.sleep(0.1)
    finally:
        assert served.stop() == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nretention_days = 0\n")
    refused = run_cli("db", "status", "--db", str(db), config=bad)
    assert refused.returncode != 0 and "retention_days" in refused.stderr and "Traceback" not in refused.stderr
