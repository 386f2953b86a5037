"""The simulator as one loopback HTTP server.

Every provider is mounted at `/{provider_id}` plus the path of its official base
URL, so `http://127.0.0.1:P/groq/openai/v1` stands for `https://api.groq.com/openai/v1`
and both our adapters and the official SDKs work against it unchanged.

Control API (for rehearsing outages):
    POST   /_sim/faults   a Fault body; DELETE /_sim/faults[?provider=P] clears (all, or one provider's)
    GET    /_sim/faults   the faults in force
    GET    /_sim/stats    calls per provider and model, stream counters, steering headers received; DELETE resets them
Control errors are JSON: {"error": "..."} with status 400.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Send

from ..core.catalog import Catalog
from ..core.types import aclose_iterator
from .engine import Fault, SimDisconnect, SimState

FAMILY_MODULES = {
    "openai": "openai_family",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "cohere": "cohere",
    "azure": "azure",
}
# A request header that fixes the answer's length in streamed pieces, for benchmarks; every family reads it.
PIECES_HEADER = "x-p402-sim-pieces"


class Invalid(Exception):
    """The body breaks one of the API's rules; the message is what the API would say."""


def words_asked(request: Request) -> int | None:
    """The answer length the PIECES_HEADER asks for, if any."""
    pieces = request.headers.get(PIECES_HEADER, "")
    return int(pieces) if pieces.isdigit() else None


class SimStream(StreamingResponse):
    """A streamed body that is closed the moment the client goes away.

    Starlette stops iterating a body when the client disconnects but leaves the
    generator suspended for the garbage collector; closing it here runs its
    `finally` (and `state.track_stream()`) at once, so stream stats are exact.
    """

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await aclose_iterator(self.body_iterator)


async def hang_until_disconnect(request: Request, limit_s: float = 3600.0) -> None:
    """A `timeout` fault: answer nothing until the client gives up (or `limit_s` passes)."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(client_gone(), limit_s)
    except asyncio.TimeoutError:
        pass


def whole_answer(body: dict[str, Any], fault: Fault | None, headers: dict[str, str] | None = None) -> Response:
    """A non-streamed JSON answer, cut in half by a `malformed` fault or by a `disconnect` fault (which then drops the connection)."""
    whole = JSONResponse(body, headers=headers)
    if fault is None or fault.kind not in ("malformed", "disconnect"):
        return whole
    half = whole.body[: len(whole.body) // 2]
    if fault.kind == "malformed":
        return Response(half, media_type="application/json")

    async def drop() -> AsyncIterator[bytes]:
        yield half
        raise SimDisconnect()

    return SimStream(drop(), media_type="application/json", headers={"content-length": str(len(whole.body))})


class _QuietDisconnects(logging.Filter):
    """A `disconnect` fault raises SimDisconnect on purpose; uvicorn need not log it as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        return not isinstance(error, SimDisconnect)


_quiet = _QuietDisconnects()


def _family_routes(state: SimState) -> list[BaseRoute]:
    mounts: list[BaseRoute] = []
    for provider in state.catalog.providers.values():
        # Imported here: the family modules import this one for its helpers.
        module = importlib.import_module(f"{__package__}.{FAMILY_MODULES[provider.wire]}")
        mounts.append(Mount(f"/{provider.id}{provider.base_path}", routes=module.routes(state, provider)))
    return mounts


def build_app(state: SimState) -> Starlette:
    def refuse(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=400)

    async def add_fault(request: Request) -> JSONResponse:
        try:
            fault = Fault.model_validate_json(await request.body())
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return refuse(f"{where}: {first['msg']}")
        if fault.provider != "*" and fault.provider not in state.catalog.providers:
            return refuse(f"unknown provider {fault.provider!r}")
        if fault.model is not None and fault.provider != "*" and not state.knows(fault.provider, fault.model):
            return refuse(f"provider {fault.provider!r} has no model {fault.model!r}")
        if fault.status is not None and fault.kind != "error":
            return refuse(f"status only applies to kind 'error', not {fault.kind!r}")
        if fault.status is not None and not 500 <= fault.status <= 599:
            return refuse(f"status must be a 5xx server error (500, 502, 503, 529), not {fault.status}")
        state.add_fault(fault)
        return JSONResponse({"ok": True, "faults": len(state.faults)}, status_code=201)

    async def list_faults(request: Request) -> JSONResponse:
        return JSONResponse([f.model_dump() for f in state.faults])

    async def clear_faults(request: Request) -> JSONResponse:
        provider = request.query_params.get("provider")
        if provider is not None and provider != "*" and provider not in state.catalog.providers:
            return refuse(f"unknown provider {provider!r}")
        state.clear_faults(None if provider == "*" else provider)
        return JSONResponse({"ok": True, "faults": len(state.faults)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(state.stats())

    async def reset_stats(request: Request) -> JSONResponse:
        state.reset_stats()
        return JSONResponse({"ok": True})

    control = [
        Route("/_sim/faults", add_fault, methods=["POST"]),
        Route("/_sim/faults", list_faults, methods=["GET"]),
        Route("/_sim/faults", clear_faults, methods=["DELETE"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/stats", reset_stats, methods=["DELETE"]),
    ]
    app = Starlette(routes=control + _family_routes(state))
    app.state.sim = state
    return app


@dataclass
class RunningSim:
    """A simulator serving in this event loop; `url` is its base address."""

    state: SimState
    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


def _free_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def start_sim(
    catalog: Catalog,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    latency: bool = True,
    speed: float = 1.0,
    tls: tuple[str, str] | None = None,
    usage: bool = True,
    azure_deployments: dict[str, str] | None = None,
) -> RunningSim:
    """Serve the simulator as a task in the running loop (port 0 picks a free one); over HTTPS with
    `tls`, a (certificate file, key file) pair. `usage=False`: the OpenAI family reports no usage."""
    from ..core.tokens import warm

    logging.getLogger("uvicorn.error").addFilter(_quiet)
    sock = _free_socket(host, port)  # first, so a busy port fails at once
    try:
        # Load the tokenizers before serving so the first answer is as quick as the rest.
        await warm([None, "openai/gpt-4o"])  # cl100k_base and o200k_base
    except BaseException:
        sock.close()
        raise
    state = SimState(catalog, seed=seed, latency=latency, speed=speed, usage=usage, azure_deployments=azure_deployments)
    # Where the process set up its logging (`p402 serve --sim`), uvicorn's records follow it; alone, uvicorn's own.
    own_logging = {"log_config": None} if logging.getLogger().handlers else {}
    config = uvicorn.Config(
        build_app(state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1, ws="none",
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None, **own_logging,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # surfaces the start-up error
        await asyncio.sleep(0.01)
    bound_port = sock.getsockname()[1]
    return RunningSim(state, server, task, f"{'https' if tls else 'http'}://{host}:{bound_port}")
