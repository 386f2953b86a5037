"""One place that assembles a running P402: settings, bus, orchestrator, optional simulator.

    async with Runtime.open(settings, sim=True) as rt:
        response = await rt.orchestrator.complete(request)

Used by `p402 chat`, `p402 serve`, the console and the demo, so they all run the
same system. With `sim=True` a simulator starts in-process (with realistic latency)
and every provider is pointed at it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.config import Settings
from .core.events import EventBus
from .core.hooks import Hooks, NoHooks
from .core.orchestrator import Orchestrator
from .sim.server import RunningSim, start_sim


@dataclass
class Runtime:
    settings: Settings
    bus: EventBus
    orchestrator: Orchestrator
    store: Any = None  # store.Store once persistence is on (None with persist=False)
    cache: Any = None  # cache.SemanticCache once persistence is on
    sim: RunningSim | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        db_path: str | Path | None = None,
        sim: bool = False,
        persist: bool = True,
        sim_latency: bool = True,
    ) -> AsyncIterator[Runtime]:
        """Start everything; on exit stop it in reverse order."""
        async with AsyncExitStack() as stack:
            running = None
            if sim:
                running = await start_sim(settings.catalog, latency=sim_latency)
                stack.push_async_callback(running.stop)
                settings.point_at(running.url)
            if db_path is not None:
                settings.db_path = Path(db_path).expanduser()
            bus = EventBus()
            hooks: Hooks = NoHooks()
            store = cache = None
            # Persistence seam: the store package opens the SQLite store and the semantic cache here
            # (when `persist`) and passes its Hooks implementation to the orchestrator.
            orchestrator = Orchestrator(settings, bus=bus, hooks=hooks)
            await orchestrator.start()
            stack.push_async_callback(orchestrator.aclose)
            yield cls(settings=settings, bus=bus, orchestrator=orchestrator, store=store, cache=cache, sim=running)
