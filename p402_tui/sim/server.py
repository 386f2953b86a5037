"""The simulator as one loopback HTTP server.

Every provider is mounted at `/{provider_id}` plus the path of its official base
URL, so `http://127.0.0.1:P/groq/openai/v1` stands for `https://api.groq.com/openai/v1`
and both our adapters and the official SDKs work against it unchanged.

Control API (for rehearsing outages):
    POST   /_sim/faults   a Fault body; DELETE /_sim/faults[?provider=P] clears
    GET    /_sim/faults   the faults in force
    GET    /_sim/stats    calls per provider and model, stream counters
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from dataclasses import dataclass

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from ..core.catalog import Catalog
from .engine import Fault, SimState

FAMILY_MODULES = {
    "openai": "openai_family",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "cohere": "cohere",
}


def _family_routes(state: SimState) -> list[BaseRoute]:
    mounts: list[BaseRoute] = []
    for provider in state.catalog.providers.values():
        module = importlib.import_module(f"{__package__}.{FAMILY_MODULES[provider.wire]}")
        mounts.append(Mount(f"/{provider.id}{provider.base_path}", routes=module.routes(state, provider)))
    return mounts


def build_app(state: SimState) -> Starlette:
    async def add_fault(request: Request) -> JSONResponse:
        try:
            fault = Fault.model_validate_json(await request.body())
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=400)
        if fault.provider != "*" and fault.provider not in state.catalog.providers:
            return JSONResponse({"error": f"unknown provider {fault.provider!r}"}, status_code=400)
        state.add_fault(fault)
        return JSONResponse({"ok": True, "faults": len(state.faults)}, status_code=201)

    async def list_faults(request: Request) -> JSONResponse:
        return JSONResponse([f.model_dump() for f in state.faults])

    async def clear_faults(request: Request) -> JSONResponse:
        state.clear_faults(request.query_params.get("provider"))
        return JSONResponse({"ok": True, "faults": len(state.faults)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(state.stats())

    control = [
        Route("/_sim/faults", add_fault, methods=["POST"]),
        Route("/_sim/faults", list_faults, methods=["GET"]),
        Route("/_sim/faults", clear_faults, methods=["DELETE"]),
        Route("/_sim/stats", stats, methods=["GET"]),
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
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
) -> RunningSim:
    """Serve the simulator as a task in the running loop (port 0 picks a free one)."""
    state = SimState(catalog, seed=seed, latency=latency, speed=speed)
    sock = _free_socket(host, port)
    config = uvicorn.Config(
        build_app(state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # surfaces the start-up error
        await asyncio.sleep(0.01)
    bound_port = sock.getsockname()[1]
    return RunningSim(state, server, task, f"http://{host}:{bound_port}")
