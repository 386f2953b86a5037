"""`p402 demo` end to end, headless and fast-forwarded: the real simulator, runtime and store, with traffic.

An outage is scripted early; the test checks that decisions arrive, that the
provider that went down shows red in the health pane, that traffic moves to
other providers, and that the spend chart has lines.
"""

from __future__ import annotations

import asyncio

from test_tui import rows, table, wait_until
from test_tui_fixtures import SIZE

from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.sim.traffic import Incident
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.demo import open_demo
from p402_tui.tui.widgets.spend import SpendChart
from p402_tui.tui.widgets.status import StatusLine


async def test_demo_moves_traffic_away_from_an_outage(tmp_path):
    settings = Settings(ConfigFile(), load_catalog(), env={})
    outage = Incident(at_s=1.0, duration_s=60, kind="error", label="down (503)", status=503)
    async with open_demo(
        settings,
        db_path=tmp_path / "demo.db",
        rate=30,
        seed=5,
        incidents=[outage],
        cycle_s=None,
        sim_speed=25,
        burst_every_s=(60, 60),
    ) as demo:
        app = ConsoleApp(demo.source, refresh_interval=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: table(app, "decisions").row_count >= 10, timeout=15)
            assert "SIMULATED" in str(app.screen.query_one(StatusLine).render())
            await wait_until(pilot, lambda: bool(demo.traffic.active), timeout=15)
            down = demo.traffic.active[0].provider
            health = table(app, "health")

            def is_red() -> bool:
                status = health.cells_of(down)[1]
                return status.plain.endswith("down") and app.state.health[down]["circuit"] == "open"

            # Seconds on a quiet machine; CI's parallel load once took the demo's traffic past 15 s.
            await wait_until(pilot, is_red, timeout=40)
            assert "bold" in str(health.cells_of(down)[1].style)  # drawn in the theme's error colour
            went_down = max(r.ts for r in app.state.decisions.values())
            await asyncio.sleep(2.0)  # more traffic after the circuit opened
            await wait_until(pilot, lambda: any(r.ts > went_down + 0.5 and r.status == "ok" for r in app.state.decisions.values()))
            later = [r for r in app.state.decisions.values() if r.ts > went_down + 0.5 and r.status == "ok"]
            assert later and all(r.provider != down for r in later)
            assert all(r.chosen.split("/")[0] != down for r in later)  # the router no longer picks it
            chart = app.screen.query_one(SpendChart)
            await wait_until(pilot, lambda: bool(chart.legend))
            assert all(total > 0 for _, _, total in chart.legend)
            assert rows(app, "decisions")
        assert demo.traffic.stats.ok > 10
