"""What the wire-family tests share: requests, fault set-up, and simulators of a test's own."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from p402_tui.core.adapters import make_adapter
from p402_tui.core.catalog import Catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.providers.base import Adapter
from p402_tui.sim.server import RunningSim, start_sim

# One model of each OpenAI-compatible provider, as the simulator serves them.
OPENAI_FAMILY_MODELS = {
    "openai": "gpt-4o-mini",
    "groq": "llama-3.3-70b-versatile",
    "deepseek": "deepseek-chat",
    "mistral": "mistral-small-latest",
    "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "fireworks": "accounts/fireworks/models/llama-v3p1-405b-instruct",
    "openrouter": "openai/gpt-4o",
    "perplexity": "sonar",
    "ai21": "jamba-mini-1.7",
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
# A 1x1 PNG, base64.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


def user(content) -> dict:
    return {"role": "user", "content": content}


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


def joined(chunks) -> str:
    return "".join(chunk.content for chunk in chunks)


async def add_fault(sim: RunningSim, provider: str, **fault) -> None:
    """Rehearse an outage through the simulator's control API, as a user would."""
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{sim.url}/_sim/faults", json={"provider": provider, **fault})
        assert response.status_code == 201, response.text


def with_context_window(catalog: Catalog, model_id: str, tokens: int) -> Catalog:
    """The catalog with one model's context window shrunk, so a short prompt overflows it."""
    spec = catalog.models[model_id]
    return Catalog(catalog.checked_on, catalog.providers, {**catalog.models, model_id: spec.model_copy(update={"context_window": tokens})})


@asynccontextmanager
async def adapters_on(settings: Settings, **defaults) -> AsyncIterator[Callable[..., Adapter]]:
    """`build(pid, **changes)` makes an adapter for one of `settings`' providers, its settings changed by
    `defaults` and then `changes`; every adapter built is closed on the way out."""
    made: list[Adapter] = []

    def build(pid: str, **changes) -> Adapter:
        adapter = make_adapter(dataclasses.replace(settings.providers[pid], **{**defaults, **changes}))
        made.append(adapter)
        return adapter

    try:
        yield build
    finally:
        for adapter in made:
            await adapter.aclose()


@asynccontextmanager
async def own_sim_adapter(catalog: Catalog, provider: str, **sim_options) -> AsyncIterator[tuple[Adapter, RunningSim]]:
    """An adapter for `provider` on a simulator of its own (started with `start_sim` options); both closed after."""
    running = await start_sim(catalog, **sim_options)
    adapter = make_adapter(Settings(ConfigFile(), catalog, env={}).point_at(running.url).providers[provider])
    try:
        yield adapter, running
    finally:
        await adapter.aclose()
        await running.stop()


async def wait_until(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    """Give the simulator's side of a closed connection a moment to notice; the caller asserts the outcome."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


class Served:
    """A `p402 serve` child; its URL is read from the line it prints."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        # -X importtime lists every module imported on stderr: how we see that textual stays out.
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "p402_tui.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env},
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        if not line.startswith("p402 gateway at "):
            self.proc.kill()
            self._reader.join(5)
            raise AssertionError(f"p402 serve did not start: {line!r} {''.join(self.stderr)[-2000:]}")
        self.line = line
        self.url = line.split()[3]
        self.sim_url = line.split("providers simulated at ")[-1].split(")")[0] if "simulated" in line else None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def imported(self) -> list[str]:
        return [line.rsplit("|", 1)[-1].strip() for line in self.stderr if line.startswith("import time:")]


# --- processes, as Linux's /proc shows them ------------------------------------------


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children(pid: int, module: str) -> list[int]:
    """The processes whose parent is `pid` and whose command line names `module`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid and module.encode() in command:
                found.append(int(entry.name))
    return found
