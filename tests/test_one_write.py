"""An answer's head and body go to the socket in one write (`gateway.server._OneWrite`): uvicorn writes
them apart, two sends and two TCP segments an answer, which a gateway pays in kernel time on every request."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.gateway.server import JOIN_MAX, _OneWrite
from p402_tui.runtime import Runtime

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Recorded:
    """What the wrapper hands the connection's transport."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


@pytest.fixture
async def gateway_url(sim, catalog, tmp_path):
    settings = Settings(ConfigFile(cache=CacheConfig(embedder="hashed")), catalog, env={}).point_at(sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        running = await runtime.serve_gateway("127.0.0.1", 0)
        yield running.url


def test_a_head_with_a_length_goes_with_the_body():
    transport = Recorded()
    one = _OneWrite(transport)  # type: ignore[arg-type]
    one.write(HEAD)
    assert transport.writes == []
    one.write(b"{}")
    assert transport.writes == [HEAD + b"{}"]
    one.write(HEAD)  # the next answer on the connection: held again
    one.write(b"[]")
    assert transport.writes[-1] == HEAD + b"[]"
    large = b"x" * (JOIN_MAX + 1)
    one.write(HEAD)
    one.write(large)  # not copied behind its head: two writes
    assert transport.writes[-2:] == [HEAD, large]


def test_what_has_no_length_goes_at_once_and_closing_sends_a_held_head():
    transport = Recorded()
    one = _OneWrite(transport)  # type: ignore[arg-type]
    one.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    stream = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    one.write(stream)
    one.write(b"5\r\nhello\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", stream, b"5\r\nhello\r\n"]
    one.write(HEAD)  # an answer whose body never comes (the app failed): uvicorn closes the connection
    one.close()
    assert transport.writes[-1] == HEAD and transport.closed
    assert one.get_extra_info("socket") == "info:socket"


async def test_a_served_answer_arrives_whole_and_a_head_request_is_answered(gateway_url):
    """Through uvicorn, on a real socket: the answer's bytes are what a client reads, HEAD included
    (uvicorn writes no body for it, so its head is not held)."""
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        got = await http.get("/health")
        head = await http.head("/api/v2/sessions")
    assert got.status_code in (200, 503) and got.json()
    assert head.status_code == 200 and head.content == b""
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(f"GET /health HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        head_bytes = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head_bytes.split(b"\r\n") if line.lower().startswith(b"content-length")))
        body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head_bytes.startswith(b"HTTP/1.1 ") and body.startswith(b"{")
