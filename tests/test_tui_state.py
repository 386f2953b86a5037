"""The console's state and formatting: plain Python, no Textual app running."""

from __future__ import annotations

from test_tui_fixtures import T0, sample_state

from p402_tui.core.events import RequestCompleted
from p402_tui.core.hooks import RequestRecord
from p402_tui.tui.format import bar, ms, sparkline, usd
from p402_tui.tui.state import ConsoleState, SpendSeries, Throughput
from p402_tui.tui.widgets.table import Cell, RowFilter


def test_money_and_time_formats_keep_small_calls_apart():
    assert usd(None) == "-"
    assert usd(0) == "$0"
    assert usd(0.000123) == "$0.000123"
    assert usd(1.3e-7) == "$0.00000013"  # a few tokens on a cheap model: not $0.000000, which reads as free
    assert usd(0.0123) == "$0.0123"
    assert usd(12.3456) == "$12.35"
    assert ms(None) == "-"
    assert ms(412.4) == "412ms"
    assert ms(2345) == "2.3s"


def test_budget_bar_and_sparkline_scale():
    assert bar(0.0, 4) == "░░░░"
    assert bar(1.0, 4) == "████"
    assert bar(2.5, 4) == "████"  # over budget stays full
    assert bar(0.5, 4) == "██░░"
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    line = sparkline([1, 2, 4, 8], width=4)
    assert line[0] < line[-1] and line[-1] == "█"
    assert len(sparkline(range(100), width=12)) == 12


def test_filter_words_negation_columns_and_regex():
    columns = ["model", "status"]
    rows = [
        [Cell("groq/llama-fast"), Cell("ok")],
        [Cell("openai/gpt-4o-mini"), Cell("error")],
        [Cell("openai/gpt-4o"), Cell("cached")],
    ]

    def matching(text: str) -> list[str]:
        row_filter = RowFilter(text, columns)
        return [r[0].plain for r in rows if row_filter.match(r)]

    assert matching("openai") == ["openai/gpt-4o-mini", "openai/gpt-4o"]
    assert matching("openai !error") == ["openai/gpt-4o"]
    assert matching("status:ok") == ["groq/llama-fast"]
    assert matching("gpt-4o.*mini") == ["openai/gpt-4o-mini"]
    assert matching("GROQ") == ["groq/llama-fast"]  # case does not matter
    assert matching("[unclosed") == []  # a broken regex is matched literally, not an error
    assert not RowFilter("  ", columns)


def test_fold_builds_rows_with_outcomes():
    state = sample_state()
    rows = list(state.decisions.values())
    assert len(rows) == 37  # 36 routed requests and one cache hit
    assert {r.status for r in rows} == {"ok", "error", "cached"}
    failover = [r for r in rows if r.attempts > 1]
    assert failover and all(r.served_by != r.chosen for r in failover)
    assert all(r.failures for r in failover)
    cached = state.decisions["req-cached"]
    assert cached.decision is None and cached.cost == 0
    assert state.summary.top_models[0][0] == "anthropic/sonnet"


def test_completion_before_decision_still_makes_one_row():
    """Both events of a request can arrive in one batch, in either order."""
    from test_tui_fixtures import CATALOG

    from p402_tui.core.catalog import parse_catalog
    from p402_tui.core.events import RouteDecided
    from p402_tui.core.router import Router
    from p402_tui.core.types import ChatMessage, ChatRequest

    decision = Router(parse_catalog(CATALOG)).route(ChatRequest(messages=[ChatMessage(role="user", content="hi")]))
    record = RequestRecord(id="req-1", ts=decision.ts + 1, provider="groq", model="llama-fast", cost_usd=0.001,
                           decision_id=decision.id, status="ok")  # fmt: skip
    state = ConsoleState()
    state.fold([RequestCompleted(record=record), RouteDecided(decision=decision)])
    assert list(state.decisions) == [decision.id]
    row = state.decisions[decision.id]
    assert row.status == "ok" and row.chosen == decision.chosen.id and row.cost == 0.001
    assert row.candidates == len(decision.candidates)


def test_old_decisions_are_evicted_and_revisions_move():
    state = ConsoleState(max_decisions=10)
    records = [RequestRecord(id=f"req-{i}", ts=T0 + i, provider="groq", model="m", cost_usd=0.01) for i in range(25)]
    state.fold(RequestCompleted(record=r) for r in records)
    assert list(state.decisions) == [f"req-{i}" for i in range(15, 25)]
    revs = [r.rev for r in state.decisions.values()]
    assert revs == sorted(revs) and len(set(revs)) == 10
    assert state.row_for_request("req-24") is state.decisions["req-24"]
    assert state.row_for_request("req-0") is None


def test_spend_series_window_and_cumulative_lines():
    series = SpendSeries(bucket_s=10, buckets=6)
    series.add(T0 - 25, "groq", 0.01)
    series.add(T0 - 15, "groq", 0.02)
    series.add(T0 - 5, "openai", 0.5)
    window, lines = series.cumulative(T0)
    assert window[-1] == int(T0 // 10)
    assert lines["openai"][-1] == 0.5
    assert abs(lines["groq"][-1] - 0.03) < 1e-12
    assert lines["groq"] == sorted(lines["groq"])  # running totals only grow
    assert list(lines) == ["openai", "groq"]  # biggest first
    window, lines = series.cumulative(T0, top=1)
    assert list(lines) == ["openai", "other"]
    series.trim(T0 + 1000)
    assert series.cumulative(T0 + 1000)[1] == {}


def test_throughput_rate_and_errors():
    throughput = Throughput()
    for i in range(50):
        throughput.add(T0 - 5 + i * 0.1, error=i % 10 == 0)
    rate, errors = throughput.rate(T0, over_s=10)
    assert rate == 5.0
    assert errors == 0.1


def test_a_refusal_from_another_gateway_keeps_its_label_over_the_wire():
    from p402_tui.client.wire import event_from_dict

    frame = {"kind": "request_rejected", "ts": T0, "status": 429, "reason": "rate_limited", "method": "POST",
             "path": "/v1/chat/completions", "gateway": "edge/w2"}
    event = event_from_dict("request_rejected", frame)
    assert event is not None and event.gateway == "edge/w2" and event.status == 429
    state = ConsoleState()
    state.fold([event])
    (row,) = state.decisions.values()
    assert row.gateway == "edge/w2" and row.status == "refused" and state.gateways == {"edge/w2"}
