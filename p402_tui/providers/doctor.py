"""`p402 doctor`: each configured provider's way out, step by step, with the fix for what fails.

For every usable provider: the route (direct, or which proxy), DNS, the TCP connection (to
the provider, or to the proxy and its CONNECT tunnel), TLS (the issuer of the certificate
seen, checked against the trust in force), and one cheap authenticated call (the model list
where the provider has one, through the transport real calls take). It talks only to the
configured base URLs and proxies.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..core.adapters import make_adapter
from ..core.config import NetworkConfig, ResolvedProvider, Settings
from ..core.errors import ProviderError
from . import http
from .proxies import Proxy, proxy_for
from .transport import transport_for
from .trust import tls_context_for

STEP_TIMEOUT_S = 10.0


@dataclass
class Step:
    name: str  # route | dns | tcp | tls | auth
    ok: bool | None  # None: not applicable or not reached
    detail: str = ""
    ms: float | None = None


@dataclass
class Checkup:
    provider: str
    base_url: str
    route: str
    steps: list[Step] = field(default_factory=list)
    verdict: str = "ok"  # ok | failed
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def diagnose(settings: Settings, providers: list[str] | None = None) -> list[Checkup]:
    """A checkup of each usable provider (or the ones named), run side by side."""
    chosen = [p for p in settings.usable_providers() if providers is None or p.id in providers]
    env = dict(settings.env)
    return list(await asyncio.gather(*(_checkup(p, settings.network, env) for p in chosen)))


async def _checkup(provider: ResolvedProvider, network: NetworkConfig, env: Mapping[str, str]) -> Checkup:
    parts = urlsplit(provider.base_url)
    host, scheme = parts.hostname or "", parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        proxy = proxy_for(provider, network, env)
        tls = tls_context_for(network, env)
    except Exception as error:  # a config the transport cannot be built from: that is the finding
        up = Checkup(provider.id, provider.base_url, "?", [Step("route", False, str(error))], "failed")
        up.fix = "fix the [network] / proxy settings named above"
        return up
    up = Checkup(provider.id, provider.base_url, "direct" if proxy is None else f"proxy {proxy.shown}")
    up.steps.append(Step("route", True, up.route))
    dial_host, dial_port = (host, port) if proxy is None else _proxy_address(proxy)
    # DNS: the provider's name, or the proxy's (a proxy resolves the provider's name itself).
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            infos = await loop.getaddrinfo(dial_host, dial_port, type=socket.SOCK_STREAM)
        addresses = ", ".join(dict.fromkeys(str(info[4][0]) for info in infos))
        up.steps.append(Step("dns", True, f"{dial_host} -> {addresses}", _ms(start)))
    except (OSError, TimeoutError) as error:
        return _failed(up, Step("dns", False, f"{dial_host} does not resolve: {error}", _ms(start)),
                       "check the base_url's host name" if proxy is None else "check the proxy's host name; "
                       "if this network resolves names only through a proxy, set HTTPS_PROXY")  # fmt: skip
    start = time.perf_counter()
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            sock = await http._dial(loop, dial_host, dial_port, 0.25)
    except (OSError, TimeoutError) as error:
        where = f"{dial_host}:{dial_port}" + ("" if proxy is None else " (the proxy)")
        reason = "timed out" if isinstance(error, TimeoutError) else str(error)
        fix = ("is the proxy running, and is its address right?" if proxy is not None
               else "check the base_url's port, and any firewall; on a network that needs a proxy, set HTTPS_PROXY")
        return _failed(up, Step("tcp", False, f"no connection to {where}: {reason}", _ms(start)), fix)
    if proxy is not None and proxy.url.startswith("https://"):  # TLS to the proxy carries the rest: the call tells
        sock.close()
        up.steps.append(Step("tcp", True, f"{proxy.shown}", _ms(start)))
        up.steps.append(Step("tls", None, "inside the https proxy's own TLS: the call below checks it"))
        return await _call(up, provider, network, env)
    if proxy is not None and scheme == "https":
        try:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                via = http.ForwardProxy(dial_host, dial_port, proxy.shown, proxy.authorization)
                await http._open_tunnel(loop, sock, via, http.target(provider.base_url))
        except (OSError, TimeoutError) as error:
            sock.close()
            status = getattr(error, "status", None)
            detail = str(error) or f"the proxy at {proxy.shown} did not answer the tunnel request in time"
            return _failed(up, Step("tcp", False, detail, _ms(start)), _proxy_fix(status))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        if proxy is not None:
            up.steps.append(Step("tcp", True, f"{proxy.shown} tunnel to {host}:{port}" if scheme == "https"
                                 else f"{proxy.shown} (plain http: no tunnel)", _ms(start)))  # fmt: skip
        else:
            up.steps.append(Step("tcp", True, f"{host}:{port}", _ms(start)))
        if scheme != "https":
            up.steps.append(Step("tls", None, "plain http: no TLS"))
        else:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await writer.start_tls(tls, server_hostname=host)
            except ssl.SSLCertVerificationError as error:
                detail = f"the certificate of {host} is not trusted: {getattr(error, 'verify_message', None) or error}"
                return _failed(up, Step("tls", False, detail, _ms(start)),
                               "if your network inspects TLS, point [network] ca_bundle (or SSL_CERT_FILE) at its "
                               "root CA; otherwise something between you and the provider is posing as it")  # fmt: skip
            except (OSError, TimeoutError) as error:
                return _failed(up, Step("tls", False, f"TLS with {host} failed: {error}", _ms(start)),
                               "check that the base_url's port speaks https")  # fmt: skip
            up.steps.append(Step("tls", True, f"issued by {_issuer(writer)}", _ms(start)))
    finally:
        writer.close()
    return await _call(up, provider, network, env)


async def _call(up: Checkup, provider: ResolvedProvider, network: NetworkConfig, env: Mapping[str, str]) -> Checkup:
    """One cheap authenticated call, through the transport real calls take."""
    adapter = make_adapter(provider, transport_for(provider, network, env))
    start = time.perf_counter()
    try:
        async with asyncio.timeout(max(STEP_TIMEOUT_S, provider.timeout_s)):
            await adapter.list_models()
        up.steps.append(Step("auth", True, "models list answered", _ms(start)))
    except NotImplementedError:
        up.steps.append(Step("auth", None, "no models list to call"))
    except (ProviderError, TimeoutError) as error:
        kind = getattr(error, "kind", "timeout")
        message = getattr(error, "message", "no answer in time")
        fix = (f"check the key: {' or '.join(provider.spec.api_key_env) or 'api_key'} (or [providers.{provider.id}] "
               "api_key)") if kind == "authentication" else "see the error; `p402 chat --model` shows a full call"
        return _failed(up, Step("auth", False, f"{kind}: {message}", _ms(start)), fix)
    finally:
        await adapter.aclose()
    return up


def _proxy_address(proxy: Proxy) -> tuple[str, int]:
    parts = urlsplit(proxy.url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _proxy_fix(status: int | None) -> str:
    if status == 407:
        return "the proxy wants credentials: put them in the proxy URL, http://user:password@host:port"
    if status == 403:
        return "the proxy does not allow this host: ask for it, or list it in NO_PROXY if it is reachable directly"
    return "the proxy could not reach the provider: check the base_url, or the proxy's own network"


def _issuer(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert") or {}
    fields = dict(pair for rdn in cert.get("issuer", ()) for pair in rdn)
    return fields.get("organizationName") or fields.get("commonName") or "an unnamed issuer"


def _failed(up: Checkup, step: Step, fix: str) -> Checkup:
    up.steps.append(step)
    up.verdict = "failed"
    up.fix = fix
    return up


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
