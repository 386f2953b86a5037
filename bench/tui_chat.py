#!/usr/bin/env python3
"""Does the chat keep up? Streamed answers into the real chat and compare views, headless.

A `p402 sim` process (its own CPU, as a provider would be) streams fixed-length
answers; the console runs in this process with `App.run_test`, the real
orchestrator behind it. Each answer goes through the chat screen's own path
(`Markdown.get_stream`) while this script watches, every 20 ms, how much of
the text the widget shows against how much has arrived.

    chat_paced      one answer at 1,000 pieces/s (a piece is one streamed delta, about a token)
    chat_unpaced    one answer as fast as the simulator sends it: the most the view absorbs
    compare_unpaced four columns at once, each as fast as it comes

Reported per case: pieces and tokens per second as delivered, the display's
staleness (age of the oldest text that has arrived but is not shown yet:
p50/p95/max), the catch-up after the last piece (last piece in to all of it
shown), event-loop lag (how late a 10 ms timer fires: what a keystroke waits
for), and how many `Markdown.append` calls the stream coalesced the pieces into.
Target: at 1,000 pieces/s the display stays within a few frames of the stream
and catches up at once when it ends.

    python bench/tui_chat.py [--pieces 3000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p402_tui.core.catalog import load_catalog  # noqa: E402
from p402_tui.core.config import ConfigFile, ProviderConfig, Settings  # noqa: E402
from p402_tui.runtime import Runtime  # noqa: E402
from p402_tui.tui.app import ConsoleApp  # noqa: E402
from p402_tui.tui.screens.chat import AnswerView, ChatScreen, LocalLink  # noqa: E402
from p402_tui.tui.screens.compare import CompareScreen  # noqa: E402
from p402_tui.tui.source import LocalSource  # noqa: E402

SIZE = (160, 48)
CHAT_MODEL = "openai/gpt-4o-mini"
COMPARE_MODELS = ["openai/gpt-4o-mini", "google/gemini-2.5-flash", "groq/llama-3.1-8b-instant",
                  "mistral/mistral-small-latest"]
PIECES_HEADER = "x-p402-sim-pieces"


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "max": round(ordered[-1], 2),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Simulator:
    """`p402 sim` in a child process at `speed` (None: no latency at all)."""

    def __init__(self, speed: float | None) -> None:
        self.port = free_port()
        pace = ["--no-latency"] if speed is None else ["--speed", f"{speed:.4f}"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p402_tui.cli", "sim", "--port", str(self.port), *pace],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("p402 sim did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Watched:
    """The orchestrator's stream, noting when each piece reached the screen's hands."""

    def __init__(self, stream, arrivals: list[tuple[float, int]]) -> None:
        self._stream = stream
        self._arrivals = arrivals
        self._chars = 0

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __aiter__(self):
        return self

    async def __anext__(self):
        chunk = await self._stream.__anext__()
        if chunk.content:
            self._chars += len(chunk.content)
            self._arrivals.append((time.perf_counter(), self._chars))
        return chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class WatchedLink(LocalLink):
    def __init__(self, orchestrator) -> None:
        super().__init__(orchestrator)
        self.arrivals: dict[str, list[tuple[float, int]]] = {}

    def stream(self, request, options, ctx):
        arrivals = self.arrivals.setdefault(options.model or "auto", [])
        return Watched(self.orchestrator.stream(request, options, ctx), arrivals)


class BenchSource(LocalSource):
    def __init__(self, runtime) -> None:
        super().__init__(runtime, simulated=True)
        self.chat_link = WatchedLink(runtime.orchestrator)


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append((time.perf_counter() - start - 0.01) * 1000)


def staleness(arrivals: list[tuple[float, int]], shown: list[tuple[float, int]]) -> list[float]:
    """For each sample: ms since the oldest piece that has arrived but is not on screen yet arrived."""
    times = [t for t, _ in arrivals]
    lengths = [n for _, n in arrivals]
    out = []
    for t, length in shown:
        received = bisect.bisect_right(times, t)
        if received == 0 or lengths[received - 1] <= length:
            out.append(0.0)
            continue
        oldest = bisect.bisect_right(lengths, length)  # the first piece that took the text past what is shown
        out.append((t - times[oldest]) * 1000)
    return out


def summary(arrivals: list[tuple[float, int]], shown: list[tuple[float, int]], done_at: float | None,
            pieces: int, tokens: int | None) -> dict:
    first, last = arrivals[0][0], arrivals[-1][0]
    span = max(last - first, 1e-9)
    return {
        "pieces": pieces,
        "pieces_per_s": round(pieces / span),
        "tokens_per_s": round(tokens / span) if tokens else None,
        "stream_s": round(span, 3),
        "staleness_ms": percentiles(staleness(arrivals, [s for s in shown if first <= s[0] <= last])),
        "catch_up_ms": None if done_at is None else round(max(done_at - last, 0.0) * 1000, 1),
    }


async def watch_widgets(markdowns, total_of, shown: dict, stop: asyncio.Event, done: dict) -> None:
    while not stop.is_set():
        now = time.perf_counter()
        for key, markdown in markdowns().items():
            length = len(markdown.source)
            shown.setdefault(key, []).append((now, length))
            total = total_of(key)
            if total and length >= total and key not in done:
                done[key] = now
        await asyncio.sleep(0.02)


async def run_chat(settings: Settings) -> dict:
    async with Runtime.open(settings, persist=False) as runtime:
        source = BenchSource(runtime)
        app = ConsoleApp(source, view="chat")
        appends = count_appends()
        async with app.run_test(size=SIZE) as pilot:
            while not (isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input")):
                await pilot.pause(0.02)
            screen = app.screen
            while len(screen.query_one("#chat-model")._options) <= 1:
                await pilot.pause(0.02)
            screen.query_one("#chat-model").value = CHAT_MODEL
            await pilot.pause()
            arrivals = source.chat_link.arrivals.setdefault(CHAT_MODEL, [])
            shown: dict = {}
            done: dict = {}
            lags: list[float] = []
            stop = asyncio.Event()

            def markdowns():
                answers = screen.query(AnswerView)
                return {CHAT_MODEL: answers.last().markdown} if answers else {}

            def total(_key):
                return arrivals[-1][1] if arrivals and not screen.streaming else None

            tasks = [asyncio.create_task(loop_lag(lags, stop)),
                     asyncio.create_task(watch_widgets(markdowns, total, shown, stop, done))]
            appends.clear()
            screen.query_one("#chat-input").value = "stream a long answer, please"
            await pilot.press("enter")
            while screen.streaming:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
            answer = screen.query(AnswerView).last()
            usage_tokens = _tokens(answer)
            out = summary(arrivals, shown.get(CHAT_MODEL, []), done.get(CHAT_MODEL), len(arrivals), usage_tokens)
            out["loop_lag_ms"] = percentiles(lags)
            out["markdown_appends"] = sum(appends)
            out["complete"] = len(answer.markdown.source) >= arrivals[-1][1]
            return out


async def run_compare(settings: Settings) -> dict:
    async with Runtime.open(settings, persist=False) as runtime:
        source = BenchSource(runtime)
        app = ConsoleApp(source, view="compare")
        appends = count_appends()
        async with app.run_test(size=SIZE) as pilot:
            while not (isinstance(app.screen, CompareScreen) and app.screen.models):
                await pilot.pause(0.02)
            screen = app.screen
            screen.choose(COMPARE_MODELS)
            arrivals = source.chat_link.arrivals
            shown: dict = {}
            done: dict = {}
            lags: list[float] = []
            stop = asyncio.Event()

            def markdowns():
                return {c.model: c.markdown for c in screen.columns()}

            def total(key):
                return arrivals[key][-1][1] if arrivals.get(key) and not screen.running else None

            tasks = [asyncio.create_task(loop_lag(lags, stop)),
                     asyncio.create_task(watch_widgets(markdowns, total, shown, stop, done))]
            appends.clear()
            screen.query_one("#compare-prompt").value = "stream a long answer, please"
            await pilot.press("f3", "enter")
            while not screen.columns() or screen.running:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
            columns = {}
            for column in screen.columns():
                got = arrivals[column.model]
                tokens = column.figures.tokens if column.figures and not column.figures.tokens_estimated else None
                columns[column.model] = summary(got, shown.get(column.model, []), done.get(column.model), len(got), tokens)
            all_arrivals = sorted(t for got in arrivals.values() for t, _ in got)
            pieces = len(all_arrivals)
            return {
                "columns": columns,
                "total_pieces_per_s": round(pieces / max(all_arrivals[-1] - all_arrivals[0], 1e-9)),
                "loop_lag_ms": percentiles(lags),
                "markdown_appends": sum(appends),
            }


def _tokens(answer: AnswerView) -> int | None:
    text = str(answer.cost.content)
    for part in text.split(" · "):
        if part.endswith(" tok") and not part.startswith("≈"):
            return int(part.split()[0])
    return None


def count_appends() -> list[int]:
    """Count `Markdown.append` calls: how many updates the stream coalesced the pieces into."""
    from textual.widgets import Markdown

    calls: list[int] = []
    original = Markdown.append

    def append(self, markdown):
        calls.append(1)
        return original(self, markdown)

    Markdown.append = append  # type: ignore[method-assign]
    return calls


def settings_at(url: str, pieces: int) -> Settings:
    catalog = load_catalog()
    file = ConfigFile(providers={pid: ProviderConfig(headers={PIECES_HEADER: str(pieces)}) for pid in catalog.providers})
    return Settings(file, catalog, env={}).point_at(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pieces", type=int, default=3000, help="pieces per answer (default 3000)")
    args = parser.parse_args()
    catalog = load_catalog()
    results: dict = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    cases = [
        ("chat_paced", 1000 / catalog.models[CHAT_MODEL].tokens_per_s, "chat"),
        ("chat_unpaced", None, "chat"),
        ("compare_unpaced", None, "compare"),
    ]
    for name, speed, view in cases:
        sim = Simulator(speed)
        try:
            sim.wait()
            settings = settings_at(sim.url, args.pieces)
            if view == "chat":
                results[name] = asyncio.run(run_chat(settings))
            else:
                results[name] = asyncio.run(run_compare(settings))
        finally:
            sim.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
