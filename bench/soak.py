#!/usr/bin/env python3
"""The gateway under faults and abuse, as issue 24's probe tested it; prints JSON.

Processes besides this one: `p402 sim --no-latency` (the upstream, with faults injected
over its `/_sim/faults` control API) and `p402 serve` pointed at it through a config
file, both on loopback. This process is the load generator (aiohttp, closed loop).

Each finding has a scenario; pick one with `--scenario` (they share the processes'
set-up in `Rig`, and register themselves in SCENARIOS):

  faults   5,000 requests at concurrency 64, half streamed, with 20 % of upstream calls
           failing in the probe's mix (503, 429 with and without Retry-After, timeouts,
           disconnects, malformed bodies). Prints the client-visible failure rate, hung
           requests, malformed streams, ledger rows against requests, whether /metrics
           agrees, the providers' health at the end; then a phase where every provider
           fails (each answer must be a 503 with Retry-After) and one after the faults are
           cleared (the gateway must serve at once, not after its ejections run out).

    python bench/soak.py --scenario faults
    python bench/soak.py --scenario faults --requests 1000 --concurrency 16

The limits' scenarios (bench/soak_limits.py, each with its own processes and database):

  big_prompt          one 8 MB prompt, then six at once: serve's RSS growth and peak, /health latency
  stalled_subscribers 500 /api/v2/events subscribers that never read, against a control stack under the
                      same load: RSS, throughput and CPU they add, disconnect spike; each shrinks its
                      receive window to 4 kB (stalled_subscribers_default_window: Linux's own)
  hung_upstream       every provider hangs: a request with the default deadline, and one with timeout_s
  slow_headers        1,000 connections sending a header line every 10 s (and 500 slow bodies), while
                      normal requests go on: when they are closed
  kill9               kill -9 under load: acknowledged requests missing from the ledger (strict, four
                      runs; batch, with the window they were answered in)
  durability_cost     request latency with durability batch and strict
  rss_batches         RSS across two batches of 10,000 distinct requests with the cache on, against
                      what the cache's entries account for; then a third with the cache off, as a control

    python bench/soak.py --scenario big_prompt --scenario kill9
    python bench/soak.py --scenario all        # every scenario, about 10 minutes

Every attempt has a 1 s timeout (set in the serve config) so a hung upstream costs a
bounded time; the whole run stops issuing requests after `--max-seconds`. Like
bench/gateway.py it re-runs itself in a loopback-only network namespace when it can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import Child, free_port, in_netns, percentile, reexec_in_netns, sim_config  # noqa: E402 - bench/gateway.py
from soak_limits import SCENARIOS as LIMITS  # noqa: E402 - bench/soak_limits.py

ROOT = Path(__file__).resolve().parent.parent
ATTEMPT_TIMEOUT_S = 1.0
HUNG_S = 30.0  # a request still unanswered after this is hung: three attempts take at most ~3 s


# --- the processes --------------------------------------------------------------------------


@dataclass
class Rig:
    """The simulator and the gateway, and what a scenario needs to reach them."""

    scratch: Path
    sim: Child
    sim_url: str
    gateway: Child
    url: str
    db_path: Path

    def stop_gateway(self) -> None:
        """SIGTERM: the gateway finishes its ledger writes before it exits."""
        self.gateway.stop()

    def sim_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.sim_url}{path}", data=data, method=method,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return response.read()


def serve_config(sim_url: str) -> str:
    """Every provider on the simulator, each attempt bounded by ATTEMPT_TIMEOUT_S; [health] at its defaults."""
    lines = []
    for line in sim_config(sim_url).splitlines():
        lines.append(line)
        if line.startswith("base_url"):
            lines += [f"timeout_s = {ATTEMPT_TIMEOUT_S}", f"first_token_timeout_s = {ATTEMPT_TIMEOUT_S}",
                      f"connect_timeout_s = {ATTEMPT_TIMEOUT_S}"]
    return "\n".join(lines) + "\n"


def open_rig(scratch: Path) -> tuple[Rig, list[Child]]:
    python = sys.executable
    children: list[Child] = []
    sim_port = free_port()
    sim = Child("p402 sim", [python, "-m", "p402_tui.cli", "sim", "--no-latency", "--port", str(sim_port)],
                scratch / "sim.log")
    children.append(sim)
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim.wait_ready(f"{sim_url}/_sim/stats", 30)
    config = scratch / "p402.toml"
    config.write_text(serve_config(sim_url))
    port = free_port()
    db_path = scratch / "p402.db"
    gateway = Child("p402 serve", [python, "-m", "p402_tui.cli", "--config", str(config), "serve",
                                   "--port", str(port), "--db", str(db_path)], scratch / "serve.log")
    children.append(gateway)
    url = f"http://127.0.0.1:{port}"
    gateway.wait_ready(f"{url}/health", 60)
    return Rig(scratch, sim, sim_url, gateway, url, db_path), children


# --- one request, judged as a client sees it ---------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    status: int
    stream: bool
    seconds: float
    kind: str = ""  # why it failed, as the client saw it
    malformed: bool = False
    retry_after: str | None = None
    error_type: str | None = None


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    hung: int = 0

    def summary(self) -> dict[str, Any]:
        done = self.outcomes
        failed = [o for o in done if not o.ok]
        seconds = sorted(o.seconds for o in done)
        total = len(done) + self.hung
        return {
            "requests": total,
            "streamed": sum(o.stream for o in done),
            "ok": len(done) - len(failed),
            "client_visible_failures": len(failed) + self.hung,
            "client_visible_failure_rate": round((len(failed) + self.hung) / total, 4) if total else None,
            "hung": self.hung,
            "malformed_streams": sum(o.malformed for o in done),
            "statuses": dict(Counter(str(o.status) for o in done).most_common()),
            "failure_kinds": dict(Counter(o.kind for o in failed).most_common(8)),
            "latency_s": {"p50": percentile(seconds, 50), "p99": percentile(seconds, 99),
                          "max": round(seconds[-1], 3) if seconds else None},
        }


def judge_stream(body: bytes) -> tuple[bool, bool, str]:
    """(ok, malformed, why) for a 200 event stream: JSON frames, a finish_reason, no error, then [DONE].

    Content may be empty: a reasoning model can spend a 16-token answer on its reasoning."""
    frames = [f for f in body.split(b"\n\n") if f.strip()]
    if not frames or frames[-1].strip() != b"data: [DONE]":
        return False, True, "stream without [DONE]"
    finished = False
    for frame in frames[:-1]:
        if frame.startswith(b":"):
            continue  # a heartbeat comment
        if not frame.startswith(b"data: "):
            return False, True, "frame without data:"
        try:
            chunk = json.loads(frame[6:])
        except ValueError:
            return False, True, "frame not JSON"
        if "error" in chunk:
            return False, False, f"error chunk: {chunk['error'].get('code')}"
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason") == "error":
                return False, False, "finish_reason error"
            finished = finished or bool(choice.get("finish_reason"))
    return (True, False, "") if finished else (False, False, "stream without finish_reason")


async def send(session: Any, url: str, i: int, stream: bool) -> Outcome:
    import aiohttp

    body = {"messages": [{"role": "user", "content": f"Request {i}: what does a router weigh?"}],
            "max_tokens": 16, "stream": stream}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"cache-control": "no-cache"},
                            timeout=aiohttp.ClientTimeout(total=HUNG_S)) as response:
        raw = await response.read()
        seconds = time.perf_counter() - start
        if response.status != 200:
            try:
                error = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                return Outcome(False, response.status, stream, seconds, f"HTTP {response.status} not JSON", True)
            return Outcome(False, response.status, stream, seconds, f"HTTP {response.status} {error.get('code')}",
                           retry_after=response.headers.get("retry-after"), error_type=error.get("type"))
        if stream:
            ok, malformed, why = judge_stream(raw)
            return Outcome(ok, 200, True, seconds, why, malformed)
        try:
            finish = json.loads(raw)["choices"][0]["finish_reason"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Outcome(False, 200, False, seconds, "body not a completion", True)
        return Outcome(finish not in (None, "error"), 200, False, seconds, f"finish_reason {finish}")


async def drive(url: str, requests: int, concurrency: int, deadline: float, first_id: int = 0) -> Tally:
    """`requests` requests (every other one streamed) from `concurrency` workers, none started after `deadline`."""
    import aiohttp

    tally = Tally()
    counter = iter(range(first_id, first_id + requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                try:
                    tally.outcomes.append(await send(session, url, i, stream=bool(i % 2)))
                except asyncio.TimeoutError:
                    tally.hung += 1
                except aiohttp.ClientError as error:
                    tally.outcomes.append(Outcome(False, 0, bool(i % 2), 0.0, f"connection: {type(error).__name__}"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


# --- what the gateway says it did -----------------------------------------------------------------


def metric_sums(text: str, name: str, label: str) -> dict[str, float]:
    """A Prometheus counter summed by one label."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, value = line[len(name) + 1:].rsplit("} ", 1)
        for part in labels.split(","):
            key, _, raw = part.partition("=")
            if key == label:
                sums[raw.strip('"')] = sums.get(raw.strip('"'), 0.0) + float(value)
    return sums


def ledger_counts(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(db_path) as db:
        return dict(db.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())


def health_summary(rig: Rig) -> dict[str, Any]:
    rows = json.loads(rig.get("/api/v2/providers"))["data"]
    states = Counter((p.get("health") or {}).get("status", "healthy") for p in rows)
    circuits = Counter((p.get("health") or {}).get("circuit", "closed") for p in rows)
    return {"status": dict(states), "circuit": dict(circuits)}


# --- scenarios ----------------------------------------------------------------------------------------

Scenario = Callable[[Rig, argparse.Namespace], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


# The probe's mix: 20 % of upstream calls fail, in six equal parts. The simulator applies
# the first fault that fires, each with its own probability, so each later one is scaled up
# by what the ones before it leave.
FAULT_MIX = [
    {"kind": "error", "status": 503},
    {"kind": "rate_limit", "retry_after_s": 1},  # 429 with Retry-After
    {"kind": "rate_limit", "wait_hint": False},  # 429 without Retry-After: the gateway's default wait applies
    {"kind": "timeout"},  # the upstream hangs; the 1 s attempt timeout ends it
    {"kind": "disconnect"},  # the connection drops after the 200, before the first token
    {"kind": "malformed"},  # a body or event that is not JSON
]


def fault_bodies(rate: float) -> list[dict[str, Any]]:
    share = rate / len(FAULT_MIX)
    bodies, left = [], 1.0
    for fault in FAULT_MIX:
        bodies.append({"provider": "*", "probability": round(share / left, 6), **fault})
        left -= share
    return bodies


@scenario("faults")
async def faults(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + args.max_seconds
    rig.sim_call("DELETE", "/_sim/faults")
    for body in fault_bodies(args.fault_rate):
        rig.sim_call("POST", "/_sim/faults", body)
    rig.sim_call("DELETE", "/_sim/stats")
    started = time.perf_counter()
    mixed = await drive(rig.url, args.requests, args.concurrency, deadline)
    elapsed = time.perf_counter() - started
    stats = rig.sim_call("GET", "/_sim/stats")
    upstream_calls = stats["calls"]
    health_after = health_summary(rig)

    # Every provider fails: nothing can answer, and each refusal must say when to come back.
    rig.sim_call("DELETE", "/_sim/faults")
    rig.sim_call("POST", "/_sim/faults", {"provider": "*", "kind": "error", "status": 503})
    down = await drive(rig.url, args.down_requests, min(args.concurrency, 16), deadline + 60, first_id=10**6)
    health_down = health_summary(rig)

    # The faults are gone: the gateway serves at once, whatever it ejected meanwhile.
    rig.sim_call("DELETE", "/_sim/faults")
    back = await drive(rig.url, args.down_requests, min(args.concurrency, 16), deadline + 120, first_id=2 * 10**6)

    await asyncio.sleep(0.5)  # /metrics is counted by a subscriber task
    metrics_text = rig.get("/metrics").decode()
    rig.stop_gateway()
    ledger = ledger_counts(rig.db_path)

    phases = {"mixed": mixed, "all_down": down, "recovered": back}
    client = {"ok": 0, "error": 0}
    for tally in phases.values():
        ok = sum(o.ok for o in tally.outcomes)
        client["ok"] += ok
        client["error"] += len(tally.outcomes) + tally.hung - ok
    # A 200 stream that broke after its first token is an error row on the gateway's side too.
    metrics = metric_sums(metrics_text, "p402_requests_total", "status")
    sent = sum(len(t.outcomes) + t.hung for t in phases.values())
    down_refusals = [o for o in down.outcomes if not o.ok]
    summary = mixed.summary()
    return {
        "mixed": {
            **summary,
            "fault_rate_injected": args.fault_rate,
            "fault_mix": FAULT_MIX,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 2),
            "rps": round(len(mixed.outcomes) / elapsed, 1) if elapsed else None,
            "upstream_calls": upstream_calls,
            "upstream_calls_per_request": round(upstream_calls / max(summary["requests"], 1), 3),
            "providers_at_end": health_after,
            "target": {"failure_rate_max": 0.02, "hung": 0, "malformed_streams": 0},
            "meets_target": summary["client_visible_failure_rate"] is not None
            and summary["client_visible_failure_rate"] <= 0.02 and summary["hung"] == 0
            and summary["malformed_streams"] == 0,
        },
        "all_down": {
            **down.summary(),
            "refusals_503_with_retry_after": sum(1 for o in down_refusals if o.status == 503 and o.retry_after),
            "retry_after_values": dict(Counter(o.retry_after for o in down_refusals).most_common(5)),
            "error_types": dict(Counter(o.error_type for o in down_refusals).most_common()),
            "every_refusal_is_503_with_retry_after": bool(down_refusals)
            and all(o.status == 503 and o.retry_after for o in down_refusals),
            "providers": health_down,
        },
        "recovered": back.summary(),
        "ledger": {
            "rows": sum(ledger.values()),
            "by_status": ledger,
            "requests_sent": sent,
            "rows_equal_requests": sum(ledger.values()) == sent,
        },
        "metrics": {
            "requests_total_by_status": metrics,
            "client_ok": client["ok"],
            "client_failed": client["error"],
            "agrees_with_ledger": metrics.get("ok", 0) == ledger.get("ok", 0)
            and metrics.get("error", 0) == ledger.get("error", 0),
            "agrees_with_clients": metrics.get("ok", 0) == client["ok"] and metrics.get("error", 0) == client["error"],
        },
    }


# --- the run -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="p402-soak-"))
    names = sorted({*SCENARIOS, *LIMITS}) if "all" in args.scenario else list(dict.fromkeys(args.scenario))
    result: dict[str, Any] = {
        "bench": "soak",
        "scenarios": names,
        "attempt_timeout_s": ATTEMPT_TIMEOUT_S,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": os.getloadavg()},
        "network_namespace": in_netns(),
    }
    for name in names:
        started = time.perf_counter()
        if name in LIMITS:
            try:
                result[name] = asyncio.run(LIMITS[name](scratch / name))
            except Exception as error:  # noqa: BLE001 - one broken scenario must not hide the others' figures
                result[name] = {"error": f"{type(error).__name__}: {error}"}
        else:
            children: list[Child] = []
            try:
                (scratch / name).mkdir(parents=True)
                rig, children = open_rig(scratch / name)
                result[name] = asyncio.run(SCENARIOS[name](rig, args))
            finally:
                for child in reversed(children):
                    child.stop()
        result[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    if args.keep:
        result["scratch"] = str(scratch)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=[*sorted({*SCENARIOS, *LIMITS}), "all"],
                        help="run this scenario (repeatable; default faults)")
    parser.add_argument("--requests", type=int, default=5000, help="requests in the main phase (default 5000)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients at once (default 64)")
    parser.add_argument("--fault-rate", type=float, default=0.20, help="share of upstream calls that fail (0.20)")
    parser.add_argument("--down-requests", type=int, default=200, help="requests in the all-down and recovery phases")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop issuing requests after this (300)")
    parser.add_argument("--no-netns", action="store_true", help="run in the host's network namespace")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, config, database)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.scenario = args.scenario or ["faults"]
    if not args.no_netns:
        reexec_in_netns([str(Path(__file__).resolve()), *argv])
    os.chdir(ROOT)
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
