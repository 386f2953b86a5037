"""OpenAI's Responses API in chat terms, and back: the translation `gateway.responses` runs on.

A Responses request becomes a chat body (instructions as the system message, input items
as messages, function tools as chat tools, `text.format` as `response_format`), so it takes
the chat route's own parse and the orchestrator's one path, on any model. A chat answer
becomes a Response object: output items (reasoning, a message, function calls) and usage
in the Responses names. Nothing here does I/O.
"""

from __future__ import annotations

import time
from random import getrandbits
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.types import JSON_INTEGER, ChatResponse, Usage
from .errors import GatewayError

# Hosted tools OpenAI runs on its own side; P402 has none of them to run.
BUILT_IN_TOOLS = (
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search",
    "code_interpreter", "computer_use_preview", "computer_use", "image_generation", "mcp", "local_shell", "shell",
    "apply_patch", "custom",
)  # fmt: skip
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponsesBody(BaseModel):
    """The fields P402 reads; the others a client may send (`include`, `truncation`...) are accepted and left."""

    model_config = ConfigDict(extra="allow", cache_strings="keys")  # as core/types.py's wire models

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), JSON_INTEGER] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    store: bool = Field(default=True, strict=True)
    previous_response_id: str | None = None
    stream: bool = Field(default=False, strict=True)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = Field(default=None, strict=True)
    user: str | None = None
    background: bool | None = Field(default=None, strict=True)
    conversation: Any = None
    p402: dict[str, Any] | None = None

    @field_validator("store", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return (info.field_name == "store") if value is None else value


def new_item_id(prefix: str) -> str:
    """An id in OpenAI's style (`resp_…`, `msg_…`): ids guard nothing, so `random` makes them."""
    return f"{prefix}_{getrandbits(96):024x}"


def refuse(message: str, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def chat_body(body: ResponsesBody, history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat body for this request, and the conversation it continues (history plus this input),
    which is what a stored response keeps for the next turn."""
    if body.background:
        raise refuse("background responses are not offered by P402; send the request without background",
                     "background", "unsupported_parameter")  # fmt: skip
    if body.conversation is not None:
        raise refuse("conversations are not offered by P402; continue with previous_response_id",
                     "conversation", "unsupported_parameter")  # fmt: skip
    if body.input is None and not history:
        raise refuse("input: required (a string or a list of input items)", "input", "missing_required_parameter")
    conversation = [*history, *input_messages(body.input)]
    if not conversation:
        raise refuse("input: holds no message to answer", "input")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.tools:
        chat["tools"] = [chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = chat_tool_choice(body.tool_choice)
    if body.text is not None and (fmt := response_format(body.text)) is not None:
        chat["response_format"] = fmt
    for name, value in (("max_tokens", body.max_output_tokens), ("temperature", body.temperature),
                        ("top_p", body.top_p)):  # fmt: skip
        if value is not None:
            chat[name] = value
    return chat, conversation


def input_messages(raw: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Input items as chat messages: function calls join the assistant turn they follow."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    out: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = {
                "id": _text(item, "call_id", where),
                "type": "function",
                "function": {"name": _text(item, "name", where), "arguments": _text(item, "arguments", where)},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                raise refuse(f"{where}.output: must be a string", f"{where}.output")
            out.append({"role": "tool", "tool_call_id": _text(item, "call_id", where), "content": output})
        elif kind == "reasoning":
            continue  # a model's own reasoning, handed back: no chat model takes it as input
        else:
            raise refuse(f"{where}.type: {kind!r} items are not offered by P402; send messages, function_call "
                         "and function_call_output items", f"{where}.type")  # fmt: skip
    return out


def _text(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise refuse(f"{where}.{name}: required, a string", f"{where}.{name}")
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise refuse(f"{where}.role: must be one of user, assistant, system, developer", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise refuse(f"{where}.content: must be a string or a list of content parts", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _text(part, "text", at)})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _text(part, "refusal", at)})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise refuse(f"{at}.image_url: required, a URL or a data URL (file ids are not offered)",
                             f"{at}.image_url")  # fmt: skip
            image = {"url": url} | ({"detail": part["detail"]} if isinstance(part.get("detail"), str) else {})
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise refuse(f"{at}.type: {kind!r} parts are not offered by P402; send input_text or input_image",
                         f"{at}.type")  # fmt: skip
    if role == "assistant" or all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    kind = tool.get("type")
    if kind in BUILT_IN_TOOLS or (isinstance(kind, str) and kind.startswith(("web_search", "computer"))):
        raise refuse(f"{where}: the built-in tool {kind!r} runs on OpenAI's side and is not offered by P402; "
                     "define it as a function tool", f"{where}.type", "unsupported_tool")  # fmt: skip
    if kind != "function":
        raise refuse(f"{where}.type: must be 'function'", f"{where}.type")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise refuse(f"{where}.name: required, a string", f"{where}.name")
    for field, kind_ok, wanted in (("description", str, "a string"), ("parameters", dict, "a JSON Schema object"),
                                   ("strict", bool, "a boolean")):
        if not isinstance(tool.get(field), (kind_ok, type(None))):
            raise refuse(f"{where}.{field}: must be {wanted}", f"{where}.{field}")
    function: dict[str, Any] = {"name": name}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool.get("parameters") is not None:
        function["parameters"] = tool["parameters"]
    if tool.get("strict"):
        function["strict"] = True
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise refuse("tool_choice: must be auto, none, required or a function", "tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise refuse(f"tool_choice: {choice.get('type')!r} is not offered by P402; choose auto, none, required "
                 "or {'type': 'function', 'name': ...}", "tool_choice")  # fmt: skip


def response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not isinstance(fmt.get("name"), str):
            raise refuse("text.format: a json_schema format needs a name and a schema", "text.format")
        if not isinstance(fmt.get("strict"), (bool, type(None))) or not isinstance(fmt.get("description"), (str, type(None))):
            raise refuse("text.format: strict must be a boolean and description a string", "text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise refuse("text.format.type: must be text, json_object or json_schema", "text.format.type")


def echoed_format(text: dict[str, Any] | None) -> dict[str, Any]:
    """The answer's `text.format`: what `response_format` accepted, in the document's shape and no more
    (a request's stray fields are not echoed back into an answer they would make invalid)."""
    fmt = (text or {}).get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        keep = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", **keep}
    return {"type": "text"}


# --- answers -------------------------------------------------------------------------------


def usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}  # fmt: skip


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": summary}


def output_items(answer: ChatResponse) -> list[dict[str, Any]]:
    items = []
    if answer.reasoning:
        items.append(reasoning_item(new_item_id("rs"), answer.reasoning))
    if answer.content or not answer.tool_calls:
        items.append(message_item(new_item_id("msg"), answer.content or ""))
    for call in answer.tool_calls or []:
        function = call.get("function", {})
        items.append(call_item(new_item_id("fc"), call.get("id", ""), function.get("name", ""),
                               function.get("arguments", "")))  # fmt: skip
    return items


def assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The output items as the chat message that continues the conversation."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [
        {"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
        for i in output if i["type"] == "function_call"
    ]  # fmt: skip
    turn: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _echoed(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as a Response lists it: every field the document requires, null where not given."""
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}  # fmt: skip


def response_object(
    body: ResponsesBody,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    answer_usage: Usage | None = None,
    finish_reason: str | None = None,
    error: dict[str, Any] | None = None,
    p402: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response object, with every property OpenAI's document requires."""
    reason = INCOMPLETE.get(finish_reason or "")
    if status == "completed" and reason is not None:
        status = "incomplete"
    out = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store,
        "temperature": body.temperature,
        "text": {"format": echoed_format(body.text)},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": [_echoed(tool) for tool in body.tools or []],
        "top_p": body.top_p,
        "truncation": "disabled",
        "metadata": body.metadata or {},
    }
    if answer_usage is not None:  # not nullable in the document: left out until there is one
        out["usage"] = usage(answer_usage)
    if body.user is not None:
        out["user"] = body.user
    if p402 is not None:
        out["p402"] = p402
    return out
