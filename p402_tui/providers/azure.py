"""Azure OpenAI: OpenAI's Chat Completions behind Azure's data-plane API.

`POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version={version}`
with the key in an `api-key` header, as the official `openai` SDK's `AzureOpenAI` sends it.
Bodies, streams and usage are OpenAI's. A model is `azure/<OpenAI model>`; the config maps
it to the deployment that serves it (`deployments`), else the deployment is named as the model.
Azure's content filter refuses a prompt with a 400 whose code is `content_filter`, and cuts an
answer short with `finish_reason: content_filter`: both are a non-retryable `ContentFilterError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from ..core.errors import ContentFilterError, ProviderError
from ..core.types import ChatChunk, ChatResponse
from .openai_compat import OpenAICompatAdapter

CONTENT_FILTER = "content_filter"


class AzureAdapter(OpenAICompatAdapter):
    wire = "azure"

    def auth_headers(self) -> dict[str, str]:
        key = self.provider.key()
        return {"api-key": key} if key else {}

    def deployment(self, model: str) -> str:
        return self.provider.deployments.get(model, model)

    def _query(self) -> str:
        return "?" + urlencode({"api-version": self.provider.api_version or ""})

    def chat_url(self, model: str) -> str:
        return f"/openai/deployments/{quote(self.deployment(model), safe='')}/chat/completions{self._query()}"

    async def list_models(self) -> list[str]:
        data = await self.get_json(f"/openai/models{self._query()}")
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return []
        return [item["id"] for item in items if isinstance(item, dict) and "id" in item]

    def parse_completion(self, data: Any, model: str) -> ChatResponse:
        response = super().parse_completion(data, model)
        if response.finish_reason == CONTENT_FILTER:
            raise self._filtered("stopped the answer", model)
        return response

    async def _batches(self, body: dict[str, Any], model: str) -> AsyncIterator[list[ChatChunk]]:
        async for batch in super()._batches(body, model):
            if any(chunk.finish_reason == CONTENT_FILTER for chunk in batch):
                kept = [chunk for chunk in batch if chunk.finish_reason != CONTENT_FILTER]
                if kept:
                    yield kept
                raise self._filtered("stopped the answer", model)
            yield batch

    def error_from_body(self, data: Any, status: int, model: str, **kw: Any) -> ProviderError:
        error = super().error_from_body(data, status, model, **kw)
        body = error.body if isinstance(error.body, dict) else {}
        if body.get("code") == CONTENT_FILTER or (status == 400 and _inner_code(data) == "ResponsibleAIPolicyViolation"):
            return self._filtered(f"refused the prompt: {error.message}", model, status=status)
        return error

    def _filtered(self, what: str, model: str, status: int | None = None) -> ContentFilterError:
        return ContentFilterError(
            f"Azure's content filter {what} (code content_filter); rephrase the request or change the "
            "deployment's content filter policy",
            provider=self.id, model=model, status=status, body={"code": CONTENT_FILTER},
        )


def _inner_code(data: Any) -> Any:
    """Azure nests the filter's own code: error.innererror.code."""
    error = data.get("error") if isinstance(data, dict) else None
    inner = error.get("innererror") if isinstance(error, dict) else None
    return inner.get("code") if isinstance(inner, dict) else None
