"""`POST /v1/embeddings` in OpenAI's shape, on any of the catalog's embedding models.

The body is OpenAI's (`input` as a string, strings, or token arrays; `dimensions`;
`encoding_format` float or base64) plus P402's `p402` object; `core.embeddings`
picks the model, calls it and records the call.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from ..core.embeddings import VectorCache, as_base64, embed, untokenize
from ..core.errors import InvalidRequestError
from ..core.tokens import off_loop
from ..core.types import JSON_INTEGER, ChatMessage, ChatRequest, json_bytes
from .bodies import route_options, validate_json
from .errors import GatewayError

SOURCE = "gateway:embeddings"  # a record's source: the gateway, through this API
MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request

Tokens = list[Annotated[int, Field(ge=0, le=2**31 - 1), JSON_INTEGER]]


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", cache_strings="keys")  # as core/types.py's wire models

    input: str | list[str] | Tokens | list[Tokens]
    model: str = Field(min_length=1)
    dimensions: Annotated[int, Field(ge=1, le=65536), JSON_INTEGER] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    p402: dict[str, Any] | None = None

    def texts(self) -> list[str]:
        raw = self.input
        single = isinstance(raw, str) or bool(raw and all(isinstance(x, int) for x in raw))  # a text or one token array
        items: list[Any] = [raw] if single else list(raw)
        if not items:
            raise GatewayError(400, "input: must hold at least one item", param="input", code="invalid_value")
        if len(items) > MAX_INPUTS:
            message = f"input holds {len(items)} items; at most {MAX_INPUTS} are accepted"
            raise GatewayError(400, message, param="input", code="invalid_value")
        texts = []
        for index, item in enumerate(items):
            where = "input" if single else f"input[{index}]"
            if isinstance(item, list):
                if not item:
                    raise GatewayError(400, f"{where}: a token array cannot be empty", param=where, code="invalid_value")
                try:
                    item = untokenize(item)
                except InvalidRequestError as error:
                    raise GatewayError(400, f"{where}: {error.message}", param=where, code="invalid_value") from None
            if not item:
                raise GatewayError(400, f"{where}: cannot be an empty string", param=where, code="invalid_value")
            texts.append(item)
        return texts


class Embeddings:
    """The route, and the vectors it has already fetched, by exact input."""

    def __init__(self, gateway: Any) -> None:
        from .app import LARGE_BODY_BYTES, read_body  # made by the app, once it is loaded

        self.gateway = gateway
        self.read_body = read_body
        self.large = LARGE_BODY_BYTES
        self.cache = VectorCache()

    async def create(self, request: Request) -> Any:
        gateway = self.gateway
        gateway.check_ledger()
        body = await self.read_body(request, gateway.max_body)
        if len(body) >= self.large:
            parsed = await off_loop(validate_json, EmbeddingsBody, body)
        else:
            parsed = validate_json(EmbeddingsBody, body)
        texts = parsed.texts()
        directives = request.headers.get("cache-control", "")
        options, ctx = route_options(
            parsed.p402, parsed.model, gateway.orchestrator.catalog,
            api_key_id=request.scope.get("p402.api_key_id"),
            no_cache="no-cache" in directives or "no-store" in directives,
        )  # fmt: skip
        ctx.source = SOURCE
        # The key's rules, limits and guardrails read the inputs as a chat's messages; what they redact
        # is what is embedded.
        chat = ChatRequest(model=parsed.model, messages=[ChatMessage(role="user", content=text) for text in texts])
        await gateway.bind(request, chat, options, ctx)
        texts = [message.content for message in chat.messages]
        result = await embed(
            gateway.orchestrator, texts, options=options, ctx=ctx, dimensions=parsed.dimensions, cache=self.cache
        )
        encode = as_base64 if parsed.encoding_format == "base64" else _floats
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
        answer = {
            "object": "list",
            "data": data,
            "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "p402": result.meta.to_dict(),
        }
        if gateway.durable is not None:
            await gateway.durable(ctx.request_id)
        return Response(json_bytes(answer), media_type="application/json")

    def stats(self) -> dict[str, Any]:
        cache = self.cache
        return {"vectors": len(cache), "bytes": cache.size, "hits": cache.hits, "misses": cache.misses}


def _floats(vector: Any) -> list[float]:
    return vector.tolist()  # type: ignore[no-any-return]
