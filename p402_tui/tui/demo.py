"""`p402 demo`: the console on simulated providers, with traffic and incidents. No keys, no network.

The simulator runs in this process with realistic latency and all 12 providers
point at it; a traffic generator sends varied requests through the same
orchestrator, store and cache as real traffic, and a script of incidents (a
provider rate-limits, another goes down and recovers) keeps the health pane
honest. Unless `--db` names a file, the ledger is a temporary database, removed
on exit, so simulated spend never mixes with real spend.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the runtime is imported only once the console's first frame is up
    from ..core.config import Settings
    from ..runtime import Runtime
    from ..sim.traffic import SessionMaker, TrafficGenerator
    from .source import LocalSource


@dataclass
class Demo:
    runtime: Runtime
    traffic: TrafficGenerator
    source: LocalSource


def session_maker(service: Any) -> SessionMaker | None:
    """Make (or, on a kept database, find again by name) the demo's agent sessions."""
    if not service.persistent:
        return None

    async def make(name: str, budget_usd: float) -> str:
        for session in await service.sessions():
            if session["name"] == name:
                return session["id"]
        return (await service.create_session(name, budget_usd=budget_usd, agent="p402-demo"))["id"]

    return make


@asynccontextmanager
async def open_demo(settings: Settings, *, db_path: str | Path | None, sim_speed: float = 1.0, **traffic: Any) -> AsyncIterator[Demo]:
    """A running demo: simulator, runtime and traffic (`traffic` goes to the TrafficGenerator: rate, seed,
    incidents, time_scale...). `sim_speed` > 1 answers faster than the catalog's pace (tests, benchmarks)."""
    from ..runtime import Runtime
    from ..sim.traffic import TrafficGenerator, demo_sessions
    from .source import LocalSource

    async with Runtime.open(settings, sim=True, db_path=db_path) as runtime:
        assert runtime.sim is not None
        runtime.sim.state.speed = sim_speed
        generator = TrafficGenerator(runtime.orchestrator, runtime.sim.state, **traffic)
        generator.start()  # traffic first, so the panes fill at once; its sessions join as they are made
        generator.sessions.extend(await demo_sessions(session_maker(runtime.service)))
        try:
            yield Demo(runtime, generator, LocalSource(runtime, simulated=True))
        finally:
            await generator.stop()


def run(args: argparse.Namespace) -> int:
    from .app import ConsoleApp
    from .launch import run_app

    temp_dir = None if args.db else tempfile.mkdtemp(prefix="p402-demo-")
    from ..core.config import store_target

    db_path = store_target(args.db) if args.db else Path(temp_dir) / "demo.db"  # type: ignore[arg-type]

    @asynccontextmanager
    async def open_source():
        from ..core.config import settings_from

        settings = settings_from(args)  # a broken config file ends the app with its one-line error
        async with open_demo(settings, db_path=db_path, rate=args.rate, seed=args.seed) as demo:
            yield demo.source

    app = ConsoleApp(refresh_interval=args.refresh)
    try:
        asyncio.run(run_app(app, open_source))
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    where = f"kept in {db_path}" if args.db else "a temporary database, removed"
    print(f"p402 demo: the simulated ledger was {where}", file=sys.stderr)
    return app.return_code or 0
