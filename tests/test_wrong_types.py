"""Every field of a rich, valid body on each surface, sent again with a value of the wrong type: each answer
is a 2xx or a 4xx in that surface's own error shape, never a 500 (found so: a Messages tool's description,
a tool result's text, a chat tool_choice's function)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from p402_tui.runtime import Runtime
from test_gateway import NO_CACHE, settings_for

IMAGE = "iVBORw0KGgo="
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}", "detail": "low"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
        "temperature": 0.5, "top_p": 0.9, "max_tokens": 20, "stop": ["x"], "seed": 1, "user": "u",
        "stream_options": {"include_usage": True}, "metadata": {"k": "v"}, "p402": {"mode": "cost"},
    },
    "/v1/messages": {
        "model": "auto", "max_tokens": 2048,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": False,
                                          "content": [{"type": "text", "text": "ok"}]}]},
        ],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}],
        "tool_choice": {"type": "auto"}, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["x"],
        "metadata": {"user_id": "u"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
    },
    "/v1/responses": {
        "model": "auto", "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                         {"type": "input_image", "image_url": f"data:image/png;base64,{IMAGE}", "detail": "low"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ],
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": False}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}},
        "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 20, "metadata": {"k": "v"}, "reasoning": {"effort": "low"},
    },
    "/v1/embeddings": {"model": "auto", "input": ["hi", "there"], "encoding_format": "float", "dimensions": 64, "user": "u"},
}
WRONG = (7, "x", [], {}, None, True)


def places(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every field and item below the body."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*at, key)
        yield from places(value, (*at, key))


def with_value(body: dict[str, Any], at: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    node = changed
    for key in at[:-1]:
        node = node[key]
    node[at[-1]] = value
    return changed


def in_its_shape(path: str, answer: dict[str, Any]) -> bool:
    if path == "/v1/messages":
        return answer.get("type") == "error" and isinstance(answer["error"].get("message"), str)
    return isinstance(answer.get("error", {}).get("message"), str)


@pytest.fixture
async def http(sim, catalog, tmp_path):
    async with Runtime.open(settings_for(catalog, sim.url), db_path=tmp_path / "p402.db") as runtime:
        running = await runtime.serve_gateway("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=30, headers=NO_CACHE) as client:
                yield client
        finally:
            await running.stop()


@pytest.mark.parametrize("path", BODIES)
async def test_a_field_of_the_wrong_type_is_a_4xx_in_the_surfaces_shape(http, path):
    body = BODIES[path]
    assert (await http.post(path, json=body)).status_code == 200, "the body to vary must itself be answered"
    wrong = []
    for at in places(body):
        for value in WRONG:
            response = await http.post(path, json=with_value(body, at, value))
            if response.status_code >= 500 or (response.status_code >= 400 and not in_its_shape(path, response.json())):
                wrong.append((".".join(map(str, at)), value, response.status_code, response.text[:200]))
    assert wrong == []


async def test_a_tool_choice_in_no_shape_an_adapter_reads_is_a_400(http):
    """The field-by-field sweep changes one value at a time; these two changed more and reached Mistral's adapter."""
    body = {"model": "mistral/mistral-small-latest", "messages": [{"role": "user", "content": "hi"}],
            "tools": BODIES["/v1/chat/completions"]["tools"]}
    for choice in ({"type": "custom", "function": "x"}, {"function": 7}, {"type": "function", "function": {}}):
        response = await http.post("/v1/chat/completions", json={**body, "tool_choice": choice})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice", (choice, response.text)
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        assert (await http.post("/v1/chat/completions", json={**body, "tool_choice": choice})).status_code == 200, choice
