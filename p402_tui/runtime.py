"""One place that assembles a running P402: settings, bus, orchestrator, optional simulator.

    async with Runtime.open(settings, sim=True) as rt:
        response = await rt.orchestrator.complete(request)

Used by `p402 chat`, `p402 serve`, the console and the demo, so they all run the
same system. With `sim=True` a simulator starts in-process (with realistic latency)
and every provider is pointed at it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import providers  # noqa: F401  registers the wire families the orchestrator makes adapters from
from .core.config import ResolvedProvider, Settings, describe_store, store_target
from .core.events import EventBus
from .core.hooks import Hooks, NoHooks
from .core.orchestrator import Orchestrator

if TYPE_CHECKING:  # the simulator (starlette, uvicorn) loads only when asked for: `p402 chat` never needs it
    from .service import Service
    from .sim.server import RunningSim


@dataclass
class Runtime:
    settings: Settings
    bus: EventBus
    orchestrator: Orchestrator
    store: Any = None  # store.Store once persistence is on (None with persist=False)
    cache: Any = None  # cache.SemanticCache once persistence is on
    sim: RunningSim | None = None
    sim_url: str | None = None  # where the simulated providers answer: this process's simulator or another's
    gateways: list[Any] = field(default_factory=list)  # gateway.server.RunningGateway, stopped first on exit
    fleet: Any = None  # fleet.link.FleetLink while a gateway serves with [fleet] enabled
    upkeep: asyncio.Task[None] | None = None  # while a gateway serves: reclaims dead processes' budget holds

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
        sim_url: str | None = None,
    ) -> AsyncIterator[Runtime]:
        """Start everything; on exit stop it in reverse order.

        `sim_url`: providers are simulated by a simulator another process runs (the supervisor's,
        under `p402 serve --workers`), instead of one started here.
        """
        async with AsyncExitStack() as stack:
            warn_if_unverified(settings)
            running = None
            if sim:
                from .sim.server import start_sim

                running = await start_sim(
                    settings.catalog, latency=sim_latency, azure_deployments=settings.azure_deployments()
                )
                stack.push_async_callback(running.stop)
                sim_url = running.url
            if sim_url is not None:
                settings.point_at(sim_url)
            if db_path is not None:
                settings.db_path = store_target(db_path)
            bus = EventBus()
            hooks: Hooks = NoHooks()
            store = cache = None
            if persist:
                from .cache.semantic import SemanticCache
                from .persistence import Persistence
                from .store.engine import open_store

                store = await open_store(settings.db_path, realtime=settings.file.store.realtime_writer)
                stack.push_async_callback(store.aclose)  # closed last: everything else may still write
                if settings.file.store.retention_days:
                    from .service.operations import retain

                    task = asyncio.create_task(retain(store, settings.file.store.retention_days), name="p402-retention")
                    stack.push_async_callback(_stopped, task)  # before the store closes
                # Provider embeddings use the orchestrator's adapters, looked up when first needed.
                cache = SemanticCache.from_config(
                    store, settings.cache, adapter_for=lambda provider: orchestrator.adapter(provider)
                )
                cache.start()  # embedder and entries load in the background; lookups wait for them
                stack.push_async_callback(cache.aclose)
                hooks = persistence = Persistence(
                    store, cache, simulated=sim_url is not None, strict=settings.file.store.durability == "strict"
                )
                stack.push_async_callback(persistence.drain)  # before the store closes
            orchestrator = Orchestrator(settings, bus=bus, hooks=hooks, transport_for=egress(settings))
            await orchestrator.start()
            stack.push_async_callback(orchestrator.aclose)
            runtime = cls(
                settings=settings, bus=bus, orchestrator=orchestrator, store=store, cache=cache, sim=running,
                sim_url=sim_url,
            )
            stack.push_async_callback(runtime.stop_gateways)
            yield runtime

    @cached_property
    def service(self) -> Service:
        """The use cases the front ends call: sessions, spend, decisions, keys."""
        from .service import Service

        return Service(self.store, self.settings.catalog, simulated=self.simulated)

    @property
    def simulated(self) -> bool:
        return self.sim_url is not None

    async def serve_gateway(self, host: str = "127.0.0.1", port: int = 4020, *, sock: Any = None) -> Any:
        """Serve the HTTP gateway in this loop; the handle has `url` and `stop()` (also done on exit).

        `sock`: a listening socket to serve instead of binding `host:port` (a worker's, inherited).
        """
        from .gateway.server import serve

        await self._join_fleet()
        await asyncio.to_thread(warm_tls, self.settings)
        if self.store is not None and self.upkeep is None:
            self.upkeep = asyncio.create_task(_reclaim_holds(self.store), name="p402-reclaim-holds")
        running = await serve(self, host, port, sock=sock)
        self.gateways.append(running)
        return running

    async def _join_fleet(self) -> None:
        """With [fleet] enabled (or P402_FLEET=1), tell the other gateways on this database what happens here."""
        conf = self.settings.file.fleet
        env = self.settings.env
        if self.fleet is not None or self.store is None or not (conf.enabled or env.get("P402_FLEET") == "1"):
            return
        from .fleet.bus import gateway_id
        from .fleet.link import FleetLink, open_bus
        from .gateway.workers import fleet_name

        name = fleet_name(gateway_id(conf.name or env.get("P402_FLEET_NAME")), env)
        bus = open_bus(self.store, name, conf.bus_url or env.get("P402_FLEET_BUS"))
        link = FleetLink(bus, self.bus, self.orchestrator.health, self.cache, relay_events=conf.events)
        await link.start()
        self.fleet = link

    async def stop_gateways(self) -> None:
        while self.gateways:
            await self.gateways.pop().stop()
        if self.fleet is not None:
            fleet, self.fleet = self.fleet, None
            await fleet.aclose()
        if self.upkeep is not None:
            upkeep, self.upkeep = self.upkeep, None
            await _stopped(upkeep)


async def _reclaim_holds(store: Any, every_s: float = 60.0) -> None:
    """Give back the budget reservations of processes that died (their holds expired), now and then."""
    from .store import shared

    while True:
        try:
            shared.reclaim(store)
        except Exception:  # the store closing: the next process reclaims what is left
            return
        await asyncio.sleep(every_s)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def warm_tls(settings: Settings) -> None:
    """Build the TLS context provider connections use (to be called on a thread, before serving). Loading the
    trust store holds the GIL for ~40 ms; built on the loop by the first upstream call, it stalled every
    request in flight. A context that cannot be built is left for that call to report, as before."""
    from .core.errors import ConfigError
    from .providers.trust import tls_context_for

    try:
        tls_context_for(settings.network, dict(settings.env))
    except ConfigError:
        pass


def warn_if_unverified(settings: Settings) -> None:
    """TLS verification is never off silently: a config that turns it off hears so, in one line, at every start."""
    from .providers.trust import insecure_warning

    warning = insecure_warning(settings.network)
    if not warning:
        return
    from . import logs

    if logs.active is not None:  # a server's stderr holds log lines only (one JSON object each, in JSON)
        logging.getLogger("p402").warning(warning.removeprefix("p402: WARNING: "))
    else:
        print(warning, file=sys.stderr, flush=True)


def egress(settings: Settings) -> Callable[[ResolvedProvider], Any]:
    """How each provider's adapter reaches it: direct or through its proxy, trusting what the settings say."""
    from .providers.transport import transport_for

    env = dict(settings.env)
    return lambda provider: transport_for(provider, settings.network, env)


@contextmanager
def ledger_for(settings: Settings, *, simulated: bool, named: bool) -> Iterator[str]:
    """Point `settings` at the database a recording command writes to; yield how to name it on start-up.

    Simulated traffic never enters a real ledger: unless the user named a database (`named`),
    a simulated run records into a temporary one that is removed when the command ends.
    """
    if not simulated or named:
        yield f"ledger {describe_store(settings.db_path)}" + (" (simulated rows are marked)" if simulated else "")
        return
    with tempfile.TemporaryDirectory(prefix="p402-sim-") as temp:
        settings.db_path = Path(temp) / "sim.db"
        yield f"ledger {settings.db_path} (temporary: simulated, removed on exit; --db keeps it)"
