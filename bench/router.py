#!/usr/bin/env python3
"""How long the router takes to decide, beside LiteLLM's Router choosing among the same models.

P402: `Router.route()` over the whole shipped catalog (every provider counted as
configured), with filters on (a capability, an excluded provider, a tier cap, a
cost cap, max_tokens), in each of the five modes. Each decision is timed from the
outside with perf_counter_ns. "route_us" is what a request pays: the winner, with
everything needed for the ranking. The full ranking (every fallback id) is built
only when read; "route_and_fallbacks_us" times both, as failover would pay them.

LiteLLM: `Router.async_get_available_deployment()` (the call its benchmark in
shared/bench-litellm times) with one deployment per catalog model in one model
group, each with its catalog price, for cost-based-routing, latency-based-routing
and simple-shuffle (and, for comparison with shared/bench-litellm, with only 16 of
them). It runs in a child process of LiteLLM's own virtualenv
(installed only for this benchmark, never a dependency of P402).

    python bench/router.py                                  # ~1 minute
    python bench/router.py --quick
    python bench/router.py --litellm-venv /tmp/litellm-venv # where litellm is installed

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("cost", "quality", "speed", "balanced", "adaptive")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Compare two ways of breaking a circuit in a distributed system, in three sentences."},
]
FILTERS = {
    "require": ["function_calling"],
    "exclude": ["openrouter"],
    "max_tier": "mid",
    "max_cost_usd": 0.0005,
    "max_tokens": 400,
}
LITELLM_GROUP = "p402-catalog"
LITELLM_STRATEGIES = ("cost-based-routing", "latency-based-routing", "simple-shuffle")


def summary(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pick(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1000, 2)

    total_s = sum(ordered) / 1e9
    return {
        "n": n,
        "median_us": round(statistics.median(ordered) / 1000, 2),
        "p95_us": pick(0.95),
        "p99_us": pick(0.99),
        "mean_us": round(statistics.fmean(ordered) / 1000, 2),
        "decisions_per_s": round(n / total_s) if total_s else None,
    }


# --- P402 -------------------------------------------------------------------------


def p402_part(n: int) -> dict[str, Any]:
    from p402_tui.core.catalog import load_catalog
    from p402_tui.core.config import RouterConfig
    from p402_tui.core.health import HealthTracker
    from p402_tui.core.hooks import RouteOptions
    from p402_tui.core.router import Router
    from p402_tui.core.tokens import count_messages
    from p402_tui.core.types import ChatRequest

    catalog = load_catalog()
    health = HealthTracker()
    router = Router(catalog, RouterConfig(), health)
    # Some live traffic, so speed and health come from measurements for part of the catalog.
    for i, model in enumerate(list(catalog.models.values())[::5]):
        health.record_success(model.provider, model.id, latency_ms=300 + i, ttft_ms=80 + i, output_tokens=200)
    request = ChatRequest(messages=MESSAGES, max_tokens=FILTERS["max_tokens"])
    filters = {k: v for k, v in FILTERS.items() if k != "max_tokens"}
    clock = time.perf_counter_ns
    out: dict[str, Any] = {
        "models": len(catalog.models),
        "prompt_tokens": count_messages(request.messages).tokens,
        "modes": {},
        "route_and_fallbacks": {},
    }
    gc.collect()
    for mode in MODES:
        options = RouteOptions.from_dict({"mode": mode, **filters})
        decision = router.route(request, options)
        for _ in range(1000):
            router.route(request, options)
        samples = []
        for _ in range(n):
            started = clock()
            router.route(request, options)
            samples.append(clock() - started)
        out["modes"][mode] = {
            **summary(samples),
            "chosen": decision.chosen_id,
            "candidates": len(decision.fallbacks) + 1,
            "excluded": len(decision.excluded),
        }
        samples = []
        for _ in range(max(n // 10, 200)):
            started = clock()
            decided = router.route(request, options)
            decided.fallbacks  # noqa: B018 - building the ranking is what this times
            decided.chosen  # noqa: B018
            samples.append(clock() - started)
        out["route_and_fallbacks"][mode] = summary(samples)

    # A health update between every two decisions: the cost of folding live stats in.
    options = RouteOptions.from_dict({"mode": "adaptive", **filters})
    samples = []
    model = catalog.models["groq/llama-3.1-8b-instant"]
    for i in range(max(n // 10, 200)):
        health.record_success(model.provider, model.id, latency_ms=200 + i % 7, ttft_ms=50, output_tokens=100)
        started = clock()
        router.route(request, options)
        samples.append(clock() - started)
    out["adaptive_after_each_health_update"] = summary(samples)

    # Every prompt new: the token count cannot come from the cache.
    fresh = [
        ChatRequest(messages=[MESSAGES[0], {"role": "user", "content": f"{MESSAGES[1]['content']} Case {i}."}], max_tokens=400)
        for i in range(max(n // 10, 200))
    ]
    options = RouteOptions.from_dict({"mode": "cost", **filters})
    samples = []
    for req in fresh:
        started = clock()
        router.route(req, options)
        samples.append(clock() - started)
    out["cost_with_every_prompt_new"] = summary(samples)
    return out


# --- LiteLLM (runs inside LiteLLM's venv) ------------------------------------------------


def litellm_deployments() -> list[dict[str, Any]]:
    from p402_tui.core.catalog import load_catalog

    return [
        {
            "model_name": LITELLM_GROUP,
            "litellm_params": {
                "model": f"openai/{model.id}",
                "api_base": "http://127.0.0.1:9/v1",  # never called: only the choice is timed
                "api_key": "sk-bench",
                "input_cost_per_token": model.input_per_1m / 1e6,
                "output_cost_per_token": model.output_per_1m / 1e6,
            },
            "model_info": {"id": model.id},
        }
        for model in load_catalog().models.values()
    ]


def litellm_child(n: int) -> None:
    """Read deployments on stdin, time LiteLLM's choice per strategy, print JSON."""
    import litellm
    from litellm import Router

    deployments = json.load(sys.stdin)
    out: dict[str, Any] = {"version": getattr(litellm, "version", None), "deployments": len(deployments), "strategies": {}}
    try:
        from importlib.metadata import version

        out["version"] = version("litellm")
    except Exception:  # the version is a label; the numbers stand without it
        pass

    async def time_strategies(model_list: list[dict[str, Any]]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for strategy in LITELLM_STRATEGIES:
            router = Router(model_list=model_list, routing_strategy=strategy)
            for _ in range(50):
                await router.async_get_available_deployment(model=LITELLM_GROUP, request_kwargs={}, messages=MESSAGES)
            gc.collect()
            samples = []
            deadline = time.monotonic() + 60
            chosen = None
            for _ in range(n):
                started = time.perf_counter_ns()
                chosen = await router.async_get_available_deployment(
                    model=LITELLM_GROUP, request_kwargs={}, messages=MESSAGES
                )
                samples.append(time.perf_counter_ns() - started)
                if time.monotonic() > deadline:
                    break
            results[strategy] = {**summary(samples), "chosen": chosen["model_info"]["id"] if chosen else None}
        return results

    async def run() -> None:
        out["strategies"] = await time_strategies(deployments)
        # The shared baseline (shared/bench-litellm) used 16 deployments: the same size, for comparison.
        out["strategies_16_deployments"] = await time_strategies(deployments[:16])

    asyncio.run(run())
    print(json.dumps(out))


def litellm_part(venv: Path, n: int) -> dict[str, Any]:
    python = venv / "bin" / "python"
    if not python.exists():
        return {"error": f"no LiteLLM venv at {venv}: python3 -m venv {venv} && {venv}/bin/pip install litellm"}
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    child = subprocess.run(
        [str(python), __file__, "--litellm-child", "--n", str(n)],
        input=json.dumps(litellm_deployments()),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if child.returncode != 0:
        return {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


# --- the report -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="timed decisions per P402 mode (default 20000)")
    parser.add_argument("--litellm-n", type=int, default=2_000, help="timed decisions per LiteLLM strategy")
    parser.add_argument("--litellm-venv", default=str(Path(tempfile.gettempdir()) / "litellm-venv"))
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer decisions (a smoke run)")
    parser.add_argument("--litellm-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.litellm_child:
        litellm_child(args.n)
        return 0
    if args.quick:
        args.n, args.litellm_n = 3_000, 300

    load_before = round(os.getloadavg()[0], 2)
    # P402 before and after LiteLLM: both rounds pooled, so drift on a shared machine hits both sides.
    first = p402_part(args.n // 2)
    litellm = {"skipped": True} if args.skip_litellm else litellm_part(Path(args.litellm_venv), args.litellm_n)
    second = p402_part(args.n - args.n // 2)
    p402 = _pool(first, second)

    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],  # a shared machine skews both sides
        },
        "filters": FILTERS,
        "p402": p402,
        "litellm": litellm,
    }
    worst = max(p402["modes"][m]["median_us"] for m in MODES)
    targets: dict[str, Any] = {"worst_mode_median_us": worst, "median_le_20us": worst <= 20}
    strategies = litellm.get("strategies") or {}
    if "cost-based-routing" in strategies:
        ratios = {
            f"litellm_{strategy}_vs_p402_{mode}": round(strategies[strategy]["median_us"] / p402["modes"][mode]["median_us"], 1)
            for strategy in strategies
            for mode in ("cost", "balanced")
        }
        ratios["litellm_cost-based-routing_vs_p402_worst_mode"] = round(strategies["cost-based-routing"]["median_us"] / worst, 1)
        report["ratios"] = ratios
        targets["ge_20x_vs_litellm_cost_based"] = ratios["litellm_cost-based-routing_vs_p402_cost"] >= 20
    report["targets"] = targets
    print(json.dumps(report, indent=2))
    return 0


def _pool(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two rounds of the same measurements: medians and rates averaged, weighted by sample count."""

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        merged = dict(b)
        total = a["n"] + b["n"]
        for key in ("median_us", "p95_us", "p99_us", "mean_us", "decisions_per_s"):
            merged[key] = round((a[key] * a["n"] + b[key] * b["n"]) / total, 2)
        merged["n"] = total
        merged["rounds_median_us"] = [a["median_us"], b["median_us"]]
        return merged

    out = dict(second)
    for group in ("modes", "route_and_fallbacks"):
        out[group] = {mode: merge(first[group][mode], second[group][mode]) for mode in MODES}
    for key in ("adaptive_after_each_health_update", "cost_with_every_prompt_new"):
        out[key] = merge(first[key], second[key])
    return out


if __name__ == "__main__":
    sys.exit(main())
