"""Start the console: the first frame at once, the runtime behind it as it comes up.

`run_app` starts the Textual app and, once its first frame is drawn, opens the
data source in the same event loop: the screen is up before the runtime's
modules are even imported (they take longer than the app itself), and the panes
go live when the source connects.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from ..core.errors import P402Error
from .app import ConsoleApp
from .source import ConsoleSource, LocalSource

Opener = Callable[[], AbstractAsyncContextManager[ConsoleSource]]


async def run_app(app: ConsoleApp, open_source: Opener) -> None:
    """Run `app` until it quits, connected to the source `open_source` yields; close the source after."""
    shown = asyncio.create_task(app.run_async(), name="p402-console")
    try:
        while app.first_frame_at is None and not shown.done():
            await asyncio.sleep(0.01)
        if shown.done():
            return
        async with open_source() as source:
            if not shown.done():
                app.connect(source)
            await shown
    finally:
        if not shown.done():
            app.exit()
        await shown


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise P402Error(f"--listen wants HOST:PORT (like 127.0.0.1:4020), not {text!r}")
    return host or "127.0.0.1", int(port)


@asynccontextmanager
async def open_console(
    settings: Any, *, db_path: str | None = None, listen: tuple[str, int] | None = None, sim: bool = False
) -> AsyncIterator[LocalSource]:
    """The runtime for `p402 console`, with `listen` the gateway served from the same loop, with `sim` on the simulator."""
    from ..runtime import Runtime

    async with Runtime.open(settings, db_path=db_path, sim=sim) as runtime:
        label = "SIMULATED" if sim else "local"
        if listen is not None:
            gateway = await runtime.serve_gateway(*listen)
            label = f"local · gateway {gateway.url}"
        yield LocalSource(runtime, label=label, simulated=sim)


def run_console(args: argparse.Namespace, settings: Any) -> int:
    """`p402` / `p402 console`: the orchestrator in this process, providers from the config (or `--sim`)."""
    from ..runtime import ledger_for

    listen = parse_listen(args.listen) if getattr(args, "listen", None) else None
    sim = bool(getattr(args, "sim", False))
    if not sim and not settings.usable_providers():
        raise P402Error("no provider is configured: set a key (see `p402 providers`), or try `p402 demo`")
    app = ConsoleApp(refresh_interval=args.refresh)
    from .. import logs

    # The gateway's logs go to stderr as `p402 serve` writes them, unless stderr is where the console draws.
    logged = logs.server_logs(logs.from_flags(settings, args)) if listen and not sys.stderr.isatty() else nullcontext()
    with ledger_for(settings, simulated=sim, named=bool(getattr(args, "db", None))) as ledger, logged:
        print(f"p402 console: {ledger}", file=sys.stderr, flush=True)
        asyncio.run(run_app(app, lambda: open_console(settings, listen=listen, sim=sim)))
    return app.return_code or 0
