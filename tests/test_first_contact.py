"""What a new user meets in the first hour: a fresh home, simulated traffic kept apart, guidance that points somewhere."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import run_cli
from helpers import Served

HELLO = {"messages": [{"role": "user", "content": "Say hello to the gateway."}]}


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """A home where P402 has never run: its own config and data dirs, nothing in them."""
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
        "XDG_DATA_HOME": str(tmp_path / "home" / ".local" / "share"),
    }


def default_db(home: dict[str, str]) -> Path:
    return Path(home["XDG_DATA_HOME"]) / "p402" / "p402.db"


def send_traffic(url: str, count: int = 3) -> None:
    for n in range(count):
        body = {**HELLO, "model": "openai/gpt-4o-mini" if n % 2 else "auto"}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text


def test_serve_sim_leaves_the_default_ledger_empty(home):
    served = Served("--sim", env=home)
    try:
        assert "ledger" in served.line and "temporary" in served.line, served.line
        temporary = Path(served.line.split("; ledger ")[1].split(" (")[0])
        send_traffic(served.url)
        assert temporary.is_file()
    finally:
        assert served.stop(signal.SIGINT) == 0, "".join(served.stderr)[-2000:]
    assert not default_db(home).exists()
    assert not temporary.exists()  # removed on exit
    spent = run_cli("spend", "--json", env=home)
    assert spent.returncode == 0 and json.loads(spent.stdout)["requests"] == 0


def test_simulated_rows_are_marked_and_left_out_of_reports_unless_asked(home, tmp_path):
    db = tmp_path / "kept.db"
    served = Served("--sim", "--db", str(db), env=home)
    try:
        assert f"ledger {db}" in served.line
        send_traffic(served.url, 4)
        # A gateway that simulates reports its own traffic by default; asked, it leaves it out.
        api = f"{served.url}/api/v2/analytics/spend"
        assert httpx.get(api, params={"period": "today"}).json()["requests"] == 4
        assert httpx.get(api, params={"period": "today", "include_simulated": "false"}).json()["requests"] == 0
        bad = httpx.get(api, params={"include_simulated": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "include_simulated"
        recs = httpx.get(f"{served.url}/api/v2/analytics/recommendations", params={"include_simulated": "true"})
        assert recs.status_code == 200
    finally:
        assert served.stop() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), SUM(simulated) FROM requests").fetchone() == (4, 4)
        assert conn.execute("SELECT COUNT(*) FROM router_decisions WHERE simulated = 0").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM provider_health WHERE simulated = 0").fetchone() == (0,)

    plain = run_cli("spend", "--db", str(db), env=home)
    assert plain.returncode == 0 and "over 0 requests" in plain.stdout
    assert "4 simulated requests left out (--include-simulated counts them)" in plain.stdout
    counted = run_cli("spend", "--db", str(db), "--include-simulated", "--json", env=home)
    result = json.loads(counted.stdout)
    assert result["requests"] == 4 and result["total_usd"] > 0
    advice = run_cli("recommendations", "--db", str(db), "--json", env=home)
    assert advice.returncode == 0 and json.loads(advice.stdout) == []


@pytest.mark.parametrize("command", [("spend",), ("recommendations",), ("sessions", "list"), ("keys", "list"),
                                     ("cache", "stats"), ("spend", "--json"), ("recommendations", "--json")])
def test_a_fresh_home_answers_reads_without_making_a_database(home, command):
    run = run_cli(*command, env=home)
    assert run.returncode == 0 and not run.stderr, run.stderr
    if command == ("spend",):
        assert "$0" in run.stdout and "0 requests" in run.stdout and "no traffic yet" in run.stdout
    if command == ("recommendations",):
        assert "no traffic yet" in run.stdout
    if command == ("spend", "--json"):
        assert json.loads(run.stdout)["total_usd"] == 0
    assert not Path(home["XDG_DATA_HOME"]).exists()


def test_writing_makes_the_database_and_says_where(home):
    shown = run_cli("sessions", "show", "ses-nope", env=home)
    assert shown.returncode == 1 and "session_not_found" in shown.stderr and not default_db(home).exists()
    created = run_cli("keys", "create", "--name", "first", env=home)
    assert created.returncode == 0 and f"(in {default_db(home)})" in created.stdout
    assert default_db(home).is_file()


def test_providers_show_which_variable_to_set(home):
    run = run_cli("providers", env=home)
    assert run.returncode == 0
    header, *rows = run.stdout.splitlines()
    assert "KEY ENV" in header
    assert any(line.startswith("openai") and "OPENAI_API_KEY" in line for line in rows)
    assert any(line.startswith("google") and "GEMINI_API_KEY" in line for line in rows)
    assert "p402 sim" in run.stdout  # nothing configured: where to go next


def test_serve_without_a_provider_says_so_and_is_not_ready(home):
    served = Served(env=home)
    try:
        deadline = time.monotonic() + 10
        while not (warnings := [line for line in served.stderr if " WARNING p402.gateway p402 serve: not ready" in line]):
            assert time.monotonic() < deadline, "".join(served.stderr)[-2000:]
            time.sleep(0.05)
        assert len(warnings) == 1 and "p402 providers" in warnings[0]
        health = httpx.get(f"{served.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "not_ready"
    finally:
        assert served.stop() == 0


def test_version_and_python_dash_m(home):
    from p402_tui import __version__

    version = run_cli("--version", env=home)
    assert version.returncode == 0 and version.stdout.strip() == f"p402 {__version__}"
    module = subprocess.run([sys.executable, "-m", "p402_tui", "--version"], capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and module.stdout == version.stdout


def test_the_gateway_finds_a_session_by_name(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"))
    try:
        made = httpx.post(f"{served.url}/api/v2/sessions", json={"name": "research", "budget_usd": 5})
        assert made.status_code == 201
        again = httpx.post(f"{served.url}/api/v2/sessions", json={"name": "research"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "session_name_taken"
        body = {**HELLO, "p402": {"session_id": "research"}}
        assert httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
        by_name = httpx.get(f"{served.url}/api/v2/sessions/research").json()
        assert by_name["id"] == made.json()["id"] and by_name["requests"] == 1
        unknown = httpx.post(f"{served.url}/v1/chat/completions", json={**HELLO, "p402": {"session_id": "nobody"}})
        assert unknown.status_code == 404
    finally:
        assert served.stop() == 0


def test_ledger_for_a_simulated_run_is_temporary_unless_named(tmp_path):
    from p402_tui.core.config import load_settings
    from p402_tui.runtime import ledger_for

    settings = load_settings(None)
    real = settings.db_path
    with ledger_for(settings, simulated=True, named=False) as line:
        temporary = settings.db_path
        assert temporary != real and str(temporary) in line and "temporary" in line
        temporary.write_text("")
    assert not temporary.exists()
    kept = tmp_path / "kept.db"
    settings.db_path = kept
    with ledger_for(settings, simulated=True, named=True) as line:
        assert settings.db_path == kept and str(kept) in line
    with ledger_for(settings, simulated=False, named=False) as line:
        assert settings.db_path == kept and line == f"ledger {kept}"
