"""The adapters' HTTP client against scripted servers on loopback: what real servers do to it."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from p402_tui.core.config import ConfigFile, Settings
from p402_tui.core.errors import ConfigError
from p402_tui.providers import http

Script = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = http.Timeouts(connect=5, read=5)


class Upstream:
    """A loopback HTTP/1.1 server whose answers a test writes byte by byte.

    `script(n, request, writer)` answers the n-th request (counted over all connections);
    it may write anything, stall, or close the connection.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.reader: asyncio.StreamReader | None = None  # the connection the request being answered came on

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                self.reader = reader
                await self.script(len(self.requests), request, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":true}', *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra.encode(), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer_ok(n: int, request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ok())


def held_first(release: asyncio.Event) -> Script:
    """Answers every request, the first only once `release` is set."""

    async def script(n: int, request: bytes, writer: asyncio.StreamWriter) -> None:
        if n == 1:
            await release.wait()
        writer.write(ok())

    return script


async def one_busy_connection(up: Upstream) -> tuple[http.Client, asyncio.Task[http.Response]]:
    """A client allowed one connection, taken by a request still waiting for its answer."""
    client = http.Client({}, limit=1)
    busy = asyncio.create_task(client.request("GET", http.target(up.url), timeouts=TIMEOUTS))
    await asyncio.sleep(0.05)
    return client, busy


async def get_bodies(up: Upstream, times: int) -> list[bytes]:
    """`times` GETs in turn on one client, each body read whole."""
    client = http.Client({})
    try:
        return [await (await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)).read() for _ in range(times)]
    finally:
        await client.aclose()


async def test_a_request_carries_the_clients_headers_and_its_body():
    async with Upstream(answer_ok) as up:
        client = http.Client({"Authorization": "Bearer k", "User-Agent": "p402/test"})
        response = await client.request("POST", http.target(up.url), b'{"a":1}', timeouts=TIMEOUTS)
        assert response.status == 200 and await response.read() == b'{"ok":true}'
        await client.aclose()
    head, _, body = up.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat HTTP/1.1"
    assert {b"Authorization: Bearer k", b"User-Agent: p402/test", b"Content-Type: application/json",
            b"Content-Length: 7"} <= set(lines)  # fmt: skip
    assert any(line.startswith(b"Host: 127.0.0.1:") for line in lines)
    assert body == b'{"a":1}'


async def test_connections_are_kept_alive_and_reused():
    async with Upstream(answer_ok) as up:
        assert await get_bodies(up, 5) == [b'{"ok":true}'] * 5
    assert up.connections == 1 and len(up.requests) == 5
    assert b"Content-Length" not in up.requests[0]  # a GET without a body says nothing of one


def test_a_client_outlives_an_event_loop_and_serves_the_next():
    """`asyncio.run` twice with one client, as a CLI command may: the first loop's connections stay behind."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so the first loop leaves an idle connection

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = http.target(f"http://127.0.0.1:{server.server_address[1]}/")
    client = http.Client({})

    async def call() -> bytes:
        return await (await client.request("GET", target, timeouts=TIMEOUTS)).read()

    try:
        assert asyncio.run(call()) == b"{}"
        assert asyncio.run(call()) == b"{}"  # on a connection of its own loop's
    finally:
        server.shutdown()
        server.server_close()


async def test_a_chunked_body_arrives_piece_by_piece_as_it_is_sent():
    sent_second = asyncio.Event()
    proceed = asyncio.Event()

    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(chunk(b"data: one\n\n"))
        await writer.drain()
        await proceed.wait()
        writer.write(chunk(b"data: two\n\n") + b"0\r\n\r\n")
        sent_second.set()

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("POST", http.target(up.url), b"{}", timeouts=TIMEOUTS)
        assert response.headers["content-type"] == "text/event-stream"
        pieces = [await anext(response)]
        assert pieces == [b"data: one\n\n"] and not sent_second.is_set()  # the first came before the second was sent
        proceed.set()
        pieces += [piece async for piece in response]
        assert b"".join(pieces) == b"data: one\n\ndata: two\n\n"
        again = await client.request("POST", http.target(up.url), b"{}", timeouts=TIMEOUTS)
        proceed.set()
        await again.read()
        await client.aclose()
    assert up.connections == 1  # read to its end, the stream's connection went back to the pool


async def test_a_body_without_a_length_ends_with_the_connection_which_is_not_reused():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"whole\":")
        await writer.drain()
        writer.write(b"true}")
        writer.close()

    async with Upstream(script) as up:
        assert await get_bodies(up, 2) == [b'{"whole":true}'] * 2
    assert up.connections == 2


async def test_connection_close_is_honoured():
    async def script(n, request, writer):
        writer.write(ok(b"{}", "Connection: close"))

    async with Upstream(script) as up:
        assert await get_bodies(up, 2) == [b"{}"] * 2
    assert up.connections == 2


@pytest.mark.parametrize(
    "encoding,encode",
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", lambda body: body)],
)
async def test_a_compressed_body_is_decoded(encoding, encode):
    body = b'{"text":"' + b"compressible " * 500 + b'"}'

    async def script(n, request, writer):
        writer.write(ok(encode(body), f"Content-Encoding: {encoding}"))

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        assert await response.read() == body
        await client.aclose()
    assert b"Accept-Encoding: identity" in up.requests[0]  # asked for none: a stream must not wait on a compressor


async def test_an_informational_answer_before_the_real_one_is_skipped():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"{}", "X-Final: yes"))

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        assert response.status == 200 and response.headers["x-final"] == "yes" and "link" not in response.headers
        assert await response.read() == b"{}"
        await client.aclose()


async def test_headers_are_read_whatever_their_case_and_repeats_are_joined():
    async def script(n, request, writer):
        writer.write(ok(b"{}", "Retry-After: 7", "X-Thing: a", "x-thing: b"))

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        await response.read()
        await client.aclose()
    assert response.headers["RETRY-AFTER"] == "7" and response.headers.get("retry-after") == "7"
    assert response.headers["X-Thing"] == "a, b" and "x-THING" in response.headers
    assert response.headers.get("absent") is None


async def test_a_keep_alive_connection_the_server_dropped_is_not_reused():
    async def script(n, request, writer):
        writer.write(ok(b"{}", "Connection: keep-alive"))
        await writer.drain()
        writer.close()  # and then thinks better of keeping it

    async with Upstream(script) as up:
        assert await get_bodies(up, 3) == [b"{}"] * 3
    assert up.connections == 3 and len(up.requests) == 3


async def test_a_reused_connection_closed_before_any_answer_is_retried_once_on_a_new_one():
    """The race a keep-alive pool always has: the server ends an idle connection as it is reused."""

    async def script(n, request, writer):
        if n == 2:
            writer.close()  # the request on the reused connection gets no answer at all
            return
        writer.write(ok())

    async with Upstream(script) as up:
        client = http.Client({})
        for _ in range(2):
            assert await (await client.request("POST", http.target(up.url), b"{}", timeouts=TIMEOUTS)).read()
        await client.aclose()
    assert up.connections == 2 and len(up.requests) == 3


async def test_a_new_connection_closed_before_any_answer_fails_without_a_retry():
    async def script(n, request, writer):
        writer.close()

    async with Upstream(script) as up:
        client = http.Client({})
        with pytest.raises(http.ConnectionClosed, match="before the response ended"):
            await client.request("POST", http.target(up.url), b"{}", timeouts=TIMEOUTS)
        await client.aclose()
    assert len(up.requests) == 1


async def test_a_connection_lost_mid_body_delivers_what_came_then_fails():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        assert await anext(response) == b"partial"
        with pytest.raises(http.ConnectionClosed):
            await anext(response)
        await client.aclose()


async def test_a_server_that_goes_quiet_is_a_read_timeout_before_and_during_the_body():
    async def script(n, request, writer):
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"first"))
        await asyncio.sleep(5)

    async with Upstream(script) as up:
        client = http.Client({})
        quick = http.Timeouts(connect=5, read=0.2)
        started = time.perf_counter()
        with pytest.raises(http.ReadTimeout, match="nothing arrived for 0.2s"):
            await client.request("GET", http.target(up.url), timeouts=quick)
        response = await client.request("GET", http.target(up.url), timeouts=quick)
        assert await anext(response) == b"first"
        with pytest.raises(http.ReadTimeout):
            await anext(response)
        assert time.perf_counter() - started < 2
        await client.aclose()


async def test_a_trickle_that_never_goes_quiet_still_meets_the_total_deadline():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(chunk(b"."))
            await writer.drain()
            await asyncio.sleep(0.05)

    async with Upstream(script) as up:
        client = http.Client({})
        started = time.perf_counter()
        with pytest.raises(http.ReadTimeout, match="did not arrive in time"):
            response = await client.request("GET", http.target(up.url), timeouts=http.Timeouts(5, read=0.2, total=0.5))
            await response.read()
        assert 0.4 < time.perf_counter() - started < 2
        await client.aclose()


async def test_the_pool_limit_makes_a_request_wait_for_a_connection_then_time_out():
    release = asyncio.Event()
    async with Upstream(held_first(release)) as up:
        client, busy = await one_busy_connection(up)
        with pytest.raises(http.ConnectTimeout):
            await client.request("GET", http.target(up.url), timeouts=http.Timeouts(connect=0.2, read=5))
        waiting = asyncio.create_task(client.request("GET", http.target(up.url), timeouts=TIMEOUTS))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        await (await busy).read()  # read to the end: its connection goes to the one waiting
        assert await (await waiting).read() == b'{"ok":true}'
        await client.aclose()
    assert up.connections == 1


async def test_closing_a_response_mid_body_closes_its_connection():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a"))
        await writer.drain()
        if await up.reader.read() == b"":  # still answering, it sees the client go
            gone.set()

    gone = asyncio.Event()
    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        assert await anext(response) == b"a"
        response.close()
        await asyncio.wait_for(gone.wait(), 2)
        await client.aclose()


async def test_a_large_body_read_slowly_pauses_the_socket_and_arrives_whole():
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def script(n, request, writer):
        writer.write(ok(body))
        await writer.drain()

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        conn = response._conn
        await asyncio.sleep(0.3)  # let it pile up unread
        assert conn is not None and conn.paused and conn.buffered < len(body)
        assert await response.read() == body
        await client.aclose()


async def test_garbage_instead_of_http_is_a_protocol_error():
    async def script(n, request, writer):
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with Upstream(script) as up:
        client = http.Client({})
        with pytest.raises(http.ProtocolError, match="unreadable HTTP response"):
            await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        await client.aclose()


async def test_aclose_closes_idle_and_busy_connections_alike():
    async def script(n, request, writer):
        if n == 1:
            writer.write(ok())
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a"))
            await asyncio.sleep(5)

    async with Upstream(script) as up:
        client = http.Client({})
        await (await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)).read()
        busy = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        await client.aclose()
        assert await anext(busy) == b"a"
        with pytest.raises(http.ConnectionClosed):
            await anext(busy)
        with pytest.raises(http.ConnectionClosed, match="client was closed"):
            await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)


async def test_https_with_the_clients_own_tls_context():
    """The same client over TLS, against a server with a certificate made for the test."""
    certificate, key = _self_signed(tmp := __import__("tempfile").mkdtemp())
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificate, key)
    client_tls = ssl.create_default_context(cafile=certificate)
    server = await asyncio.start_server(_tls_answer, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        client = http.Client({}, tls=client_tls)
        response = await client.request("GET", http.target(f"https://localhost:{port}/v1/models"), timeouts=TIMEOUTS)
        assert response.status == 200 and await response.read() == b'{"tls":true}'
        plain = http.Client({})  # a client that trusts only the system's CAs refuses the certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            await plain.request("GET", http.target(f"https://localhost:{port}/v1/models"), timeouts=TIMEOUTS)
        await client.aclose()
        await plain.aclose()
    finally:
        server.close()
    assert tmp


async def _tls_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok(b'{"tls":true}'))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _self_signed(folder: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def test_targets_split_urls_once_for_the_request_line():
    plain = http.target("http://127.0.0.1:8080/v1/chat/completions")
    assert (plain.origin, plain.host_header, plain.path) == (
        ("http", "127.0.0.1", 8080), b"127.0.0.1:8080", b"/v1/chat/completions"
    )
    secure = http.target("https://llm.example.test/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    assert secure.origin == ("https", "llm.example.test", 443) and secure.host_header == b"llm.example.test"
    assert secure.path == b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert http.target("http://[::1]:11434/v1", {"page size": 2}).host_header == b"[::1]:11434"
    assert http.target("http://h/v1/models", {"page size": 2}).path == b"/v1/models?page+size=2"
    assert http.target("http://h/models/my model").path == b"/models/my%20model"
    for bad in ("localhost:11434/v1", "ftp://h/x", "http:///nohost"):
        with pytest.raises(ValueError, match="not an http"):
            http.target(bad)


def test_a_header_that_could_split_a_request_is_refused():
    for name, value in (("X-Evil", "a\r\nHost: other"), ("X-Key", "sk-abc\n"), ("Bad:Name", "v"), ("X-Word", "café")):
        with pytest.raises(ValueError, match="cannot carry"):
            http.Client({name: value})


def test_config_refuses_a_base_url_or_header_no_request_could_use(catalog):
    with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
        Settings(ConfigFile.model_validate({"providers": {"openai": {"base_url": "localhost:11434/v1"}}}), catalog, env={})
    with pytest.raises(ConfigError, match="header 'X-Team'"):
        Settings(ConfigFile.model_validate({"providers": {"openai": {"headers": {"X-Team": "a\nb"}}}}), catalog, env={})


# --- what a review of the client found (each failed before its fix) ---------------------------


@pytest.mark.parametrize("ending", ["silence", "reset", "aclose"])
async def test_a_body_that_ends_with_the_connection_is_not_complete_when_the_connection_fails(ending):
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n{\"partial\":")
        await writer.drain()
        if ending == "reset":  # a reset (SO_LINGER 0), not the end of the body
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            await asyncio.sleep(3)

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=http.Timeouts(5, read=0.3))
        assert await anext(response) == b'{"partial":'
        if ending == "aclose":
            await client.aclose()
        expected = http.ReadTimeout if ending == "silence" else (http.ConnectionClosed, ConnectionResetError)
        with pytest.raises(expected):
            await response.read()
        await client.aclose()


async def test_a_cut_short_chunked_body_is_not_complete_whatever_the_case_of_its_header():
    async def script(n, request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n" + chunk(b"hello"))
        await writer.drain()
        writer.close()

    async with Upstream(script) as up:
        client = http.Client({})
        response = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        with pytest.raises(http.ConnectionClosed):
            await response.read()
        await client.aclose()


async def test_a_woken_waiter_that_is_cancelled_passes_its_connection_on():
    release = asyncio.Event()
    async with Upstream(held_first(release)) as up:
        client, busy = await one_busy_connection(up)
        first = asyncio.create_task(client.request("GET", http.target(up.url), timeouts=TIMEOUTS))
        second = asyncio.create_task(client.request("GET", http.target(up.url), timeouts=http.Timeouts(1, 5)))
        await asyncio.sleep(0.05)
        release.set()
        await (await busy).read()  # its connection goes back to the pool and wakes `first`...
        first.cancel()  # ...whose caller leaves before it runs
        assert await (await second).read() == b'{"ok":true}'
        await client.aclose()


async def test_a_connection_returned_with_its_reading_paused_reads_the_next_answer():
    async def script(n, request, writer):
        writer.write(ok(b"x" * ((1 << 20) + 1000) if n == 1 else b"second"))
        await writer.drain()

    async with Upstream(script) as up:
        client = http.Client({})
        first = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        conn = first._conn
        await asyncio.sleep(0.3)
        assert conn is not None and conn.complete and conn.paused
        first.close()  # whole but unread: back to the pool
        second = await client.request("GET", http.target(up.url), timeouts=http.Timeouts(5, read=1))
        assert await second.read() == b"second"
        await client.aclose()
    assert up.connections == 1


async def test_what_a_server_says_on_an_idle_connection_never_answers_the_next_request():
    async def script(n, request, writer):
        writer.write(ok(b"first" if n == 1 else b"second"))
        await writer.drain()
        if n == 1:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # out of turn

    async with Upstream(script) as up:
        client = http.Client({})
        assert await (await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)).read() == b"first"
        await asyncio.sleep(0.2)
        second = await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        assert second.status == 200 and await second.read() == b"second"
        await client.aclose()
    assert up.connections == 2


async def test_closing_the_client_fails_requests_waiting_or_connecting():
    release = asyncio.Event()
    async with Upstream(held_first(release)) as up:
        client, busy = await one_busy_connection(up)
        waiting = asyncio.create_task(client.request("GET", http.target(up.url), timeouts=TIMEOUTS))
        await asyncio.sleep(0.05)
        await client.aclose()
        with pytest.raises(http.ConnectionClosed):
            await waiting
        busy.cancel()

        late = http.Client({})
        connecting = asyncio.create_task(late.request("GET", http.target(up.url), timeouts=TIMEOUTS))
        while not late._open:
            await asyncio.sleep(0)
        await late.aclose()  # before the TCP handshake is done
        with pytest.raises(http.ConnectionClosed):
            await connecting
        release.set()
    assert up.connections == 2 and len(up.requests) <= 2


async def test_a_request_dropped_after_the_server_worked_on_it_is_not_sent_again():
    async def script(n, request, writer):
        if n == 2:
            await asyncio.sleep(http.RETRY_WITHIN_S + 0.2)  # long past a keep-alive race
            writer.close()
            return
        writer.write(ok())

    async with Upstream(script) as up:
        client = http.Client({})
        await (await client.request("POST", http.target(up.url), b'{"n":1}', timeouts=TIMEOUTS)).read()
        with pytest.raises(http.ConnectionClosed):
            await client.request("POST", http.target(up.url), b'{"n":2}', timeouts=TIMEOUTS)
        await client.aclose()
    assert [r.partition(b"\r\n\r\n")[2] for r in up.requests] == [b'{"n":1}', b'{"n":2}']


async def test_compression_edges_raw_deflate_a_cut_stream_and_an_unreadable_encoding():
    body = b'{"text":"' + b"abc " * 200 + b'"}'
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(body) + raw.flush()
    cut_gzip = gzip.compress(body)[:-20]

    async def script(n, request, writer):
        if n == 1:
            writer.write(ok(raw_deflate, "Content-Encoding: deflate"))
        elif n == 2:
            writer.write(ok(cut_gzip, "Content-Encoding: gzip"))
        else:
            writer.write(ok(b"\x1b\x00", "Content-Encoding: br"))

    async with Upstream(script) as up:
        client = http.Client({})
        assert await (await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)).read() == body
        with pytest.raises(http.ProtocolError, match="ended before"):
            await (await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)).read()
        with pytest.raises(http.ProtocolError, match="'br'"):  # at the request: no 200 to read first
            await client.request("GET", http.target(up.url), timeouts=TIMEOUTS)
        await client.aclose()
