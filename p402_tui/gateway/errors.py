"""Errors in OpenAI's shape, so every OpenAI client raises its own typed exception.

`{"error": {"message", "type", "param", "code"}}` with the status that names the
fault: the official SDKs pick their exception class from the status alone.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from ..core.errors import AllAttemptsFailedError, EgressFailedError, P402Error, ProviderError, UnavailableError

# OpenAI's error `type` for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
}


class _NoAnswer(Response):
    """What a request whose client left before its body came gets: nothing, as nobody would read it (its
    access line says status 0, as of any caller that left before an answer began). No error of ours."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


NO_ANSWER = _NoAnswer()


class GatewayError(Exception):
    """A refusal the gateway itself makes (bad body, no key, too large)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # a 503's Retry-After


# Our own refusals whose `type` says more than the status's: OpenAI's SDKs still go by the status.
_KIND_TYPES = {"overloaded": "overloaded_error"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _KIND_TYPES.get(code or "") or _TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(error_body(status, message, param=param, code=code)).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def from_gateway_error(error: GatewayError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else error.headers
    return error_response(error.status, error.message, param=error.param, code=error.code, headers=headers)


def p402_status(error: P402Error) -> int:
    """The HTTP status for one of our own errors; an upstream refusal of the request stays a 4xx."""
    if isinstance(error, ProviderError):
        return error.http_status if 400 <= error.http_status < 500 and error.scope == "request" else 502
    return error.http_status


def describe_attempts(error: AllAttemptsFailedError) -> str:
    """Each failed try in one line: `server_error 503 from groq/llama-3.3-70b: ...; timeout from ...`."""
    failed = [a for a in error.attempts if a.error_kind is not None]
    tries = "; ".join(a.error or f"{a.error_kind} from {a.provider}/{a.model}" for a in failed)
    return f"all {len(failed)} upstream attempt(s) failed: {tries}"


def from_p402_error(error: P402Error) -> Response:
    status = p402_status(error)
    message = str(error.message)
    param = error.details.get("param")  # a field the store's own checks refused
    if isinstance(error, AllAttemptsFailedError) and error.attempts and not isinstance(error, EgressFailedError):
        message = describe_attempts(error)  # (one local reason for them all is said once, as itself)
    if error.kind == "model_not_found":
        param = "model"
    headers = error.details.get("headers")  # a key's refusal: Retry-After and x-ratelimit-*
    if isinstance(error, UnavailableError):
        headers = {"retry-after": str(max(1, math.ceil(error.retry_after_s)))}
    return error_response(status, message, param=param, code=error.kind, headers=headers)


def from_validation_error(error: ValidationError, *, prefix: str = "") -> GatewayError:
    """A 400 naming the first bad field the way OpenAI does (`messages[0].role`)."""
    problems = error.errors(include_url=False)
    # Within a union pydantic reports every branch; the deepest complaint is the useful one.
    first = max(problems, key=lambda p: len(p["loc"]))
    if first["type"] == "json_invalid":
        return GatewayError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = prefix + _param_path(first["loc"])
    where = param or "body"
    return GatewayError(400, f"{where}: {first['msg']}", param=param or None, code="invalid_value")


_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _BRANCH_NAMES or "[" in part or "-" in part:
            continue  # pydantic names the union branch it tried; the caller only needs the field
        else:
            path += f".{part}" if path else str(part)
    return path
