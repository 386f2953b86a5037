"""The router: which model answers a request, and which ones stand behind it.

Five modes rank the eligible models:

    cost      lowest estimated cost for this prompt and expected answer
    quality   highest quality prior (the catalog's score, the tier breaking near-ties)
    speed     lowest expected latency: time to first token + answer length / tokens per second,
              measured live per model, catalog figures until traffic is seen
    balanced  weighted sum of normalised cost, quality and speed (weights in config)
    adaptive  balanced, multiplied by live health (error rate, tail latency, circuits)

A decision is made on every request, so it has to be cheap. Everything that does not
depend on the request is computed once per catalog: per-model numbers live in numpy
arrays sorted by id (so the first of equal scores is always the smallest id), and the
filters that depend only on the options (capabilities, providers, tier, circuits) are
cached per option set. Per request that leaves a cost vector, three masks and an argmin.
The full ranking, every candidate's component scores and the excluded list are built
only when someone reads them (failover, the console, `p402 route`).

Component scores are normalised to 0..1 over the models that pass the option filters
(cost and speed on a log scale: prices span four orders of magnitude). The health
component is not normalised: it is the live 0..1 health itself.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

from .catalog import Catalog, ModelSpec
from .config import MODES, RouterConfig
from .errors import InvalidRequestError
from .hooks import RouteOptions
from .tokens import count_messages
from .types import CAPABILITIES, TIER_RANK, TIERS, ChatRequest, usd_json

if TYPE_CHECKING:
    from .config import Settings
    from .health import HealthTracker

# Model names that ask the router to choose; `p402/<mode>` also picks the mode.
AUTO_MODELS = frozenset({"auto", "p402/auto", "router"})
ROUTER_PREFIX = "p402/"


class ModelRef(NamedTuple):
    """What a request's `model` asks for: a model to pin, or the router's choice (in `mode` when it names one)."""

    pin: str | None = None
    mode: str | None = None


def parse_model_ref(ref: str | None) -> ModelRef:
    """Absent, `auto`, `p402/auto` or `router`: the router chooses; `p402/<mode>`: it chooses in that mode;
    anything else pins a model (`provider/model`, or a bare wire id the catalog resolves)."""
    if not ref or ref in AUTO_MODELS:
        return _CHOOSE
    if ref.startswith(ROUTER_PREFIX) and ref[len(ROUTER_PREFIX) :] in MODES:
        return ModelRef(mode=ref[len(ROUTER_PREFIX) :])
    return ModelRef(pin=ref)


_CHOOSE = ModelRef()

NOT_CONFIGURED = "provider not configured"
DISABLED = "provider disabled"
EXCLUDED_PROVIDER = "excluded provider"
CIRCUIT_OPEN = "circuit open"
OVER_TIER = "over max_tier"
CONTEXT_TOO_SMALL = "context too small"
OUTPUT_TOO_SMALL = "max_tokens over output limit"
OVER_COST = "over max_cost_usd"
UNPRICED = "unpriced (used only when pinned or in an alias)"
NOT_ALLOWED = "not allowed for the gateway key"

_BIT = {cap: 1 << i for i, cap in enumerate(CAPABILITIES)}
# A few extra tenths of a micro-dollar keep log(cost) finite for free (local) models.
_COST_FLOOR = 1e-7
# Added to the sort key of models outside `prefer`: larger than any real key in that mode.
_PREFER_PENALTY = {"cost": 1e4, "speed": 1e9}
_TIER_NUDGE = 0.01  # quality mode: the tier breaks near-ties of the quality prior
LIVE_FOLD_S = 0.1  # a success's latency figures reach the ranking within this; failures and circuits at once
# Prompts counted and remembered: at most this many, holding at most this much text alive (one 8 MB
# prompt was kept for the next 4,095 distinct ones, and as many of them could each be as large).
PROMPT_MEMO = 4096
PROMPT_MEMO_CHARS = 4_000_000
# What a decision was ranked with: the router's live arrays (ttft ms, ms per token, health) and their epoch.
_Live = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _bits(capabilities: Iterable[str]) -> int:
    bits = 0
    for cap in capabilities:
        bits |= _BIT[cap]
    return bits


def _missing(have: int, need: int) -> str:
    names = [cap for cap in CAPABILITIES if need & _BIT[cap] and not have & _BIT[cap]]
    return ("missing capability " if len(names) == 1 else "missing capabilities ") + ", ".join(names)


@dataclass(slots=True)
class Candidate:
    """One eligible model with its scores; `score` is the mode's total, components are 0..1."""

    id: str
    provider: str
    model: str
    tier: str
    score: float
    cost: float
    quality: float
    speed: float
    health: float
    est_cost_usd: float
    est_latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return _candidate_dict(
            (self.id, self.provider, self.model, self.tier), self.score, self.cost, self.quality, self.speed,
            self.health, self.est_cost_usd, self.est_latency_ms,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        components = data["components"]
        return cls(
            id=data["id"],
            provider=data["provider"],
            model=data["model"],
            tier=data["tier"],
            score=data["score"],
            cost=components["cost"],
            quality=components["quality"],
            speed=components["speed"],
            health=components["health"],
            est_cost_usd=data["est_cost_usd"],
            est_latency_ms=data["est_latency_ms"],
        )


def _candidate_dict(
    model: tuple[str, str, str, str], score: float, cost: float, quality: float, speed: float, health: float,
    est_cost_usd: float, est_latency_ms: float,
) -> dict[str, Any]:
    """A candidate as a decision's dict shows it (`Candidate.from_dict` reads it back).

    `model`: (id, provider, wire model, tier), as a `ModelListing` holds it."""
    return {
        "id": model[0],
        "provider": model[1],
        "model": model[2],
        "tier": model[3],
        "score": round(score, 6),
        "components": {
            "cost": round(cost, 6),
            "quality": round(quality, 6),
            "speed": round(speed, 6),
            "health": round(health, 6),
        },
        "est_cost_usd": usd_json(est_cost_usd),
        "est_latency_ms": round(est_latency_ms, 1),
    }


@dataclass(slots=True)
class Excluded:
    id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


@dataclass(frozen=True, slots=True, eq=False)
class ModelListing:
    """The models an option set ranks, as (id, provider, wire model, tier), and the ones its filters left out.

    Every decision of one option set holds the same listing object, until providers or circuits change."""

    models: tuple[tuple[str, str, str, str], ...]
    excluded: tuple[Excluded, ...]


@dataclass(frozen=True, slots=True, eq=False)
class LiveColumns:
    """The live figures of a listing's models, in its order: quality, speed and health scores, latency in ms.

    Every decision ranked with the same figures (one option set, answer length and health epoch)
    holds the same object."""

    quality: np.ndarray
    speed: np.ndarray
    health: np.ndarray
    latency: np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class DecisionSnapshot:
    """A decision as plain columns: what `to_dict()` shows, without a dict per model.

    `ranked` holds positions in `listing.models`, best first (the chosen model first, when
    one was chosen); `score`, `cost` (the 0..1 cost score) and `est_cost_usd` follow `ranked`.
    `filtered` holds the positions this request's own figures excluded, with their reasons.
    """

    id: str
    ts: float
    mode: str
    chosen: bool
    prompt_tokens: int
    est_output_tokens: int
    decision_us: float
    options: dict[str, Any]  # `RouteOptions.to_dict()`, its mode the one the decision used
    listing: ModelListing
    live: LiveColumns
    ranked: np.ndarray
    score: np.ndarray
    cost: np.ndarray
    est_cost_usd: np.ndarray
    filtered: tuple[tuple[int, str], ...]

    def to_dict(self) -> dict[str, Any]:
        models = self.listing.models
        live = self.live
        quality, speed, health, latency = (c.tolist() for c in (live.quality, live.speed, live.health, live.latency))
        candidates = [
            _candidate_dict(models[i], score, cost, quality[i], speed[i], health[i], est, latency[i])
            for i, score, cost, est in zip(
                self.ranked.tolist(), self.score.tolist(), self.cost.tolist(), self.est_cost_usd.tolist()
            )
        ]
        excluded = [*self.listing.excluded, *(Excluded(models[i][0], reason) for i, reason in self.filtered)]
        excluded.sort(key=lambda e: e.id)
        chosen = None
        if self.chosen:
            first = candidates[0]
            chosen = {k: first[k] for k in ("id", "provider", "model", "tier", "est_cost_usd", "score")}
        return {
            "id": self.id,
            "ts": self.ts,
            "mode": self.mode,
            "chosen": chosen,
            "fallbacks": [c["id"] for c in candidates[1:]] if self.chosen and self.options.get("failover", True) else [],
            "candidates": candidates,
            "excluded": [e.to_dict() for e in excluded],
            "prompt_tokens": self.prompt_tokens,
            "est_output_tokens": self.est_output_tokens,
            "decision_us": round(self.decision_us, 2),
            "options": self.options,
        }

    def columns(self) -> dict[str, Any]:
        """What the store indexes the decision by (`store.queries.decision_rows`), and its brief shows."""
        return {
            "id": self.id, "ts": self.ts, "mode": self.mode,
            "chosen": self.listing.models[int(self.ranked[0])][0] if self.chosen else None,
            "est_cost_usd": float(self.est_cost_usd[0]) if self.chosen else None,
            "candidates": len(self.ranked), "excluded": len(self.listing.excluded) + len(self.filtered),
        }  # fmt: skip


class RouteDecision:
    """What the router chose and why.

    `candidates` (ranked, the chosen one first), `fallbacks` (ids to try next, in order)
    and `excluded` (every other model with its reason) are built on first read.
    """

    __slots__ = (
        "id",
        "ts",
        "mode",
        "prompt_tokens",
        "est_output_tokens",
        "decision_us",
        "options",
        "_chosen",
        "_candidates",
        "_fallbacks",
        "_excluded",
        "_rank",
    )

    def __init__(
        self,
        *,
        id: str,
        ts: float,
        mode: str,
        chosen: Candidate | None = None,
        fallbacks: list[str] | None = None,
        candidates: Sequence[Candidate] | None = None,
        excluded: list[Excluded] | None = None,
        prompt_tokens: int = 0,
        est_output_tokens: int = 0,
        decision_us: float = 0.0,
        options: RouteOptions | None = None,
    ) -> None:
        self.id = id
        self.ts = ts
        self.mode = mode
        self.prompt_tokens = prompt_tokens
        self.est_output_tokens = est_output_tokens
        self.decision_us = decision_us
        self.options = options or RouteOptions()
        self._chosen = chosen
        self._candidates = candidates
        self._fallbacks = fallbacks
        self._excluded = excluded
        self._rank: _Ranking | tuple[Any, ...] | None = None

    @classmethod
    def _decided(
        cls, id: str, ts: float, mode: str, prompt_tokens: int, est_output_tokens: int, decision_us: float,
        options: RouteOptions, rank: tuple[Any, ...],
    ) -> RouteDecision:
        """The router's own constructor: positional, and the ranking left as the tuple it was made from."""
        decision = cls.__new__(cls)
        decision.id, decision.ts, decision.mode = id, ts, mode
        decision.prompt_tokens, decision.est_output_tokens, decision.decision_us = prompt_tokens, est_output_tokens, decision_us
        decision.options = options
        decision._chosen = decision._candidates = decision._fallbacks = decision._excluded = None
        decision._rank = rank
        return decision

    def _ranked(self) -> _Ranking | None:
        rank = self._rank
        if type(rank) is tuple:
            rank = self._rank = _Ranking(*rank)
        return rank

    @property
    def chosen(self) -> Candidate | None:
        if self._chosen is None:
            ranking = self._ranked()
            if ranking is not None and ranking.chosen >= 0:
                self._chosen = ranking.candidate(ranking.chosen)
        return self._chosen

    @property
    def chosen_id(self) -> str | None:
        """The chosen model's id, without building its scores."""
        ranking = self._ranked()
        if ranking is not None:
            return ranking.entry.ids[ranking.chosen] if ranking.chosen >= 0 else None
        return self._chosen.id if self._chosen is not None else None

    @property
    def candidates(self) -> Sequence[Candidate]:
        if self._candidates is None:
            ranking = self._ranked()
            if ranking is None:
                self._candidates = [self._chosen] if self._chosen is not None else []
            else:
                chosen = self.chosen
                rest = [ranking.candidate(i) for i in ranking.order() if i != ranking.chosen]
                self._candidates = ([chosen] if chosen is not None else []) + rest
        return self._candidates

    @property
    def fallbacks(self) -> list[str]:
        if self._fallbacks is None:
            ranking = self._ranked()
            if not self.options.failover or self.chosen_id is None:
                self._fallbacks = []
            elif ranking is not None:
                ids = ranking.entry.ids
                self._fallbacks = [ids[i] for i in ranking.order() if i != ranking.chosen]
            else:
                self._fallbacks = [c.id for c in self.candidates[1:]]
        return self._fallbacks

    @property
    def excluded(self) -> list[Excluded]:
        if self._excluded is None:
            ranking = self._ranked()
            self._excluded = ranking.excluded() if ranking is not None else []
        return self._excluded

    @property
    def est_cost_usd(self) -> float:
        ranking = self._ranked()
        if ranking is not None and self._chosen is None:
            # The chosen candidate's estimate, without scoring it (the budget check needs only this).
            return float(ranking.cost[ranking.chosen]) if ranking.chosen >= 0 else 0.0
        chosen = self.chosen
        return chosen.est_cost_usd if chosen is not None else 0.0

    def plan(self) -> list[Candidate]:
        """The models to try, in order: the chosen one, then its fallbacks."""
        if self.chosen is None:
            return []
        return list(self.candidates[: 1 + len(self.fallbacks)])

    def why_none(self) -> str:
        """Why nothing was chosen: the pinned model's reason, else the commonest reasons."""
        excluded = self.excluded
        if not excluded:
            return "no model in the catalog"
        pinned = self.options.model
        ranking = self._ranked()
        if ranking is not None and ranking.entry.pin is not None:
            pinned = ranking.entry.pinned_id
        if pinned is not None:
            for item in excluded:
                if item.id == pinned:
                    return f"{item.id}: {item.reason}"
        counts: dict[str, int] = {}
        for item in excluded:
            reason = item.reason.split(" on ", 1)[0]  # "retired on <date>" counts as one reason
            counts[reason] = counts.get(reason, 0) + 1
        parts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return "; ".join(f"{n} {reason}" for reason, n in parts)

    def to_dict(self) -> dict[str, Any]:
        return self.snapshot().to_dict()

    def columns(self) -> dict[str, Any]:
        """The columns the store indexes it by, counted as from its snapshot (`store.queries.decision_rows`)
        without building one: a decision's brief on every event stream needs only these, and a snapshot
        costs about thirty numpy calls."""
        ranking = self._ranked()
        if ranking is None or not len(ranking.entry.idx):
            return self.snapshot().columns()
        chosen = ranking.chosen
        # A pinned decision's key is made here and not kept: the writer still snapshots it with others.
        key = ranking._key if ranking._key is not None else ranking.make_key()
        finite = np.isfinite(key)
        # The snapshot ranks the eligible (a finite key) and puts a pinned choice first, eligible or not.
        candidates = int(np.count_nonzero(finite)) + (1 if chosen >= 0 and not finite[chosen] else 0)
        filtered = int(np.count_nonzero(ranking.bad)) if ranking.bad is not None else 0
        return {
            "id": self.id, "ts": self.ts, "mode": self.mode,
            "chosen": ranking.entry.ids[chosen] if chosen >= 0 else None,
            "est_cost_usd": float(ranking.cost[chosen]) if chosen >= 0 else None,
            "candidates": candidates, "excluded": len(ranking.entry.excluded) + filtered,
        }  # fmt: skip

    def options_used(self) -> dict[str, Any]:
        """`RouteOptions.to_dict()`, its mode the one this decision used."""
        options = self.options.to_dict()
        options["mode"] = self.mode
        return options

    def snapshot(self) -> DecisionSnapshot:
        """The decision as it stands: its ranking, scores and exclusions, which nothing later changes."""
        options = self.options_used()
        ranking = self._ranked()
        if ranking is not None and len(ranking.entry.idx):
            return ranking.snapshot(self, options)
        candidates = self.candidates
        return DecisionSnapshot(
            id=self.id,
            ts=self.ts,
            mode=self.mode,
            chosen=self.chosen is not None,
            prompt_tokens=self.prompt_tokens,
            est_output_tokens=self.est_output_tokens,
            decision_us=self.decision_us,
            options=options,
            listing=ModelListing(tuple((c.id, c.provider, c.model, c.tier) for c in candidates), tuple(self.excluded)),
            live=LiveColumns(*(np.array([getattr(c, name) for c in candidates], dtype=np.float64)
                               for name in ("quality", "speed", "health", "est_latency_ms"))),
            ranked=np.arange(len(candidates)),
            score=np.array([c.score for c in candidates], dtype=np.float64),
            cost=np.array([c.cost for c in candidates], dtype=np.float64),
            est_cost_usd=np.array([c.est_cost_usd for c in candidates], dtype=np.float64),
            filtered=(),
        )  # fmt: skip

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RouteDecision:
        """A decision from its `to_dict()` (a stored one, or one a gateway sent): read like the decision
        routed, and its `to_dict()` is `data` itself. A candidate is built from its dict when first read."""
        candidates = _CandidateRows(data["candidates"])
        decision = _ReadBack(
            id=data["id"],
            ts=data["ts"],
            mode=data["mode"],
            chosen=candidates[0] if data["chosen"] is not None else None,
            fallbacks=list(data["fallbacks"]),
            candidates=candidates,
            excluded=[Excluded(e["id"], e["reason"]) for e in data["excluded"]],
            prompt_tokens=data["prompt_tokens"],
            est_output_tokens=data["est_output_tokens"],
            decision_us=data["decision_us"],
            options=RouteOptions.from_dict(data["options"]),
        )
        decision._data = data
        return decision

    def __repr__(self) -> str:
        return f"<RouteDecision {self.id} {self.mode} -> {self.chosen_id}>"


class _ReadBack(RouteDecision):
    """A decision rebuilt by `RouteDecision.from_dict`: its dict is the one it was read from."""

    __slots__ = ("_data",)
    _data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self._data


class _CandidateRows(Sequence[Candidate]):
    """A read-back decision's candidates, each built from its dict only when read.

    A busy gateway sends hundreds of decisions a second with every candidate in each;
    the console's dashboard reads only how many there are and the chosen one.
    """

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows
        self._built: dict[int, Candidate] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Candidate: ...

    @overload
    def __getitem__(self, index: slice) -> list[Candidate]: ...

    def __getitem__(self, index: int | slice) -> Candidate | list[Candidate]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._rows)))]
        index = range(len(self._rows))[index]  # negative indexes, and IndexError past the end
        if index not in self._built:
            self._built[index] = Candidate.from_dict(self._rows[index])
        return self._built[index]


class _Entry:
    """The models that pass one option set's request-independent filters, with their numbers."""

    __slots__ = (
        "idx",
        "ids",
        "prices",
        "ctx",
        "min_ctx",
        "max_out",
        "min_max_out",
        "quality_key",
        "quality",
        "prefer_penalty",
        "cheapest",
        "dearest",
        "excluded",
        "pin",
        "pinned_id",
        "mode",
        "default_output",
        "live",
        "listing",
        "peers",
        "turn",
    )

    def __init__(self) -> None:
        self.live: dict[tuple[int, int], _Vectors] = {}  # by (answer length, health epoch)
        self.listing: ModelListing | None = None  # built when a decision of this option set is first snapshot


@dataclass(slots=True)
class _Vectors:
    """Per-answer-length numbers of an entry's models under one health epoch."""

    epoch: int
    latency: np.ndarray  # expected ms
    speed: np.ndarray  # 0..1
    health: np.ndarray  # 0..1
    rest: np.ndarray  # weighted quality + speed: the part of a balanced score that is not cost
    columns: LiveColumns | None = None  # built when a decision ranked with these is first snapshot


class _Ranking:
    """Everything a decision needs to build its candidates and exclusions later."""

    __slots__ = (
        "router", "entry", "cost", "_key", "bad", "masks", "chosen", "prompt_tokens", "answer_tokens", "live",
        "_eligible", "_order", "_cost_n", "_vectors",
    )  # fmt: skip

    def __init__(
        self,
        router: Router,
        entry: _Entry,
        cost: np.ndarray,
        key: np.ndarray | None,
        bad: np.ndarray | None,
        masks: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None],
        chosen: int,
        prompt_tokens: int,
        answer_tokens: int,
        live: _Live,
    ) -> None:
        self.router = router
        self.entry = entry
        self.cost = cost
        self._key = key  # None until first read, for a pinned decision
        self.bad = bad
        self.masks = masks
        self.chosen = chosen
        self.prompt_tokens = prompt_tokens
        self.answer_tokens = answer_tokens
        self.live = live
        self._eligible: np.ndarray | None = None
        self._order: list[int] | None = None
        self._cost_n: np.ndarray | None = None
        self._vectors: _Vectors | None = None

    @property
    def key(self) -> np.ndarray:
        if self._key is None:
            self._key = self.make_key()
        return self._key

    def make_key(self) -> np.ndarray:
        # Its own vectors: a snapshot taken after health moved on would compute them twice otherwise.
        return self.router._key(
            self.entry, self.cost, self.bad, self.prompt_tokens, self.answer_tokens, self.live, self.vectors
        )

    @property
    def cost_score(self) -> np.ndarray:
        """Each model's normalised cost score (1 the cheapest)."""
        if self._cost_n is None:
            self._cost_n = _log_score(self.cost + _COST_FLOOR)
        return self._cost_n

    @property
    def vectors(self) -> _Vectors:
        """The live figures this decision was ranked with."""
        if self._vectors is None:
            self._vectors = self.router._live_vectors(self.entry, self.answer_tokens, self.live)
        return self._vectors

    @property
    def eligible(self) -> np.ndarray:
        """Eligible positions, best first (equal keys: smallest id first); sorted once for every use."""
        if self._eligible is None:
            key = self.key
            self._eligible = np.argsort(key, kind="stable")[: int(np.count_nonzero(np.isfinite(key)))]
        return self._eligible

    def order(self) -> list[int]:
        """`eligible` as a list."""
        if self._order is None:
            self._order = self.eligible.tolist()
        return self._order

    def candidate(self, i: int) -> Candidate:
        entry = self.entry
        router = self.router
        m = int(entry.idx[i])
        vectors = self.vectors
        cost_score, quality, speed, health = (
            float(self.cost_score[i]), float(entry.quality[i]), float(vectors.speed[i]), float(vectors.health[i])
        )
        mode = entry.mode
        if mode == "cost":
            score = cost_score
        elif mode == "quality":
            score = quality
        elif mode == "speed":
            score = speed
        else:
            cost_weight, quality_weight, speed_weight = router._weights
            score = cost_weight * cost_score + quality_weight * quality + speed_weight * speed
            if mode == "adaptive":
                score *= health
        spec = router._specs[m]
        return Candidate(
            id=spec.id,
            provider=spec.provider,
            model=spec.model,
            tier=spec.tier,
            score=score,
            cost=cost_score,
            quality=quality,
            speed=speed,
            health=health,
            est_cost_usd=float(self.cost[i]),
            est_latency_ms=float(vectors.latency[i]),
        )

    def excluded(self) -> list[Excluded]:
        ids = self.entry.ids
        out = [*self.entry.excluded, *(Excluded(ids[i], reason) for i, reason in self.filtered())]
        out.sort(key=lambda e: e.id)
        return out

    def filtered(self) -> tuple[tuple[int, str], ...]:
        """The positions this request's own figures (size, max_tokens, cost cap) excluded, with the reason."""
        if self.bad is None:
            return ()
        ctx_bad, out_bad, _ = self.masks
        out = []
        for i in np.flatnonzero(self.bad).tolist():
            if ctx_bad is not None and ctx_bad[i]:
                reason = CONTEXT_TOO_SMALL
            elif out_bad is not None and out_bad[i]:
                reason = OUTPUT_TOO_SMALL
            else:
                reason = OVER_COST
            out.append((i, reason))
        return tuple(out)

    def parts(self) -> tuple[ModelListing, LiveColumns]:
        """The listing and the live figures a snapshot refers to, built once for every decision sharing them."""
        entry, vectors = self.entry, self.vectors
        if entry.listing is None:
            specs = self.router._specs
            entry.listing = ModelListing(
                tuple((s.id, s.provider, s.model, s.tier) for s in (specs[int(m)] for m in entry.idx)),
                tuple(entry.excluded),
            )
        if vectors.columns is None:
            vectors.columns = LiveColumns(entry.quality, vectors.speed, vectors.health, vectors.latency)
        return entry.listing, vectors.columns

    def snapshot(self, decision: RouteDecision, options: dict[str, Any]) -> DecisionSnapshot:
        entry, vectors = self.entry, self.vectors
        ranked = _chosen_first(self.eligible, self.chosen)
        score = _score(entry.mode, self.router._weights, self.cost_score, entry.quality, vectors.speed, vectors.health)
        return _snapshot_of(
            decision, options, self.parts(), self.chosen >= 0,
            ranked, score[ranked], self.cost_score[ranked], self.cost[ranked], self.filtered(),
        )  # fmt: skip


def _chosen_first(ranked: np.ndarray, chosen: int) -> np.ndarray:
    """The ranking with a pinned choice first; otherwise the argmin leads already."""
    if chosen >= 0 and (not len(ranked) or ranked[0] != chosen):
        return np.concatenate(([chosen], ranked[ranked != chosen]))
    return ranked


def _snapshot_of(
    decision: RouteDecision, options: dict[str, Any], parts: tuple[ModelListing, LiveColumns], chosen: bool,
    ranked: np.ndarray, score: np.ndarray, cost: np.ndarray, est_cost_usd: np.ndarray,
    filtered: tuple[tuple[int, str], ...],
) -> DecisionSnapshot:
    return DecisionSnapshot(
        id=decision.id,
        ts=decision.ts,
        mode=decision.mode,
        chosen=chosen,
        prompt_tokens=decision.prompt_tokens,
        est_output_tokens=decision.est_output_tokens,
        decision_us=decision.decision_us,
        options=options,
        listing=parts[0],
        live=parts[1],
        ranked=ranked,
        score=score,
        cost=cost,
        est_cost_usd=est_cost_usd,
        filtered=filtered,
    )


def snapshots(decisions: Sequence[RouteDecision]) -> list[DecisionSnapshot]:
    """Each decision's `snapshot()`, the same to the bit. Rankings of one option set under one health epoch
    are computed together, a row each of one array: a snapshot alone makes some thirty numpy calls on arrays
    of a hundred-odd models, each costing about a microsecond whatever its length. Only the modes whose key
    is computed here (balanced, adaptive), for decisions whose key is not computed yet (a pin's) and that
    nothing of their own filtered; every other decision is snapshot alone."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, decision in enumerate(decisions):
        ranking = decision._ranked()
        if (
            ranking is not None and len(ranking.entry.idx) and ranking.entry.mode in _RANGED_MODES
            and ranking._key is None and ranking.bad is None
        ):  # fmt: skip
            groups.setdefault((id(ranking.entry), id(ranking.vectors)), []).append(i)
    out: list[DecisionSnapshot | None] = [None] * len(decisions)
    for members in groups.values():
        if len(members) > 1:
            for i, snapshot in zip(members, _snapshot_rows([decisions[i] for i in members])):
                out[i] = snapshot
    return [snapshot or decision.snapshot() for snapshot, decision in zip(out, decisions)]


def _snapshot_rows(decisions: list[RouteDecision]) -> list[DecisionSnapshot]:
    """`_Ranking.snapshot` of decisions of one entry and one `_Vectors`: their keys (`_ranged_key`) and cost
    scores (`_log_scaled`) a row each of one array."""
    rankings: list[_Ranking] = [d._ranked() for d in decisions]  # type: ignore[misc]
    first = rankings[0]
    entry, vectors, router = first.entry, first.vectors, first.router
    mode, weights = entry.mode, router._weights
    adaptive = mode == "adaptive"
    cost = np.stack([r.cost for r in rankings])
    logs = np.log(cost + _COST_FLOOR)
    terms = [_cost_terms(adaptive, weights[0], *_cost_range(entry, r.prompt_tokens, r.answer_tokens)) for r in rankings]
    scale, shift = (np.array(column)[:, None] for column in zip(*terms))
    key = _ranged_key(logs, scale, shift, vectors.rest, vectors.health if adaptive else None)
    if entry.prefer_penalty is not None:
        key += entry.prefer_penalty
    order = np.argsort(key, axis=1, kind="stable")
    counts = np.count_nonzero(np.isfinite(key), axis=1).tolist()
    cost_score = _log_scaled(logs)
    score = _score(mode, weights, cost_score, entry.quality, vectors.speed, vectors.health)
    chosen = [r.chosen for r in rankings]
    n = key.shape[1]
    if min(counts) == n and min(chosen) >= 0:
        # Every model ranked and one chosen in each row: the chosen first, then the rest in order (a row whose
        # chosen leads already is unchanged), and each row's figures in that order, for all rows at once.
        picked = np.array(chosen)[:, None]
        order = np.concatenate((picked, order[order != picked].reshape(len(rankings), n - 1)), axis=1)
        score, cost_score, cost = (np.take_along_axis(a, order, axis=1) for a in (score, cost_score, cost))
        rows = [(order[row], score[row], cost_score[row], cost[row]) for row in range(len(rankings))]
    else:
        rows = []
        for row, pick in enumerate(chosen):
            ranked = _chosen_first(order[row, : counts[row]], pick)
            rows.append((ranked, score[row][ranked], cost_score[row][ranked], cost[row][ranked]))
    parts = first.parts()
    return [
        _snapshot_of(decision, decision.options_used(), parts, pick >= 0, *row, ())
        for decision, pick, row in zip(decisions, chosen, rows)
    ]


def _score(
    mode: str, weights: tuple[float, float, float], cost_score: np.ndarray, quality: np.ndarray, speed: np.ndarray,
    health: np.ndarray,
) -> np.ndarray:
    """Every model's score: the same float operations, in the same order, as `_Ranking.candidate`."""
    if mode == "cost":
        return cost_score
    if mode == "quality":
        return quality
    if mode == "speed":
        return speed
    cost_weight, quality_weight, speed_weight = weights
    score = cost_weight * cost_score + quality_weight * quality + speed_weight * speed
    return score * health if mode == "adaptive" else score


def _sort_key(
    mode: str, weights: tuple[float, float, float], cost: np.ndarray, quality_key: np.ndarray, vectors: _Vectors | None,
    prefer_penalty: np.ndarray | None, bad: np.ndarray | None, cost_range: tuple[float, float] | None,
) -> np.ndarray:
    """Each model's sort key (lower is better; filtered out by `bad`: inf).

    `vectors` is needed in speed, balanced and adaptive modes, `cost_range` (`_cost_range`)
    in balanced and adaptive.
    """
    marked = bad is not None or prefer_penalty is not None  # the key is written to below
    if mode == "cost":
        key = cost.copy() if marked else cost  # `cost` itself stays the estimate
    elif mode == "quality":
        key = quality_key.copy() if marked else quality_key
    else:
        assert vectors is not None
        if mode == "speed":
            key = vectors.latency.copy() if marked else vectors.latency
        else:
            assert cost_range is not None
            adaptive = mode == "adaptive"
            scale, shift = _cost_terms(adaptive, weights[0], *cost_range)
            key = _ranged_key(np.log(cost + _COST_FLOOR), scale, shift, vectors.rest, vectors.health if adaptive else None)
    if prefer_penalty is not None:
        key += prefer_penalty
    if bad is not None:
        key[bad] = np.inf
    return key


def _cost_terms(adaptive: bool, cost_weight: float, low: float, high: float) -> tuple[float, float]:
    """How a balanced or adaptive key takes the cost in, given the cheapest and dearest estimate (`_cost_range`).

    The key is -(cost_weight * cost_score + rest), with cost_score = (H - log c) / (H - L): `scale` multiplies
    log c and `shift` is taken off. The constant cost_weight * H / (H - L) drops out of a balanced ranking;
    adaptive multiplies by health, so there it stays in. Costs all equal: every cost_score is 1."""
    span = math.log(high + _COST_FLOOR) - math.log(low + _COST_FLOOR)
    if not span > 1e-12:  # NaN too: infinite prices
        return 0.0, cost_weight
    return cost_weight / span, (cost_weight * (math.log(high + _COST_FLOOR) / span) if adaptive else 0.0)


def _ranged_key(
    logs: np.ndarray, scale: Any, shift: Any, rest: np.ndarray, health: np.ndarray | None
) -> np.ndarray:
    """The balanced or adaptive (`health` given) key of log(cost + floor) (`_cost_terms`): one decision's, with
    `scale` and `shift` floats, or a row each of decisions sharing their models and live figures, with columns."""
    key = logs * scale
    key -= rest
    if isinstance(shift, np.ndarray) or shift:  # one balanced decision's is 0: nothing to take off
        key -= shift
    if health is not None:
        key *= health
    return key


def _cost_range(entry: _Entry, prompt_tokens: int, answer_tokens: int) -> tuple[float, float]:
    """The cheapest and the dearest estimate of the entry's models: a short scan of their price hulls."""
    return (
        min(prompt_tokens * a + answer_tokens * b for a, b in entry.cheapest),
        max(prompt_tokens * a + answer_tokens * b for a, b in entry.dearest),
    )


def _prefer_penalty(mode: str, prefer: Iterable[str], providers: Iterable[str]) -> np.ndarray | None:
    """The key added to models outside `prefer` (None without a `prefer`)."""
    preferred = set(prefer)
    if not preferred:
        return None
    penalty = _PREFER_PENALTY.get(mode, 10.0)
    return np.array([0.0 if provider in preferred else penalty for provider in providers], dtype=np.float64)


_RANGED_MODES = ("balanced", "adaptive")  # the modes whose key needs the cost range
def _log_score(values: np.ndarray) -> np.ndarray:
    """1 for the smallest value, 0 for the largest, on a log scale (all 1 when they are equal)."""
    return _log_scaled(np.log(values))


def _log_scaled(logs: np.ndarray) -> np.ndarray:
    """`_log_score` of the values whose logs these are; of each row, for rows."""
    if logs.ndim == 1:  # one decision's, on its hot path: the extremes as scalars, half the calls
        low, high = logs.min(), logs.max()
    else:
        low, high = logs.min(axis=1, keepdims=True), logs.max(axis=1, keepdims=True)
    flat = high - low < 1e-12
    if not flat.any():
        return (high - logs) / (high - low)
    return np.where(flat, 1.0, (high - logs) / np.where(flat, 1.0, high - low))


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that can be the minimum of `x * a + y * b` for some x, y >= 0.

    Those lie on the lower-left convex hull of the (a, b) points, a handful even for a
    large catalog, so the cheapest and dearest cost of any prompt size is a short scan.
    """
    front: list[tuple[float, float]] = []
    for a, b in sorted(set(points)):
        if front and b >= front[-1][1]:
            continue  # dominated: another point is no dearer on both prices
        while len(front) >= 2:
            (a1, b1), (a2, b2) = front[-2], front[-1]
            if (a2 - a1) * (b - b1) - (b2 - b1) * (a - a1) <= 0:
                front.pop()  # the middle point is on or above the segment: never the minimum alone
            else:
                break
        front.append((a, b))
    return front or [(0.0, 0.0)]


def _peers(specs: list[ModelSpec]) -> list[list[int]]:
    """For each position, the positions of models equal to it in every figure the router ranks by."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    keys = []
    for i, m in enumerate(specs):
        key = (m.input_per_1m, m.output_per_1m, m.quality, m.tier, m.tokens_per_s, m.ttft_ms, m.context_window,
               m.max_output_tokens, m.capabilities)
        groups.setdefault(key, []).append(i)
        keys.append(key)
    return [groups[key] for key in keys]


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if hi - lo < 1e-12:
        return np.ones_like(values)
    return (values - lo) / (hi - lo)


class Router:
    """Chooses a model per request over a catalog, the usable providers and live health."""

    def __init__(
        self,
        catalog: Catalog,
        config: RouterConfig | None = None,
        health: HealthTracker | None = None,
        *,
        usable: Iterable[str] | None = None,
        disabled: Iterable[str] = (),
        today: date | None = None,
        aliases: dict[str, Any] | None = None,
    ) -> None:
        """`usable`: providers that may be called (None: all); the rest are `disabled` or not configured."""
        self.catalog = catalog
        self.config = config or RouterConfig()
        self.health = health
        # Alias name -> (its member ids, its mode or None).
        self.aliases: dict[str, tuple[tuple[str, ...], str | None]] = {
            name: (tuple(alias.models), alias.mode) for name, alias in (aliases or {}).items()
        }
        self._today = (today or date.today()).isoformat()
        self._dirty: set[str] = set()
        self._urgent = False  # a dirty provider failed or changed circuit: fold it in before the next decision
        self._fold_due = -math.inf  # monotonic time from which a success's new figures are folded in
        self._next_change = math.inf
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self._index()
        self._prompts: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._prompt_chars = 0  # the text `_prompts` holds (near enough: a large prompt's count runs on a thread)
        self._ids_counter = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._weights = self._normalised_weights()
        self.set_providers(catalog.providers if usable is None else usable, disabled)
        if health is not None:
            health.add_listener(self._health_changed)

    def _index(self) -> None:
        """The catalog's per-model numbers as arrays sorted by id; live figures start from the catalog's."""
        specs = sorted(self.catalog.models.values(), key=lambda m: m.id)
        self._specs: list[ModelSpec] = specs
        self._ids = [m.id for m in specs]
        self._position = {mid: i for i, mid in enumerate(self._ids)}
        self._providers = list(self.catalog.providers)
        self._by_provider: dict[str, list[int]] = {p: [] for p in self._providers}
        for i, m in enumerate(specs):
            self._by_provider.setdefault(m.provider, []).append(i)
        self._caps = [_bits(m.capabilities) for m in specs]
        self._tier = [TIER_RANK[m.tier] for m in specs]
        self._prices = np.array([(m.input_per_1m / 1e6, m.output_per_1m / 1e6) for m in specs], dtype=np.float64)
        self._ctx = np.array([m.context_window for m in specs], dtype=np.int64)
        self._max_out = np.array([m.max_output_tokens for m in specs], dtype=np.int64)
        self._quality = np.array([m.quality + _TIER_NUDGE * TIER_RANK[m.tier] for m in specs], dtype=np.float64)
        self._catalog_ttft = np.array([m.ttft_ms for m in specs], dtype=np.float64)
        self._catalog_mspt = np.array([1000.0 / m.tokens_per_s for m in specs], dtype=np.float64)
        self._retired = [m.deprecated_on is not None and m.deprecated_on <= self._today for m in specs]
        self._unpriced = [not m.priced for m in specs]
        # Live numbers: replaced, never mutated, so a decision keeps the arrays it was made with.
        self._ttft = self._catalog_ttft
        self._mspt = self._catalog_mspt
        self._health = np.ones(len(specs), dtype=np.float64)
        self._blocked = [False] * len(specs)
        self._epoch = getattr(self, "_epoch", -1) + 1
        self._entries.clear()
        if self.health is not None and hasattr(self, "_ids_counter"):
            self._dirty = set(self._by_provider)  # a model was added: every live figure is read again
            self._refresh()

    def _known(self, ref: str) -> int:
        """A pinned model's position; a `provider/<id>` the catalog lacks is added (unpriced) first."""
        spec = self.catalog.resolve(ref)
        if spec.id not in self._position:
            self._index()
        return self._position[spec.id]

    def _health_changed(self, provider: str, urgent: bool) -> None:
        self._dirty.add(provider)
        if urgent:
            self._urgent = True

    @classmethod
    def from_settings(cls, settings: Settings, health: HealthTracker | None = None) -> Router:
        usable = [p.id for p in settings.usable_providers()]
        disabled = [pid for pid, p in settings.providers.items() if not p.enabled]
        return cls(settings.catalog, settings.router, health, usable=usable, disabled=disabled, aliases=settings.aliases)

    def set_providers(self, usable: Iterable[str], disabled: Iterable[str] = ()) -> None:
        """Which providers may be called now (after a key was added or a provider switched off)."""
        self.usable = frozenset(usable)
        self.disabled = frozenset(disabled)
        self._entries.clear()

    def _normalised_weights(self) -> tuple[float, float, float]:
        w = self.config.weights
        total = w.cost + w.quality + w.speed
        if total <= 0:
            return (1 / 3, 1 / 3, 1 / 3)
        return (w.cost / total, w.quality / total, w.speed / total)

    # --- the decision --------------------------------------------------------------

    def route(self, request: ChatRequest, options: RouteOptions | None = None) -> RouteDecision:
        """Rank the eligible models for this request. Never calls anything; `chosen` is None when none is eligible."""
        started = time.perf_counter_ns()
        if options is None:
            options = RouteOptions()
        health = self.health
        if health is not None and (
            (self._dirty and (self._urgent or time.monotonic() >= self._fold_due))
            or health.clock() >= self._next_change
        ):
            self._refresh()
        prompt_tokens, need = self._prompt(request)
        pin = options.model
        if pin is None and request.model is not None:
            pin = request.model
        require, prefer, exclude = options.require, options.prefer, options.exclude
        if type(require) is not frozenset or type(prefer) is not tuple or type(exclude) is not tuple:
            require, prefer, exclude = frozenset(require), tuple(prefer), tuple(exclude)
        entry_key = (options.mode, need, require, prefer, exclude, options.max_tier, pin, options.allow)
        entry = self._entries.get(entry_key)
        if entry is None:
            entry = self._entry(entry_key)
        mode = entry.mode
        max_tokens = request.max_tokens
        answer_tokens = max_tokens if max_tokens is not None else entry.default_output

        cost = entry.prices.dot((prompt_tokens, answer_tokens))
        ctx_bad = out_bad = cost_bad = None
        if prompt_tokens + answer_tokens > entry.min_ctx:
            ctx_bad = entry.ctx < prompt_tokens + answer_tokens
        if max_tokens is not None and max_tokens > entry.min_max_out:
            out_bad = entry.max_out < max_tokens
        if options.max_cost_usd is not None:
            cost_bad = cost > options.max_cost_usd
        bad = ctx_bad
        for mask in (out_bad, cost_bad):
            if mask is not None:
                bad = mask if bad is None else bad | mask

        live = (self._ttft, self._mspt, self._health, self._epoch)
        if entry.pin is not None:
            chosen = entry.pin if entry.pin >= 0 and (bad is None or not bad[entry.pin]) else -1
            # The others are ranked when first asked for: a pinned call needs them only to fail
            # over and for its record, which is written after the answer has gone.
            key = None
        else:
            key = self._key(entry, cost, bad, prompt_tokens, answer_tokens, live)
            chosen = int(key.argmin()) if len(key) else -1
            if chosen >= 0 and key[chosen] == np.inf:
                chosen = -1
            elif chosen >= 0 and entry.peers is not None and len(entry.peers[chosen]) > 1:
                # Equal members of an alias (one model's deployments) take turns instead of one taking all.
                group = [i for i in entry.peers[chosen] if key[i] != np.inf]
                entry.turn += 1
                chosen = group[entry.turn % len(group)]
        return RouteDecision._decided(
            f"dec-{self._id_prefix}-{next(self._ids_counter)}",
            time.time(),
            mode,
            prompt_tokens,
            answer_tokens,
            (time.perf_counter_ns() - started) / 1000,
            options,
            (self, entry, cost, key, bad, (ctx_bad, out_bad, cost_bad), chosen, prompt_tokens, answer_tokens, live),
        )

    def _key(
        self, entry: _Entry, cost: np.ndarray, bad: np.ndarray | None, prompt_tokens: int, answer_tokens: int,
        live: _Live, vectors: _Vectors | None = None,
    ) -> np.ndarray:
        """Each model's sort key in the entry's mode (`_sort_key`).

        `vectors`: the live figures under `live`, when the caller has them already."""
        mode = entry.mode
        if vectors is None and mode not in ("cost", "quality"):
            vectors = self._live_vectors(entry, answer_tokens, live)
        cost_range = _cost_range(entry, prompt_tokens, answer_tokens) if mode in _RANGED_MODES else None
        return _sort_key(mode, self._weights, cost, entry.quality_key, vectors, entry.prefer_penalty, bad, cost_range)

    def count_prompt(self, request: ChatRequest) -> int:
        """The request's prompt tokens, remembered for `route`; safe on another thread (a large prompt's count)."""
        return self._prompt(request)[0]

    def _prompt(self, request: ChatRequest) -> tuple[int, int]:
        """(prompt tokens, capability bits the request needs), counted once per distinct prompt."""
        parts: list[Any] = []
        for m in request.messages:
            content = m.content
            if type(content) is str and m.tool_calls is None and m.name is None and m.tool_call_id is None:
                parts.append(m.role)
                parts.append(content)
            else:
                parts.append(m.model_dump_json(exclude_none=True))
        tools = request.tools
        if tools:
            parts.append(tuple(t.model_dump_json() for t in tools))
        response_format = request.response_format
        fmt = response_format.get("type") if response_format else None
        key = (request.stream, fmt, *parts)
        found = self._prompts.get(key)
        if found is None:
            tokens = count_messages(request.messages, tools=tools).tokens
            found = (tokens, _bits(request.needs()))
            chars = sum(len(part) for part in parts if type(part) is str)
            if len(self._prompts) >= PROMPT_MEMO or self._prompt_chars + chars > PROMPT_MEMO_CHARS:
                self._prompts.clear()
                self._prompt_chars = 0
            self._prompts[key] = found
            self._prompt_chars += chars
        return found

    def _entry(self, key: tuple[Any, ...]) -> _Entry:
        """Apply the request-independent filters of one option set (cached until health or providers change)."""
        mode_opt, need, require, prefer, exclude, max_tier, pin_ref, allow = key
        alias = self.aliases.get(pin_ref) if pin_ref is not None else None
        if alias is not None:
            pin_ref, mode_opt = None, mode_opt or alias[1]
        pin_ref, mode = self._pin_and_mode(pin_ref, mode_opt)
        unknown = set(require) - set(CAPABILITIES)
        if unknown:
            raise InvalidRequestError(f"unknown capability {sorted(unknown)[0]!r}; choose from {', '.join(CAPABILITIES)}")
        if max_tier is not None and max_tier not in TIER_RANK:
            raise InvalidRequestError(f"unknown tier {max_tier!r}; choose from {', '.join(TIERS)}")
        for provider in (*prefer, *exclude):
            if provider not in self.catalog.providers:
                raise InvalidRequestError(f"unknown provider {provider!r}; `p402 providers` lists them")
        need |= _bits(require)
        pin = self._known(pin_ref) if pin_ref is not None else None
        members = {self._known(mid) for mid in alias[0]} if alias is not None else None
        tier_cap = TIER_RANK[max_tier] if max_tier is not None else len(TIERS)
        excluded_providers = set(exclude)

        keep: list[int] = []
        excluded: list[Excluded] = []
        for i, spec in enumerate(self._specs):
            provider = spec.provider
            if members is not None and i not in members:
                continue  # an alias chooses among its members only
            if provider not in self.usable:
                reason = DISABLED if provider in self.disabled else NOT_CONFIGURED
            elif provider in excluded_providers:
                reason = EXCLUDED_PROVIDER
            elif self._unpriced[i] and i != pin and members is None:
                reason = UNPRICED
            elif allow is not None and spec.id not in allow:
                reason = NOT_ALLOWED
            elif self._retired[i] and i != pin:
                reason = f"retired on {spec.deprecated_on}"
            elif self._caps[i] & need != need:
                reason = _missing(self._caps[i], need)
            elif self._tier[i] > tier_cap:
                reason = OVER_TIER
            elif self._blocked[i]:  # last: the orchestrator may still try a model left out only for this
                reason = CIRCUIT_OPEN
            else:
                keep.append(i)
                continue
            excluded.append(Excluded(spec.id, reason))

        entry = _Entry()
        entry.mode = mode
        entry.default_output = self.config.output_tokens.get(mode, self.config.default_output_tokens)  # type: ignore[call-overload]
        entry.idx = np.array(keep, dtype=np.int64)
        entry.ids = [self._ids[i] for i in keep]
        entry.prices = np.ascontiguousarray(self._prices[entry.idx]) if keep else np.zeros((0, 2))
        entry.ctx = self._ctx[entry.idx]
        entry.max_out = self._max_out[entry.idx]
        entry.min_ctx = int(entry.ctx.min()) if keep else 0
        entry.min_max_out = int(entry.max_out.min()) if keep else 0
        prior = self._quality[entry.idx]
        entry.quality = _minmax(prior) if keep else prior  # 0..1 over the models kept
        entry.quality_key = -entry.quality
        prices = [(float(a), float(b)) for a, b in entry.prices]
        entry.cheapest = _lower_hull(prices)
        entry.dearest = [(-a, -b) for a, b in _lower_hull([(-a, -b) for a, b in prices])]
        entry.prefer_penalty = _prefer_penalty(mode, prefer, (self._specs[i].provider for i in keep))
        entry.excluded = excluded
        entry.pinned_id = self._ids[pin] if pin is not None else None
        entry.pin = keep.index(pin) if pin is not None and pin in keep else None
        if pin is not None and entry.pin is None:
            # The pinned model failed a filter: keep nothing choosable, the excluded list says why.
            entry.pin = -1
        entry.peers = _peers([self._specs[i] for i in keep]) if members is not None else None
        entry.turn = 0
        if len(self._entries) >= 256:
            self._entries.clear()
        self._entries[key] = entry
        return entry

    def _pin_and_mode(self, pin_ref: str | None, mode: str | None) -> tuple[str | None, str]:
        pin_ref, named_mode = parse_model_ref(pin_ref)
        mode = mode or named_mode or self.config.mode
        if mode not in MODES:
            raise InvalidRequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return pin_ref, mode

    def _live_vectors(self, entry: _Entry, answer_tokens: int, live: _Live) -> _Vectors:
        """Latency, speed score and health of the entry's models, cached per answer length and health epoch.

        Keyed by the epoch a decision was ranked in, not the current one: decisions are snapshot for
        the store after their answers, often once health has moved on, and would compute them again."""
        ttft, mspt, health, epoch = live
        cached = entry.live.get((answer_tokens, epoch))
        if cached is not None:
            return cached
        idx = entry.idx
        latency = ttft[idx] + answer_tokens * mspt[idx]
        speed = _log_score(latency) if len(latency) else latency
        _, quality_weight, speed_weight = self._weights
        vectors = _Vectors(epoch, latency, speed, health[idx], entry.quality * quality_weight + speed * speed_weight)
        if len(entry.live) >= 16:
            entry.live.clear()
        entry.live[(answer_tokens, epoch)] = vectors
        return vectors

    def _refresh(self) -> None:
        """Fold health changes into the live arrays (copies: decisions in flight keep theirs)."""
        health = self.health
        assert health is not None
        now = health.clock()
        timed = now >= self._next_change
        providers = set(self._by_provider) if timed else set(self._dirty)
        self._dirty.clear()
        ttft, mspt, scores = self._ttft.copy(), self._mspt.copy(), self._health.copy()
        blocked = list(self._blocked)
        for provider in providers:
            factor = health.provider_factor(provider)
            # Models never called read as catalog figures under the provider's own factor and circuit;
            # only the few with live stats are looked at one by one (a provider may list dozens).
            members = self._by_provider.get(provider, [])
            ttft[members] = self._catalog_ttft[members]
            mspt[members] = self._catalog_mspt[members]
            scores[members] = factor
            provider_blocked = health.blocked(provider, None, now)
            for i in members:
                blocked[i] = provider_blocked
            for model_id in health.models_seen(provider):
                i = self._position.get(model_id)
                if i is None:
                    continue
                live = health.model_live(model_id)
                ttft[i] = live.ttft_ms if live is not None and live.ttft_ms is not None else self._catalog_ttft[i]
                mspt[i] = (
                    1000.0 / live.tokens_per_s
                    if live is not None and live.tokens_per_s
                    else self._catalog_mspt[i]
                )
                scores[i] = factor * (live.health if live is not None else 1.0)
                blocked[i] = health.blocked(provider, model_id, now)
        self._ttft, self._mspt, self._health = ttft, mspt, scores
        self._epoch += 1
        self._urgent = False
        # Under load every call moves some latency figure; folding each one in cost more than the
        # rest of a decision, and figures 100 ms old rank models just as well.
        self._fold_due = time.monotonic() + LIVE_FOLD_S
        if blocked != self._blocked:
            self._blocked = blocked
            self._entries.clear()
        self._next_change = health.next_change_at()

    # --- for the console and the CLI --------------------------------------------------

    def models(self) -> list[ModelSpec]:
        return list(self._specs)

    def usable_models(self) -> list[ModelSpec]:
        return [m for m in self._specs if m.provider in self.usable]

