"""Which forward proxy, if any, a provider's calls go through.

Read as curl and `urllib.request.getproxies()` read it: `https_proxy` for https URLs,
`http_proxy` for http ones, `all_proxy` for both, each in lower or upper case (lower
first), and `no_proxy` for the exceptions. The config's `proxy` / `no_proxy` (a
provider's own, else `[network]`'s) override the environment's.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..core.config import NetworkConfig, ResolvedProvider
from ..core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Proxy:
    url: str  # as given, credentials included: what the transport dials
    shown: str  # scheme://host:port, no credentials: what messages and `p402 doctor` say
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        return f"Proxy({self.shown})"

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def authorization(self) -> str:
        """The Proxy-Authorization value for the URL's credentials ("" without any)."""
        if not (self.username or self.password):
            return ""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


def parse_proxy(value: str, where: str) -> Proxy:
    """A proxy URL (`host:port` means http://); SOCKS and other schemes are refused."""
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: proxy {parts.scheme}:// is not supported; use an http:// or https:// proxy")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where}: proxy {_hide(text)!r} has no valid port") from None
    if not parts.hostname:
        raise ConfigError(f"{where}: proxy {_hide(text)!r} names no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Proxy(
        text, f"{parts.scheme}://{host}:{port}", unquote(parts.username or ""), unquote(parts.password or "")
    )


def proxy_for(provider: ResolvedProvider, network: NetworkConfig, env: Mapping[str, str]) -> Proxy | None:
    """The proxy `provider`'s base URL is reached through, or None for a direct connection."""
    parts = urlsplit(provider.base_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if provider.proxy is not None:
        value, where = provider.proxy, f"[providers.{provider.id}] proxy"
    elif network.proxy is not None:
        value, where = network.proxy, "[network] proxy"
    else:
        names = (f"{parts.scheme}_proxy", "all_proxy")
        value, where = next(((v, n) for n in names for v in (_env(env, n),) if v), ("", ""))
    if not value:
        return None
    exceptions = provider.no_proxy if provider.no_proxy is not None else network.no_proxy
    if exceptions is None:
        exceptions = [e for e in _env(env, "no_proxy").split(",")]
    if bypassed(host, port, exceptions):
        return None
    return parse_proxy(value, where)


def bypassed(host: str, port: int, entries: Iterable[str]) -> bool:
    """True when `host:port` matches a no_proxy entry: `*`, a name (and its subdomains), `.suffix`,
    `name:port`, an IP address or a CIDR range."""
    host = host.strip("[]").lower().rstrip(".")
    address = _address(host)
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, want_port = _split_port(entry)
        if want_port is not None and want_port != port:
            continue
        name = name.strip("[]").rstrip(".")
        if address is not None or _address(name) is not None:
            if address is not None and address == _address(name):
                return True
            continue
        suffix = name.lstrip(".")
        if host == suffix or host.endswith("." + suffix):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _env(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or env.get(name.upper()) or "").strip()


def _hide(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f"{parts.username}:{parts.password}@", "***@") if parts.password else url
