"""Operating `p402 serve`: its logs (JSON or text, an access line per request) and its drain on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
import sqlite3
import threading
import time

import httpx
import pytest

from p402_tui import logs
from tests.helpers import Served

HELLO = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
# openai/gpt-4 is the simulator's slowest model: this stream takes ~4 s at its pace.
SLOW = {"model": "openai/gpt-4", "stream": True, "max_tokens": 120, "messages": [{"role": "user", "content": "a story"}]}
ACCESS_FIELDS = [
    "ts", "level", "logger", "msg", "method", "path", "status", "latency_ms", "key_id", "request_id",
    "client_request_id", "model", "provider", "cost_usd", "cached", "stream", "error_kind",
]  # fmt: skip


def log_lines(served: Served) -> list[str]:
    return [line.rstrip("\n") for line in served.stderr if not line.startswith("import time:")]


def json_lines(served: Served) -> list[dict]:
    return [json.loads(line) for line in log_lines(served)]  # every line one object, or this raises


def test_json_logs_carry_an_access_line_per_request_and_p402s_own_warnings(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), "--log-format", "json")
    try:
        answered = httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, headers={"x-request-id": "trace-7"}, timeout=30)
        assert answered.status_code == 200 and answered.headers["x-request-id"] == "trace-7"
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**HELLO, "stream": True}, timeout=30) as s:
            streamed_id = s.headers["x-request-id"]
            assert "[DONE]" in "".join(s.iter_text())
        missing = httpx.get(f"{served.url}/no/such/path", timeout=10)
        assert missing.status_code == 404
        with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn warns of it: its record takes our format too
            raw.recv(1024)
    finally:
        assert served.stop() == 0
    lines = json_lines(served)
    access = [line for line in lines if line["logger"] == "p402.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 200), ("GET", "/no/such/path", 404),
    ]  # fmt: skip
    for line in access:
        assert list(line) == ACCESS_FIELDS
        assert line["latency_ms"] > 0 and line["ts"].endswith("Z")
    chat, stream, _ = access
    assert chat["client_request_id"] == "trace-7" and chat["request_id"].startswith("req")
    assert (chat["provider"], chat["model"], chat["cached"], chat["stream"]) == ("openai", "gpt-4o-mini", False, False)
    assert chat["cost_usd"] > 0 and chat["key_id"] is None
    assert stream["stream"] is True and stream["request_id"] == streamed_id
    assert stream["cached"] is True and stream["cost_usd"] == 0  # the same question: answered from the cache
    with sqlite3.connect(tmp_path / "p402.db") as conn:
        stored = conn.execute("SELECT id, client_request_id FROM requests ORDER BY ts").fetchall()
    assert stored == [(chat["request_id"], "trace-7"), (stream["request_id"], None)]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert any(line["logger"].startswith("uvicorn") and "Invalid HTTP request" in line["msg"] for line in warnings)
    assert [line["msg"] for line in lines if line["logger"] == "p402.gateway"][-1] == "stopped: the ledger is flushed"


def _access_lines(served: Served, path: str, count: int, within: float = 5.0) -> None:
    """Wait (up to `within` s) until the gateway has written `count` JSON access lines for `path`."""
    deadline = time.monotonic() + within
    while sum(f'"path":"{path}"' in line for line in log_lines(served)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_in_process_tests_run_on_the_loop_p402_serve_runs_on():
    """uvloop refuses what asyncio's loop forgives: an error per detached subscriber hid from in-process
    tests while they ran on asyncio's (conftest's `event_loop_policy`)."""
    uvloop = pytest.importorskip("uvloop")
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_an_event_subscriber_that_leaves_is_no_error(tmp_path):
    """On uvloop (as `p402 serve` runs) a closed transport refuses what asyncio's ignores: a console that
    detached was logged as an unexpected error, once per subscriber."""
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), "--log-format", "json")
    try:
        for _ in range(3):
            with httpx.stream("GET", f"{served.url}/api/v2/events", timeout=10) as events:
                lines = events.iter_lines()
                assert next(lines) == ": subscribed"
                assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
                assert next(line for line in lines if line.startswith("event: ")) in ("event: route_decided", "event: cache_hit")
        _access_lines(served, "/api/v2/events", 3)  # each stream ends on the gateway a moment after its client leaves
    finally:
        assert served.stop() == 0
    lines = json_lines(served)
    assert [line["status"] for line in lines if line.get("path") == "/api/v2/events"] == [200, 200, 200]
    assert [line for line in lines if line["level"] == "error"] == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"])
def test_a_client_that_leaves_before_its_body_is_no_error_and_logged_status_0(tmp_path, path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), "--log-format", "json")
    try:
        with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{".encode())
            time.sleep(0.2)  # the request is in the gateway, waiting for the rest of its body
        _access_lines(served, path, 1)
    finally:
        assert served.stop() == 0
    lines = json_lines(served)
    assert [line["status"] for line in lines if line.get("path") == path] == [0]  # no answer began
    assert [line for line in lines if line["level"] == "error"] == []


def test_text_logs_read_as_lines_and_the_access_line_can_be_switched_off(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "a.db"))
    try:
        assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
    finally:
        assert served.stop() == 0
    (line,) = [line for line in log_lines(served) if " access " in line]
    assert " INFO access POST /v1/chat/completions 200 " in line
    assert "model=gpt-4o-mini provider=openai" in line and "cost_usd=" in line and "stream=false" in line

    config = tmp_path / "p402.toml"
    config.write_text("[gateway]\naccess_log = false\n")
    for args, env in ((["--no-access-log"], {"P402_LOG_FORMAT": "json"}), (["--config", str(config)], {"P402_LOG_FORMAT": "json"})):
        served = Served("--sim", "--db", str(tmp_path / "b.db"), *args, env=env)
        try:
            assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
        finally:
            assert served.stop() == 0
        lines = json_lines(served)
        assert lines and not any(line["logger"] == "p402.access" for line in lines)


def test_log_level_warning_keeps_info_out(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), "--log-level", "warning")
    try:
        assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
    finally:
        assert served.stop() == 0
    assert log_lines(served) == []


class _Stuck(io.StringIO):
    """A stderr that blocks every write until released, as a full pipe does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait()
        return super().write(text)


def test_a_blocked_stderr_never_blocks_the_caller():
    stuck = _Stuck()
    running = logs.Logs("json", "info", stream=stuck)
    try:
        access = logs.AccessLog(running)
        scope = {"method": "GET", "path": "/health/live", "p402.status": 200}
        started = time.perf_counter()
        for _ in range(1000):
            access.write(scope, started)
        logging.getLogger("p402.test").warning("still %s", "here")
        assert time.perf_counter() - started < 1.0  # nothing waited for the stuck stream
    finally:
        stuck.release.set()
        running.stop()
    lines = [json.loads(line) for line in stuck.getvalue().splitlines()]
    assert len(lines) == 1001 and lines[-1]["msg"] == "still here" and lines[0]["status"] == 200


# --- drain ---------------------------------------------------------------------------------------


def _slow_stream(url: str, seen: list[str], outcome: list) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=SLOW, timeout=60) as response:
            seen.extend(response.iter_lines())  # line by line, as they arrive: the test watches them
        outcome.append("ended")
    except httpx.HTTPError as error:
        outcome.append(error)


def _in_flight(url: str) -> tuple[threading.Thread, list[str], list]:
    seen: list[str] = []
    outcome: list = []
    thread = threading.Thread(target=_slow_stream, args=(url, seen, outcome))
    thread.start()
    deadline = time.monotonic() + 20
    while not any(line.startswith("data: {") for line in seen):  # its first chunk arrived: it is in flight
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.02)
    return thread, seen, outcome


def _refused(url: str) -> bool:
    """Whether a new TCP connection is refused: the listening socket is closed.

    A bare connect, not a request: on a busy machine a request's own set-up took most of the
    stream's few seconds, and a connection queued just before the socket closed is reset, not refused.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_signals_that_keep_coming_while_the_ledger_is_flushed_do_not_kill_the_gateway(tmp_path):
    """After the drain, closing the store flushes the ledger; a signal then (a second Ctrl-C, a supervisor
    that repeats itself) used to meet no handler and kill the process by its default action, mid-flush."""
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db))
    assert httpx.post(f"{served.url}/v1/chat/completions", json=HELLO, timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while served.proc.poll() is None:
        assert time.monotonic() < deadline, "the gateway did not stop"
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert served.stop() == 0, "".join(served.stderr)[-2000:]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1


def test_sigterm_lets_an_in_flight_stream_finish_refuses_new_connections_and_flushes_the_ledger(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db), "--log-format", "json")
    thread, seen, outcome = _in_flight(served.url)
    served.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not _refused(served.url):  # the listening socket closes at once
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert thread.is_alive()  # ... while the stream goes on
    thread.join(30)
    code = served.stop()
    assert code == 0 and outcome == ["ended"], outcome
    assert [line for line in seen if line][-1] == "data: [DONE]"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status, model, stream FROM requests").fetchall() == [("ok", "gpt-4", 1)]
    messages = [line["msg"] for line in json_lines(served) if line["logger"] == "p402.gateway"]
    assert messages[-3:] == [
        "draining: new connections refused; 1 request(s) in flight get up to 30s to finish",
        "drained: every request in flight finished",
        "stopped: the ledger is flushed",
    ]


def test_past_the_drain_bound_what_remains_is_cut_the_ledger_still_flushed(tmp_path):
    db = tmp_path / "p402.db"
    config = tmp_path / "p402.toml"
    config.write_text("[gateway]\ndrain_timeout_s = 0.5\n")
    served = Served("--sim", "--db", str(db), "--config", str(config), "--log-format", "json")
    thread, seen, outcome = _in_flight(served.url)
    started = time.monotonic()
    code = served.stop()
    thread.join(30)
    assert code == 0 and time.monotonic() - started < 10
    assert outcome and outcome != ["ended"]  # its connection was cut before [DONE]
    assert "data: [DONE]" not in seen
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status, error_kind FROM requests").fetchall() == [("error", "cancelled")]
    messages = [line["msg"] for line in json_lines(served) if line["logger"] == "p402.gateway"]
    assert "drained: 1 request(s) cut short past the 0.5s bound" in messages
    assert messages[-1] == "stopped: the ledger is flushed"
    assert not any("Traceback" in line for line in served.stderr)


@pytest.mark.parametrize("value", ["xml", "loud"])
def test_a_bad_log_setting_in_the_environment_is_a_clear_error(tmp_path, value):
    from tests.conftest import run_cli

    name = "P402_LOG_FORMAT" if value == "xml" else "P402_LOG_LEVEL"
    result = run_cli("serve", "--sim", "--port", "0", "--db", str(tmp_path / "p402.db"), env={name: value})
    assert result.returncode != 0 and f"{name}={value!r}" in result.stderr and "Traceback" not in result.stderr


def test_a_second_signal_cuts_the_drain_short(tmp_path):
    db = tmp_path / "p402.db"
    served = Served("--sim", "--db", str(db), "--log-format", "json")  # the default bound: 30 s
    thread, seen, outcome = _in_flight(served.url)
    served.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not any("draining" in line for line in served.stderr):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code = served.stop(signal.SIGINT)
    thread.join(30)
    assert code == 0 and "data: [DONE]" not in seen and outcome != ["ended"]
    messages = [line["msg"] for line in json_lines(served) if line["logger"] == "p402.gateway"]
    assert "drained: 1 request(s) cut short by a second signal (SIGINT)" in messages
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status, error_kind FROM requests").fetchall() == [("error", "cancelled")]


def test_past_the_queue_bound_lines_are_dropped_and_counted(monkeypatch):
    monkeypatch.setattr(logs, "MAX_QUEUED", 50)
    stuck = _Stuck()
    running = logs.Logs("json", "info", stream=stuck)
    try:
        access = logs.AccessLog(running)
        for _ in range(200):
            access.write({"method": "GET", "path": "/health/live", "p402.status": 200}, time.perf_counter())
    finally:
        stuck.release.set()
        running.stop()
    lines = [json.loads(line) for line in stuck.getvalue().splitlines()]
    assert running.dropped >= 100  # 150 unless the listener woke (every 0.1 s) and took a batch mid-loop
    assert lines[-1]["level"] == "warning" and lines[-1]["msg"] == f"{running.dropped} log lines dropped: stderr could not keep up"
    assert len(lines) == 200 - running.dropped + 1


def test_start_up_warnings_are_log_lines_too(tmp_path):
    config = tmp_path / "p402.toml"
    config.write_text("[network]\nverify = false\n")
    served = Served("--sim", "--db", str(tmp_path / "p402.db"), "--config", str(config), "--log-format", "json")
    assert served.stop() == 0
    (warning,) = [line for line in json_lines(served) if line["level"] == "warning"]
    assert warning["logger"] == "p402" and warning["msg"].startswith("TLS verification is OFF")
