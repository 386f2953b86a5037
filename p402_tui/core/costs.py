"""What a call costs, what every model would cost, and which model is cheapest.

Prices are USD per 1M tokens from the catalog. A cost is exactly
`input x in_price / 1e6 + output x out_price / 1e6`, never rounded here; only display rounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog, ModelSpec
from .types import CAPABILITIES, TIER_RANK, TIERS, Usage

# Anthropic bills a 5-minute cache write at 1.25x the input rate (reference catalog.md, "Cache pricing").
CACHE_WRITE_MULTIPLIER = 1.25
# The most tokens a comparison prices: past any real volume, and exact as the floats prices are.
MAX_COMPARED_TOKENS = 10**15


@dataclass(frozen=True, slots=True)
class CostRow:
    id: str
    provider: str
    model: str
    tier: str
    input_per_1m: float
    output_per_1m: float
    cost_usd: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "model": self.model,
            "tier": self.tier,
            "input_per_1m": self.input_per_1m,
            "output_per_1m": self.output_per_1m,
            "cost_usd": self.cost_usd,
        }


def call_cost(model: ModelSpec, usage: Usage) -> float:
    """USD for one call as the provider reported it.

    Cached prompt tokens are billed at the cached rate; reasoning tokens are already
    inside completion tokens. Cache-write tokens are part of the prompt tokens and
    pay the write surcharge on top of the input rate.
    """
    surcharge = usage.cache_write_tokens * model.input_per_1m * (CACHE_WRITE_MULTIPLIER - 1) / 1e6
    return model.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) + surcharge


def _check_tokens(input_tokens: int, output_tokens: int) -> None:
    if not (0 <= input_tokens <= MAX_COMPARED_TOKENS and 0 <= output_tokens <= MAX_COMPARED_TOKENS):
        raise ValueError(f"token counts must be from 0 to {MAX_COMPARED_TOKENS:,}")


def _check_filters(require: Iterable[str], max_tier: str | None) -> None:
    unknown = set(require) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capability {sorted(unknown)[0]!r}; choose from {', '.join(CAPABILITIES)}")
    if max_tier is not None and max_tier not in TIER_RANK:
        raise ValueError(f"unknown tier {max_tier!r}; choose from {', '.join(TIERS)}")


def _eligible(
    catalog: Catalog, require: Iterable[str], max_tier: str | None, providers: set[str] | None = None
) -> list[ModelSpec]:
    _check_filters(require, max_tier)
    needed = frozenset(require)
    cap = TIER_RANK[max_tier] if max_tier is not None else len(TIER_RANK)
    return [
        m
        for m in catalog.models.values()
        # An unpriced model has no cost to compare; $0 would rank it first.
        if m.priced and m.has(needed) and m.tier_rank <= cap and (providers is None or m.provider in providers)
    ]


def compare(
    catalog: Catalog,
    input_tokens: int,
    output_tokens: int,
    require: Iterable[str] = frozenset(),
    top: int | None = None,
    max_tier: str | None = None,
) -> list[CostRow]:
    """Every model with the required capabilities, cheapest first (ties by id)."""
    _check_tokens(input_tokens, output_tokens)
    if top is not None and top < 1:
        raise ValueError("top must be 1 or more")
    rows = [
        CostRow(
            id=m.id,
            provider=m.provider,
            model=m.model,
            tier=m.tier,
            input_per_1m=m.input_per_1m,
            output_per_1m=m.output_per_1m,
            cost_usd=m.cost(input_tokens, output_tokens),
        )
        for m in _eligible(catalog, require, max_tier)
    ]
    rows.sort(key=lambda row: (row.cost_usd, row.id))
    return rows if top is None else rows[:top]


def cheapest(
    catalog: Catalog,
    require: Iterable[str],
    max_tier: str | None = None,
    input_tokens: int = 1000,
    output_tokens: int = 500,
    providers: set[str] | None = None,
) -> ModelSpec | None:
    """The cheapest model with the capabilities, at most `max_tier`, among `providers` (None: all)."""
    _check_tokens(input_tokens, output_tokens)
    candidates = _eligible(catalog, require, max_tier, providers)
    if not candidates:
        return None
    return min(candidates, key=lambda m: (m.cost(input_tokens, output_tokens), m.id))


__all__ = ["CACHE_WRITE_MULTIPLIER", "CostRow", "call_cost", "cheapest", "compare"]
