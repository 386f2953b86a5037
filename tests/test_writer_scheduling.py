"""The ledger writer runs as a real-time thread where Linux allows it (`core/gil.promptly`), and as any
thread where it does not; a gateway's writer asks, `[store] realtime_writer = false` says not to."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import ENGINES, open_engine_store

from p402_tui.core import gil
from p402_tui.runtime import Runtime
from p402_tui.store import queries
from p402_tui.store.store import Store

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_FIFO"), reason="scheduling policies are Linux's")


def _may_be_realtime() -> bool:
    """Whether this process may make a thread real-time (root, CAP_SYS_NICE or RLIMIT_RTPRIO), asked on a
    thread of its own that ends at once."""
    granted: list[bool] = []
    probe = threading.Thread(target=lambda: granted.append(gil.promptly()))
    probe.start()
    probe.join()
    return granted[0]


def _policy(thread: threading.Thread | None) -> int:
    assert thread is not None and thread.native_id is not None
    return os.sched_getscheduler(thread.native_id)


async def _writes_commit(store) -> None:
    for n in range(20):
        store.put(queries.INSERT_REQUEST, queries.request_row(_record(n)))
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM requests") == 20


def _record(n: int):
    from p402_tui.core.hooks import RequestRecord

    return RequestRecord(id=f"req-{n}", provider="openai", model="gpt-4o", cost_usd=n / 1000)


@pytest.fixture(params=ENGINES)
async def realtime_store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "p402.db", realtime=True)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_writer_that_asks_runs_real_time_where_linux_allows_it(realtime_store):
    allowed = _may_be_realtime()  # as root (CI) it is: this test then holds the real-time path
    writer = realtime_store.writer
    assert writer.stats.realtime is allowed
    assert writer.stats.to_dict()["realtime"] is allowed
    assert _policy(writer._thread) == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    assert os.sched_getparam(writer._thread.native_id).sched_priority == (1 if allowed else 0)
    # SQLite's checkpointer, started by the writer's thread before it asked, copies the WAL as any thread.
    checkpointer = getattr(writer, "_checkpointer", None)
    if checkpointer is not None:
        assert _policy(checkpointer) == os.SCHED_OTHER
    await _writes_commit(realtime_store)


async def test_a_writer_refused_real_time_runs_as_any_thread(tmp_path, monkeypatch):
    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(gil.os, "sched_setscheduler", refused)
    store = await Store.open(tmp_path / "p402.db", realtime=True)
    try:
        assert store.writer.stats.realtime is False
        assert _policy(store.writer._thread) == os.SCHED_OTHER
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
