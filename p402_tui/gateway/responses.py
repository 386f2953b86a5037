"""`/v1/responses`: OpenAI's Responses API on every routed model.

A request is translated to a chat request (`responses_wire`) and goes the chat route's
way: its parse, then the orchestrator's `complete` or `stream`, so routing, failover,
the cache, budgets and the ledger treat it exactly as chat, and its usage and cost are
the same. Answers are kept (unless `store` is false) in the store's `stored_responses`,
so `previous_response_id` continues a conversation on any model, and the most recent
ones in memory too, so a next turn never waits for the writer's commit.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..core.errors import P402Error
from ..core.hooks import MAX_MESSAGES
from ..core.tokens import off_loop
from ..core.types import ChatChunk, ChatRequest, Usage, json_bytes
from . import sse
from .bodies import route_options, validate_json
from .errors import GatewayError, from_validation_error, p402_status
from .responses_wire import (
    ResponsesBody,
    assistant_turn,
    call_item,
    chat_body,
    message_item,
    new_item_id,
    output_items,
    reasoning_item,
    response_object,
)

SOURCE = "gateway:responses"  # a record's source: the gateway, through this API
RECENT = 1000  # answers kept in memory as well (without a store: the only ones kept)
_ERROR_CODES = {"rate_limit": "rate_limit_exceeded"}  # the document's ResponseErrorCode; the rest server_error


class Responses:
    """The routes, and the answers kept for the next turn."""

    def __init__(self, gateway: Any) -> None:
        from .app import LARGE_BODY_BYTES, read_body  # made by the app, once it is loaded

        self.gateway = gateway
        self.read_body = read_body
        self.large = LARGE_BODY_BYTES
        self.recent: OrderedDict[str, tuple[str | None, dict[str, Any], list[Any]]] = OrderedDict()

    # --- POST /v1/responses -----------------------------------------------------------

    async def create(self, request: Request) -> Any:
        gateway = self.gateway
        gateway.check_ledger()
        raw = await self.read_body(request, gateway.max_body)
        large = len(raw) >= self.large
        body = await off_loop(validate_json, ResponsesBody, raw) if large else validate_json(ResponsesBody, raw)
        key_id = request.scope.get("p402.api_key_id")
        history: list[Any] = []
        if body.previous_response_id is not None:
            found = await self._find(body.previous_response_id, key_id)
            if found is None:
                raise GatewayError(404, f"no stored response {body.previous_response_id!r}; it was never stored, "
                                   "or was deleted", param="previous_response_id", code="previous_response_not_found")
            history = found[1]
        directives = request.headers.get("cache-control", "")
        no_cache = "no-cache" in directives or "no-store" in directives
        parse = functools.partial(_chat_request, body, history, gateway.orchestrator.catalog, key_id, no_cache)
        chat, options, ctx, conversation = await off_loop(parse) if large else parse()
        await gateway.bind(request, chat, options, ctx)
        response_id = new_item_id("resp")
        if chat.stream:
            stream = gateway.orchestrator.stream(chat, options, ctx)
            try:
                first = await stream.batches().__anext__()  # a refusal is still a proper HTTP error
            except StopAsyncIteration:
                first = None
            except BaseException:
                await stream.aclose()
                raise
            keep = functools.partial(self._keep, key_id=key_id, conversation=conversation) if body.store else None
            frames = _events(stream, first, body, response_id, keep, gateway.durable)
            return sse.EventStreamResponse(frames, cleanup=stream.aclose)
        answer = await gateway.orchestrator.complete(chat, options, ctx)
        output = output_items(answer)
        meta = answer.p402.to_dict() if answer.p402 is not None else None
        data = response_object(
            body, response_id=response_id, created_at=answer.created, model=answer.model, output=output,
            answer_usage=answer.usage, finish_reason=answer.finish_reason, p402=meta,
        )  # fmt: skip
        if body.store:
            self._keep(data, output, key_id=key_id, conversation=conversation)
        if gateway.durable is not None:
            await gateway.durable(ctx.request_id)
        return Response(json_bytes(data), media_type="application/json")

    def _keep(self, data: dict[str, Any], output: list[Any], *, key_id: str | None, conversation: list[Any]) -> None:
        """Remember an answer and the conversation it ends, for GET and the next turn."""
        turns = [*conversation, assistant_turn(output)]
        self.recent[data["id"]] = (key_id, data, turns)
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.gateway.service.keep_response(data["id"], data["created_at"], key_id, data, turns)

    async def _find(self, response_id: str, key_id: str | None) -> tuple[dict[str, Any], list[Any]] | None:
        kept = self.recent.get(response_id)
        if kept is not None:
            return (kept[1], kept[2]) if kept[0] == key_id else None
        return await self.gateway.service.stored_response(response_id, key_id)

    # --- GET and DELETE /v1/responses/{id} --------------------------------------------

    async def get(self, request: Request) -> Any:
        response_id = request.path_params["response_id"]
        found = await self._find(response_id, request.scope.get("p402.api_key_id"))
        if found is None:
            raise _not_found(response_id)
        return Response(json_bytes(found[0]), media_type="application/json")

    async def delete(self, request: Request) -> Any:
        response_id = request.path_params["response_id"]
        key_id = request.scope.get("p402.api_key_id")
        kept = self.recent.get(response_id)
        deleted = kept is not None and kept[0] == key_id
        if deleted:
            del self.recent[response_id]
        deleted = await self.gateway.service.delete_response(response_id, key_id) or deleted
        if not deleted:
            raise _not_found(response_id)
        return Response(json_bytes({"id": response_id, "object": "response.deleted", "deleted": True}),
                        media_type="application/json")  # fmt: skip


def _chat_request(
    body: ResponsesBody, history: list[Any], catalog: Any, key_id: str | None, no_cache: bool
) -> tuple[ChatRequest, Any, Any, list[Any]]:
    """The chat request this one runs as, validated as the chat route validates its own, how to route it,
    who asks, and the conversation it continues."""
    chat_dict, conversation = chat_body(body, history)
    try:
        chat = ChatRequest.model_validate(chat_dict)
    except ValidationError as error:
        raise from_validation_error(error) from None
    if len(chat.messages) > MAX_MESSAGES:
        message = f"the conversation holds {len(chat.messages)} messages; at most {MAX_MESSAGES} are accepted"
        raise GatewayError(400, message, param="input", code="too_many_messages")
    options, ctx = route_options(body.p402, chat.model, catalog, api_key_id=key_id, no_cache=no_cache)
    ctx.source = SOURCE
    return chat, options, ctx, conversation


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"no stored response {response_id!r}", param="response_id", code="not_found")


# --- the event stream ---------------------------------------------------------------------


class _Output:
    """The output items of a streamed answer as they open, grow and close, written as typed events."""

    def __init__(self) -> None:
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self.open: tuple[str, dict[str, Any], int] | None = None  # kind, item, output index
        self.calls: dict[int, dict[str, Any]] = {}  # a tool call's index -> its item
        self.text: list[str] = []  # the open item's pieces
        self.delta_head = b""

    def event(self, kind: str, data: dict[str, Any]) -> bytes:
        data["type"] = kind
        data["sequence_number"] = self.seq
        self.seq += 1
        return sse.event_frame(kind, data)

    def _opening(self, kind: str, item: dict[str, Any], out: list[bytes]) -> None:
        self.close(out)
        index = len(self.items)
        self.open = (kind, item, index)
        self.text = []
        self.items.append(item)
        out.append(self.event("response.output_item.added", {"output_index": index, "item": item}))  # written now
        where = _where(item, index)
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self.event("response.content_part.added",
                                  {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part}))
            self.delta_head = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                               + where + b',"content_index":0,"logprobs":[],"sequence_number":')  # fmt: skip
        elif kind == "reasoning":
            part = {"type": "summary_text", "text": ""}
            out.append(self.event("response.reasoning_summary_part.added",
                                  {"item_id": item["id"], "output_index": index, "summary_index": 0, "part": part}))
            self.delta_head = (b'event: response.reasoning_summary_text.delta\ndata: {"type":'
                               b'"response.reasoning_summary_text.delta",' + where
                               + b',"summary_index":0,"sequence_number":')  # fmt: skip
        else:
            self.delta_head = _call_delta_head(item, index)

    def delta(self, text: str, out: list[bytes]) -> None:
        """A piece of the open item: the hot path, one frame written around the text's JSON."""
        self.text.append(text)
        out.append(self.delta_head + str(self.seq).encode() + b',"delta":' + json_bytes(text) + b"}\n\n")
        self.seq += 1

    def take(self, chunk: ChatChunk, out: list[bytes]) -> None:
        if chunk.reasoning:
            if self.open is None or self.open[0] != "reasoning":
                self._opening("reasoning", reasoning_item(new_item_id("rs"), ""), out)
            self.delta(chunk.reasoning, out)
        if chunk.content:
            if self.open is None or self.open[0] != "message":
                self._opening("message", message_item(new_item_id("msg"), "", "in_progress") | {"content": []}, out)
            self.delta(chunk.content, out)
        for call in chunk.tool_calls or ():
            item = self.calls.get(call.index)
            if item is None:
                item = call_item(new_item_id("fc"), call.id or new_item_id("call"), call.name or "", "", "in_progress")
                self.calls[call.index] = item
                self._opening("call", item, out)
            elif self.open is None or self.open[1] is not item:
                # A call's arguments resumed after another item: they join it, no new item.
                self.close(out)
                self.open = ("call", item, self.items.index(item))
                self.text = [item["arguments"]]
                self.delta_head = _call_delta_head(item, self.open[2])
            elif call.name and not item["name"]:
                item["name"] = call.name
            if call.arguments:
                self.delta(call.arguments, out)

    def close(self, out: list[bytes]) -> None:
        if self.open is None:
            return
        kind, item, index = self.open
        self.open = None
        text = "".join(self.text)
        if kind == "message":
            item.update(message_item(item["id"], text))
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self.event("response.output_text.done", {**common, "text": text, "logprobs": []}))
            out.append(self.event("response.content_part.done", {**common, "part": item["content"][0]}))
        elif kind == "reasoning":
            item.update(reasoning_item(item["id"], text))
            common = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            out.append(self.event("response.reasoning_summary_text.done", {**common, "text": text}))
            out.append(self.event("response.reasoning_summary_part.done",
                                  {**common, "part": {"type": "summary_text", "text": text}}))
        else:
            item["arguments"], item["status"] = text, "completed"
            out.append(self.event("response.function_call_arguments.done",
                                  {"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": text}))
        out.append(self.event("response.output_item.done", {"output_index": index, "item": item}))


def _where(item: dict[str, Any], index: int) -> bytes:
    return b'"item_id":' + json_bytes(item["id"]) + b',"output_index":' + str(index).encode()


def _call_delta_head(item: dict[str, Any], index: int) -> bytes:
    return (b'event: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta",'
            + _where(item, index) + b',"sequence_number":')  # fmt: skip


async def _events(
    stream: Any, first: list[ChatChunk] | None, body: ResponsesBody, response_id: str,
    keep: Callable[..., None] | None, durable: Callable[[str], Awaitable[None]] | None,
) -> AsyncIterator[bytes]:
    """The Responses stream: created, in_progress, each item's events, then completed (incomplete, failed)."""
    output = _Output()
    created = stream.created

    def snapshot(status: str, **extra: Any) -> dict[str, Any]:
        return response_object(body, response_id=response_id, created_at=created, model=stream.meta.model,
                               status=status, output=output.items, **extra)  # fmt: skip

    started = json_bytes(snapshot("in_progress"))  # one object, written as both opening events
    out = [
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":' + started
        + b'}\n\nevent: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1,"response":'
        + started + b"}\n\n"
    ]  # fmt: skip
    output.seq = 2
    usage: Usage | None = None
    finish: str | None = None
    try:
        async with stream:
            batches = stream.batches()
            batch = first
            while batch is not None:
                for chunk in batch:
                    if chunk.error is not None:
                        output.close(out)
                        failure = {"code": "server_error", "message": str(chunk.error.get("message") or "stream broke")}
                        meta = stream.meta.to_dict()
                        done = snapshot("failed", error=failure, answer_usage=chunk.usage, p402=meta)
                        out.append(output.event("response.failed", {"response": done}))
                        yield sse.Last(b"".join(out))
                        return
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                    output.take(chunk, out)
                if out and finish is None:  # from the finish on, the rest leaves in one write with the end
                    yield b"".join(out)
                    out = []
                batch = await anext(batches, None)
            output.close(out)
            if not output.items:  # an empty answer is still a message
                output._opening("message", message_item(new_item_id("msg"), "", "in_progress") | {"content": []}, out)
                output.close(out)
            usage = usage or stream.usage  # none from upstream: our count, as the chat route falls back to
            done = snapshot("completed", answer_usage=usage, finish_reason=finish, p402=stream.meta.to_dict())
            if keep is not None:
                keep(done, output.items)
            if durable is not None:
                await durable(stream.request_id)
            # An answer cut short (max_output_tokens) ends as OpenAI ends one: response.incomplete.
            last = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
            out.append(output.event(last, {"response": done}))
    except P402Error as error:
        output.close(out)
        code = _ERROR_CODES.get(error.kind, "server_error")
        failure = {"code": code, "message": f"{error.message} (HTTP {p402_status(error)})"}
        out.append(output.event("response.failed", {"response": snapshot("failed", error=failure)}))
    yield sse.Last(b"".join(out))
