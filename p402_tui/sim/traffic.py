"""Demo traffic: a steady mix of requests and a script of incidents, so the whole system moves.

The generator sends its requests through the orchestrator (and so through the
router, the health tracker, the store and the cache) exactly as real callers do;
only the providers are simulated. Incidents are faults added to the running
simulator and removed again, which the health tracker then sees like a real
outage. Nothing here knows about Textual: `p402 demo` drives it under the
console and `p402 serve --sim` can drive it headless.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import P402Error
from ..core.hooks import CallContext, RouteOptions
from ..core.types import ChatMessage, ChatRequest, ContentPart, FunctionDef, ImageURL, Tool
from .engine import Fault, SimState

log = logging.getLogger(__name__)

# A 1x1 PNG: enough for a request to need a vision model.
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "Write a Python function that merges two sorted lists without using sort()."),
    ("code", "Why does this SQL query do a full table scan: SELECT * FROM orders WHERE lower(email) = ?"),
    ("code", "Refactor this loop into a list comprehension: for x in xs: if x > 0: out.append(x * 2)"),
    ("code", "Explain the difference between asyncio.gather and asyncio.TaskGroup with an example."),
    ("summarise", "Summarise the attached incident report in three bullet points for an executive audience."),
    ("summarise", "Give me a one-paragraph summary of the trade-offs between SQLite WAL mode and rollback journals."),
    ("translate", "Translate into French: The invoice is overdue; please pay within seven days."),
    ("translate", "Translate into Japanese: Our office will be closed on Monday for maintenance."),
    ("math", "What is 17 times 23, and how would you check it mentally?"),
    ("math", "A train leaves at 14:05 and arrives at 17:50. How long is the journey in minutes?"),
    ("extract", "Extract the company, amount and due date as JSON: ACME Corp owes $4,200 by March 3rd."),
    ("extract", "Return JSON with the city and temperature from: It is 21 degrees in Lisbon today."),
    ("chat", "Suggest three names for a coffee shop that also repairs bicycles."),
    ("chat", "What should I pack for a three-day hike in the Alps in September?"),
    ("chat", "Write a haiku about a router choosing the cheapest model."),
    ("analysis", "Compare PostgreSQL logical replication with physical streaming replication for a read-heavy app."),
    ("analysis", "List the risks of caching LLM answers semantically and how to mitigate each one."),
    ("support", "A customer says their card was charged twice. Draft a polite reply asking for the order id."),
)

IMAGE_PROMPTS = (
    "Describe what is in this image.",
    "Is there any text in this picture? Transcribe it.",
    "What colours dominate this image?",
)

WEATHER_TOOL = Tool(
    function=FunctionDef(
        name="get_weather",
        description="Current weather for a city",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    )
)
ORDER_TOOL = Tool(
    function=FunctionDef(
        name="lookup_order",
        description="Find an order by id",
        parameters={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    )
)
TOOL_PROMPTS = (
    ("What's the weather in Oslo right now?", WEATHER_TOOL),
    ("Is it raining in Porto?", WEATHER_TOOL),
    ("Where is my order A-1042?", ORDER_TOOL),
)

# How often each mode is asked for: most traffic takes the default trade-offs.
MODE_WEIGHTS = {"balanced": 5, "cost": 4, "adaptive": 4, "speed": 2, "quality": 1}

# The agent sessions the demo runs traffic under: name, budget in USD.
DEMO_SESSIONS: tuple[tuple[str, float], ...] = (
    ("support-bot", 0.50),
    ("code-review-agent", 2.00),
    ("nightly-summaries", 0.05),
    ("research-assistant", 5.00),
)


@dataclass(slots=True)
class Incident:
    """A fault that starts `at_s` seconds into the run and lasts `duration_s`.

    `provider` None means: whichever provider took the most traffic so far, so
    the outage always hits where the traffic is and the move away is visible.
    """

    at_s: float
    duration_s: float
    kind: str  # a Fault kind: error | rate_limit | timeout | disconnect | malformed
    label: str
    provider: str | None = None
    status: int | None = None
    probability: float = 1.0
    retry_after_s: float | None = None


def default_incidents() -> list[Incident]:
    """One cycle of the demo's script; it repeats every `DEFAULT_CYCLE_S`."""
    return [
        Incident(15, 25, "rate_limit", "rate limited", probability=0.9, retry_after_s=5),
        Incident(50, 30, "error", "down (503)", status=503),
    ]


DEFAULT_CYCLE_S = 90.0


@dataclass(slots=True)
class ActiveIncident:
    incident: Incident
    provider: str
    fault: Fault
    started: float
    ends: float


@dataclass
class TrafficStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    bursts: int = 0
    by_mode: Counter[str] = field(default_factory=Counter)
    by_provider: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    incidents: list[str] = field(default_factory=list)  # "t+15s groq rate limited" lines, in order

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "bursts": self.bursts,
            "by_mode": dict(self.by_mode),
            "by_provider": dict(self.by_provider),
            "errors": dict(self.errors),
            "incidents": list(self.incidents),
        }


class TrafficGenerator:
    """Poisson arrivals at `rate` requests/s, bursts now and then, incidents on a script.

    `orchestrator` is a core Orchestrator; `sim` the running simulator's state
    (None: no incidents). `time_scale` < 1 fast-forwards the script (tests).
    `sessions` may grow while it runs: requests pick from whatever it holds.
    """

    def __init__(
        self,
        orchestrator: Any,
        sim: SimState | None,
        *,
        rate: float = 3.0,
        seed: int | None = None,
        sessions: list[str] | None = None,
        incidents: list[Incident] | None = None,
        cycle_s: float | None = DEFAULT_CYCLE_S,
        time_scale: float = 1.0,
        burst_every_s: tuple[float, float] = (20.0, 45.0),
        burst_size: tuple[int, int] = (15, 40),
        concurrency: int = 32,
        max_tokens: int = 200,
        opening_burst: int = 6,
        source: str = "demo",
    ) -> None:
        self.orchestrator = orchestrator
        self.sim = sim
        self.rate = rate
        self.rng = random.Random(seed)
        self.sessions = list(sessions or [])
        self.incidents = default_incidents() if incidents is None else incidents
        self.cycle_s = cycle_s
        self.time_scale = time_scale
        self.burst_every_s = burst_every_s
        self.burst_size = burst_size
        self.max_tokens = max_tokens
        self.opening_burst = opening_burst
        self.source = source
        self.stats = TrafficStats()
        self.active: list[ActiveIncident] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._started = 0.0

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self.run(), name="p402-traffic")
        return self._runner

    async def stop(self) -> None:
        """Stop sending, cancel what is in flight and lift every fault the script added."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for active in list(self.active):
            self._lift(active)

    async def drain(self) -> None:
        """Stop sending and wait for the requests in flight to finish (faults stay as they are)."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self) -> None:
        """Send traffic until cancelled."""
        self._started = time.monotonic()
        script = asyncio.create_task(self._script(), name="p402-incidents")
        try:
            await asyncio.gather(self._arrivals(), self._bursts())
        finally:
            script.cancel()
            await asyncio.gather(script, return_exceptions=True)

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    # --- arrivals ------------------------------------------------------------------

    async def _arrivals(self) -> None:
        for _ in range(self.opening_burst):  # something to look at from the first second
            await self._launch()
        while True:
            await asyncio.sleep(self.rng.expovariate(self.rate))
            await self._launch()

    async def _bursts(self) -> None:
        low, high = self.burst_every_s
        while True:
            await asyncio.sleep(self.rng.uniform(low, high) * self.time_scale)
            self.stats.bursts += 1
            for _ in range(self.rng.randint(*self.burst_size)):
                await self._launch()

    async def _launch(self) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._one())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _one(self) -> None:
        request, options, ctx = self.next_request()
        self.stats.sent += 1
        self.stats.by_mode[options.mode or "default"] += 1
        try:
            if request.stream:
                async with self.orchestrator.stream(request, options, ctx) as stream:
                    async for _chunk in stream:
                        pass
                    meta = stream.meta
            else:
                meta = (await self.orchestrator.complete(request, options, ctx)).p402
        except P402Error as error:
            self.stats.failed += 1
            self.stats.errors[error.kind] += 1
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug must not stop the demo; it is counted and logged
            self.stats.failed += 1
            self.stats.errors[type(error).__name__] += 1
            log.exception("demo request failed unexpectedly")
            return
        self.stats.ok += 1
        if meta is not None:
            self.stats.by_provider[meta.provider] += 1

    # --- what to send ----------------------------------------------------------------

    def next_request(self) -> tuple[ChatRequest, RouteOptions, CallContext]:
        """One varied request: a prompt, sometimes tools, an image or JSON; a mode; maybe a session."""
        rng = self.rng
        roll = rng.random()
        tools = None
        response_format = None
        require: set[str] = set()
        if roll < 0.10:
            content: Any = [
                ContentPart(type="text", text=rng.choice(IMAGE_PROMPTS)),
                ContentPart(type="image_url", image_url=ImageURL(url=PIXEL)),
            ]
        elif roll < 0.22:
            text, tool = rng.choice(TOOL_PROMPTS)
            content, tools = text, [tool]
        else:
            task, content = rng.choice(PROMPTS)
            if task == "extract" and rng.random() < 0.7:
                response_format = {"type": "json_object"}
            if task == "analysis" and rng.random() < 0.3:
                require.add("reasoning")
        messages = [ChatMessage(role="user", content=content)]
        if rng.random() < 0.3:
            messages.insert(0, ChatMessage(role="system", content="You are a concise assistant."))
        request = ChatRequest(
            messages=messages,
            tools=tools,
            response_format=response_format,
            max_tokens=rng.choice((64, 128, self.max_tokens)),
            stream=rng.random() < 0.5,
        )
        mode = rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]
        options = RouteOptions(mode=mode, require=frozenset(require))
        if rng.random() < 0.1:
            options.max_tier = "budget"
        session = rng.choice(self.sessions) if self.sessions and rng.random() < 0.6 else None
        ctx = CallContext(session_id=session, tag=f"demo-{mode}", source=self.source)
        return request, options, ctx

    # --- incidents ---------------------------------------------------------------------

    async def _script(self) -> None:
        if self.sim is None or not self.incidents:
            return
        cycle = 0
        while True:
            offset = (self.cycle_s or 0.0) * cycle
            for incident in sorted(self.incidents, key=lambda i: i.at_s):
                await self._sleep_until((offset + incident.at_s) * self.time_scale)
                while incident.provider is None and not self.stats.by_provider:
                    await asyncio.sleep(0.1)  # aim at the traffic, so wait until there is some
                self._begin(incident)
            if not self.cycle_s:
                await self._sleep_until(float("inf"))
            cycle += 1
            await self._sleep_until((self.cycle_s * cycle) * self.time_scale)

    async def _sleep_until(self, at: float) -> None:
        """Sleep until `at` seconds into the run, lifting incidents as they end."""
        while True:
            now = self.elapsed()
            next_end = min((a.ends for a in self.active), default=float("inf"))
            wake = min(at, next_end)
            if wake == float("inf"):
                await asyncio.Event().wait()  # nothing more scheduled: sleep until cancelled
            if wake > now:
                await asyncio.sleep(wake - now)
            for active in [a for a in self.active if a.ends <= self.elapsed()]:
                self._lift(active)
            if self.elapsed() >= at:
                return

    def _target(self, incident: Incident) -> str:
        if incident.provider:
            return incident.provider
        busy = [p for p, _ in self.stats.by_provider.most_common() if not self.is_faulted(p)]
        return busy[0] if busy else next(iter(self.stats.by_provider))

    def is_faulted(self, provider: str) -> bool:
        return any(a.provider == provider for a in self.active)

    def _begin(self, incident: Incident) -> None:
        assert self.sim is not None
        provider = self._target(incident)
        fault = Fault(
            provider=provider,
            kind=incident.kind,  # type: ignore[arg-type]
            status=incident.status,
            probability=incident.probability,
            retry_after_s=incident.retry_after_s,
        )
        self.sim.add_fault(fault)
        now = self.elapsed()
        self.active.append(ActiveIncident(incident, provider, fault, now, now + incident.duration_s * self.time_scale))
        self.stats.incidents.append(f"t+{now:.0f}s {provider} {incident.label}")
        log.info("incident: %s %s for %.0fs", provider, incident.label, incident.duration_s * self.time_scale)

    def _lift(self, active: ActiveIncident) -> None:
        if self.sim is not None and active.fault in self.sim.faults:
            self.sim.faults.remove(active.fault)
        if active in self.active:
            self.active.remove(active)
            self.stats.incidents.append(f"t+{self.elapsed():.0f}s {active.provider} recovered")


SessionMaker = Callable[[str, float], Awaitable[str]]


async def demo_sessions(create: SessionMaker | None) -> list[str]:
    """Create the demo's agent sessions with `create(name, budget_usd) -> id`; none without a store."""
    if create is None:
        return []
    return [await create(name, budget) for name, budget in DEMO_SESSIONS]
