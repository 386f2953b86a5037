#!/usr/bin/env python3
"""What the shared budgets and rate windows add to a request: one `p402 serve` on SQLite, at
concurrency 1, a key with a budget, rpm and tpm against a key with none (the database round trips
are the difference), in alternating rounds; then the same with the fleet bus on (`P402_FLEET=1`).

Prints JSON: per variant, p50 latency in ms and the gateway's CPU ms per request (utime + stime
from /proc around each round), and the machine's load average at the start.

    python bench/shared_state.py --requests 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gateway import cpu_seconds, free_port, sim_config

MODEL = "openai/gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "One word?"}], "max_tokens": 8}


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "p402_tui.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env})
    line = proc.stdout.readline()
    return proc, line.split()[3]


def keys(db: str, env: dict[str, str]) -> tuple[str, str]:
    def make(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "p402_tui.cli", "keys", "create", "--json", "--db", db, *extra],
                             capture_output=True, text=True, env={**os.environ, **env}, check=True)
        return json.loads(out.stdout)["key"]

    return make("--name", "plain"), make("--name", "limited", "--budget-usd", "1000", "--rpm", "100000",
                                        "--tpm", "100000000")


def run(url: str, key: str, n: int, pid: int) -> tuple[float, float]:
    headers = {"authorization": f"Bearer {key}", "cache-control": "no-cache"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(20):
            client.post("/v1/chat/completions", json=BODY, headers=headers)
        cpu = cpu_seconds(pid)
        took = []
        for _ in range(n):
            began = time.perf_counter()
            client.post("/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
            took.append(time.perf_counter() - began)
        cpu = cpu_seconds(pid) - cpu
    return statistics.median(took) * 1000, cpu / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "p402_tui.cli", "sim", "--port", str(port), "--no-latency"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, object] = {"load": os.getloadavg()}
    try:
        time.sleep(2)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.toml"
            config.write_text(sim_config(f"http://127.0.0.1:{port}"))
            env = {"P402_CONFIG": str(config)}
            db = str(Path(tmp) / "bench.db")
            plain, limited = keys(db, env)
            for variant, extra in (("fleet_off", {}), ("fleet_on", {"P402_FLEET": "1"})):
                proc, url = start(["--db", db], {**env, **extra})
                try:
                    figures: dict[str, list[tuple[float, float]]] = {"plain": [], "limited": []}
                    for _ in range(args.rounds):
                        for name, key in (("plain", plain), ("limited", limited)):
                            figures[name].append(run(url, key, args.requests, proc.pid))
                    out[variant] = {
                        name: {"p50_ms": round(statistics.median(r[0] for r in runs), 3),
                               "cpu_ms_per_request": round(statistics.median(r[1] for r in runs), 3)}
                        for name, runs in figures.items()
                    }
                finally:
                    proc.terminate()
                    proc.wait(20)
    finally:
        sim.terminate()
        sim.wait(10)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
