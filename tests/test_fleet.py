"""Two real `p402 serve` processes on one database, as a fleet: one budget and one rate limit between them,
a circuit one opens held by the other within a second, a cached answer served by either, and each one's
event stream showing both gateways' events, labelled.

Each test takes its database from `store_url`, on either engine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port, run_cli, sim_config_text
from helpers import Served

from p402_tui.core.config import is_store_url
from p402_tui.store.engine import open_store

PINNED = "openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "Say hello to the fleet."}]
NO_CACHE = {"cache-control": "no-cache"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory, catalog):
    """A `p402 sim` process of this module's own: these tests set faults on it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--host", "127.0.0.1", "--port", str(port), "--no-latency"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/_sim/stats", timeout=0.5)
            break
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, "p402 sim did not start"
            time.sleep(0.1)
    config = tmp_path_factory.mktemp("fleetcfg") / "config.toml"
    config.write_text(sim_config_text(url, catalog) + '\n[cache]\nembedder = "hashed"\n')
    try:
        yield {"url": url, "config": config}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def faults(sim):
    with httpx.Client(base_url=sim["url"]) as client:
        client.delete("/_sim/faults").raise_for_status()
        yield client
        client.delete("/_sim/faults").raise_for_status()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "fleet.db")


@pytest.fixture(params=["store", "postgres"])
def bus_url(request, store_url) -> str:
    """The fleet's bus: the store's own, or LISTEN/NOTIFY on a real PostgreSQL."""
    if request.param == "postgres" and is_store_url(store_url):
        pytest.skip("a PostgreSQL store's own bus is LISTEN/NOTIFY already")
    return request.getfixturevalue("pg_url") if request.param == "postgres" else ""


@pytest.fixture
def fleet(sim, store_url, bus_url):
    """Start gateways on the one database: `fleet("gw-a", "gw-b")` -> their URLs by name."""
    served: list[Served] = []
    env = {"P402_CONFIG": str(sim["config"]), "P402_FLEET": "1", "P402_FLEET_BUS": bus_url}

    def start(*names: str) -> dict[str, str]:
        urls = {}
        for name in names:
            gateway = Served("--db", store_url, env={**env, "P402_FLEET_NAME": name})
            served.append(gateway)
            urls[name] = gateway.url
        return urls

    start.env = env  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for gateway in served:
            assert gateway.stop() == 0, "".join(l for l in gateway.stderr if not l.startswith("import time:"))[-3000:]


def _cost(answer: dict) -> float:
    return answer["p402"]["cost_usd"]


async def test_one_budget_and_one_rate_limit_across_two_gateways(fleet, sim, store_url):
    made = run_cli("keys", "create", "--name", "probe", "--json", "--db", store_url, env={"P402_CONFIG": str(sim["config"])})
    assert made.returncode == 0, made.stderr
    probe = json.loads(made.stdout)["key"]
    urls = fleet("gw-a", "gw-b")
    body = {"model": PINNED, "messages": HELLO, "max_tokens": 24}
    async with httpx.AsyncClient(timeout=60) as client:
        answer = (await client.post(f"{urls['gw-a']}/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {probe}", **NO_CACHE})).json()
    cost = _cost(answer)
    assert cost > 0
    budget = 50 * cost  # fifty requests' worth; each reserves its estimate, never below its cost
    made = run_cli("keys", "create", "--name", "shared", "--budget-usd", repr(budget), "--budget-period", "day",
                   "--rpm", "120", "--json", "--db", store_url, env={"P402_CONFIG": str(sim["config"])})
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    await asyncio.sleep(1.5)  # new keys reach running gateways within a second

    async def one(client: httpx.AsyncClient, url: str) -> tuple[int, float]:
        response = await client.post(f"{url}/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {key['key']}", **NO_CACHE})
        return response.status_code, _cost(response.json()) if response.status_code == 200 else 0.0

    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(one(client, urls["gw-a" if i % 2 else "gw-b"]) for i in range(200)))
    statuses = [status for status, _ in results]
    accepted = statuses.count(200)
    assert set(statuses) <= {200, 402, 429}, statuses
    assert 1 <= accepted <= 50  # the budget, whichever gateway served them
    assert statuses.count(429) >= 80  # the rpm: 120 of the 200 in the minute, counted by both gateways together
    assert accepted + statuses.count(402) <= 120
    answered = sum(cost for _, cost in results)
    assert answered <= budget * (1 + 1e-9)
    store = await open_store(store_url, create=False)  # what both gateways committed (each within 25 ms)
    try:
        deadline = time.monotonic() + 5
        while True:
            row = await store.fetchone(
                "SELECT COUNT(*) AS n, COALESCE(SUM(cost_usd), 0) AS cost FROM requests "
                "WHERE api_key_id = ? AND status = 'ok'", (key["id"],))
            rows, spent = row["n"], row["cost"]
            if rows == accepted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert rows == accepted and spent == pytest.approx(answered)
        # Every request past the rate limit has its row (those over budget as errors costing nothing); the 429s
        # were refused before a request was made of them.
        row = await store.fetchone("SELECT COUNT(*) AS n, SUM(cost_usd) AS cost FROM requests WHERE api_key_id = ?",
                                   (key["id"],))
        assert row["n"] == accepted + statuses.count(402) and row["cost"] == pytest.approx(answered)
        counter = await store.fetchone("SELECT spent, reserved FROM budget_usage WHERE scope = ?", (f"key:{key['id']}",))
        assert counter["spent"] == pytest.approx(spent) and counter["reserved"] == pytest.approx(0.0, abs=1e-9)
        assert await store.scalar("SELECT COUNT(*) FROM budget_holds") == 0
        window = await store.scalar("SELECT requests FROM rate_windows WHERE scope = ?", (f"key:{key['id']}",))
        assert window == 120
    finally:
        await store.aclose()


async def test_a_circuit_one_gateway_opens_the_other_routes_around_within_a_second(fleet, faults):
    urls = fleet("gw-a", "gw-b")
    body = {"model": "auto", "mode": "cost", "messages": HELLO, "max_tokens": 16}
    async with httpx.AsyncClient(timeout=60) as client:
        first = (await client.post(f"{urls['gw-b']}/v1/chat/completions", json=body, headers=NO_CACHE)).json()
        chosen = f"{first['p402']['provider']}/{first['p402']['model']}"
        provider, wire = chosen.split("/", 1)
        faults.post("/_sim/faults", json={"provider": provider, "model": wire, "kind": "rate_limit",
                                          "retry_after_s": 30}).raise_for_status()
        through_a = await client.post(f"{urls['gw-a']}/v1/chat/completions", json=body, headers=NO_CACHE)
        opened = time.monotonic()
        assert through_a.status_code == 200  # gw-a met the 429 and failed over
        assert through_a.json()["p402"]["attempts"][0]["error_kind"] == "rate_limited"
        seen = None
        while time.monotonic() - opened < 2:
            providers = (await client.get(f"{urls['gw-b']}/api/v2/providers")).json()["data"]
            health = next(p["health"] for p in providers if p["id"] == provider)
            if health and "gw-a" in (health.get("reason") or ""):
                seen = time.monotonic() - opened
                break
            await asyncio.sleep(0.02)
        assert seen is not None and seen < 1.0, health
        for _ in range(5):  # no request of gw-b's meets the 429 gw-a met
            answer = await client.post(f"{urls['gw-b']}/v1/chat/completions", json=body, headers=NO_CACHE)
            assert answer.status_code == 200
            meta = answer.json()["p402"]
            assert [a["error_kind"] for a in meta["attempts"]] in ([], [None])
            assert f"{meta['provider']}/{meta['model']}" != chosen


async def test_an_answer_cached_through_one_gateway_is_a_hit_through_the_other(fleet):
    urls = fleet("gw-a", "gw-b")
    body = {"model": PINNED, "messages": [{"role": "user", "content": "What is the capital of the fleet?"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        first = (await client.post(f"{urls['gw-a']}/v1/chat/completions", json=body)).json()
        assert not first["p402"]["cached"]
        deadline = time.monotonic() + 3
        while True:
            second = (await client.post(f"{urls['gw-b']}/v1/chat/completions", json=body)).json()
            if second["p402"]["cached"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert second["p402"]["cached"] and second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


async def test_each_gateway_streams_the_whole_fleets_events_labelled(fleet):
    urls = fleet("gw-a", "gw-b")
    body = {"model": PINNED, "messages": HELLO, "max_tokens": 8}
    seen: list[dict] = []

    async def listen(client: httpx.AsyncClient, opened: asyncio.Event) -> None:
        async with client.stream("GET", f"{urls['gw-b']}/api/v2/events") as stream:
            opened.set()
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))

    async with httpx.AsyncClient(timeout=60) as client:
        opened = asyncio.Event()
        task = asyncio.create_task(listen(client, opened))
        await asyncio.wait_for(opened.wait(), 10)
        # gw-a relays its events once it hears that gw-b is watched: within about half a second.
        deadline = time.monotonic() + 5
        while not any(e.get("gateway") == "gw-a" for e in seen):
            assert time.monotonic() < deadline, "gw-a's events never reached gw-b's stream"
            await client.post(f"{urls['gw-a']}/v1/chat/completions", json=body, headers=NO_CACHE)
            await asyncio.sleep(0.1)
        seen.clear()
        await client.post(f"{urls['gw-a']}/v1/chat/completions", json=body, headers=NO_CACHE)
        await client.post(f"{urls['gw-b']}/v1/chat/completions", json=body, headers=NO_CACHE)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            labelled = {(e["kind"], e.get("gateway")) for e in seen}
            if {("route_decided", "gw-a"), ("route_decided", "gw-b"), ("request_completed", "gw-a"),
                    ("request_completed", "gw-b")} <= labelled:
                break
            await asyncio.sleep(0.05)
        task.cancel()
    labelled = {(e["kind"], e.get("gateway")) for e in seen}
    assert {("route_decided", "gw-a"), ("route_decided", "gw-b"), ("request_completed", "gw-a"),
            ("request_completed", "gw-b")} <= labelled, labelled
    completed = [e for e in seen if e["kind"] == "request_completed" and e["gateway"] == "gw-a"]
    assert completed[0]["record"]["model"] and completed[0]["record"]["status"] == "ok"


async def test_a_gateway_killed_under_load_loses_no_more_than_its_writers_window(fleet, sim, store_url):
    """`kill -9` of one gateway under load: the other keeps serving; after a restart `p402 db status` is
    clean; what the killed one acknowledged but never committed covers under 100 ms of its traffic."""
    if fleet.env["P402_FLEET_BUS"]:
        pytest.skip("the bus does not bear on what the ledger keeps")
    urls = fleet("gw-b")
    doomed = Served("--db", store_url, env={**fleet.env, "P402_FLEET_NAME": "gw-a"})
    urls["gw-a"] = doomed.url
    body = {"model": PINNED, "messages": HELLO, "max_tokens": 8}
    acked: dict[str, list[tuple[str, float]]] = {"gw-a": [], "gw-b": []}
    failed_b: list = []
    killed = asyncio.Event()
    after_kill = 0

    async def load(client: httpx.AsyncClient, name: str, worker: int) -> None:
        nonlocal after_kill
        n = 0
        while not (killed.is_set() and (name == "gw-a" or after_kill >= 60)):
            rid = f"{name}-{worker}-{n}"
            n += 1
            try:
                response = await client.post(f"{urls[name]}/v1/chat/completions", json=body,
                                             headers={"x-request-id": rid, **NO_CACHE})
            except httpx.HTTPError as error:
                if name == "gw-b":
                    failed_b.append(repr(error))
                continue
            if response.status_code == 200:
                acked[name].append((rid, time.time()))
                after_kill += name == "gw-b" and killed.is_set()
            elif name == "gw-b":
                failed_b.append(response.status_code)

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(load(client, name, w)) for name in acked for w in range(8)]
        while len(acked["gw-a"]) < 100:
            await asyncio.sleep(0.01)
        doomed.proc.kill()  # SIGKILL: no drain, no flush
        killed_at = time.time()
        doomed.proc.wait(10)
        killed.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert failed_b == []  # the other gateway kept serving, every request of it answered
    assert after_kill >= 60

    restarted = fleet("gw-a")  # the same name back, as a supervisor would restart it
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(f"{restarted['gw-a']}/v1/chat/completions", json=body, headers=NO_CACHE)).status_code == 200
    status = run_cli("db", "status", "--json", "--db", store_url, env={"P402_CONFIG": str(sim["config"])})
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["up_to_date"] and report["schema_version"] == report["current_version"]

    store = await open_store(store_url, create=False)
    try:
        stored = {row["client_request_id"] for row in await store.fetchall(
            "SELECT client_request_id FROM requests WHERE client_request_id IS NOT NULL")}
    finally:
        await store.aclose()
    assert {rid for rid, _ in acked["gw-b"]} <= stored
    missing = [at for rid, at in acked["gw-a"] if rid not in stored]
    span = max(0.0, killed_at - min(missing)) if missing else 0.0  # an answer read after the kill was sent before it
    print(f"\n{store_url.split(':')[0] if is_store_url(store_url) else 'sqlite'}: gw-a acknowledged "
          f"{len(acked['gw-a'])}, missing from the ledger {len(missing)}, covering {span * 1000:.1f} ms before the kill")
    assert span < 0.1
