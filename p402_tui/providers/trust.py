"""The certificates provider connections trust.

`SSL_CERT_FILE` / `SSL_CERT_DIR`, when set, are the trust (as OpenSSL, curl and Python read
them); otherwise the OS trust store, as pip reads it (truststore), so a company root CA
installed with update-ca-certificates counts; certifi's bundle where the OS store cannot be
read. `[network] ca_bundle` adds a bundle to either. Verification is off only when the
config says `verify = false`, and `insecure_warning` then gives the line start-up prints.
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
from collections.abc import Mapping

from ..core.config import NetworkConfig
from ..core.errors import ConfigError


def tls_context_for(network: NetworkConfig, env: Mapping[str, str]) -> ssl.SSLContext:
    """The context for these settings, built once per distinct trust (loading a store takes tens of ms)."""
    return _context(
        network.ca_bundle, network.verify, env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
    )


def trust_source(network: NetworkConfig, env: Mapping[str, str]) -> str:
    """Where trust comes from, in a few words (for `p402 doctor`)."""
    if not network.verify:
        return "none: verification is off"
    cert_file, cert_dir = env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR")
    base = " + ".join(f"{n}={v}" for n, v in (("SSL_CERT_FILE", cert_file), ("SSL_CERT_DIR", cert_dir)) if v)
    base = base or ("the OS trust store" if _os_store_readable() else "certifi's bundle")
    return f"{base} + ca_bundle {network.ca_bundle}" if network.ca_bundle else base


def insecure_warning(network: NetworkConfig) -> str | None:
    if network.verify:
        return None
    return "p402: WARNING: TLS verification is OFF ([network] verify = false): any server can pose as a provider"


@functools.cache
def _context(ca_bundle: str | None, verify: bool, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    if cert_file or cert_dir:
        try:
            context = ssl.create_default_context(cafile=cert_file, capath=cert_dir)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"SSL_CERT_FILE / SSL_CERT_DIR cannot be read: {error}") from None
    else:
        context = _os_store() or _certifi()
    if ca_bundle:
        path = os.path.expanduser(ca_bundle)
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"[network] ca_bundle {ca_bundle!r} cannot be read as PEM certificates: {error}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# Where Linux distributions keep their CA bundle (truststore's list, after certifi-system-store).
_CA_FILES = (
    "/etc/ssl/cert.pem", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/etc/pki/tls/cert.pem",
    "/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/ca-bundle.pem",
)  # fmt: skip


def _os_store() -> ssl.SSLContext | None:
    """The OS trust store, or None where it cannot be read.

    macOS and Windows: truststore, which asks the system to verify. Elsewhere truststore only
    points OpenSSL at the distribution's CA files, and does so again on every handshake (60 ms,
    on the event loop): the same files are loaded here once instead.
    """
    if sys.platform in ("darwin", "win32"):
        import truststore

        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    paths = ssl.get_default_verify_paths()
    if paths.cafile or (paths.capath and any(name.endswith(".0") for name in os.listdir(paths.capath))):
        return ssl.create_default_context()
    for cafile in _CA_FILES:
        if os.path.isfile(cafile):
            return ssl.create_default_context(cafile=cafile)
    return None


def _os_store_readable() -> bool:
    return sys.platform in ("darwin", "win32") or _os_store() is not None


def _certifi() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
