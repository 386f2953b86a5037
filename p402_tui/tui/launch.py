"""Start the console: the first frame at once, the runtime behind it as it comes up.

`run_app` starts the Textual app and, once its first frame is drawn, opens the
data source in the same event loop: the screen is up before the runtime's
modules are even imported (they take longer than the app itself), and the panes
go live when the source connects.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
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


def run_console(args: argparse.Namespace, settings: Any) -> int:
    """`p402` / `p402 console`: the orchestrator in this process, providers from the config."""
    from contextlib import asynccontextmanager

    from ..runtime import Runtime

    listen = parse_listen(args.listen) if getattr(args, "listen", None) else None
    if not settings.usable_providers():
        raise P402Error("no provider is configured: set a key (see `p402 providers`), or try `p402 demo`")

    @asynccontextmanager
    async def open_source():
        async with Runtime.open(settings, db_path=getattr(args, "db", None)) as runtime:
            label = "local"
            if listen is not None:
                serve = getattr(runtime, "serve_gateway", None)
                if serve is None:
                    raise P402Error("this build cannot serve the gateway yet (--listen)")
                await serve(*listen)
                label = f"local · gateway on {listen[0]}:{listen[1]}"
            yield LocalSource(runtime, label=label)

    app = ConsoleApp(refresh_interval=args.refresh)
    asyncio.run(run_app(app, open_source))
    return app.return_code or 0
