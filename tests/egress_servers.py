"""Real network pieces for the egress tests, all on loopback: a forward proxy (proxy.py, run as
a subprocess), a CA made in the test (trustme) and the simulator served over TLS with its certificate."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr

from p402_tui.core.config import Settings
from p402_tui.sim.server import RunningSim, start_sim

HERE = Path(__file__).parent
INTERNAL = "provider.internal"  # resolves nowhere but at the test proxy (proxy_plugin.LoopbackNames)


def need(module: str) -> None:
    """Skip with one line when a real component is missing; in CI (.ci/run sets CI) it is a failure."""
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ForwardProxy:
    port: int
    log: Path
    auth: str | None
    scheme: str = "http"

    def url(self, auth: str | None = None) -> str:
        credentials = auth if auth is not None else self.auth
        return f"{self.scheme}://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    @property
    def shown(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def connects(self, host: str) -> list[str]:
        return [line for line in self.lines() if f"CONNECT {host}" in line]


@contextmanager
def forward_proxy(folder: Path, *, auth: str | None = None, tls: Authority | None = None) -> Iterator[ForwardProxy]:
    """proxy.py on a free loopback port, its access log in `folder`; with `tls`, an https:// proxy."""
    need("proxy")
    port = free_port()
    log = folder / f"proxy-{port}.log"
    command = [
        sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port), "--num-workers", "1",
        "--num-acceptors", "1", "--plugins", "proxy_plugin.LoopbackNames", "--log-file", str(log),
    ]  # fmt: skip
    if auth:
        command += ["--basic-auth", auth]
    if tls:
        command += ["--cert-file", str(tls.cert), "--key-file", str(tls.key)]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        env.pop(name, None)
    process = subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"proxy.py did not start: {log.read_text() if log.exists() else ''}") from None
                time.sleep(0.1)
        yield ForwardProxy(port, log, auth, "https" if tls else "http")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclasses.dataclass
class Authority:
    ca_pem: Path  # the test CA's certificate: what ca_bundle / SSL_CERT_FILE point at
    cert: Path
    key: Path


def authority(folder: Path) -> Authority:
    need("trustme")
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(INTERNAL, "127.0.0.1")
    paths = Authority(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca_pem))
    server.private_key_pem.write_to_path(str(paths.key))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    for extra in server.cert_chain_pems[1:]:
        paths.cert.write_bytes(paths.cert.read_bytes() + extra.bytes())
    return paths


@contextmanager
def tls_sim(catalog, ca: Authority, **options) -> Iterator[RunningSim]:
    """The simulator over HTTPS with the test CA's certificate, served from its own thread."""
    with threaded_sim(catalog, tls=(str(ca.cert), str(ca.key)), **options) as running:
        yield running


@contextmanager
def threaded_sim(catalog, **options) -> Iterator[RunningSim]:
    """A latency-free simulator (`start_sim`'s options) served from its own thread."""
    started = threading.Event()
    holder: dict = {}

    def serve() -> None:
        async def main() -> None:
            try:
                holder["sim"] = await start_sim(catalog, latency=False, **options)
            finally:
                holder["loop"] = asyncio.get_running_loop()
                started.set()
            await holder["sim"].task

        asyncio.run(main())

    thread = threading.Thread(target=serve, name="threaded-sim", daemon=True)
    thread.start()
    started.wait(30)
    if "sim" not in holder:
        raise RuntimeError("the simulator did not start")
    try:
        yield holder["sim"]
    finally:
        holder["loop"].call_soon_threadsafe(setattr, holder["sim"].server, "should_exit", True)
        thread.join(10)


def pointed(settings: Settings, host: str, port: int, *, key: str = "sim-key") -> Settings:
    """Every provider at https://host:port/<id><official path>, as `point_at` does, but keeping
    the proxy settings in force (point_at makes the in-process simulator always direct)."""
    for pid, provider in list(settings.providers.items()):
        settings.providers[pid] = dataclasses.replace(
            provider,
            base_url=f"https://{host}:{port}/{pid}{provider.spec.base_path}",
            api_key=provider.api_key if provider.spec.keyless else SecretStr(key),
        )
    return settings
