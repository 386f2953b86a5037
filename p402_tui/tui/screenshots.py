"""Render real console states into screenshots/: an SVG from Textual and a PNG beside it.

    python -m p402_tui.tui.screenshots [--out screenshots] [--seconds 20]

It runs the demo headless: the real simulator, runtime, store and traffic
generator, sped up, with a provider outage scripted early. Once traffic has
flowed for `--seconds`, it saves each state in `SHOTS` (the dashboard, a
decision that failed over, the help screen, a chat, a comparison) at 160x48. Other views add their
own `Shot` to `SHOTS`.

PNG needs `rsvg-convert` (Debian: `apt-get install librsvg2-bin`) and the
font the SVGs name, Fira Code (`apt-get install fonts-firacode`); without
rsvg-convert only the SVGs are written, and the script says so. Textual's SVG
places each run of text by its first character and a text length, which
rsvg-convert does not honour for glyphs taken from a fallback font (braille,
block elements); the copy handed to it places every character explicitly.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from textual.pilot import Pilot

SIZE = (160, 48)


@dataclass(frozen=True, slots=True)
class Shot:
    name: str
    prepare: Callable[[Pilot], Awaitable[None]]  # bring the app to the state to picture
    restore: Callable[[Pilot], Awaitable[None]]  # and back to the dashboard afterwards


async def _dashboard(pilot: Pilot) -> None:
    await pilot.pause()


async def _decision(pilot: Pilot) -> None:
    from .screens.decision import DecisionScreen

    app = pilot.app
    rows = list(app.state.decisions.values())  # type: ignore[attr-defined]
    row = next((r for r in reversed(rows) if r.attempts > 1 and r.decision is not None), None)
    row = row or next(r for r in reversed(rows) if r.decision is not None and r.status == "ok")
    await app.push_screen(DecisionScreen(row))
    await pilot.pause()


async def _help(pilot: Pilot) -> None:
    await pilot.press("question_mark")
    await pilot.pause()


async def _back(pilot: Pilot) -> None:
    await pilot.press("escape")
    await pilot.pause()


async def _until(pilot: Pilot, condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the console did not reach the state to picture")
        await pilot.pause(0.05)


async def _chat(pilot: Pilot) -> None:
    """Two questions: the first routed (auto, balanced), the second to a model picked by hand."""
    from textual.widgets import Input, Select

    from .screens.chat import ChatScreen

    app = pilot.app
    app.action_view("chat")  # type: ignore[attr-defined]
    await _until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input"))
    screen = app.screen
    await _until(pilot, lambda: len(screen.query_one("#chat-model", Select)._options) > 1)
    questions = [("How does P402 pick a model for each request?", None),
                 ("And when that provider goes down?", "openai/gpt-4o-mini")]
    for question, model in questions:
        if model is not None:
            screen.query_one("#chat-model", Select).value = model
        screen.query_one("#chat-input", Input).value = question
        await pilot.press("enter")
        await _until(pilot, lambda: not screen.streaming)  # type: ignore[attr-defined]
    app.clear_notifications()
    await pilot.pause(0.5)


async def _compare(pilot: Pilot) -> None:
    """Three models from healthy providers, side by side, the second marked the winner."""
    from textual.widgets import Input

    from .screens.compare import CompareScreen

    app = pilot.app
    app.action_view("compare")  # type: ignore[attr-defined]
    await _until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.models)  # type: ignore[attr-defined]
    screen = app.screen
    health = app.state.health  # type: ignore[attr-defined]
    wanted = ["openai/gpt-4o-mini", "google/gemini-2.5-flash", "anthropic/claude-sonnet-4-6",
              "groq/llama-3.1-8b-instant", "mistral/mistral-small-latest", "deepseek/deepseek-chat"]
    healthy = [m for m in wanted if health.get(m.split("/")[0], {}).get("status", "healthy") == "healthy"]
    screen.choose(healthy[:3])  # type: ignore[attr-defined]
    screen.query_one("#compare-prompt", Input).value = "Explain a circuit breaker in two sentences."
    await pilot.press("f3", "enter")
    await _until(pilot, lambda: screen.columns() and not screen.running)  # type: ignore[attr-defined]
    await pilot.press("2")
    await pilot.pause(0.3)
    app.clear_notifications()
    await pilot.pause(0.5)


async def _to_dashboard(pilot: Pilot) -> None:
    pilot.app.action_view("dashboard")  # type: ignore[attr-defined]
    await pilot.pause()


SHOTS: list[Shot] = [
    Shot("dashboard", _dashboard, _dashboard),
    Shot("decision", _decision, _back),
    Shot("help", _help, _back),
    Shot("chat", _chat, _to_dashboard),
    Shot("compare", _compare, _to_dashboard),
]


def for_rsvg(svg: str) -> str:
    """The SVG with every character placed explicitly and spaces kept (see the module docstring)."""
    svg = svg.replace("<svg ", '<svg xml:space="preserve" ', 1)
    pattern = re.compile(r'(<text [^>]*?)x="([\d.]+)"([^>]*?)textLength="([\d.]+)"([^>]*)>([^<]*)</text>')

    def place(match: re.Match[str]) -> str:
        head, x, middle, length, tail, body = match.groups()
        chars = html.unescape(body).replace("\xa0", " ")
        if len(chars) < 2:
            return f'{head}x="{x}"{middle}{tail}>{html.escape(chars, quote=False)}</text>'
        step = float(length) / len(chars)
        xs = " ".join(f"{float(x) + i * step:.2f}" for i in range(len(chars)))
        return f'{head}x="{xs}"{middle}{tail}>{html.escape(chars, quote=False)}</text>'

    return pattern.sub(place, svg)


def to_png(svg_path: Path) -> Path | None:
    converter = shutil.which("rsvg-convert")
    if converter is None:
        return None
    png = svg_path.with_suffix(".png")
    with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False, encoding="utf-8") as fixed:
        fixed.write(for_rsvg(svg_path.read_text(encoding="utf-8")))
    try:
        subprocess.run([converter, fixed.name, "-o", str(png)], check=True)
    finally:
        Path(fixed.name).unlink()
    return png


async def render(out: Path, seconds: float) -> list[Path]:
    from ..core.config import load_settings
    from ..sim.traffic import Incident
    from .app import ConsoleApp
    from .demo import open_demo

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    incidents = [
        Incident(4, 60, "rate_limit", "rate limited", probability=0.9, retry_after_s=5),
        Incident(8, 60, "error", "down (503)", status=503),
    ]
    with tempfile.TemporaryDirectory(prefix="p402-shots-") as temp:
        settings = load_settings(env={})
        async with open_demo(
            settings, db_path=Path(temp) / "demo.db", rate=12, seed=7, incidents=incidents, cycle_s=None, sim_speed=3
        ) as demo:
            app = ConsoleApp(demo.source, refresh_interval=0.5)
            async with app.run_test(size=SIZE) as pilot:
                await asyncio.sleep(seconds)
                await demo.traffic.drain()  # hold the picture still: what was sent has finished
                await asyncio.sleep(1.5)  # and the console has shown it
                for shot in SHOTS:
                    await shot.prepare(pilot)
                    svg = out / f"{shot.name}.svg"
                    app.save_screenshot(svg.name, str(out))
                    written.append(svg)
                    await shot.restore(pilot)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description="Render real console states to SVG and PNG.")
    parser.add_argument("--out", default="screenshots", help="directory to write (default screenshots/)")
    parser.add_argument("--seconds", type=float, default=20.0, help="let the demo run this long first (default 20)")
    args = parser.parse_args()
    written = asyncio.run(render(Path(args.out), args.seconds))
    for svg in written:
        png = to_png(svg)
        print(f"{svg}" + (f"  {png}" if png else ""))
    if shutil.which("rsvg-convert") is None:
        print("no PNGs: rsvg-convert is missing (apt-get install librsvg2-bin fonts-firacode)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
