"""`p402 serve` and `p402 keys` as a user runs them: child processes, loopback only."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import run_cli
from helpers import Served, children, gone_within, running

HELLO = {"messages": [{"role": "user", "content": "Say hello to the gateway."}]}


def test_serve_headless_without_textual_and_ctrl_c_stops_it_cleanly(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"))
    try:
        assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
        answer = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30)
        assert answer.status_code == 200 and answer.json()["p402"]["provider"]
    finally:
        code = served.stop(signal.SIGINT)
    assert code == 0, "".join(served.stderr)[-2000:]
    modules = served.imported()
    assert "p402_tui.gateway.app" in modules and "uvicorn" in modules
    assert not [m for m in modules if m == "textual" or m.startswith("textual.")]
    assert not any("Traceback" in line for line in served.stderr)


def test_serve_finishes_in_flight_requests_and_flushes_the_store(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db))  # the in-process simulator answers at a model's real pace
    results: list[httpx.Response] = []
    body = {**HELLO, "model": "openai/gpt-4o-mini", "max_tokens": 60}
    request = threading.Thread(
        target=lambda: results.append(httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30))
    )
    try:
        request.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{served.sim_url}/_sim/stats").json()["calls"] == 0:  # wait until it reached the model
            assert time.monotonic() < deadline and request.is_alive()
            time.sleep(0.02)
        code = served.stop(signal.SIGTERM)  # what a service manager sends
    finally:
        request.join(30)
    assert code == 0
    assert results and results[0].status_code == 200, results
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, provider, model FROM requests").fetchall()
    assert rows == [("ok", "openai", "gpt-4o-mini")]


def test_serve_ends_a_watching_event_stream_cleanly_when_it_stops(tmp_path):
    """An attached console's event stream ends as a whole response on SIGTERM, not a cut connection."""
    served = Served("--sim", "--db", str(tmp_path / "p402.db"))
    seen: list[str] = []
    outcome: list[BaseException | str] = []

    def watch() -> None:
        try:
            with httpx.stream("GET", f"{served.url}/api/v2/events", timeout=30) as response:
                for line in response.iter_lines():
                    seen.append(line)
            outcome.append("ended")
        except BaseException as error:  # httpx.RemoteProtocolError when the body is cut short
            outcome.append(error)

    watcher = threading.Thread(target=watch)
    try:
        watcher.start()
        deadline = time.monotonic() + 10
        while ": subscribed" not in seen:
            assert time.monotonic() < deadline and watcher.is_alive()
            time.sleep(0.02)
        assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
        while not any(line.startswith("event: request_completed") for line in seen):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        code = served.stop(signal.SIGTERM)
    finally:
        watcher.join(30)
    assert code == 0 and outcome == ["ended"], outcome
    assert time.monotonic() - started < 10
    assert not any("Traceback" in line for line in served.stderr)


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    result = run_cli("serve", "--sim", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "p402.db"))
    assert result.returncode == 1
    assert "without gateway keys" in result.stderr and "p402 keys create" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_keys_create_list_revoke_and_the_gateway_honours_them(tmp_path):
    db = str(tmp_path / "p402.db")
    created = run_cli("keys", "create", "--name", "ci-bot", "--db", db, "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    secret = key["key"]
    assert secret.startswith("p402-") and key["active"] is True
    listed = run_cli("keys", "list", "--db", db, "--json")
    (row,) = json.loads(listed.stdout)
    assert row.pop("usage")["spent_usd"] == 0  # the list adds what each key spent
    assert row == {k: v for k, v in key.items() if k != "key"}
    assert secret not in listed.stdout
    with sqlite3.connect(db) as conn:
        assert secret not in repr(conn.execute("SELECT * FROM gateway_keys").fetchall())  # only the hash is kept

    served = Served("--sim", "--db", db)
    try:
        denied = httpx.get(f"{served.url}/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "missing_api_key"
        allowed = httpx.get(f"{served.url}/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert allowed.status_code == 200 and allowed.json()["data"]
        assert httpx.get(f"{served.url}/health").status_code == 200
    finally:
        assert served.stop() == 0

    revoked = run_cli("keys", "revoke", key["id"], "--db", db)
    assert revoked.returncode == 0 and key["id"] in revoked.stdout
    again = run_cli("keys", "revoke", key["id"], "--db", db)
    assert again.returncode == 1 and "no active key" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(run_cli("keys", "list", "--db", db, "--json").stdout)[0]["active"] is False


def test_keys_create_prints_the_key_once(tmp_path):
    result = run_cli("keys", "create", "--name", "laptop", "--db", str(tmp_path / "p402.db"))
    assert result.returncode == 0
    secrets = [line for line in result.stdout.splitlines() if line.startswith("p402-")]
    assert len(secrets) == 1
    table = run_cli("keys", "list", "--db", str(tmp_path / "p402.db")).stdout
    assert "laptop" in table and secrets[0] not in table


def test_serve_rejects_a_bad_port_without_a_traceback():
    result = run_cli("serve", "--port", "70000")
    assert result.returncode == 2 and "not a port" in result.stderr and "Traceback" not in result.stderr



def _building(tmp_path: Path) -> tuple[Served, int]:
    """A first start (an empty cache dir) of `p402 serve`, and the child process distilling its static vectors."""
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        deadline = time.monotonic() + 30
        while not httpx.get(f"{served.url}/api/v2/cache", timeout=5).json().get("building"):
            assert time.monotonic() < deadline, "the static vectors were never being made"
            time.sleep(0.1)
        while not (builders := children(served.proc.pid, "p402_tui.cache.static_child")):
            assert time.monotonic() < deadline, "no child process is making the static vectors"
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the first batches
    except BaseException:
        served.stop()
        raise
    return served, builders[0]


linux_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")


@linux_proc
def test_serve_stopped_while_it_distils_the_static_vectors_exits_cleanly(tmp_path):
    """A first start distils the cache's static vectors for a minute or two, in a child process (MiniLM's
    weights and half a gigabyte of arrays stay out of the gateway); stopping the gateway meanwhile ends
    the child between two batches, promptly, and leaves no table behind."""
    served, builder = _building(tmp_path)
    started = time.monotonic()
    code = served.stop()
    assert code == 0, "".join(served.stderr)[-2000:]
    assert time.monotonic() - started < 7, "the gateway waited on its build instead of stopping it"
    assert gone_within(builder, 1), "the build outlived its gateway"
    assert "could not be made" not in "".join(served.stderr)  # a stop, not a failure
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))


@linux_proc
def test_a_gateway_killed_while_it_distils_leaves_no_build_running(tmp_path):
    """kill -9 gives the gateway no say: its child sees its stdin close and stops by itself."""
    served, builder = _building(tmp_path)
    served.stop(signal.SIGKILL)
    assert gone_within(builder, 5), "the build outlived a killed gateway"
    assert not list((tmp_path / "cache").rglob("*.npy"))


@linux_proc
def test_a_build_signalled_alone_says_why_the_semantic_tier_is_off(tmp_path):
    """Someone stops the build's child (a `pkill`) while the gateway serves on: the cache says so."""
    served, builder = _building(tmp_path)
    try:
        os.kill(builder, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (cache := httpx.get(f"{served.url}/api/v2/cache", timeout=5).json())["building"]:
            assert time.monotonic() < deadline, "still building after its child was stopped"
            time.sleep(0.1)
        assert cache["embedder"] is None and "stopped by a signal" in (cache["warning"] or "")
    finally:
        assert served.stop() == 0


def _cache_build(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`p402 cache build` on an empty cache dir, and the child process distilling the static vectors."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "cache", "build"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    deadline = time.monotonic() + 30
    while not (builders := children(proc.pid, "p402_tui.cache.static_child")):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no child process is making the static vectors: {proc.communicate()}")
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the first batches
    return proc, builders[0]


def _ended(proc: subprocess.Popen, builder: int) -> str:
    """The command's stderr once it has exited; if it does not, it and its child are killed (a failed test
    would leave them distilling for half a minute) and the timeout raised."""
    try:
        return proc.communicate(timeout=20)[1]
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if running(builder):
            os.kill(builder, signal.SIGKILL)
        raise


@linux_proc
def test_cache_build_interrupted_stops_its_child_and_exits_130(tmp_path):
    """Ctrl-C to `p402 cache build` alone (a SIGINT to its pid, not its group): it stops the child between
    two batches and exits as interrupted, leaving no table or partial file."""
    proc, builder = _cache_build(tmp_path)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    err = _ended(proc, builder)
    assert proc.returncode == 130, err
    # Well short of the 30 s a build takes; past the child's own bound (CHILD_STOP_S) on a loaded machine.
    assert time.monotonic() - started < 15, "the build ran on after Ctrl-C"
    assert gone_within(builder, 1) and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))


@linux_proc
def test_cache_build_whose_child_is_stopped_says_so_in_one_line(tmp_path):
    proc, builder = _cache_build(tmp_path)
    os.kill(builder, signal.SIGTERM)
    err = _ended(proc, builder)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["p402: cache build: the build was stopped before it was done (its process was signalled)"]
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))
