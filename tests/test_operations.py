"""Operations through a running `p402 serve` and the CLI: probes, request ids, the store's upkeep."""

from __future__ import annotations

import sqlite3

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
