"""Bounds on what one request, one subscriber and one connection may cost, on real servers on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.core.hooks import MAX_LABEL_CHARS, MAX_MESSAGES
from p402_tui.runtime import Runtime
from p402_tui.sim.engine import Fault
from conftest import run_cli
from test_gateway import assert_openai_error

HELLO = [{"role": "user", "content": "Say hello to the gateway."}]


def settings_for(catalog, sim_url: str, **sections) -> Settings:
    file = ConfigFile(cache=CacheConfig(embedder="hashed"), **sections)
    return Settings(file, catalog, env={}).point_at(sim_url)


@pytest.fixture
async def runtime(sim, catalog, tmp_path):
    async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as rt:
        yield rt


@pytest.fixture
async def http(runtime):
    running = await runtime.serve_gateway("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            yield client
    finally:
        await running.stop()


# --- what one request may carry -------------------------------------------------------------


async def test_too_many_messages_and_overlong_labels_are_400s(http):
    many = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    response = await http.post("/v1/chat/completions", json={"model": "auto", "messages": many})
    assert assert_openai_error(response, 400, "too_many_messages")["param"] == "messages"
    for field in ("tag", "namespace", "session_id"):
        body = {"model": "auto", "messages": HELLO, "p402": {field: "x" * (MAX_LABEL_CHARS + 1)}}
        response = await http.post("/v1/chat/completions", json=body)
        assert assert_openai_error(response, 400)["param"] == f"p402.{field}"
    response = await http.post("/api/v2/sessions", json={"name": "n" * 1000})
    assert assert_openai_error(response, 400)["param"] == "name"


def test_the_cli_refuses_an_overlong_tag_in_one_line():
    result = run_cli("chat", "--tag", "t" * (MAX_LABEL_CHARS + 1), "hello", config=None)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"p402 chat: error: argument --tag: at most {MAX_LABEL_CHARS} characters, not {MAX_LABEL_CHARS + 1}"
    )


# --- deadlines ------------------------------------------------------------------------------


async def test_a_hung_upstream_is_a_504_at_the_requests_deadline(http, sim):
    sim.state.add_fault(Fault(kind="timeout"))
    began = time.perf_counter()
    body = {"model": "auto", "messages": HELLO, "p402": {"timeout_s": 0.5}}
    response = await http.post("/v1/chat/completions", json=body)
    assert time.perf_counter() - began < 3
    assert_openai_error(response, 504, "deadline_exceeded")
    response = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert_openai_error(response, 504, "deadline_exceeded")  # nothing streamed yet: still an HTTP error
