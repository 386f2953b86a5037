"""The policy's pure parts: detectors, pattern matching, rate-limit headers, periods."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import pytest

from p402_tui.policy.budget import period_bounds
from p402_tui.policy.guardrails import compile_redactor, iban_ok, luhn_ok
from p402_tui.policy.limits import duration, headers, token_wait
from p402_tui.policy.rules import compile_policy, model_matches, parse_policy
from p402_tui.store.shared import Window


def redact(text: str, *rules: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    return compile_redactor(list(rules)).text(text, counts), counts


def test_detectors_find_what_they_should_and_leave_lookalikes():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")
    text, counts = redact(
        "mail a.b+c@mail.example.org, card 5500-0000-0000-0004, iban GB82WEST12345698765432, "
        "key sk-proj-abcdefghijklmnopqrstuvwx, call +44 20 7946 0958; "
        "order 4111 1111 1111 1112 placed 2026-12-06 for 12.50",
        "email", "card", "iban", "secret", "phone",
    )
    assert counts == Counter(email=1, card=1, iban=1, secret=1, phone=1)
    assert "4111 1111 1111 1112" in text and "2026-12-06" in text and "12.50" in text
    assert "[REDACTED:card]" in text and "5500" not in text
    custom, counts = redact("ticket TKT-1234 and TKT-99", "ticket=TKT-\\d+")
    assert custom == "ticket [REDACTED:ticket] and [REDACTED:ticket]" and counts == {"ticket": 2}


@pytest.mark.parametrize("rule", ["nope", "email=x", "bad name=x", "x=("])
def test_a_bad_redact_rule_is_refused_with_its_name(rule):
    with pytest.raises(ValueError, match="redact rule"):
        compile_redactor([rule])


def test_model_patterns_match_ids_and_bare_names():
    assert model_matches(["openai/*"], "openai/gpt-4o-mini")
    assert not model_matches(["openai/*"], "anthropic/claude-haiku-5-5")
    assert model_matches(["*/llama-*"], "groq/llama-3.3-70b-versatile")
    assert model_matches(["gpt-4o-mini"], "openai/gpt-4o-mini")
    compiled = compile_policy(parse_policy({"models": ["openai/*"]}), ["openai/a", "openai/b", "groq/c"])
    assert compiled.allowed == {"openai/a", "openai/b"}
    assert compile_policy(parse_policy({}), ["openai/a"]).allowed is None


@pytest.mark.parametrize(
    "policy, field",
    [({"rpm": 0}, "rpm"), ({"budget_period": "week"}, "budget_period"), ({"deny": ["("]}, "deny"),
     ({"defaults": {"namespace": "key:other/x"}}, "defaults.namespace"), ({"surprise": 1}, "surprise")],
)
def test_a_bad_policy_names_its_field(policy, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        parse_policy(policy)


def test_a_window_says_what_is_left_and_when_to_come_back():
    window = Window(start=100.0, requests=3, tokens=80)
    figures = headers(window, 3, 100, 130.0)
    assert figures["x-ratelimit-remaining-requests"] == "0" and figures["x-ratelimit-reset-requests"] == "30s"
    assert figures["x-ratelimit-remaining-tokens"] == "20" and figures["x-ratelimit-reset-tokens"] == "30s"
    assert window.reset_in(130.0) == pytest.approx(30.0) and window.reset_in(200.0) == 0.0
    assert token_wait(window, 30, 100, 130.0) == pytest.approx(30.0)
    assert token_wait(window, 101, 100, 130.0) == 60.0  # it can never fit: a whole window
    assert headers(Window(0.0, 0, 0), None, 10, 5.0) == {
        "x-ratelimit-limit-tokens": "10", "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "0ms"}
    assert [duration(s) for s in (0.02, 1, 59.2, 360)] == ["20ms", "1s", "1m0s", "6m0s"]


def test_budget_periods_are_utc_days_and_months():
    now = datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc).timestamp()
    start, reset = period_bounds("day", now)
    assert datetime.fromtimestamp(start, timezone.utc) == datetime(2026, 12, 31, tzinfo=timezone.utc)
    assert reset - start == 86400
    start, reset = period_bounds("month", now)
    assert datetime.fromtimestamp(reset, timezone.utc) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert period_bounds("total", now) == (0.0, None)
