"""The ledger writer runs as a real-time thread where Linux allows it (`core/gil.promptly`) and it has a core
besides the loop's, drains a backlog as any thread, and runs as any thread where it may not; the runtime's
writer asks, `[store] realtime_writer = false` says not to."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ENGINES, open_engine_store

from p402_tui.core import gil
from p402_tui.core.hooks import RequestRecord
from p402_tui.runtime import Runtime
from p402_tui.store import queries
from p402_tui.store.store import Store

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_FIFO"), reason="scheduling policies are Linux's")


def _may_be_realtime() -> bool:
    """Whether this process may make a thread real-time and has two CPUs for it, asked of Linux directly on a
    thread of its own that ends at once. CI runs as root: there it must be, so that the real-time path is held."""
    granted: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            granted.append(False)
        else:
            granted.append(True)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    allowed = granted[0] and len(os.sched_getaffinity(0)) >= 2
    if os.environ.get("CI"):
        assert allowed, "CI runs the suite as root on two or more CPUs"
    return allowed


def _policy(thread: threading.Thread | None) -> int:
    assert thread is not None and thread.native_id is not None
    return os.sched_getscheduler(thread.native_id) & ~os.SCHED_RESET_ON_FORK


def _record(n: int) -> RequestRecord:
    return RequestRecord(id=f"req-{n}", provider="openai", model="gpt-4o", cost_usd=n / 1000)


async def _writes_commit(store, first: int = 0, count: int = 20) -> None:
    for n in range(first, first + count):
        store.put(queries.INSERT_REQUEST, queries.request_row(_record(n)))
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM requests") == first + count


async def _until(condition, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


@pytest.fixture(params=ENGINES)
async def realtime_store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "p402.db", realtime=True)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_writer_that_asks_runs_real_time_where_linux_allows_it(realtime_store):
    allowed = _may_be_realtime()
    writer = realtime_store.writer
    assert writer.stats.realtime is allowed
    assert writer.stats.to_dict()["realtime"] is allowed
    assert _policy(writer._thread) == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    assert os.sched_getparam(writer._thread.native_id).sched_priority == (1 if allowed else 0)
    # SQLite's checkpointer runs as any thread: it copies the WAL, which no answered request waits for.
    checkpointer = getattr(writer, "_checkpointer", None)
    if checkpointer is not None:
        assert _policy(checkpointer) == os.SCHED_OTHER
    await _writes_commit(realtime_store)


async def test_threads_a_real_time_writer_starts_run_as_any_thread():
    if not _may_be_realtime():
        pytest.skip("this process may not make a thread real-time (held under CI, which runs as root)")
    policies: list[int] = []

    def writer_like() -> None:
        assert gil.promptly() is None
        child = threading.Thread(target=lambda: policies.append(os.sched_getscheduler(0)))
        child.start()
        child.join()

    thread = threading.Thread(target=writer_like)
    thread.start()
    thread.join()
    assert policies == [os.SCHED_OTHER]


async def test_a_real_time_writer_drains_a_backlog_as_any_thread_then_runs_real_time_again(tmp_path, monkeypatch):
    if not _may_be_realtime():
        pytest.skip("this process may not make a thread real-time (held under CI, which runs as root)")
    drained_as: list[int] = []
    ordinarily = gil.ordinarily

    def recorded() -> bool:
        done = ordinarily()
        drained_as.append(os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK)
        return done

    monkeypatch.setattr(gil, "ordinarily", recorded)
    path = tmp_path / "p402.db"
    store = await Store.open(path, realtime=True)
    writer = store.writer
    writer.max_batch = 100
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        await _writes_queued(store, 0, 1)
        await _until(lambda: writer.pending == 0)  # taken: its one-row batch waits on the lock
        await _writes_queued(store, 1, 250)  # queued behind it: its next takes leave rows behind them
        locker.execute("ROLLBACK")
        await store.flush()
        assert await store.scalar("SELECT COUNT(*) FROM requests") == 251
        assert drained_as == [os.SCHED_OTHER]
        await _writes_commit(store, first=251, count=1)  # a batch taken with nothing behind it
        assert not writer._lagging and writer.stats.realtime
        assert _policy(writer._thread) == os.SCHED_FIFO
    finally:
        locker.close()
        await store.aclose()


async def _writes_queued(store, first: int, count: int) -> None:
    for n in range(first, first + count):
        store.put(queries.INSERT_REQUEST, queries.request_row(_record(n)))


async def test_a_writer_refused_real_time_runs_as_any_thread(tmp_path, monkeypatch, caplog):
    def refused(policy: int, priority: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(gil, "_schedule", refused)
    with caplog.at_level("INFO", logger="p402.store"):
        store = await Store.open(tmp_path / "p402.db", realtime=True)
    try:
        assert store.writer.stats.realtime is False
        assert _policy(store.writer._thread) == os.SCHED_OTHER
        await _writes_commit(store)
    finally:
        await store.aclose()
    (said,) = [r.getMessage() for r in caplog.records if "not real-time" in r.getMessage()]
    assert "CAP_SYS_NICE" in said and "kill -9" in said
    assert "CAP_SYS_NICE" in store.writer.stats.realtime_refused


# A real-time thread without CAP_SYS_NICE, as one real-time by its RLIMIT_RTPRIO alone (systemd's
# LimitRTPRIO=1) is: here it asks as root, then drops the capability (capset is a thread's own). Going back
# to any thread's policy must keep the reset-on-fork flag, which only CAP_SYS_NICE may clear.
_WITHOUT_CAP_SYS_NICE = textwrap.dedent("""
    import ctypes, json, os, threading
    from p402_tui.core import gil

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    seen = {}

    def thread():
        me = threading.get_native_id()
        seen["asked"] = gil.promptly()
        seen["then"] = os.sched_getscheduler(me) & ~os.SCHED_RESET_ON_FORK
        header, data = Header(0x20080522, 0), (Data * 2)()
        assert libc.capget(ctypes.byref(header), data) == 0
        data[0].effective &= ~(1 << 23)  # CAP_SYS_NICE
        data[0].permitted &= ~(1 << 23)
        assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
        seen["ordinarily"] = gil.ordinarily()
        seen["drained"] = os.sched_getscheduler(me) & ~os.SCHED_RESET_ON_FORK
        seen["again"] = gil.promptly()  # without the capability: only as the RLIMIT_RTPRIO allows
        seen["after"] = os.sched_getscheduler(me) & ~os.SCHED_RESET_ON_FORK

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    print(json.dumps(seen))
""")


def test_a_real_time_writer_without_cap_sys_nice_still_drains_as_any_thread():
    if not _may_be_realtime() or os.geteuid() != 0:
        pytest.skip("needs root, to ask and then drop CAP_SYS_NICE (held under CI, which runs as root)")
    done = subprocess.run([sys.executable, "-c", _WITHOUT_CAP_SYS_NICE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["asked"], seen["then"]) == (None, os.SCHED_FIFO), seen
    assert (seen["ordinarily"], seen["drained"]) == (True, os.SCHED_OTHER), seen
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= 1:  # real-time by the limit alone, as under LimitRTPRIO=1
        assert (seen["again"], seen["after"]) == (None, os.SCHED_FIFO), seen
    else:
        assert "CAP_SYS_NICE" in seen["again"] and seen["after"] == os.SCHED_OTHER, seen


async def test_with_one_cpu_the_writer_does_not_ask(tmp_path, monkeypatch):
    asked: list[int] = []
    monkeypatch.setattr(gil.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(gil, "_schedule", lambda policy, priority: asked.append(policy))
    store = await Store.open(tmp_path / "p402.db", realtime=True)
    try:
        assert store.writer.stats.realtime is False and asked == []
        await _writes_commit(store)
    finally:
        await store.aclose()


async def test_a_store_opened_for_a_report_does_not_ask(tmp_path):
    store = await Store.open(tmp_path / "p402.db")
    try:
        assert store.writer.stats.realtime is False
        assert _policy(store.writer._thread) == os.SCHED_OTHER
    finally:
        await store.aclose()


@pytest.mark.parametrize("asked", [True, False])
async def test_the_runtime_asks_as_the_store_config_says(sim_settings, tmp_path, asked):
    sim_settings.file.store.realtime_writer = asked
    async with Runtime.open(sim_settings, db_path=tmp_path / "p402.db") as runtime:
        writer = runtime.store.writer
        assert writer.realtime is asked
        assert writer.stats.realtime is (asked and _may_be_realtime())
