"""Request bodies as they arrive: validated once here, each error naming its field.

A chat request is the OpenAI body plus P402's own `p402` object. The OpenAI SDK
sends anything in `extra_body` as top-level JSON, so P402's options ride in one
`p402` object and are taken out before the request goes upstream, where a
provider would reject an unknown field.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import SkipJsonSchema

from ..core import jsonpieces
from ..core.catalog import Catalog
from ..core.config import MODES, Mode
from ..core.costs import MAX_COMPARED_TOKENS
from ..core.errors import UnknownModelError
from ..core.hooks import (
    MAX_LABEL_CHARS,
    MAX_MESSAGES,
    MAX_SESSION_NAME_CHARS,
    CallContext,
    RouteOptions,
    reserved_namespace,
)
from ..core.router import ROUTER_PREFIX, parse_model_ref
from ..core.sessions import SessionStatus
from ..core.types import JSON_INTEGER, Capability, ChatRequest, Tier
from .errors import GatewayError, from_validation_error


class Failover(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, strict=True)
    max_retries: Annotated[int, Field(ge=0, le=10), JSON_INTEGER] | None = None


class P402Options(BaseModel):
    """The `p402` object of a chat request body."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    require: list[Capability] = Field(default_factory=list)
    prefer: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    max_tier: Tier | None = None
    max_cost_usd: float | None = Field(default=None, ge=0, strict=True)
    cache: bool = Field(default=True, strict=True)
    namespace: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    session_id: str | None = Field(default=None, max_length=MAX_LABEL_CHARS, description="a session's id, or its name")
    tag: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    failover: Failover = Field(default_factory=Failover)
    timeout_s: float | None = Field(default=None, gt=0, le=3600, strict=True)  # this request's deadline across attempts


# The most a list endpoint gives in one answer: recent decisions (the gateway keeps this many
# in memory as well) and a session's requests or messages.
DECISION_RING = 500
SESSION_PAGE_MAX = 1000

_NO_OPTIONS = P402Options()  # most bodies carry no `p402` object; only read, never changed


def parse_chat(
    body: bytes, catalog: Catalog, *, api_key_id: str | None, no_cache: bool
) -> tuple[ChatRequest, RouteOptions, CallContext]:
    """The request, how to route it and who asks; a 400 or 404 naming what is wrong."""
    request = validate_json(ChatRequest, body)
    if len(request.messages) > MAX_MESSAGES:
        message = f"messages holds {len(request.messages)} messages; at most {MAX_MESSAGES} are accepted"
        raise GatewayError(400, message, param="messages", code="too_many_messages")
    extra = request.__pydantic_extra__
    raw = extra.pop("p402", None) if extra else None
    options, ctx = route_options(raw, request.model, catalog, api_key_id=api_key_id, no_cache=no_cache)
    return request, options, ctx


def route_options(
    raw: Any, model: str | None, catalog: Catalog, *, api_key_id: str | None, no_cache: bool
) -> tuple[RouteOptions, CallContext]:
    """How to route a request and who asks, from its `p402` object (`raw`, None when absent) and `model`.

    Every surface (chat, Messages) reads its P402 options here, so they mean the same on each.
    """
    try:
        p402 = _NO_OPTIONS if raw is None else P402Options.model_validate(raw)
    except ValidationError as error:
        raise from_validation_error(error, prefix="p402.") from None
    if p402.namespace is not None and (reason := reserved_namespace(p402.namespace)) is not None:
        raise GatewayError(400, reason, param="p402.namespace", code="invalid_value")
    for field in ("prefer", "exclude"):
        for index, provider in enumerate(getattr(p402, field)):
            if provider not in catalog.providers:
                message = f"unknown provider {provider!r}; choose from {', '.join(catalog.providers)}"
                raise GatewayError(400, message, param=f"p402.{field}[{index}]", code="invalid_value")
    model = resolve_model(catalog, model)
    if raw is None:  # most bodies carry no `p402` object: the defaults and the model they name
        options = RouteOptions(model=model)
    else:
        options = RouteOptions.from_dict({
            "mode": p402.mode,
            "require": p402.require,
            "prefer": p402.prefer,
            "exclude": p402.exclude,
            "max_tier": p402.max_tier,
            "max_cost_usd": p402.max_cost_usd,
            "model": model,
            "failover": p402.failover.enabled,
            "max_retries": p402.failover.max_retries,
        })
    ctx = CallContext(
        session_id=p402.session_id,
        tag=p402.tag,
        namespace=p402.namespace,
        cache=p402.cache and not no_cache,
        api_key_id=api_key_id,
        source="gateway",
        timeout_s=p402.timeout_s,
    )
    return options, ctx


# The router's own names as /v1/models lists them, so a client that picks from the list can pick routing.
ROUTER_MODEL_IDS = tuple(f"{ROUTER_PREFIX}{name}" for name in ("auto", *MODES))


def resolve_model(catalog: Catalog, ref: str | None) -> str | None:
    """None routes; so do the router's own names (`auto`, `p402/cost`...) and configured aliases;
    `provider/model` (any id of a known provider) or a bare wire id the catalog lists pins (else a 404)."""
    if not ref:
        return None
    if ref in catalog.models or parse_model_ref(ref).pin is None:
        return ref
    if ref in catalog.aliases:
        return ref
    try:
        return catalog.resolve(ref).id
    except UnknownModelError as error:  # unknown, or a bare id several providers share
        raise GatewayError(404, str(error), param="model", code="model_not_found") from None


class CompareBody(BaseModel):
    """POST /api/v2/providers: what a call of this size costs on each model."""

    model_config = ConfigDict(extra="forbid")

    input_tokens: Annotated[int, Field(ge=0, le=MAX_COMPARED_TOKENS), JSON_INTEGER]
    output_tokens: Annotated[int, Field(ge=0, le=MAX_COMPARED_TOKENS), JSON_INTEGER]
    require: list[Capability] = Field(default_factory=lambda: ["chat"])  # embedding models price no answer
    max_tier: Tier | None = None
    top: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None


SessionName = Annotated[str, Field(min_length=1, max_length=MAX_SESSION_NAME_CHARS, pattern=r"\S")]


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: SessionName
    budget_usd: float | None = Field(default=None, ge=0, strict=True)
    agent: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    status: SessionStatus = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # None here means "left out", which the schema says by not requiring it


class SessionPatch(BaseModel):
    """Only the fields sent change; `budget_usd: null` removes the budget, `agent: null` the agent.

    A name and a status cannot be removed: left out they stay, sent as null they are a 400.
    """

    model_config = ConfigDict(extra="forbid")

    # The constraints sit on the str member: on the union, the document loses the pattern.
    name: SessionName | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)
    budget_usd: float | None = Field(default=None, ge=0, strict=True)
    agent: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    status: SessionStatus | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default
    )
    metadata: dict[str, Any] | None = None

    @field_validator("name", "status", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null; leave the field out to keep it")
        return value

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


Body = TypeVar("Body", bound=BaseModel)


def validate_json(model: type[Body], body: bytes) -> Body:
    """`body` as `model`, or a 400 naming what is wrong. A long body's long strings are decoded a piece
    at a time (core/jsonpieces.py), so parsing it never holds the GIL, and the loop, for long."""
    if len(body) <= jsonpieces.LONG:
        try:
            return model.model_validate_json(body)
        except ValidationError as error:
            raise from_validation_error(error) from None
    try:
        data = jsonpieces.loads(body)
    except ValueError as error:
        raise GatewayError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
    return validate(model, data)


def validate(model: type[Body], data: Any) -> Body:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from None
