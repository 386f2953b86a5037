"""Pictures of the console (pytest-textual-snapshot): dashboard, a decision's detail, help.

Fixed data, a fixed clock, a fixed time zone and size, and no live source, so
no timer moves anything between runs. Approve changes with
`pytest tests/test_tui_snapshots.py --snapshot-update` after looking at the report.
The SVGs live where pytest-textual-snapshot keeps them: tests/__snapshots__/<this file>/.
"""

from __future__ import annotations

from test_tui_fixtures import SIZE, T0, pin_timezone, sample_state

from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.screens.decision import DecisionScreen

pin_timezone()


def fixed_app() -> ConsoleApp:
    return ConsoleApp(state=sample_state(), clock=lambda: T0)


def test_dashboard(snap_compare):
    """All four panes: decisions newest first with a failover and errors, health with one provider down and one
    degraded, sessions with budget bars, the spend chart with its legend and the ledger totals."""
    assert snap_compare(fixed_app(), terminal_size=SIZE)


def test_decision_detail(snap_compare):
    """A decision that failed over: the ranked candidates with component scores, the exclusions with reasons,
    and both attempts, the first with its error."""

    async def open_failover(pilot):
        app = pilot.app
        await pilot.pause()
        row = next(r for r in app.state.decisions.values() if r.attempts > 1 and r.decision.excluded)
        await app.push_screen(DecisionScreen(row))
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=open_failover)


def test_help(snap_compare):
    """`?` over the dashboard: every key of every view and the filter grammar."""
    assert snap_compare(fixed_app(), terminal_size=SIZE, press=["question_mark"])
