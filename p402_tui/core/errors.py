"""One small error hierarchy for everything that can go wrong on the way to a model.

Each upstream error says whether trying again elsewhere can help (`retryable`) and
whether the fault lies with the whole provider or only one model (`scope`), which
is what failover needs to know. Messages keep the provider's words, never a key.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Scope = Literal["provider", "model", "request"]

# Anything that looks like an API key is masked before a message is kept.
_KEYISH = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{10,}|(?<=key=)[^&\s\"']+|[Bb]earer\s+[^\s\"']+)")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEYISH.sub("***", text)


class P402Error(Exception):
    """Base of every error P402 raises on purpose. `kind` is a stable short name."""

    kind = "error"
    http_status = 500
    retryable = False
    scope: Scope = "request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


# --- Upstream (provider) errors -------------------------------------------------


class ProviderError(P402Error):
    """An upstream call failed."""

    kind = "provider_error"
    http_status = 502
    retryable = True
    scope: Scope = "provider"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status = status
        self.retry_after_s = retry_after_s
        self.body = body

    def __str__(self) -> str:
        where = f"{self.provider}/{self.model}" if self.model else self.provider
        status = f" {self.status}" if self.status else ""
        return f"{self.kind}{status} from {where or 'upstream'}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "retry_after_s": self.retry_after_s,
        }


class AuthenticationError(ProviderError):
    kind = "authentication"
    retryable = False  # another provider may still work, see orchestrator; the same one will not


class BadRequestError(ProviderError):
    kind = "bad_request"
    http_status = 400
    retryable = False
    scope: Scope = "request"


class ContentFilterError(BadRequestError):
    """The provider's content filter refused the prompt or stopped the answer (Azure OpenAI): asking again will not help."""

    kind = "content_filter"


class ContextLengthError(BadRequestError):
    """The prompt does not fit this model; a larger model may take it."""

    kind = "context_length"
    retryable = True
    scope: Scope = "model"


class ModelNotFoundError(ProviderError):
    kind = "model_not_found"
    http_status = 404
    retryable = True
    scope: Scope = "model"


class RateLimitError(ProviderError):
    kind = "rate_limited"
    http_status = 429


class ServerError(ProviderError):
    kind = "server_error"


class OverloadedError(ServerError):
    kind = "overloaded"


class TimeoutError(ProviderError):  # noqa: A001 - deliberately our own name inside this hierarchy
    """`phase` is connect, first_token or read."""

    kind = "timeout"
    http_status = 504

    def __init__(self, message: str, *, phase: str = "read", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.phase = phase


class ConnectionLostError(ProviderError):
    """`phase` is connect (no connection made: refused, name unknown, certificate refused) or read (closed before
    the answer)."""

    kind = "connection"

    def __init__(self, message: str, *, phase: str = "read", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.phase = phase


class DnsError(ConnectionLostError):
    """The provider's host name did not resolve."""

    kind = "dns"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, phase="connect", **kw)


class ConnectionRefusedError(ConnectionLostError):  # noqa: A001 - ours, as TimeoutError above
    kind = "connection_refused"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, phase="connect", **kw)


class TlsError(ConnectionLostError):
    """The provider's certificate was not trusted, or the TLS handshake failed."""

    kind = "tls"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, phase="connect", **kw)


class ProxyError(ConnectionLostError):
    """The forward proxy refused the tunnel or the request, or could not be reached: a fault on our side
    of the network, not the provider's, so it counts against no provider's health."""

    kind = "proxy"

    def __init__(self, message: str, *, proxy: str = "", **kw: Any) -> None:
        super().__init__(message, phase="connect", **kw)
        self.proxy = proxy


class RedirectError(ProviderError):
    """A 3xx: provider APIs do not redirect, so the base URL is wrong (or something between rewrites it)."""

    kind = "redirect"
    retryable = True


# Failures that, shared by every attempt of a request, point at this machine's network, not the providers.
LOCAL_KINDS = frozenset({"proxy", "dns", "tls"})


class StreamInterruptedError(ProviderError):
    """The stream broke or sent garbage after it had started."""

    kind = "stream_interrupted"


class MalformedResponseError(ProviderError):
    kind = "malformed_response"


def error_for_status(status: int, message: str, *, context_length: bool = False, **kw: Any) -> ProviderError:
    """The error class an HTTP status stands for."""
    if status in (401, 403):
        return AuthenticationError(message, status=status, **kw)
    if status == 404:
        return ModelNotFoundError(message, status=status, **kw)
    if status == 429:
        return RateLimitError(message, status=status, **kw)
    if status == 529:
        return OverloadedError(message, status=status, **kw)
    if status in (408, 504):
        return TimeoutError(message, status=status, **kw)
    if status >= 500:
        return ServerError(message, status=status, **kw)
    if context_length:
        return ContextLengthError(message, status=status, **kw)
    return BadRequestError(message, status=status, **kw)


# --- P402's own refusals ------------------------------------------------------


class ConfigError(P402Error):
    kind = "config"
    http_status = 500


class CatalogError(P402Error):
    kind = "catalog"
    http_status = 500


class UnknownModelError(P402Error):
    kind = "model_not_found"
    http_status = 404


class InvalidRequestError(P402Error):
    """A routing option we cannot honour as given: an unknown mode, capability, tier or provider."""

    kind = "invalid_request"
    http_status = 400


class NoEligibleModelError(P402Error):
    kind = "no_eligible_model"
    http_status = 400


class BudgetExceededError(P402Error):
    kind = "budget_exceeded"
    http_status = 402


class DeadlineExceededError(P402Error):
    """The request's total deadline passed, whatever attempt was under way."""

    kind = "deadline_exceeded"
    http_status = 504


class AllAttemptsFailedError(P402Error):
    """Every candidate failed; `attempts` lists each try and its error."""

    kind = "upstream_failed"
    http_status = 502

    def __init__(self, message: str, attempts: list[Any], last: ProviderError | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last = last


class EgressFailedError(AllAttemptsFailedError):
    """Every attempt failed for one reason on this machine's side (a proxy refusing, no DNS, a TLS
    interceptor nobody trusts): said once, as that reason, rather than as twelve providers down."""

    kind = "egress_failed"
    http_status = 502

    def __init__(self, message: str, attempts: list[Any], last: ProviderError | None = None, *, reason: str) -> None:
        super().__init__(message, attempts, last)
        self.reason = reason  # the shared error kind: proxy, dns or tls


class UnavailableError(AllAttemptsFailedError):
    """No candidate can answer now: each is ejected, throttled, or just failed. Worth retrying after `retry_after_s`.

    Not the caller's fault, so never a 4xx: a 503 that clients and SDKs retry.
    """

    kind = "overloaded"
    http_status = 503
    retryable = True

    def __init__(
        self, message: str, attempts: list[Any], last: ProviderError | None = None, *, retry_after_s: float
    ) -> None:
        super().__init__(message, attempts, last)
        self.retry_after_s = retry_after_s
