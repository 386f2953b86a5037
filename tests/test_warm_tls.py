"""The TLS context provider connections use is built before the gateway serves, on a thread: loading a
trust store holds the GIL for tens of ms, and the first upstream call built it on the event loop."""

from __future__ import annotations

import functools
import threading

import pytest
from egress_servers import authority, pointed, tls_sim

from p402_tui.core.config import ConfigFile, NetworkConfig, Settings
from p402_tui.providers import trust
from p402_tui.runtime import Runtime


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return authority(tmp_path_factory.mktemp("warm-tls"))


@pytest.fixture(scope="module")
def upstream(catalog, ca):
    with tls_sim(catalog, ca) as running:
        yield running


async def test_the_context_is_built_on_a_thread_before_the_first_request(catalog, upstream, ca, monkeypatch):
    import httpx

    built: list[str] = []
    original = trust._context.__wrapped__

    @functools.cache
    def recording(*args):
        built.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(trust, "_context", recording)
    port = int(upstream.url.rsplit(":", 1)[1])
    conf = pointed(Settings(ConfigFile(network=NetworkConfig(ca_bundle=str(ca.ca_pem))), catalog, env={}), "127.0.0.1", port)
    loop_thread = threading.current_thread().name
    async with Runtime.open(conf, persist=False) as runtime:
        gateway = await runtime.serve_gateway(port=0)
        assert len(built) == 1 and built[0] != loop_thread  # before any request, off the loop
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json={
                "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert answer.status_code == 200, answer.text  # over TLS, trusting the bundle: the context warmed is the one used
    assert len(built) == 1
