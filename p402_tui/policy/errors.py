"""Refusals a key's policy makes; each carries its status and the headers a client needs."""

from __future__ import annotations

from ..core.errors import P402Error


class PolicyError(P402Error):
    """Raised with `headers=` when the answer needs some (Retry-After, x-ratelimit-*)."""

    http_status = 400


class ForbiddenError(PolicyError):
    kind = "permission_denied"
    http_status = 403


class ModelNotAllowedError(PolicyError):
    kind = "model_not_allowed"
    http_status = 403


class RateLimitedError(PolicyError):
    kind = "rate_limit_exceeded"
    http_status = 429


class KeyBudgetExceededError(PolicyError):
    kind = "budget_exceeded"
    http_status = 402


class GuardrailError(PolicyError):
    kind = "guardrail"
    http_status = 400
