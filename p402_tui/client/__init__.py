"""A Python client for a running P402 gateway (no Textual, no store).

`AsyncP402` for asyncio code and `P402` for plain code: OpenAI-compatible chat with P402's
options as arguments (mode, require, prefer, exclude, max_cost, session, tag), and the
gateway's sessions, spend, recommendations, decisions and live events, typed. Both answer
`service.P402Service`, as the local `service.Service` does, so a front end works the
same on either.
"""

from .aio import AsyncP402, ChatStream, gateway_url
from .sync import P402, SyncChatStream
from .wire import GatewayError, event_from_dict

__all__ = ["AsyncP402", "ChatStream", "GatewayError", "P402", "SyncChatStream", "event_from_dict", "gateway_url"]
