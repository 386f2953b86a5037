"""Provider calls over real networks: a forward proxy (proxy.py), a CA made in the test (trustme),
trust settings, egress error kinds, redirects, dual stack. Every byte stays on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import pytest

from egress_servers import INTERNAL, authority, forward_proxy, free_port, pointed, tls_sim

from p402_tui.core.adapters import make_adapter
from p402_tui.core.config import ConfigFile, NetworkConfig, ProviderConfig, Settings
from p402_tui.core.errors import EgressFailedError
from p402_tui.core.hooks import RouteOptions
from p402_tui.core.types import ChatRequest
from p402_tui.providers import http
from p402_tui.providers.proxies import bypassed, proxy_for
from p402_tui.providers.proxied import ProxiedTransport
from p402_tui.providers.transport import transport_for
from p402_tui.runtime import Runtime

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-5-5", "google": "gemini-3.5-flash", "cohere": "command-r-08-2024"}


def ask(**fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "Say something about proxies."}], max_tokens=12, **fields)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("egress")


@pytest.fixture(scope="module")
def ca(folder):
    return authority(folder)


@pytest.fixture(scope="module")
def upstream(catalog, ca):
    with tls_sim(catalog, ca) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(folder):
    with forward_proxy(folder) as running:
        yield running


@pytest.fixture(scope="module")
def auth_proxy(folder):
    with forward_proxy(folder, auth="alice:s3cret") as running:
        yield running


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def settings(catalog, env: dict[str, str], host: str, port: int, **network) -> Settings:
    return pointed(Settings(ConfigFile(network=NetworkConfig(**network)), catalog, env=env), host, port)


def adapter(settings: Settings, provider: str):
    resolved = settings.providers[provider]
    return make_adapter(resolved, transport_for(resolved, settings.network, settings.env))


async def test_all_four_families_answer_through_https_proxy_to_a_name_only_the_proxy_resolves(catalog, upstream, proxy, ca):
    port = port_of(upstream.url)
    # provider.internal is in no DNS (and asking would send a query off the machine): only the proxy resolves it.
    conf = settings(catalog, {"HTTPS_PROXY": proxy.url()}, INTERNAL, port, ca_bundle=str(ca.ca_pem))
    before = len(proxy.connects(f"{INTERNAL}:{port}"))
    for provider, model in MODELS.items():
        client = adapter(conf, provider)
        try:
            assert client.transport.route == f"proxy {proxy.shown}"
            answer = await client.complete(ask(), model=model)
            assert answer.content and answer.usage.completion_tokens > 0, provider
            parts = [chunk.content async for chunk in client.stream(ask(), model=model) if chunk.content]
            assert "".join(parts), provider
        finally:
            await client.aclose()
    await asyncio.sleep(0.3)  # the proxy writes its access line as a tunnel closes
    assert len(proxy.connects(f"{INTERNAL}:{port}")) > before


async def test_no_proxy_bypasses_and_without_it_the_same_call_tunnels(catalog, upstream, proxy, ca):
    port = port_of(upstream.url)
    env = {"https_proxy": proxy.url(), "NO_PROXY": "localhost,127.0.0.0/8"}
    direct = adapter(settings(catalog, env, "127.0.0.1", port, ca_bundle=str(ca.ca_pem)), "openai")
    proxied = adapter(settings(catalog, {"https_proxy": proxy.url()}, "127.0.0.1", port, ca_bundle=str(ca.ca_pem)), "openai")
    try:
        assert direct.transport.route == "direct" and isinstance(direct.transport, http.Client)
        assert (await direct.complete(ask(), model="gpt-4o-mini")).content
        assert proxied.transport.route == f"proxy {proxy.shown}"
        assert (await proxied.complete(ask(), model="gpt-4o-mini")).content
    finally:
        await direct.aclose()
        await proxied.aclose()
    await asyncio.sleep(0.3)
    assert len(proxy.connects(f"127.0.0.1:{port}")) == 1  # the proxied call only


async def test_an_https_proxy_goes_through_httpx_tls_to_the_proxy_then_to_the_provider(catalog, upstream, folder, ca):
    port = port_of(upstream.url)
    with forward_proxy(folder, tls=ca) as secure:
        conf = settings(catalog, {"HTTPS_PROXY": secure.url()}, INTERNAL, port, ca_bundle=str(ca.ca_pem))
        for provider, model in (("openai", MODELS["openai"]), ("google", MODELS["google"])):
            client = adapter(conf, provider)
            try:
                assert isinstance(client.transport, ProxiedTransport) and client.transport.route == f"proxy {secure.shown}"
                assert (await client.complete(ask(), model=model)).content
                assert "".join([c.content async for c in client.stream(ask(), model=model) if c.content])
            finally:
                await client.aclose()
        await asyncio.sleep(0.3)
        assert secure.connects(f"{INTERNAL}:{port}")


async def test_plain_http_goes_to_the_proxy_in_absolute_form_with_its_credentials(catalog, auth_proxy):
    from egress_servers import threaded_sim

    with threaded_sim(catalog) as plain:
        port = port_of(plain.url)
        base = Settings(ConfigFile(), catalog, env={"HTTP_PROXY": auth_proxy.url()})
        conf = pointed(base, INTERNAL, port)
        for pid, provider in conf.providers.items():
            conf.providers[pid] = dataclasses.replace(provider, base_url=provider.base_url.replace("https://", "http://"))
        good = adapter(conf, "anthropic")
        bad = make_adapter(conf.providers["anthropic"], transport_for(
            conf.providers["anthropic"], NetworkConfig(proxy=auth_proxy.url("alice:wrong")), {}))
        try:
            assert (await good.complete(ask(), model=MODELS["anthropic"])).content
            with pytest.raises(Exception) as caught:
                await bad.complete(ask(), model=MODELS["anthropic"])
        finally:
            await good.aclose()
            await bad.aclose()
    assert caught.value.kind == "proxy" and caught.value.status == 407 and auth_proxy.shown in caught.value.message
    await asyncio.sleep(0.3)
    assert [line for line in auth_proxy.lines() if f"POST {INTERNAL}:{port}/anthropic/v1/messages - 200" in line]


async def test_proxy_credentials_are_sent_and_a_wrong_password_is_a_clear_407(catalog, upstream, auth_proxy, ca):
    port = port_of(upstream.url)
    good = adapter(settings(catalog, {"HTTPS_PROXY": auth_proxy.url()}, INTERNAL, port, ca_bundle=str(ca.ca_pem)), "openai")
    bad = adapter(settings(catalog, {}, INTERNAL, port, ca_bundle=str(ca.ca_pem), proxy=auth_proxy.url("alice:wrong")), "openai")
    try:
        assert (await good.complete(ask(), model="gpt-4o-mini")).content
        with pytest.raises(Exception) as caught:
            await bad.complete(ask(), model="gpt-4o-mini")
    finally:
        await good.aclose()
        await bad.aclose()
    error = caught.value
    assert error.kind == "proxy" and error.status == 407 and error.proxy == auth_proxy.shown
    assert f"the proxy at {auth_proxy.shown} refused the tunnel: 407" in error.message
    assert "wrong" not in str(error)  # the password is never shown


async def test_a_tunnel_the_proxy_cannot_open_is_its_502_naming_the_proxy(catalog, proxy, ca):
    closed = free_port()
    client = adapter(settings(catalog, {"HTTPS_PROXY": proxy.url()}, INTERNAL, closed, ca_bundle=str(ca.ca_pem)), "openai")
    try:
        with pytest.raises(Exception) as caught:
            await client.complete(ask(), model="gpt-4o-mini")
    finally:
        await client.aclose()
    assert caught.value.kind == "proxy" and caught.value.status == 502
    assert f"the proxy at {proxy.shown}" in caught.value.message


async def test_an_untrusted_ca_is_refused_and_ssl_cert_file_or_ca_bundle_trusts_it(catalog, upstream, proxy, ca):
    port = port_of(upstream.url)
    refused = adapter(settings(catalog, {}, "127.0.0.1", port), "anthropic")
    through = adapter(settings(catalog, {"HTTPS_PROXY": proxy.url()}, INTERNAL, port), "anthropic")
    by_env = adapter(settings(catalog, {"SSL_CERT_FILE": str(ca.ca_pem)}, "127.0.0.1", port), "anthropic")
    by_config = adapter(settings(catalog, {}, "127.0.0.1", port, ca_bundle=str(ca.ca_pem)), "anthropic")
    try:
        for client, host in ((refused, "127.0.0.1"), (through, INTERNAL)):
            with pytest.raises(Exception) as caught:
                await client.complete(ask(), model="claude-haiku-5-5")
            assert caught.value.kind == "tls", caught.value
            assert f"the certificate of {host} is not trusted" in caught.value.message
        assert (await by_env.complete(ask(), model="claude-haiku-5-5")).content
        assert (await by_config.complete(ask(), model="claude-haiku-5-5")).content
    finally:
        for client in (refused, through, by_env, by_config):
            await client.aclose()


async def test_dns_failure_and_refused_connection_are_their_own_kinds(catalog):
    # A name too long for DNS fails in the resolver itself: no query leaves the machine.
    long_name = ".".join(["a" * 60] * 5) + ".example"
    conf = Settings(ConfigFile(), catalog, env={})
    for host, port, kind, words in ((long_name, 443, "dns", "does not resolve"),
                                    ("127.0.0.1", free_port(), "connection_refused", "refused the connection")):  # fmt: skip
        client = adapter(pointed(conf, host, port), "openai")
        try:
            with pytest.raises(Exception) as caught:
                await client.complete(ask(), model="gpt-4o-mini")
        finally:
            await client.aclose()
        assert caught.value.kind == kind and words in caught.value.message


async def test_every_provider_failing_at_one_proxy_is_said_once_and_marks_none_down(catalog, upstream, auth_proxy, ca):
    port = port_of(upstream.url)
    conf = settings(catalog, {"HTTPS_PROXY": auth_proxy.url("alice:wrong")}, INTERNAL, port, ca_bundle=str(ca.ca_pem))
    async with Runtime.open(conf, persist=False) as runtime:
        with pytest.raises(EgressFailedError) as caught:
            await runtime.orchestrator.complete(ask(), RouteOptions(max_retries=5))
        error = caught.value
        assert error.http_status == 502 and error.reason == "proxy" and len(error.attempts) > 1
        assert error.message.startswith("every provider failed for the same local reason: the proxy at ")
        health = runtime.orchestrator.health
        assert not any(health.blocked(a.provider) for a in error.attempts)
        for attempt in error.attempts:  # the health pane paints nobody red for one broken proxy
            shown = health.provider(attempt.provider)
            assert shown.failures == 0 and shown.last_error is None and shown.status == "healthy", shown


def test_no_proxy_entries_match_as_curl_reads_them():
    cases = {
        ("api.openai.com", 443, "*"): True,
        ("api.openai.com", 443, "openai.com"): True,  # a name covers its subdomains
        ("api.openai.com", 443, ".openai.com"): True,
        ("openai.com", 443, ".openai.com"): True,
        ("notopenai.com", 443, "openai.com"): False,
        ("llm.corp.example", 8080, "llm.corp.example:8080"): True,
        ("llm.corp.example", 443, "llm.corp.example:8080"): False,
        ("10.1.2.3", 443, "10.0.0.0/8"): True,
        ("10.1.2.3", 443, "10.1.2.3"): True,
        ("11.1.2.3", 443, "10.0.0.0/8"): False,
        ("::1", 443, "::1"): True,
        ("fd00::5", 443, "fd00::/8"): True,
        ("10.1.2.3", 443, "example.com, 10.1.2.3 "): True,
    }
    for (host, port, entries), expected in cases.items():
        assert bypassed(host, port, entries.split(",")) is expected, (host, port, entries)


def test_config_overrides_the_environment_and_a_provider_its_network(catalog):
    env = {"HTTPS_PROXY": "http://env-proxy:3128", "no_proxy": "example.com"}
    conf = Settings(ConfigFile(network=NetworkConfig(proxy="http://u:p@net-proxy:8080")), catalog, env=env)
    assert proxy_for(conf.providers["openai"], conf.network, env).shown == "http://net-proxy:8080"
    assert proxy_for(conf.providers["openai"], conf.network, env).username == "u"
    assert proxy_for(conf.providers["openai"], NetworkConfig(), env).shown == "http://env-proxy:3128"
    assert proxy_for(conf.providers["openai"], NetworkConfig(), {"ALL_PROXY": "corp:3128"}).shown == "http://corp:3128"
    assert proxy_for(conf.providers["openai"], NetworkConfig(proxy=""), env) is None
    assert proxy_for(conf.providers["openai"], NetworkConfig(no_proxy=["openai.com"]), env) is None
    own = Settings(ConfigFile(providers={"openai": ProviderConfig(proxy="http://own:1")}), catalog, env=env)
    assert proxy_for(own.providers["openai"], NetworkConfig(proxy="http://net:2"), env).shown == "http://own:1"
    bare = Settings(ConfigFile(providers={"openai": ProviderConfig(no_proxy=["*"])}), catalog, env=env)
    assert proxy_for(bare.providers["openai"], conf.network, env) is None


def test_a_socks_proxy_is_refused_in_one_line(catalog):
    conf = Settings(ConfigFile(network=NetworkConfig(proxy="socks5://127.0.0.1:1080")), catalog, env={})
    with pytest.raises(Exception, match=r"\[network\] proxy: proxy socks5:// is not supported"):
        proxy_for(conf.providers["openai"], conf.network, {})


async def test_a_redirect_is_an_error_naming_status_and_location(catalog):
    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://api.example.com/v1/chat\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conf = Settings(ConfigFile(), catalog, env={}).point_at(f"http://127.0.0.1:{port}")
        client = make_adapter(conf.providers["openai"])
        try:
            with pytest.raises(Exception) as caught:
                await client.complete(ask(), model="gpt-4o-mini")
            streamed = client.stream(ask(), model="gpt-4o-mini")
            with pytest.raises(Exception) as in_stream:
                await anext(streamed)
        finally:
            await client.aclose()
    finally:
        server.close()
    for error in (caught.value, in_stream.value):
        assert error.kind == "redirect" and error.status == 301
        assert "301 redirect to https://api.example.com/v1/chat" in error.message


async def test_a_dead_ipv6_address_costs_the_happy_eyeballs_delay_not_the_connect_timeout():
    # ::1 with a full accept queue drops every SYN: a route that swallows packets. IPv4 answers.
    dead = socket.socket(socket.AF_INET6)
    try:
        dead.bind(("::1", 0))
    except OSError:
        dead.close()
        pytest.skip("this machine has no IPv6 loopback (::1)")
    dead.listen(0)
    port = dead.getsockname()[1]
    filler = socket.socket(socket.AF_INET6)
    filler.connect(("::1", port))  # fills the queue

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", port)

    async def both_families(host: str, port: int):
        assert host == "dual.example"
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]  # fmt: skip

    client = http.Client(connect_timeout=5.0, resolve=both_families)
    try:
        started = time.perf_counter()
        response = await client.request(
            "GET", http.target(f"http://dual.example:{port}/"), timeouts=http.Timeouts(connect=5.0, read=5.0)
        )
        assert await response.read() == b"ok"
        assert time.perf_counter() - started < 1.5  # 0.25 s of head start for IPv6, then IPv4 wins
    finally:
        await client.aclose()
        server.close()
        filler.close()
        dead.close()


async def test_verification_off_is_said_at_start_up_in_one_line(catalog, capsys):
    conf = Settings(ConfigFile(network=NetworkConfig(verify=False)), catalog, env={})
    async with Runtime.open(conf, persist=False):
        pass
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == ["p402: WARNING: TLS verification is OFF ([network] verify = false): any server can pose as a provider"]


def test_the_sdks_variable_names_are_read(catalog):
    def resolved(env):
        return Settings(ConfigFile(), catalog, env=env).providers

    assert resolved({"GOOGLE_API_KEY": "g1", "GEMINI_API_KEY": "g2"})["google"].key() == "g1"  # google-genai's order
    assert resolved({"GEMINI_API_KEY": "g2"})["google"].key() == "g2"
    assert resolved({"CO_API_KEY": "c1", "COHERE_API_KEY": "c2"})["cohere"].key() == "c1"
    assert resolved({"COHERE_API_KEY": "c2"})["cohere"].key() == "c2"
    urls = resolved({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    assert (urls["openai"].base_url, urls["anthropic"].base_url) == ("http://127.0.0.1:9/v1", "http://127.0.0.1:9")
    ours = resolved({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "P402_OPENAI_BASE_URL": "http://127.0.0.1:8/v1"})
    assert ours["openai"].base_url == "http://127.0.0.1:8/v1"


def test_the_readme_lists_every_providers_variables(catalog):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for provider in catalog.providers.values():
        for name in [*provider.api_key_env, *provider.base_url_env, f"P402_{provider.id.upper()}_BASE_URL"]:
            assert f"`{name}`" in readme, name


async def test_the_gateway_502_says_the_one_local_reason(catalog, upstream, auth_proxy, ca):
    import httpx

    port = port_of(upstream.url)
    conf = settings(catalog, {"HTTPS_PROXY": auth_proxy.url("alice:wrong")}, INTERNAL, port, ca_bundle=str(ca.ca_pem))
    async with Runtime.open(conf, persist=False) as runtime:
        gateway = await runtime.serve_gateway(port=0)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "egress_failed"
    assert error["message"].startswith(f"every provider failed for the same local reason: the proxy at {auth_proxy.shown}")
    assert "wrong" not in answer.text


def test_the_cli_says_the_one_local_reason_in_one_line(upstream, auth_proxy, ca, tmp_path, monkeypatch, capsys):
    from p402_tui.cli import main

    port = port_of(upstream.url)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[network]\nproxy = "{auth_proxy.url("alice:wrong")}"\nca_bundle = "{ca.ca_pem}"\n'
        + "".join(f'[providers.{pid}]\napi_key = "sim-key"\nbase_url = "https://{INTERNAL}:{port}/{pid}{path}"\n'
                  for pid, path in (("openai", "/v1"), ("anthropic", ""), ("cohere", "")))
    )  # fmt: skip
    monkeypatch.setenv("P402_CONFIG", str(config))
    code = main(["chat", "--no-cache", "--db", str(tmp_path / "db.sqlite"), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith(f"p402: egress_failed: every provider failed for the same local reason: the proxy at {auth_proxy.shown}")


async def test_ssl_cert_dir_trusts_a_hashed_folder_and_certifi_backs_a_missing_os_store(catalog, upstream, ca, tmp_path, monkeypatch):
    import shutil
    import ssl
    import subprocess

    from p402_tui.providers import trust

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (it names the hashed file SSL_CERT_DIR wants)")
    digest = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", str(ca.ca_pem)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    folder = tmp_path / "certs"
    folder.mkdir()
    shutil.copy(ca.ca_pem, folder / f"{digest}.0")
    client = adapter(settings(catalog, {"SSL_CERT_DIR": str(folder)}, "127.0.0.1", port_of(upstream.url)), "cohere")
    try:
        assert (await client.complete(ask(), model=MODELS["cohere"])).content
    finally:
        await client.aclose()
    # No OpenSSL default paths and none of the distributions' bundle files: certifi's bundle is the trust.
    empty = ssl.DefaultVerifyPaths(None, None, "/nonexistent/cert.pem", "", "/nonexistent/certs", "")
    monkeypatch.setattr(trust.ssl, "get_default_verify_paths", lambda: empty)
    monkeypatch.setattr(trust, "_CA_FILES", ("/nonexistent/ca-certificates.crt",))
    monkeypatch.setattr(trust.sys, "platform", "linux")
    assert trust._os_store() is None
    assert trust.trust_source(NetworkConfig(), {}) == "certifi's bundle"
    import certifi

    fallback = trust._context.__wrapped__(None, True, None, None)  # uncached: built under the patched paths
    assert len(fallback.get_ca_certs()) == len(ssl.create_default_context(cafile=certifi.where()).get_ca_certs()) > 50
