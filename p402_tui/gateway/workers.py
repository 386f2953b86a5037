"""`p402 serve --workers N`: N gateway processes on one port, under a supervising parent.

Each worker is a whole `p402 serve` (its own orchestrator, store writer and cache) with its own
listening socket on the port, bound with SO_REUSEPORT, so the kernel hands each new connection to
one of them by a hash of its addresses. Chosen over one socket bound by the parent and inherited by
every worker (uvicorn's model): there, whichever worker wakes first accepts every connection waiting,
and a burst of them (a client opening its pool) could all land on one worker, which measured up to
all of them under load (README, Workers); the hash spreads any burst. Linux only: elsewhere
SO_REUSEPORT does not balance (macOS gives every connection to the last socket bound).

The parent binds the port too, without listening, so a port in use is found before any worker
starts, `--port 0` picks one port for all, and the port stays held while a worker restarts. The
first worker starts alone: it migrates the database, and a start-up error (a bad config, keys
missing for a public address) is its one line and the parent's exit code. The rest start together.
Workers run in their own process groups, so a terminal's Ctrl-C reaches the parent only, which tells
each worker to stop with SIGTERM: each drains as a lone `p402 serve` does. A worker whose parent
died stops by itself.

Workers are a fleet (p402_tui/fleet) unless `[fleet] enabled = false` says otherwise: `fleet_env` turns
the bus on for them, so a circuit, a cached answer and every event of one worker reach the others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ConfigError
from . import request_ids
from .server import _bind

ENV = "P402_WORKER"  # set by the parent for its workers: "slot:ready_fd:parent_pid"
ENV_SIM = "P402_WORKER_SIM"  # the parent's simulator, shared by its workers (`--workers N --sim`)
HEADER = b"x-p402-worker"
START_TIMEOUT_S = 120.0  # a worker not ready by then is stopped (a first start of the cache may be slow)
BACKOFF_S = 0.5  # before restarting a worker that died; doubled for each death soon after a start
MAX_BACKOFF_S = 30.0
STABLE_S = 30.0  # a worker that lived this long starts its backoff afresh when it dies
STOP_MARGIN_S = 20.0  # beyond the drain grace, for a worker to flush its store and exit


class CannotStart(Exception):
    """A worker exited, or hung, before it was ready; `code` is its exit status."""

    def __init__(self, slot: int, code: int | None) -> None:
        super().__init__(f"worker {slot} {_how(code)} before it was ready")
        self.code = code


# --- in a worker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """This process as one of a parent's workers, from what the parent put in its environment."""

    slot: int
    ready_fd: int
    parent: int
    sim_url: str | None

    @classmethod
    def from_environ(cls) -> Worker | None:
        spec = os.environ.get(ENV)
        if not spec:
            return None
        slot, ready_fd, parent = (int(part) for part in spec.split(":"))
        return cls(slot, ready_fd, parent, os.environ.get(ENV_SIM) or None)

    def socket(self, host: str, port: int) -> socket.socket:
        """This worker's socket on the shared port; every answer from here on names this worker."""
        request_ids.STAMP.append((HEADER, str(self.slot).encode()))
        return _bind(host, port, reuse_port=True)

    def ready(self) -> None:
        """Tell the parent this worker serves."""
        os.write(self.ready_fd, b"ready\n")
        os.close(self.ready_fd)

    async def orphaned(self) -> None:
        """Returns once the parent is gone (a `kill -9` of it leaves no one to stop this worker)."""
        while os.getppid() == self.parent:
            await asyncio.sleep(0.5)


# --- in the parent ------------------------------------------------------------------------------


def fleet_env(fleet: Any, env: Mapping[str, str], host: str, port: int) -> dict[str, str]:
    """What puts the workers on one fleet bus: on unless the config or P402_FLEET turned it off.
    Each worker labels itself with the fleet name (default host:port) and its slot (`fleet_name`)."""
    if ("enabled" in fleet.model_fields_set and not fleet.enabled) or env.get("P402_FLEET") == "0":
        return {}
    return {"P402_FLEET": "1", "P402_FLEET_NAME": fleet.name or env.get("P402_FLEET_NAME") or f"{socket.gethostname()}:{port}"}


def fleet_name(name: str, env: Mapping[str, str]) -> str:
    """A gateway's label in the fleet: a worker's is its parent's name with its slot, `<name>/w<slot>`."""
    spec = env.get(ENV)
    return f"{name}/w{spec.split(':')[0]}" if spec else name


def reserve(host: str, port: int) -> socket.socket:
    """The port, bound for the workers to share and never listened on: no connection comes to it."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("--workers needs Linux, where SO_REUSEPORT spreads connections over the workers")
    return _bind(host, port, reuse_port=True)  # its errors are the one-line ConfigError a lone `p402 serve` gives


@dataclass
class _Slot:
    id: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    quick_deaths: int = 0  # deaths soon after a start, in a row: how long the next restart waits
    keeper: asyncio.Task[None] | None = None


@dataclass
class Supervisor:
    """Starts `count` workers running `argv`, keeps them running, stops them."""

    count: int
    argv: Sequence[str]
    sim_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # more for every worker's environment (the fleet's)
    grace_s: float = 30.0  # each worker's drain bound ([gateway] drain_timeout_s), for its in-flight requests
    say: Callable[[str], None] = lambda line: print(f"p402 serve: {line}", file=sys.stderr, flush=True)
    slots: list[_Slot] = field(init=False)
    stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.slots = [_Slot(i) for i in range(1, self.count + 1)]

    @property
    def pids(self) -> list[int]:
        return [slot.proc.pid for slot in self.slots if slot.proc is not None]

    async def start(self) -> None:
        """Every worker started and ready, the first alone; raises CannotStart (having stopped the rest)."""
        try:
            await self._spawn(self.slots[0])
            outcomes = await asyncio.gather(*(self._spawn(slot) for slot in self.slots[1:]), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            await self.stop()
            raise
        for slot in self.slots:
            slot.keeper = asyncio.create_task(self._keep(slot), name=f"p402-worker-{slot.id}")

    async def stop(self) -> int:
        """SIGTERM to every worker, then wait for each to drain and exit (SIGKILL past the bound).
        Returns 0 when every worker exited cleanly."""
        self.stopping.set()
        keepers = [slot.keeper for slot in self.slots if slot.keeper is not None]
        for keeper in keepers:  # no restart from here on; one under way has its process in its slot
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        running = [slot.proc for slot in self.slots if slot.proc is not None and slot.proc.returncode is None]
        for proc in running:
            _signal(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(proc.wait() for proc in running)), self.grace_s + STOP_MARGIN_S)
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    self.say(f"worker (pid {proc.pid}) did not stop in time; killing it")
                    _signal(proc, signal.SIGKILL)
            await asyncio.gather(*(proc.wait() for proc in running))
        return 0 if all(proc.returncode == 0 for proc in running) else 1

    async def _spawn(self, slot: _Slot) -> None:
        """Start the slot's worker and wait until it says it serves."""
        read_end, write_end = os.pipe()
        env = {**os.environ, **self.env, ENV: f"{slot.id}:{write_end}:{os.getpid()}"}
        if self.sim_url is not None:
            env[ENV_SIM] = self.sim_url
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self.argv, pass_fds=(write_end,), env=env, stdin=asyncio.subprocess.DEVNULL,
                process_group=0,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the worker's copy is the only one left: its death ends the read below
        slot.started = time.monotonic()
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
        )
        try:
            said = await asyncio.wait_for(reader.read(16), START_TIMEOUT_S)  # b"" if it died first
        except TimeoutError:
            _signal(slot.proc, signal.SIGKILL)
            said = b""
        finally:
            transport.close()
        if said != b"ready\n":
            await slot.proc.wait()
            raise CannotStart(slot.id, slot.proc.returncode)

    async def _keep(self, slot: _Slot) -> None:
        """Restart the slot's worker whenever it dies, waiting longer after each death soon after a start."""
        while True:
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self.stopping.is_set():
                return
            lived = time.monotonic() - slot.started
            slot.quick_deaths = 0 if lived >= STABLE_S else slot.quick_deaths + 1
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** max(slot.quick_deaths - 1, 0))
            self.say(f"worker {slot.id} (pid {slot.proc.pid}) {_how(code)}; restarting it in {delay:g} s")
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                await self._spawn(slot)
            except CannotStart as error:
                self.say(str(error))
                continue
            self.say(f"worker {slot.id} is back (pid {slot.proc.pid})")


def _signal(proc: asyncio.subprocess.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
