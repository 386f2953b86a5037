"""The store on PostgreSQL through the commands people run: `p402 db`, `p402 serve`, the probes.

Every test here needs a real server (tests/postgres.py): skipped with its reason where none is
installed, never under CI.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import run_cli
from helpers import Served

HELLO = {"messages": [{"role": "user", "content": "Say hello to the gateway."}]}


def test_db_status_and_migrate_on_postgresql(pg_cluster, pg_url):
    from p402_tui.store.db import SCHEMA_VERSION

    before = run_cli("db", "status", "--db", pg_url, "--json")
    assert before.returncode == 0, before.stderr
    found = json.loads(before.stdout)
    assert found["engine"] == "postgresql" and found["exists"] is False and found["schema_version"] is None
    text = run_cli("db", "status", "--db", pg_url)
    assert text.returncode == 0 and "no database at" in text.stdout
    migrated = run_cli("db", "migrate", "--db", pg_url, "--json")
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["to_version"] == SCHEMA_VERSION
    after = json.loads(run_cli("db", "status", "--db", pg_url, "--json").stdout)
    assert after["up_to_date"] and after["schema_version"] == SCHEMA_VERSION
    assert after["rows"]["requests"] == 0 and after["size_bytes"] > 0
    assert pg_cluster.psql("SELECT version FROM p402_schema", pg_url.rsplit("/", 1)[1]).strip() == str(SCHEMA_VERSION)
    again = run_cli("db", "migrate", "--db", pg_url, "--json")
    assert json.loads(again.stdout)["from_version"] == SCHEMA_VERSION  # nothing left to do
    shown = run_cli("db", "status", "--db", pg_url)
    assert "engine  postgresql" in shown.stdout and "(current)" in shown.stdout


def test_an_unreachable_or_malformed_postgresql_url_is_one_line(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for args in (("db", "status"), ("db", "migrate"), ("spend",), ("sessions", "list")):
        down = run_cli(*args, "--db", f"postgresql://p402:secret@127.0.0.1:{port}/nowhere")
        assert down.returncode == 1, (args, down.stdout)
        assert down.stderr.strip().count("\n") == 0 and "Traceback" not in down.stderr, down.stderr
        assert "cannot reach PostgreSQL" in down.stderr and "secret" not in down.stderr
    for url in ("postgresql://p402:secret@127.0.0.1:notaport/x", "postgresql://p402:secret@[broken/x"):
        bad = run_cli("db", "status", "--db", url)
        assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr, bad.stderr
        assert "PostgreSQL" in bad.stderr and "secret" not in bad.stderr, bad.stderr
    config = tmp_path / "config.toml"
    config.write_text('[store]\nurl = "mysql://somewhere/else"\n')
    refused = run_cli("db", "status", config=config)
    assert refused.returncode != 0 and "url" in refused.stderr and "Traceback" not in refused.stderr


def test_serve_on_postgresql_answers_and_the_ledger_row_lands_there(pg_cluster, pg_url):
    served = Served("--sim", "--db", pg_url)
    try:
        answer = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, headers={"x-request-id": "pg-1"}, timeout=30)
        assert answer.status_code == 200, answer.text
        cost, decision_id = answer.json()["p402"]["cost_usd"], answer.json()["p402"]["decision_id"]
        ready = httpx.get(f"{served.url}/health/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["store"]["ok"], ready.text
    finally:
        assert served.stop() == 0
    dbname = pg_url.rsplit("/", 1)[1]
    row = pg_cluster.psql("SELECT client_request_id, status, cost_usd, simulated FROM requests", dbname).strip()
    ledger_id, status, stored_cost, simulated = row.split("|")
    assert (ledger_id, status, simulated) == ("pg-1", "ok", "1") and float(stored_cost) == pytest.approx(cost)
    assert int(pg_cluster.psql("SELECT COUNT(*) FROM router_decisions", dbname)) == 1
    shown = run_cli("decisions", "show", decision_id, "--db", pg_url, "--json")  # the record read back whole
    assert shown.returncode == 0, shown.stderr
    decision = json.loads(shown.stdout)
    assert decision["id"] == decision_id and decision["chosen"] and decision["candidates"]


def test_sessions_with_budgets_through_the_cli_on_postgresql(pg_url, sim_process):
    def chat(session: str, prompt: str):
        return run_cli("chat", "--model", "openai/gpt-4o-mini", "--session", session, "--db", pg_url, "--json",
                       "--no-cache", prompt, config=sim_process["config"])  # fmt: skip

    made = run_cli("sessions", "create", "--name", "research", "--budget", "0.01", "--db", pg_url, "--json")
    assert made.returncode == 0, made.stderr
    session = json.loads(made.stdout)
    taken = run_cli("sessions", "create", "--name", "research", "--db", pg_url)
    assert taken.returncode == 1 and "exists already" in taken.stderr and "Traceback" not in taken.stderr
    first = chat("research", "Say one word.")
    assert first.returncode == 0, first.stderr
    shown = json.loads(run_cli("sessions", "show", session["id"], "--db", pg_url, "--json").stdout)
    cost = json.loads(first.stdout)["cost_usd"]
    assert shown["requests"] == 1 and shown["spent_usd"] == pytest.approx(cost) and cost > 0
    assert shown["remaining_usd"] == pytest.approx(0.01 - cost)
    assert run_cli("sessions", "create", "--name", "tiny", "--budget", "0.000001", "--db", pg_url).returncode == 0
    refused = chat("tiny", "Say one more word.")
    assert refused.returncode == 1 and "budget" in refused.stderr and "Traceback" not in refused.stderr


@pytest.fixture
def own_cluster():
    """A cluster of this test's own: it is stopped and started again."""
    from postgres import remove_cluster, start_cluster

    try:
        cluster = start_cluster()
    except LookupError as why:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {why}")
        pytest.skip(str(why))
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_ready_goes_unready_while_postgresql_is_stopped_and_requests_get_503s(own_cluster):
    url = own_cluster.create_database()
    served = Served("--sim", "--db", url)
    try:
        assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
        assert httpx.get(f"{served.url}/health/ready").status_code == 200
        own_cluster.stop()

        def unready():
            ready = httpx.get(f"{served.url}/health/ready", timeout=10)
            return ready if ready.status_code == 503 else None

        body = _until(unready).json()
        assert body["failing"] == ["store"] and "does not answer" in body["checks"]["store"]["reason"]
        chat = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "store_unavailable", chat.text
        assert chat.headers["retry-after"] == "1"
        messages = httpx.post(
            f"{served.url}/v1/messages", timeout=30,
            json={"model": "p402/auto", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]},
        )  # fmt: skip
        assert messages.status_code == 503 and messages.json()["type"] == "error", messages.text
        assert messages.json()["error"]["type"] in ("overloaded_error", "api_error"), messages.text
        own_cluster.start()
        _until(lambda: httpx.get(f"{served.url}/health/ready", timeout=10).status_code == 200)
        after = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30)
        assert after.status_code == 200, after.text
    finally:
        assert served.stop() == 0
    assert int(own_cluster.psql("SELECT COUNT(*) FROM requests", url.rsplit("/", 1)[1])) == 2


async def test_the_writer_keeps_every_row_while_the_server_is_away_and_commits_them_when_it_returns(own_cluster):
    import asyncio

    from p402_tui.core.hooks import RequestRecord
    from p402_tui.store import queries
    from p402_tui.store.engine import open_store

    def row(n: int):
        return queries.request_row(RequestRecord(id=f"req-{n}", provider="openai", model="gpt-4o", cost_usd=n / 1000))

    url = own_cluster.create_database()
    store = await open_store(url)
    try:
        for n in range(500):
            store.put(queries.INSERT_REQUEST, row(n))
        await store.flush()
        assert store.writer.stats.batches < 20  # hundreds of rows, a handful of transactions
        assert store.unavailable is None
        await asyncio.to_thread(own_cluster.stop)
        for n in range(500, 800):
            store.put(queries.INSERT_REQUEST, row(n))
        deadline = asyncio.get_running_loop().time() + 20
        while store.unavailable is None or store.writer.stats.retries < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert store.writer.stats.failed == 0
        await asyncio.to_thread(own_cluster.start)
        await asyncio.wait_for(store.flush(), 30)
        assert store.writer.stats.failed == 0
        assert await store.scalar("SELECT COUNT(*) FROM requests") == 800
        assert await store.scalar("SELECT SUM(cost_usd) FROM requests") == pytest.approx(sum(range(800)) / 1000)
        assert store.unavailable is None
    finally:
        await store.aclose()


async def test_two_gateways_migrating_one_fresh_database_at_once_both_succeed(pg_url):
    import asyncio

    from p402_tui.store.db import SCHEMA_VERSION
    from p402_tui.store.engine import open_store

    stores = await asyncio.gather(open_store(pg_url), open_store(pg_url))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION, SCHEMA_VERSION]
        assert await stores[0].scalar("SELECT COUNT(*) FROM p402_schema") == 1
        await stores[0].run("INSERT INTO gateway_keys (id, name, hash, prefix, created) VALUES ('k', 'n', 'h', 'p', 0)")
        assert await stores[1].scalar("SELECT name FROM gateway_keys WHERE id = 'k'") == "n"  # one database, both see it
    finally:
        for store in stores:
            await store.aclose()


def test_db_prune_on_postgresql_removes_old_history_in_batches(pg_cluster, pg_url):
    assert run_cli("db", "migrate", "--db", pg_url).returncode == 0
    old = time.time() - 40 * 86400
    dbname = pg_url.rsplit("/", 1)[1]
    pg_cluster.psql(
        f"INSERT INTO requests (id, ts, status) SELECT 'old' || i, {old}, 'ok' FROM generate_series(1, 1200) AS i; "
        f"INSERT INTO requests (id, ts, status) VALUES ('new', {time.time()}, 'ok'); "
        f"INSERT INTO provider_health (ts, provider, snapshot) VALUES ({old}, 'openai', '{{}}')",
        dbname,
    )
    pruned = run_cli("db", "prune", "--older-than", "30d", "--db", pg_url, "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["removed"]["requests"] == 1200 and report["removed"]["provider_health"] == 1
    assert pg_cluster.psql("SELECT id FROM requests", dbname).split() == ["new"]


def test_p402_db_and_store_url_in_the_config_select_postgresql_too(pg_url, tmp_path):
    assert run_cli("db", "migrate", "--db", pg_url).returncode == 0
    by_env = run_cli("db", "status", "--json", env={"P402_DB": pg_url})
    assert by_env.returncode == 0 and json.loads(by_env.stdout)["engine"] == "postgresql", by_env.stderr
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nurl = "{pg_url}"\n')
    by_config = run_cli("db", "status", "--json", config=config)
    assert by_config.returncode == 0, by_config.stderr
    assert json.loads(by_config.stdout)["engine"] == "postgresql" and json.loads(by_config.stdout)["up_to_date"]
    file = tmp_path / "p402.db"
    by_flag = run_cli("db", "status", "--json", "--db", str(file), config=config)  # the flag has the last word
    assert json.loads(by_flag.stdout)["engine"] == "sqlite"


async def test_local_days_on_postgresql_are_this_process_s_as_on_sqlite(pg_url, tmp_path, monkeypatch):
    from p402_tui.store.engine import open_store

    monkeypatch.setenv("TZ", "Pacific/Auckland")  # far from UTC: 23:30 UTC is the next day there
    time.tzset()
    try:
        ts = 1767223800.0  # 2025-12-31 23:30 UTC
        for target in (tmp_path / "p402.db", pg_url):
            store = await open_store(target)
            try:
                day = await store.scalar(f"SELECT {store.dialect.local_day('?')}", (ts,))
            finally:
                await store.aclose()
            assert day == "2026-01-01", (target, day)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_gateway_keys_with_budgets_on_postgresql(pg_cluster, pg_url):
    def key(*args: str) -> tuple[str, str]:
        made = run_cli("keys", "create", *args, "--json", "--db", pg_url)
        assert made.returncode == 0, made.stderr
        found = json.loads(made.stdout)
        return found["id"], found["key"]

    _, admin = key("--name", "root")
    frugal_id, frugal = key("--name", "frugal", "--role", "user", "--budget-usd", "0.0000001", "--budget-period", "day")
    served = Served("--sim", "--db", pg_url)
    try:
        def chat(secret: str):
            return httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30,
                              headers={"authorization": f"Bearer {secret}"})  # fmt: skip

        assert chat("p402-nope").status_code == 401
        assert chat(admin).status_code == 200
        refused = chat(frugal)
        assert refused.status_code == 402 and "budget" in refused.json()["error"]["message"], refused.text
        assert run_cli("keys", "revoke", frugal_id, "--db", pg_url).returncode == 0
        _until(lambda: chat(frugal).status_code == 401, timeout=5)  # the gateway reads keys from the same database
    finally:
        assert served.stop() == 0
    dbname = pg_url.rsplit("/", 1)[1]
    assert pg_cluster.psql("SELECT COUNT(*) FROM requests WHERE api_key_id IS NOT NULL AND status = 'ok'", dbname).strip() == "1"


async def test_the_store_s_connections_do_not_compile_queries_with_llvm(pg_url):
    """A report at 10 million rows crossed jit_above_cost: 2.4 s of compiling for a query of 0.3 s."""
    from p402_tui.store.engine import open_store

    store = await open_store(pg_url)
    try:
        assert await store.scalar("SHOW jit") == "off"
    finally:
        await store.aclose()


async def test_decision_records_stay_in_their_rows_and_read_back_as_routed(pg_url):
    """Past PostgreSQL's default 2 KB target a record was compressed in vain and cut into TOAST chunks,
    a third of the server's CPU on a write: the store keeps it in its row instead."""
    import json

    from p402_tui.core.catalog import load_catalog
    from p402_tui.core.router import Router
    from p402_tui.core.types import ChatRequest
    from p402_tui.persistence import Persistence
    from p402_tui.store import queries
    from p402_tui.store.engine import open_store

    router = Router(load_catalog())
    request = ChatRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    decisions = [router.route(request), router.route(request.model_copy(update={"model": "openai/gpt-4o-mini"}))]
    store = await open_store(pg_url)
    try:
        persistence = Persistence(store)
        for decision in decisions:
            persistence.decided(decision)
        await store.flush()
        sizes = await store.fetchall("SELECT octet_length(decision) AS n, pg_column_size(decision) AS kept "
                                     "FROM router_decisions")
        assert len(sizes) == 2 and min(row["n"] for row in sizes) > 2032  # over the default target
        assert [row["kept"] - row["n"] for row in sizes] == [4, 4], sizes  # inline, with its header
        toasted = "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'router_decisions'"
        assert await store.scalar(toasted) == 0
        for decision in decisions:
            read = await queries.get_decision(store, decision.id)
            assert json.dumps(read) == json.dumps(decision.to_dict())
    finally:
        await store.aclose()
