"""Azure OpenAI's data-plane API, simulated: OpenAI's bodies and streams behind Azure's routes.

    POST /openai/deployments/{deployment}/chat/completions?api-version=...   header api-key
    GET  /openai/models?api-version=...

A deployment serves the OpenAI model the simulator was told it deploys (`SimState.azure_deployments`,
from `[providers.azure] deployments`), else the OpenAI model of the same name, as `AzureOpenAI`
clients often name them; any other is Azure's DeploymentNotFound. A prompt holding
`CONTENT_FILTER_TRIGGER` is refused as Azure's content filter refuses one. A stream opens with
Azure's prompt-filter chunk, whose `choices` is empty.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.catalog import ModelSpec, ProviderSpec
from .engine import Fault, SimState, key_is_known
from .openai_family import Dialect, OpenAIFamily, Reply, SimError, _frame

CONTENT_FILTER_TRIGGER = "[[azure-content-filter]]"
_FILTER_RESULTS = {
    category: {"filtered": False, "severity": "safe"} for category in ("hate", "self_harm", "sexual", "violence")
}


def routes(state: SimState, provider: ProviderSpec) -> list[Route]:
    family = AzureFamily(state, provider)
    return [
        Route("/openai/deployments/{deployment}/chat/completions", family.deployment_chat, methods=["POST"]),
        Route("/openai/models", family.models, methods=["GET"]),
    ]


class AzureFamily(OpenAIFamily):
    def __init__(self, state: SimState, provider: ProviderSpec) -> None:
        super().__init__(state, provider)
        self.dialect = Dialect(openai_extras=True)

    async def deployment_chat(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            self._check_version(request)
            spec = self._deployed(request.path_params["deployment"])
            body = await self._json_body(request)
            body["model"] = spec.model  # Azure answers for the deployment, whatever the body names
            if CONTENT_FILTER_TRIGGER in json.dumps(body.get("messages")):
                raise _filtered()
            return await self._chat(request, body)
        except SimError as error:
            return self.error_response(error)

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            self._check_version(request)
        except SimError as error:
            return self.error_response(error)
        data = [{"id": m.model, "object": "model", "created": int(self.state.started), "owned_by": "system"}
                for m in self.state.catalog.models_of("openai") if "chat" in m.capabilities]
        return JSONResponse({"object": "list", "data": data})

    def _check_auth(self, request: Request) -> None:
        key = request.headers.get("api-key", "")
        if not key_is_known(key):
            raise SimError(
                401,
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
                "key for an active subscription and use a correct regional API endpoint for your resource.",
                "invalid_request_error", "401",
            )

    def _check_version(self, request: Request) -> None:
        if not request.query_params.get("api-version"):
            raise SimError(404, "Resource not found", "invalid_request_error", "404")

    def _deployed(self, deployment: str) -> ModelSpec:
        model = self.state.azure_deployments.get(deployment, deployment)
        spec = self.state.model_spec("openai", model)
        if spec is None:
            raise SimError(
                404,
                "The API deployment for this resource does not exist. If you created the deployment within the last "
                "5 minutes, please wait a moment and try again.",
                "invalid_request_error", "DeploymentNotFound",
            )
        return spec

    def _model(self, body: dict[str, Any]) -> ModelSpec:
        spec = self.state.model_spec("openai", str(body.get("model")))
        assert spec is not None  # `_deployed` found it
        return spec

    async def _stream(self, reply: Reply, fault: Fault | None) -> AsyncIterator[bytes]:
        # Azure's first event reports the prompt's filter results, with no choices yet.
        yield _frame({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                      "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER_RESULTS}]})
        async for frame in super()._stream(reply, fault):
            yield frame

    def _completion(self, reply: Reply) -> dict[str, Any]:
        out = super()._completion(reply)
        out["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _FILTER_RESULTS}]
        out["choices"][0]["content_filter_results"] = _FILTER_RESULTS
        return out

    def error_body(self, error: SimError) -> dict[str, Any]:
        body = super().error_body(error)
        if error.code == "content_filter":
            body["error"]["status"] = 400
            body["error"]["innererror"] = {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {**_FILTER_RESULTS, "violence": {"filtered": True, "severity": "high"}},
            }
        return body


def _filtered() -> SimError:
    return SimError(
        400,
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please "
        "modify your prompt and retry. To learn more about our content filtering policies please read our "
        "documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
        "invalid_request_error", "content_filter", "prompt",
    )


__all__ = ["CONTENT_FILTER_TRIGGER", "routes"]
