"""A request that arrived in a provider's own API shape, kept as it came.

The gateway's Messages route translates Anthropic's body into the chat shape every
adapter reads, and keeps the original beside it: when the router picks a model of
that same wire family, its adapter sends the original (only `model` and `stream`
set for the call), so fields the chat shape has no place for (`cache_control`,
thinking blocks and their signatures, beta fields) arrive as sent, with the headers
of that API the request came with (Anthropic's `anthropic-beta`, which turns those
fields on, and `anthropic-version`).
"""

from __future__ import annotations

from typing import Any

from pydantic import PrivateAttr

from .types import ChatRequest


class NativeRequest(ChatRequest):
    """A chat request with the body it was translated from, in `wire`'s own shape."""

    _wire: str = PrivateAttr(default="")
    _body: dict[str, Any] = PrivateAttr(default_factory=dict)
    _headers: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def of(
        cls, chat: dict[str, Any], *, wire: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> NativeRequest:
        """`headers`: what the upstream of `wire` is to receive besides the adapter's own."""
        request = cls.model_validate(chat)
        request._wire = wire
        request._body = body
        request._headers = headers or {}
        return request


def native_body(request: ChatRequest, wire: str) -> dict[str, Any] | None:
    """The body as it came, when `request` arrived in `wire`'s own shape; else None."""
    if type(request) is NativeRequest and request._wire == wire:
        return request._body
    return None


def native_headers(request: ChatRequest, wire: str) -> dict[str, str]:
    """The headers for `wire`'s upstream that came with `request`; empty unless it arrived in `wire`'s shape."""
    if type(request) is NativeRequest and request._wire == wire:
        return request._headers
    return {}
