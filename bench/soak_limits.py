#!/usr/bin/env python3
"""Soak scenarios for the gateway's limits: memory per request and per subscriber, deadlines, slow
clients, durability under kill -9, and RSS across long runs. Run them through bench/soak.py.

Each scenario starts its own `p402 sim --no-latency` and `p402 serve` (pointed at it through a config
file, with a fresh database), drives them over loopback from this process, and returns a dict; the
list of them, with what each measures, is in bench/soak.py's docstring.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import Child, free_port, percentile, rss_mib, sim_config  # noqa: E402 - bench/gateway.py, beside this file

PYTHON = sys.executable
MODEL = "openai/gpt-4o-mini"
HEALTH_EVERY_S = 0.02


# --- processes ---------------------------------------------------------------------------


class Stack:
    """A simulator and a gateway in front of it, with the extra config given; `stop()` ends both."""

    def __init__(self, scratch: Path, extra_config: str = "", *, name: str = "serve") -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        sim_port, port = free_port(), free_port()
        self.sim = Child("sim", [PYTHON, "-m", "p402_tui.cli", "sim", "--no-latency", "--port", str(sim_port)],
                         scratch / "sim.log")
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.sim.wait_ready(f"{self.sim_url}/_sim/stats", 30)
        config = scratch / "p402.toml"
        config.write_text(sim_config(self.sim_url) + "\n" + extra_config)
        self.db = scratch / "p402.db"
        self.serve = Child(name, [PYTHON, "-m", "p402_tui.cli", "serve", "--config", str(config),
                                  "--port", str(port), "--db", str(self.db)], scratch / f"{name}.log")
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.serve.wait_ready(f"{self.url}/health", 60)

    def rss_mb(self) -> float:
        return rss_mb(self.serve.pid)

    def stop(self) -> None:
        self.serve.stop()
        self.sim.stop()


def rss_mb(pid: int) -> float:
    """Resident MB of a process and its children (`gateway.rss_mib`), 0 once it has gone."""
    return rss_mib(pid) or 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """RSS of a process every 20 ms, in a thread, while a block runs: `peak_mb`."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def settle(stack: Stack, seconds: float = 1.0) -> float:
    """RSS once it has stopped falling (memory is trimmed a moment after a large request)."""
    await asyncio.sleep(seconds)
    return round(stack.rss_mb(), 1)


# --- clients -----------------------------------------------------------------------------


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}


async def closed_loop(session: Any, url: str, *, concurrency: int, duration: float,
                      body: Callable[[int], dict[str, Any]] | None = None, limit: int | None = None) -> dict[str, Any]:
    """C workers, each sending its next request when the last is done; requests/s and latency."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    counter = [0]
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < deadline and (limit is None or counter[0] < limit):
            i = counter[0]
            counter[0] += 1
            payload = body(i) if body else chat_body(f"closed loop {i % 50}")
            began = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
                    await response.read()
                    if response.status != 200:
                        failures[str(response.status)] = failures.get(str(response.status), 0) + 1
                        continue
            except Exception as error:  # noqa: BLE001 - a soak counts failures, it does not stop on them
                key = type(error).__name__
                failures[key] = failures.get(key, 0) + 1
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"requests": len(ordered), "rps": round(len(ordered) / elapsed, 1), "failures": failures,
            "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99)}


_PROBE = """
import http.client, json, sys, threading, time
host, port, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop, out = threading.Event(), []
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
conn = http.client.HTTPConnection(host, port, timeout=30)
while not stop.is_set():
    began = time.perf_counter()
    conn.request("GET", "/health")
    conn.getresponse().read()
    out.append((time.perf_counter() - began) * 1000)
    time.sleep(every)
print(json.dumps(out))
"""


class HealthProbe:
    """/health every 20 ms from a process of its own (so this one's work is not in the figures)."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([PYTHON, "-c", _PROBE, "127.0.0.1", str(port), str(HEALTH_EVERY_S)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self) -> list[float]:
        out, _ = self.proc.communicate("", timeout=30)
        return json.loads(out)


def latency_summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99),
            "max_ms": round(ordered[-1], 1) if ordered else None}


def session(**kw: Any) -> Any:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=kw.pop("total", 300)),
                                 connector=aiohttp.TCPConnector(limit=kw.pop("limit", 100)))


# --- scenarios ---------------------------------------------------------------------------


async def _big_prompt(stack: Stack) -> dict[str, Any]:
    prompt = ("All work and no play makes a very long prompt indeed. " * 150_000)[:8_000_000]
    out: dict[str, Any] = {}
    async with session() as client:
        for i in range(5):  # warm: tokenizer, routes, connection pool
            async with client.post(f"{stack.url}/v1/chat/completions", json=chat_body(f"warm {i}")) as r:
                await r.read()
        base = await settle(stack)
        for label, copies, model in (("one", 1, "auto"), ("six", 6, "auto"), ("one_pinned", 1, MODEL)):
            probe = HealthProbe(stack.port)
            await asyncio.sleep(0.2)
            statuses: list[int] = []

            bodies = [json.dumps(chat_body(f"{i} {prompt}", model=model)).encode() for i in range(copies)]

            async def big(i: int) -> None:
                headers = {"content-type": "application/json"}
                async with client.post(f"{stack.url}/v1/chat/completions", data=bodies[i], headers=headers) as response:
                    await response.read()
                    statuses.append(response.status)

            began = time.perf_counter()
            with Sampler(stack.serve.pid) as sampler:
                await asyncio.gather(*(big(i) for i in range(copies)))
                took = time.perf_counter() - began
                await asyncio.sleep(0.5)  # the trim after it, too
                health = probe.stop()
            after = await settle(stack, 2.0)
            out[label] = {
                "statuses": statuses, "seconds": round(took, 2), "rss_before_mb": base,
                "rss_peak_mb": round(sampler.peak_mb, 1), "rss_after_mb": after,
                "rss_growth_mb": round(after - base, 1), "health": latency_summary(health),
            }
            base = after
    return out


async def big_prompt(scratch: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": {"one_growth_mb": "< 50", "six_peak_mb": "< 400", "health_max_ms": "< 50"}}
    for label, extra in (("cache_on", ""), ("cache_off", "[cache]\nenabled = false\n")):
        stack = Stack(scratch / label, extra)
        try:
            out[label] = await _big_prompt(stack)
        finally:
            stack.stop()
    return out


async def _subscriber(port: int, window: int | None = 4096) -> socket.socket:
    """A subscriber that never reads; `window`: its receive buffer (None: Linux's default, which takes
    64 kB and more of events into the client's kernel before the gateway's writes block)."""
    sock = socket.socket()
    if window is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)  # before connecting: a small window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /api/v2/events HTTP/1.1\r\nhost: soak\r\n\r\n")
    return sock


async def all_subscribed(client: Any, url: str, count: int, within: float = 15.0) -> int:
    """Wait (up to `within` s) until the gateway says it serves `count` event streams; how many it does."""
    deadline = time.perf_counter() + within
    while (connected := await subscribers(client, url)) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    return connected


async def subscribers(client: Any, url: str) -> int:
    """How many event streams the gateway says it serves (its /metrics gauge)."""
    async with client.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("p402_event_subscribers "):
                return int(line.split()[1])
    return -1


def _subscriber_load(i: int) -> dict[str, Any]:
    """The load beside the subscribers: half one of 50 prompts the cache answers, half routed to the
    simulator uncached (each a decision, an upstream call and a ledger row), so every kind of event flows
    and neither phase grows the cache."""
    if i % 2:
        return chat_body(f"stalled load {i}", p402={"cache": False})
    return chat_body(f"closed loop {i // 2 % 50}")


async def _load_slice(client: Any, stack: Stack, seconds: float) -> dict[str, Any]:
    """One slice of the subscribers' load on `stack`: requests, the gateway's CPU for them, its peak RSS."""
    pid = stack.serve.pid
    cpu = cpu_s(pid)
    with Sampler(pid) as sampler:
        run = await closed_loop(client, stack.url, concurrency=16, duration=seconds, body=_subscriber_load)
    run["cpu_s"] = round(cpu_s(pid) - cpu, 3)
    run["peak_mb"] = round(sampler.peak_mb, 1)
    return run


def _phase(slices: list[dict[str, Any]], base_mb: float) -> dict[str, Any]:
    requests = sum(s["requests"] for s in slices)
    seconds = sum(s["requests"] / s["rps"] for s in slices if s["rps"])
    cpu = sum(s["cpu_s"] for s in slices)
    peak = max(s["peak_mb"] for s in slices)
    failures: dict[str, int] = {}
    for s in slices:
        for key, n in s["failures"].items():
            failures[key] = failures.get(key, 0) + n
    return {"rss_before_mb": base_mb, "rss_peak_mb": peak, "growth_mb": round(peak - base_mb, 1),
            "requests": requests, "rps": round(requests / seconds, 1) if seconds else 0.0,
            "rps_by_slice": [s["rps"] for s in slices],
            "cpu_ms_per_request": round(1000 * cpu / requests, 3) if requests else None,
            "cpu_ms_per_request_by_slice": [round(1000 * s["cpu_s"] / s["requests"], 3) if s["requests"] else None
                                            for s in slices],
            "failures": failures}


async def stalled_subscribers(scratch: Path, count: int = 500, slice_s: float = 3.0, pairs: int = 4,
                              burst: int = 150, window: int | None = 4096) -> dict[str, Any]:
    """500 subscribers that never read, against a control: two identical fresh stacks take the same load
    in alternating slices (control, subscribed, subscribed, control, ...: a drift in the machine's load
    falls on both alike), the subscribed one with `count` stalled subscribers from before its first slice.
    Their cost is what they add over the control: RSS growth, requests/s and CPU a request.

    Both stacks are warmed with the load itself first, so neither phase pays for a first sight (the
    cache's entries, MiniLM loading, the routes' first calls) that the other does not. The stalled
    subscribers fall behind and are cut during the first subscribed slice; then a second set of `count`
    is filled with events (a burst of `burst` requests, fewer events than the log holds, so none is cut)
    and closes its sockets at once: the disconnect spike is RSS over what it was before they closed."""
    config = "[gateway]\nmax_event_subscribers = 1024\n"
    control, subscribed = Stack(scratch / "control", config), Stack(scratch / "subscribed", config)
    try:
        async with session() as client:
            for stack in (control, subscribed):
                await closed_loop(client, stack.url, concurrency=16, duration=slice_s, body=_subscriber_load)
            bases = {"control": await settle(control), "subscribed": await settle(subscribed)}
            socks = [await _subscriber(subscribed.port, window) for _ in range(count)]
            connected = await all_subscribed(client, subscribed.url, count)
            idle_mb = await settle(subscribed, 0.5)
            slices: dict[str, list[dict[str, Any]]] = {"control": [], "subscribed": []}
            for k in range(pairs):
                order = ("control", "subscribed") if k % 2 == 0 else ("subscribed", "control")
                for name in order:
                    stack = control if name == "control" else subscribed
                    slices[name].append(await _load_slice(client, stack, slice_s))
            await asyncio.sleep(2)
            still_open = await subscribers(client, subscribed.url)
            for sock in socks:
                sock.close()
            await asyncio.sleep(1)
            # The disconnect: a fresh set, each holding what it has not read, closes together.
            socks = [await _subscriber(subscribed.port, window) for _ in range(count)]
            await all_subscribed(client, subscribed.url, count)
            await closed_loop(client, subscribed.url, concurrency=16, duration=60, body=_subscriber_load, limit=burst)
            await asyncio.sleep(1)
            held = await subscribers(client, subscribed.url)
            before_mb = await settle(subscribed, 0.5)
            with Sampler(subscribed.serve.pid) as disconnect:
                for sock in socks:
                    sock.close()
                await asyncio.sleep(2)
            after_mb = await settle(subscribed)
            left = await subscribers(client, subscribed.url)
    finally:
        control.stop()
        subscribed.stop()
    ctl, sub = _phase(slices["control"], bases["control"]), _phase(slices["subscribed"], bases["subscribed"])
    sub.update({"subscribed": connected, "rss_with_subscribers_idle_mb": idle_mb,
                "idle_subscribers_mb": round(idle_mb - bases["subscribed"], 1),
                "still_subscribed_after_load": still_open})
    return {
        "subscribers": count, "receive_window": window or "Linux's default", "slice_s": slice_s, "slices_each": pairs,
        "load": "concurrency 16; half 50 cached prompts, half routed uncached", "control": ctl, "with_subscribers": sub,
        "disconnect": {"subscribers_holding_events": held, "burst_requests": burst, "rss_before_mb": before_mb,
                       "rss_peak_mb": round(disconnect.peak_mb, 1), "rss_after_mb": after_mb,
                       "subscribers_left": left},
        "cost_mb": round(sub["growth_mb"] - ctl["growth_mb"], 1),
        "slowdown_pct": round(100 * (1 - sub["rps"] / ctl["rps"]), 1) if ctl["rps"] else None,
        "cpu_overhead_pct": (round(100 * (sub["cpu_ms_per_request"] / ctl["cpu_ms_per_request"] - 1), 1)
                             if ctl["cpu_ms_per_request"] and sub["cpu_ms_per_request"] else None),
        "disconnect_spike_mb": round(max(0.0, disconnect.peak_mb - before_mb), 1),
        # The slice in which the stalled subscribers were still connected (they are cut in it), against the
        # control's mean: the cost while it lasts, which the whole phase's figures dilute.
        "first_slice_slowdown_pct": round(100 * (1 - sub["rps_by_slice"][0] / ctl["rps"]), 1) if ctl["rps"] else None,
        "first_slice_cpu_overhead_pct": (round(100 * (sub["cpu_ms_per_request_by_slice"][0] / ctl["cpu_ms_per_request"] - 1), 1)
                                         if ctl["cpu_ms_per_request"] and sub["cpu_ms_per_request_by_slice"][0] else None),
        "targets": {"cost_mb": "< 100", "slowdown_pct": "<= 5", "cpu_overhead_pct": "<= 5",
                    "disconnect_spike_mb": "~0 (no spike)"},
    }


async def hung_upstream(scratch: Path) -> dict[str, Any]:
    stack = Stack(scratch)
    try:
        async with session(total=600) as client:
            async with client.post(f"{stack.sim_url}/_sim/faults", json={"kind": "timeout"}) as r:
                r.raise_for_status()

            async def one(label: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
                began = time.perf_counter()
                async with client.post(f"{stack.url}/v1/chat/completions", json=body) as response:
                    text = await response.text()
                took = time.perf_counter() - began
                code = None
                if response.status != 200 and text.startswith("{"):
                    code = json.loads(text).get("error", {}).get("code")
                elif body.get("stream"):
                    code = "error chunk" if '"error"' in text else "no error"
                return label, {"status": response.status, "code": code, "seconds": round(took, 2)}

            results = dict(await asyncio.gather(
                one("default_deadline", chat_body("hang")),
                one("default_deadline_stream", chat_body("hang", stream=True)),
                one("timeout_s_5", chat_body("hang", p402={"timeout_s": 5})),
            ))
    finally:
        stack.stop()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from p402_tui.core.config import RouterConfig

    return {"request_timeout_s": RouterConfig().request_timeout_s, **results,
            "target": "each ends within its deadline (+1 s), with 504 deadline_exceeded"}


async def _slow_client(port: int, lines: list[bytes], every_s: float, stop_at: float) -> float | None:
    """Send `lines` one every `every_s`; seconds until the server closed the connection (None: it never did)."""
    began = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0.0
    try:
        for line in lines:
            writer.write(line)
            try:
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1), every_s)
                if not data:
                    return time.perf_counter() - began
            except asyncio.TimeoutError:
                if time.perf_counter() > stop_at:
                    return None
            except (ConnectionError, OSError):
                return time.perf_counter() - began
        return None
    finally:
        writer.close()


async def slow_headers(scratch: Path, headers: int = 1000, bodies: int = 500, every_s: float = 10.0,
                       window_s: float = 60.0) -> dict[str, Any]:
    stack = Stack(scratch)
    try:
        stop_at = time.perf_counter() + window_s
        header_lines = [b"GET /health HTTP/1.1\r\n"] + [f"x-slow-{i}: {i}\r\n".encode() for i in range(100)]
        body_lines = [b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\ncontent-length: 1000\r\n\r\n"]
        body_lines += [b"{"] * 999
        slow = [asyncio.create_task(_slow_client(stack.port, header_lines, every_s, stop_at)) for _ in range(headers)]
        slow += [asyncio.create_task(_slow_client(stack.port, body_lines, every_s, stop_at)) for _ in range(bodies)]
        await asyncio.sleep(1)
        async with session() as client:
            normal = await closed_loop(client, stack.url, concurrency=4, duration=20)
        closed = await asyncio.gather(*slow)
    finally:
        stack.stop()

    def summary(times: list[float | None]) -> dict[str, Any]:
        done = sorted(t for t in times if t is not None)
        return {"connections": len(times), "closed": len(done), "never_closed": len(times) - len(done),
                "closed_within_30s": sum(t <= 30 for t in done),
                "median_s": round(statistics.median(done), 1) if done else None,
                "max_s": round(done[-1], 1) if done else None}

    return {"slow_headers": summary(closed[:headers]), "slow_bodies": summary(closed[headers:]),
            "normal_requests_meanwhile": normal, "target": "1,000 slow-header connections closed within 30 s"}


async def _kill_run(scratch: Path, durability: str, seconds: float = 4.0) -> dict[str, Any]:
    stack = Stack(scratch, f'[store]\ndurability = "{durability}"\n')
    acknowledged: dict[str, float] = {}
    killed_at = [0.0]
    try:
        async with session(total=30) as client:
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    tag = f"k{w}-{i}"
                    i += 1
                    try:
                        async with client.post(f"{stack.url}/v1/chat/completions",
                                               json=chat_body(f"kill {tag}", p402={"tag": tag, "cache": False})) as r:
                            await r.read()
                            if r.status == 200:
                                acknowledged[tag] = time.perf_counter()
                    except Exception:  # noqa: BLE001 - the server is killed mid-request: expected
                        return

            workers = [asyncio.create_task(worker(w)) for w in range(16)]
            await asyncio.sleep(seconds)
            os.killpg(stack.serve.proc.pid, signal.SIGKILL)
            killed_at[0] = time.perf_counter()
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    finally:
        stack.stop()
    with sqlite3.connect(stack.db) as conn:
        tags = {row[0] for row in conn.execute("SELECT tag FROM requests")}
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    missing = [tag for tag in acknowledged if tag not in tags and acknowledged[tag] <= killed_at[0]]
    window = max((killed_at[0] - acknowledged[tag]) * 1000 for tag in missing) if missing else 0.0
    return {"acknowledged": len(acknowledged), "ledger_rows": len(tags), "missing": len(missing),
            "window_ms": round(window, 1), "rps": round(len(acknowledged) / seconds, 1), "integrity": integrity}


async def kill9(scratch: Path) -> dict[str, Any]:
    strict = [await _kill_run(scratch / f"strict{i}", "strict") for i in range(4)]
    batch = [await _kill_run(scratch / f"batch{i}", "batch") for i in range(4)]
    return {"strict": strict, "batch": batch,
            "strict_missing_total": sum(run["missing"] for run in strict),
            "batch_window_ms_max": max(run["window_ms"] for run in batch),
            "targets": {"strict_missing_total": 0, "batch_window_ms_max": "< 50"}}


async def durability_cost(scratch: Path, duration: float = 8.0) -> dict[str, Any]:
    """What strict durability costs a request: latency at 1 and 16 concurrent, batch against strict, no cache."""
    out: dict[str, Any] = {}
    for mode in ("batch", "strict"):
        stack = Stack(scratch / mode, f'[store]\ndurability = "{mode}"\n')
        try:
            async with session() as client:
                body = lambda i: chat_body(f"cost {i}", p402={"cache": False})  # noqa: E731
                await closed_loop(client, stack.url, concurrency=4, duration=1, body=body)
                out[mode] = {f"c{c}": await closed_loop(client, stack.url, concurrency=c, duration=duration, body=body)
                             for c in (1, 16)}
        finally:
            stack.stop()
    out["added_p50_ms"] = {c: round(out["strict"][c]["p50_ms"] - out["batch"][c]["p50_ms"], 2) for c in ("c1", "c16")}
    return out


ARENA_HEAP = 64 << 20  # glibc's heaps for threads' arenas: 64 MB reserved each, aligned to their size


def resident_by_kind(pid: int) -> dict[str, float]:
    """A process's resident MB by kind of mapping (/proc/PID/smaps): glibc's main heap (the loop thread's
    arena), the other threads' arena heaps, other anonymous memory (Python's object arenas, large arrays
    and whatever else was mmapped), and file-backed pages (libraries, the model, the database's shm); and, of
    all of them, how much is in transparent huge pages (numpy asks for them on its large arrays, and a huge
    page is resident whole, the part of an array's capacity not yet written included)."""
    kinds = {"main_heap": 0.0, "thread_arenas": 0.0, "other_anonymous": 0.0, "file_backed": 0.0, "stacks_and_special": 0.0,
             "of_which_huge_pages": 0.0}
    kind = "other_anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef" and ":" not in fields[0]:
            start = int(fields[0].split("-")[0], 16)
            name = fields[5] if len(fields) > 5 else ""
            if name == "[heap]":
                kind = "main_heap"
            elif name.startswith("/"):
                kind = "file_backed"
            elif name:
                kind = "stacks_and_special"
            else:
                kind = "thread_arenas" if start % ARENA_HEAP == 0 else "other_anonymous"
        elif fields[0] == "Rss:":
            kinds[kind] += int(fields[1]) / 1024
        elif fields[0] == "AnonHugePages:":
            kinds["of_which_huge_pages"] += int(fields[1]) / 1024
    return {name: round(mb, 1) for name, mb in kinds.items()}


async def rss_batches(scratch: Path, per_batch: int = 10_000) -> dict[str, Any]:
    stack = Stack(scratch)
    out: dict[str, Any] = {}
    try:
        async with session() as client:
            await closed_loop(client, stack.url, concurrency=8, duration=2, body=lambda i: chat_body(f"warm {i}"))
            rss = [await settle(stack)]
            kinds = [resident_by_kind(stack.serve.pid)]
            entries = []
            for batch in range(2):
                run = await closed_loop(
                    client, stack.url, concurrency=16, duration=600, limit=per_batch,
                    body=lambda i, b=batch: chat_body(f"batch {b} question {i}: what is {i} plus {b}?"),
                )
                rss.append(await settle(stack, 2.0))
                kinds.append(resident_by_kind(stack.serve.pid))
                async with client.get(f"{stack.url}/api/v2/cache") as r:
                    cache = await r.json()
                entries.append(cache)
                out[f"batch{batch + 1}"] = {"requests": run["requests"], "rps": run["rps"],
                                            "failures": run["failures"], "rss_after_mb": rss[-1],
                                            "cache_entries": cache.get("entries"),
                                            "cache_memory_mb": round(cache.get("memory_bytes", 0) / 2**20, 2),
                                            "cache_index_mb": round(cache.get("index_bytes", 0) / 2**20, 2)}
            # A control: the same traffic with the cache off shows what the rest of the process may grow by in a
            # batch (the store's page caches filling, the allocators' slack): the noise beside the comparison.
            run = await closed_loop(
                client, stack.url, concurrency=16, duration=600, limit=per_batch,
                body=lambda i: chat_body(f"batch 3 question {i}: what is {i} plus 3?", p402={"cache": False}),
            )
            rss.append(await settle(stack, 2.0))
            kinds.append(resident_by_kind(stack.serve.pid))
            out["batch3_cache_off"] = {"requests": run["requests"], "rps": run["rps"], "failures": run["failures"],
                                       "rss_after_mb": rss[-1]}
    finally:
        stack.stop()
    added = (entries[1].get("entries") or 0) - (entries[0].get("entries") or 0)
    growth = rss[2] - rss[1]
    # What the cache says its entries, LRU table, indexes and probes hold (`memory_bytes`, which
    # tests/test_cache_memory.py holds to tracemalloc's count), grown over the second batch.
    accounted = ((entries[1].get("memory_bytes") or 0) - (entries[0].get("memory_bytes") or 0)) / 2**20
    out.update({"rss_start_mb": rss[0], "growth_second_batch_mb": round(growth, 1),
                "cache_entries_added": added, "cache_accounts_for_mb": round(accounted, 1),
                "growth_per_entry_kb": round(growth * 1024 / added, 2) if added else None,
                "cache_per_entry_kb": round(accounted * 1024 / added, 2) if added else None,
                "within": growth <= accounted,
                # Where the second batch's growth is resident, by kind of mapping (`resident_by_kind`).
                "growth_second_batch_by_kind_mb": {k: round(kinds[2][k] - kinds[1][k], 1) for k in kinds[2]},
                "growth_first_batch_by_kind_mb": {k: round(kinds[1][k] - kinds[0][k], 1) for k in kinds[1]},
                "control_cache_off_growth_mb": round(rss[3] - rss[2], 1),
                "control_cache_off_growth_by_kind_mb": {k: round(kinds[3][k] - kinds[2][k], 1) for k in kinds[3]}})
    return out


SCENARIOS: dict[str, Callable[[Path], Any]] = {
    "big_prompt": big_prompt,
    "stalled_subscribers": stalled_subscribers,
    "stalled_subscribers_default_window": functools.partial(stalled_subscribers, window=None),
    "hung_upstream": hung_upstream,
    "slow_headers": slow_headers,
    "kill9": kill9,
    "durability_cost": durability_cost,
    "rss_batches": rss_batches,
}
