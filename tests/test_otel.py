"""OpenTelemetry traces of the gateway's requests, received by a real OTLP/HTTP endpoint on loopback."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from p402_tui import telemetry  # imports nothing of OpenTelemetry

if not telemetry.installed():
    if os.environ.get("CI"):  # CI installs the test extra, which brings the otel one: its absence is a failure
        raise ImportError("CI needs the otel extra (opentelemetry-sdk) for the traces tests")
    pytest.skip("the otel extra is not installed", allow_module_level=True)

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from p402_tui.core.config import CacheConfig, ConfigFile, Settings, TelemetryConfig
from p402_tui.core.errors import ConfigError
from p402_tui.runtime import Runtime
from tests.helpers import Served

SERVER, CLIENT = 2, 3  # Span.SpanKind in the protocol
ERROR = 2  # Status.StatusCode


class Receiver:
    """An OTLP/HTTP traces endpoint: POST /v1/traces with a protobuf body, decoded as a collector would."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.resources: list[dict] = []

    async def traces(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        for resource_spans in message.resource_spans:
            self.resources.append({a.key: _value(a.value) for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(), "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano, "status": span.status.code,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    })  # fmt: skip
        body = ExportTraceServiceResponse().SerializeToString()
        return Response(body, media_type="application/x-protobuf")


def _value(value):
    return getattr(value, value.WhichOneof("value"))


@pytest.fixture
async def receiver():
    found = Receiver()
    app = Starlette(routes=[Route("/v1/traces", found.traces, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    found.url = f"http://127.0.0.1:{port}"
    yield found
    server.should_exit = True
    await task


@pytest.fixture
def traced(receiver, monkeypatch, catalog, fresh_sim):
    """Settings with traces on, exporting to the receiver at once."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    settings = Settings(ConfigFile(cache=CacheConfig(embedder="hashed")), catalog, env=env).point_at(fresh_sim.url)
    yield settings
    telemetry.shutdown()


async def test_a_request_is_a_server_span_with_a_client_span_per_upstream_attempt(traced, receiver, fault, tmp_path):
    await fault(provider="*", kind="error", status=503, count=1)  # the first attempt fails, the next answers
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with Runtime.open(traced, db_path=tmp_path / "p402.db") as runtime:
        running = await runtime.serve_gateway("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            answer = await http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "trace me"}], "p402": {"mode": "cost"}},
                headers={"x-request-id": "client-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
            )
            assert answer.status_code == 200, answer.text
            refused = await http.post("/v1/chat/completions", content=b"{not json")
            assert refused.status_code == 400
            streamed = {"messages": [{"role": "user", "content": "stream me"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=streamed) as response:
                assert response.status_code == 200 and "[DONE]" in "".join([t async for t in response.aiter_text()])
        meta = answer.json()["p402"]
        await running.stop()
    telemetry.shutdown()  # what is batched goes out now
    for _ in range(100):
        if len(receiver.spans) >= 6:
            break
        await asyncio.sleep(0.05)
    assert receiver.resources[0]["service.name"] == "p402"
    roots = [span for span in receiver.spans if span["kind"] == SERVER]
    chat, bad, stream = sorted(roots, key=lambda span: span["start"])
    assert chat["name"] == "POST /v1/chat/completions" and chat["trace_id"] == trace_id  # the caller's trace
    assert chat["parent"] == "00f067aa0ba902b7"
    a = chat["attributes"]
    assert (a["http.request.method"], a["url.path"], a["http.response.status_code"]) == ("POST", "/v1/chat/completions", 200)
    assert a["p402.client_request_id"] == "client-1" and a["p402.request_id"].startswith("req")
    assert a["p402.route.mode"] == "cost" and a["p402.route.decision_id"] == meta["decision_id"]
    assert a["p402.route.candidates"] >= 2
    assert (a["gen_ai.system"], a["gen_ai.response.model"]) == (meta["provider"], meta["model"])
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["p402.cost_usd"] == pytest.approx(meta["cost_usd"]) and a["p402.cache_hit"] is False
    attempts = sorted((s for s in receiver.spans if s["parent"] == chat["span_id"]), key=lambda span: span["start"])
    assert [s["kind"] for s in attempts] == [CLIENT, CLIENT]
    failed, answered = attempts
    assert [(s["attributes"]["gen_ai.system"], s["attributes"]["gen_ai.request.model"]) for s in attempts] == [
        (x["provider"], x["model"]) for x in meta["attempts"]
    ]
    assert failed["status"] == ERROR and failed["attributes"]["error.type"] == meta["attempts"][0]["error_kind"]
    assert answered["attributes"]["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    assert chat["start"] <= failed["start"] < failed["end"] <= answered["start"] < answered["end"] <= chat["end"]
    assert bad["attributes"]["http.response.status_code"] == 400 and bad["trace_id"] != trace_id
    assert not [s for s in receiver.spans if s["parent"] == bad["span_id"]]
    assert stream["attributes"]["p402.stream"] is True and stream["attributes"]["gen_ai.usage.output_tokens"] > 0
    (attempt,) = [s for s in receiver.spans if s["parent"] == stream["span_id"]]
    assert attempt["kind"] == CLIENT and attempt["attributes"]["gen_ai.system"] == stream["attributes"]["gen_ai.system"]
    assert stream["start"] <= attempt["start"] < attempt["end"] <= stream["end"]


def test_otel_on_in_the_config_without_the_extra_is_a_clear_error(catalog, monkeypatch):
    settings = Settings(ConfigFile(telemetry=TelemetryConfig(otel=True)), catalog, env={})
    monkeypatch.setattr(telemetry, "installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'p402-tui\[otel\]'"):
        telemetry.tracer(settings)
    assert telemetry.tracer(Settings(ConfigFile(), catalog, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})) is None


def test_without_an_endpoint_serve_imports_nothing_of_opentelemetry(tmp_path):
    served = Served("--sim", "--db", str(tmp_path / "p402.db"))
    try:
        assert httpx.get(f"{served.url}/health/live", timeout=10).status_code == 200
    finally:
        assert served.stop() == 0
    imported = served.imported()
    assert "p402_tui.gateway.app" in imported
    assert not [name for name in imported if name.startswith(("opentelemetry", "p402_tui.telemetry.otel"))]