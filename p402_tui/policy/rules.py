"""A key's policy as it is stored (validated with pydantic at the edge) and as it is enforced.

Stored as JSON with the key. `compile_policy` turns it into plain objects once per
change: model patterns expanded against the catalog, regexes compiled.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.config import Mode
from ..core.hooks import reserved_namespace
from ..core.types import JSON_INTEGER, TIER_RANK, Tier
from .guardrails import Redactor, compile_redactor

Period = Literal["day", "month", "total"]
ROLES = ("admin", "user", "viewer")


class Defaults(BaseModel):
    """Merged into every request of the key; what the request says itself wins."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    tag: str | None = Field(default=None, max_length=128)
    namespace: str | None = Field(default=None, max_length=128)
    session_prefix: str | None = Field(default=None, max_length=64)

    @field_validator("namespace")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value is not None and (reason := reserved_namespace(value)) is not None:
            raise ValueError(reason)  # a key's own namespace would read another key's answers
        return value


class KeyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: float | None = Field(default=None, ge=0)
    budget_period: Period = "month"
    rpm: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None
    tpm: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None
    models: list[str] = Field(default_factory=list, description="allowed: `provider/model` patterns; empty allows all")
    max_tier: Tier | None = None
    max_cost_per_request_usd: float | None = Field(default=None, ge=0)
    defaults: Defaults = Field(default_factory=Defaults)
    redact: list[str] = Field(default_factory=list, description="email, phone, card, iban, secret, or NAME=REGEX")
    deny: list[str] = Field(default_factory=list, description="regexes that refuse a request")

    @field_validator("deny")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"deny regex {pattern!r}: {error}") from None
        return value

    @field_validator("redact")
    @classmethod
    def _rules(cls, value: list[str]) -> list[str]:
        compile_redactor(value)  # raises ValueError naming the bad rule
        return value


def parse_policy(data: dict[str, Any]) -> KeyPolicy:
    """A policy from JSON; ValueError with the first bad field named."""
    try:
        return KeyPolicy.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def model_matches(patterns: list[str], model_id: str) -> bool:
    """`openai/*`, `*/llama-*`, or a bare name (`gpt-4o-mini`) matching the model part."""
    bare = model_id.partition("/")[2]
    return any(fnmatch.fnmatchcase(model_id, p) or ("/" not in p and fnmatch.fnmatchcase(bare, p)) for p in patterns)


@dataclass(slots=True)
class Compiled:
    """What enforcement reads on every request."""

    policy: KeyPolicy
    allowed: frozenset[str] | None  # model ids the key may use; None: any
    max_tier_rank: int | None
    deny: list[tuple[str, re.Pattern[str]]] = field(default_factory=list)
    redactor: Redactor | None = None


def compile_policy(policy: KeyPolicy, model_ids: list[str]) -> Compiled:
    allowed = frozenset(m for m in model_ids if model_matches(policy.models, m)) if policy.models else None
    return Compiled(
        policy=policy,
        allowed=allowed,
        max_tier_rank=None if policy.max_tier is None else TIER_RANK[policy.max_tier],
        deny=[(f"deny:{i + 1}", re.compile(p)) for i, p in enumerate(policy.deny)],
        redactor=compile_redactor(policy.redact) if policy.redact else None,
    )
