#!/usr/bin/env python3
"""What the gateway adds to a call, and how it compares with LiteLLM's proxy.

Processes besides this one: `p402 sim --no-latency` (the upstream), `p402 serve`
pointed at it through a config file (once per variant), the no-logic floor proxy,
and LiteLLM's proxy pointed at the same simulator (installed only for this
benchmark, in its own venv).
This process is the load generator (aiohttp, closed loop: each of C workers
sends its next request when the last one is done). For every concurrency, with
and without streaming, it measures the simulator called directly, then through
P402: first in its default configuration (row p402_default: the answer cache on,
every prompt different), then the same process with the cache off (row p402:
`cache-control: no-cache`) and variants that show where its time goes, then through
a proxy with no logic on the same libraries (bench/floor_proxy.py: the floor any
gateway built on uvicorn and our upstream client stands on), then through LiteLLM, and prints JSON:

  latency (p50/p99) and, streamed, time to first token; "added" = through a gateway
  minus direct at the same concurrency; requests/s; CPU ms per request of the
  gateway process, read from /proc/<pid>/stat (utime + stime) around the run.

    python bench/gateway.py                      # everything, ~3 minutes
    python bench/gateway.py --duration 1 --skip-litellm
    python bench/gateway.py --litellm-venv DIR   # reuse (or create) LiteLLM's venv there

Answers arrive all at once from a latency-free simulator, which is what the targets
are set against. Real streams arrive token by token, one upstream read each, and a
gateway pays per read; `--sim-speed` paces the simulator (20: twenty times a
model's real speed) and `--max-tokens` makes the answers long enough to show it:

    python bench/gateway.py --sim-speed 20 --max-tokens 200 --modes stream --concurrency 8

On a small machine that testbed is itself the limit: this process and the simulator are Python too,
and on 2 cores they take about as much CPU as the gateway, so a second worker has no core to use.
The lean testbed takes them out of the way: `--driver wrk` makes wrk the load generator (C, one
thread, C keep-alive connections in a closed loop, POSTing the chat body from a small Lua script
that prints its summary as JSON) and `--upstream static` puts nginx behind the gateways (one worker
on a free loopback port, its config, pid and logs in the scratch dir, answering every chat
completions path with one fixed chat.completion carrying usage). Both come from Debian's packages
(wrk, nginx-light), installed with apt-get when missing; where that fails, "testbed" in the JSON
says so and which Python stand-in measured instead. It serves the cache-off row of each variant
(the rows that need new prompts or other APIs are left out), plain answers only:

    python bench/gateway.py --driver wrk --upstream static --modes plain --concurrency 1,64 \\
        --variants p402,p402_workers2,p402_postgres,p402_workers2_postgres --skip-litellm --skip-floor \\
        --c1-slices 6 --slice-duration 5

Then the verdicts set two workers beside one at c64 on each engine (one run, same testbed), and
upstream_cpu_ms_per_request and client_cpu_ms_per_request show what nginx and wrk took. With
`--c1-slices N`, rows p402 and p402_postgres are measured again at concurrency 1 in N alternating
slices each (ABBA order); "c1_slices" reports every slice's p50, the median of them, and
PostgreSQL minus SQLite slice by slice, so the noise is there to see beside the difference.

Like shared/bench-litellm/run.sh, it re-runs itself in a loopback-only network
namespace when the machine allows it, so nothing in the run can reach further.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "In one sentence, what does a model router weigh?"}]
MAX_TOKENS = 16
LITELLM_VERSION = "1.108.7"  # the version measured in shared/bench-litellm/RESULTS-litellm.md
TICKS = os.sysconf("SC_CLK_TCK")
FIRST_CONTENT = re.compile(rb'"(?:content|text)":"[^"]')  # a chat chunk's text, or a Messages text_delta
FIRST_DELTA = re.compile(rb'"delta":"[^"]')  # the Responses API's first text event


# --- processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident MiB of a process and its children (the cache's MiniLM confirmer is one, once started)."""
    total = None
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0.0) + int(line.split()[1]) / 1024
        except OSError:
            pass
    return None if total is None else round(total, 1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children still running (LiteLLM may fork)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def _ours_seconds(pids: list[int]) -> float:
    own = os.times()
    return own.user + own.system + sum(cpu_seconds(pid) for pid in pids)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Child:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, url: str, timeout_s: float, headers: dict[str, str] | None = None, *,
                   embedder: bool = False) -> float:
        """Seconds until `url` answers 200 (and, with `embedder`, names the cache's embedder)."""
        import urllib.request

        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1) as r:
                    if r.status == 200 and (not embedder or json.loads(r.read()).get("embedder")):
                        return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout_s}s: {self.log.read_text()[-1500:]}")

    def wait_logged(self, text: str, timeout_s: float) -> float:
        """Seconds until `text` shows in the child's output."""
        start = time.perf_counter()
        while text not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"{self.name} never said {text!r}: {self.log.read_text()[-1500:]}")
            time.sleep(0.05)
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def _wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s") from None
            time.sleep(0.1)


# --- the load --------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 3)


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "mean": round(statistics.fmean(ordered), 3) if ordered else None,
    }


class UniquePrompts:
    """Bodies whose user message is different every time: ten words drawn from bench/data's prompts.

    What a gateway mostly sees. No counter in the text: numbers would let the cache's
    near-miss guard turn candidates down without judging them, flattering the cache.
    """

    # One generator for every run of the benchmark: a run must not repeat an earlier run's prompts
    # (the warm-up's included), or the cache would answer them from its exact tier.
    rng: Any = None

    def __init__(self, payload: dict[str, Any]) -> None:
        import random

        text = (ROOT / "bench" / "data" / "cache_pairs.jsonl").read_text(encoding="utf-8")
        self.words = sorted(set(re.findall(r"[a-z]{3,}", text.lower())))
        if UniquePrompts.rng is None:
            UniquePrompts.rng = random.Random(402)
        marker = "\x00prompt\x00"
        body = json.dumps({**payload, "messages": [{"role": "user", "content": marker}]})
        self.head, self.tail = (part.encode() for part in body.split(json.dumps(marker)))

    def __call__(self) -> bytes:
        prompt = " ".join(UniquePrompts.rng.choices(self.words, k=10)).capitalize() + "?"
        return self.body(prompt)

    def body(self, prompt: str) -> bytes:
        return self.head + json.dumps(prompt).encode() + self.tail

    def paraphrase_pair(self) -> list[bytes]:
        """A prompt and its paraphrase: the second's lookup has a candidate, so the cache loads MiniLM
        to confirm it (once per process, about half a second of CPU) in the warm-up, not in the run."""
        for line in (ROOT / "bench" / "data" / "cache_pairs.jsonl").open(encoding="utf-8"):
            pair = json.loads(line)
            if pair["kind"] == "paraphrase" and pair["split"] == "tune":
                return [self.body(pair["a"]), self.body(pair["b"])]
        raise RuntimeError("bench/data/cache_pairs.jsonl has no paraphrase pair")


async def load(
    url: str, payload: dict[str, Any], headers: dict[str, str], *, concurrency: int, duration: float,
    max_requests: int, stream: bool, server_pid: int | None, ours: list[int], unique: bool = False,
    upstream_pid: int | None = None, store_pid: int | None = None,
    first_content: re.Pattern[bytes] = FIRST_CONTENT,
) -> dict[str, Any]:
    import aiohttp

    fixed = json.dumps(payload).encode()
    bodies = UniquePrompts(payload) if unique else (lambda: fixed)
    headers = {"content-type": "application/json", **headers}
    latencies: list[float] = []
    ttfts: list[float] = []
    failures: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))

    async def one(record: bool) -> None:
        start = time.perf_counter()
        first = None
        try:
            async with session.post(url, data=bodies(), headers=headers) as response:
                if response.status != 200:
                    text = await response.text()
                    raise RuntimeError(f"HTTP {response.status}: {text[:120]}")
                if stream:
                    async for line in response.content:
                        if first is None and first_content.search(line):
                            first = time.perf_counter()
                        if line.startswith(b"data: [DONE]"):
                            break
                else:
                    await response.read()
        except Exception as error:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
            key = f"{type(error).__name__}: {error}"[:160]
            failures[key] = failures.get(key, 0) + 1
            return
        if record:
            latencies.append((time.perf_counter() - start) * 1000)
            if first is not None:
                ttfts.append((first - start) * 1000)

    try:
        if unique:  # steady state: the confirmer's one-time load happens here, not in the measured run
            for body in bodies.paraphrase_pair():  # type: ignore[union-attr]
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
        await asyncio.gather(*(one(False) for _ in range(concurrency * 4)))  # open connections, warm caches
        failures.clear()
        budget = [max_requests]
        cpu_before = cpu_seconds(server_pid) if server_pid else None
        machine_before, ours_before = machine_busy_seconds(), _ours_seconds(ours)
        client_before = sum(os.times()[:2])
        upstream_before = cpu_seconds(upstream_pid) if upstream_pid else None
        store_before = cpu_seconds(store_pid) if store_pid else None
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                await one(True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(server_pid) if server_pid else None
        machine_after, ours_after = machine_busy_seconds(), _ours_seconds(ours)
        client_after = sum(os.times()[:2])
        upstream_after = cpu_seconds(upstream_pid) if upstream_pid else None
        store_after = cpu_seconds(store_pid) if store_pid else None
    finally:
        await session.close()
    done = len(latencies)
    out: dict[str, Any] = {
        "requests": done,
        "errors": sum(failures.values()),
        "rps": round(done / elapsed, 1) if elapsed else 0.0,
        "latency_ms": summary(latencies),
    }
    if stream:
        out["ttft_ms"] = summary(ttfts)
    if cpu_before is not None and done:
        out["server_cpu_ms_per_request"] = round((cpu_after - cpu_before) * 1000 / (done + sum(failures.values())), 3)
        # This load generator's own CPU: on a small machine it competes with the gateway for the cores.
        out["client_cpu_ms_per_request"] = round((client_after - client_before) * 1000 / done, 3)
        if upstream_before is not None:  # the simulator's, behind a gateway: the third share of the machine
            out["upstream_cpu_ms_per_request"] = round((upstream_after - upstream_before) * 1000 / done, 3)
        if store_before is not None:  # the PostgreSQL server's backends: the engine's cost outside the gateway
            out["store_cpu_ms_per_request"] = round((store_after - store_before) * 1000 / done, 3)
    # Cores busy with processes outside this benchmark while it ran: the noise behind every figure.
    foreign = (machine_after - machine_before) - (ours_after - ours_before)
    out["other_processes_cores"] = round(max(foreign, 0.0) / elapsed, 2) if elapsed else None
    # Cores busy on the whole machine: near the core count, throughput is bounded by the machine, not the gateway.
    out["machine_busy_cores"] = round((machine_after - machine_before) / elapsed, 2) if elapsed else None
    if failures:
        out["error_kinds"] = dict(sorted(failures.items(), key=lambda kv: -kv[1])[:5])
    return out


# --- the lean testbed: wrk drives, nginx answers ---------------------------------------------

TOOLS = {"wrk": "wrk", "nginx": "nginx-light"}  # binary: Debian package
INSTALL_NOTE = "P402_BENCH_TOOLS"  # what ensure_tools did, handed across the re-exec into the namespace
# An OpenAI chat completion with usage, shaped as the simulator answers MESSAGES at MAX_TOKENS.
STATIC_ANSWER = json.dumps({
    "id": "chatcmpl-static", "object": "chat.completion", "created": 1796612463, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Price, latency, health and the "
                 "budget left, in that order for most teams today", "refusal": None},
                 "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 18, "completion_tokens": 16, "total_tokens": 34},
    "system_fingerprint": "fp_static",
}, separators=(",", ":"))


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_tools(names: list[str]) -> None:
    """wrk and nginx from Debian's packages, installed when missing (as .ci/run installs postgresql);
    what could not be had is noted for the JSON, and the run falls back to the Python testbed."""
    missing = [TOOLS[n] for n in names if not _which(n)]
    note = {n: "present" for n in names}
    if missing:
        why = None
        if os.geteuid() != 0:
            why = "not root, cannot apt-get install"
        else:
            print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr, flush=True)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            done = subprocess.run(["bash", "-c", "apt-get update -qq && apt-get install -y -qq " + " ".join(missing)],
                                  capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
            if done.returncode:
                why = "apt-get failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        for n in names:
            if TOOLS[n] in missing:
                note[n] = "installed" if _which(n) else f"missing ({why})"
    os.environ[INSTALL_NOTE] = json.dumps(note)


def testbed(args: argparse.Namespace) -> dict[str, Any]:
    """The driver and upstream this run uses: what was asked, unless its program is missing."""
    note = json.loads(os.environ.get(INSTALL_NOTE) or "{}")
    out: dict[str, Any] = {"driver": args.driver, "upstream": args.upstream}
    for kind, asked, tool, fallback in (("driver", args.driver, "wrk", "aiohttp"),
                                        ("upstream", args.upstream, "nginx", "sim")):
        if asked == fallback:
            continue
        if _which(tool):
            done = subprocess.run([_which(tool), "-v"], capture_output=True, text=True, check=False)
            out[f"{tool}_version"] = ((done.stdout + done.stderr).strip().splitlines() or ["?"])[0]
            if note.get(tool) == "installed":
                out[f"{tool}_installed_by_bench"] = True
        else:
            out[kind] = fallback
            out[f"{kind}_fallback"] = f"{tool} {note.get(tool, 'missing')}: measured with {fallback} instead"
    return out


def nginx_config(folder: Path, port: int) -> Path:
    """One worker answering every chat completions path with STATIC_ANSWER; the rest 404."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    config = folder / "nginx.conf"
    config.write_text(f"""daemon off;
worker_processes 1;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location ~ /chat/completions$ {{
            default_type application/json;
            return 200 '{STATIC_ANSWER}';
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error": {{"message": "not here", "type": "not_found"}}}}';
        }}
    }}
}}
""")
    return config


def start_static_upstream(scratch: Path) -> tuple[Child, str]:
    """nginx on a free loopback port, a child of this bench (stopped with it)."""
    folder, port = scratch / "nginx", free_port()
    config = nginx_config(folder, port)
    child = Child("nginx", [_which("nginx"), "-c", str(config), "-p", str(folder), "-e", str(folder / "error.log")],
                  scratch / "nginx.log")
    _wait_for_port(port, 10)
    return child, f"http://127.0.0.1:{port}"


WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('P402WRK {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"mean":%.1f}\\n', summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean))
end
"""


def wrk_script(folder: Path, payload: dict[str, Any], headers: dict[str, str]) -> Path:
    """A Lua script for wrk: POST the chat body with our headers, print the summary as one JSON line."""
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{json.dumps(payload)}]==]",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path = folder / f"wrk-{secrets.token_hex(4)}.lua"
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


def _wrk(url: str, script: Path, concurrency: int, duration: float) -> dict[str, Any]:
    argv = [_which("wrk"), "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
            "--timeout", "30s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("P402WRK "):
            return json.loads(line[len("P402WRK "):])
    raise RuntimeError(f"wrk gave no summary (exit {done.returncode}): {(done.stdout + done.stderr)[-800:]}")


def load_wrk(
    url: str, payload: dict[str, Any], headers: dict[str, str], *, concurrency: int, duration: float,
    server_pid: int | None, ours: list[int], scratch: Path, upstream_pid: int | None = None,
    store_pid: int | None = None, warmup: bool = True,
) -> dict[str, Any]:
    """`load`'s measurement with wrk as the load generator: one C thread, `concurrency` keep-alive
    connections, each sending its next request when the last is answered (a closed loop, as `load`)."""
    script = wrk_script(scratch, payload, headers)
    if warmup:
        _wrk(url, script, concurrency, 1)  # open connections, warm caches
    pids = {"server": server_pid, "upstream": upstream_pid, "store": store_pid}
    before = {k: cpu_seconds(p) for k, p in pids.items() if p}
    machine_before, ours_before = machine_busy_seconds(), _ours_seconds(ours)
    client_before = sum(os.times()[2:4])  # wrk's CPU, once it has been waited for
    summary_ = _wrk(url, script, concurrency, duration)
    client_after = sum(os.times()[2:4])
    after = {k: cpu_seconds(p) for k, p in pids.items() if p}
    machine_after, ours_after = machine_busy_seconds(), _ours_seconds(ours)
    elapsed = summary_["duration_us"] / 1e6
    kinds = ("connect", "read", "write", "status", "timeout")
    errors = sum(summary_[k] for k in kinds)
    done = max(summary_["requests"] - summary_["status"], 0)  # wrk counts non-2xx answers among its requests
    out: dict[str, Any] = {
        "requests": done,
        "errors": errors,
        "rps": round(done / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"n": summary_["requests"], **{q: round(summary_[q] / 1000, 3) for q in ("p50", "p90", "p99")},
                       "mean": round(summary_["mean"] / 1000, 3)},
    }
    if done:
        if "server" in before:
            out["server_cpu_ms_per_request"] = round((after["server"] - before["server"]) * 1000 / (done + errors), 3)
        out["client_cpu_ms_per_request"] = round((client_after - client_before) * 1000 / done, 3)
        if "upstream" in before:
            out["upstream_cpu_ms_per_request"] = round((after["upstream"] - before["upstream"]) * 1000 / done, 3)
        if "store" in before:
            out["store_cpu_ms_per_request"] = round((after["store"] - before["store"]) * 1000 / done, 3)
    foreign = (machine_after - machine_before) - (ours_after - ours_before) - (client_after - client_before)
    out["other_processes_cores"] = round(max(foreign, 0.0) / elapsed, 2) if elapsed else None
    out["machine_busy_cores"] = round((machine_after - machine_before) / elapsed, 2) if elapsed else None
    if errors:
        out["error_kinds"] = {k: summary_[k] for k in kinds if summary_[k]}
    return out


# --- the contestants ---------------------------------------------------------------------


def sim_config(sim_url: str) -> str:
    sys.path.insert(0, str(ROOT))
    from p402_tui.core.catalog import load_catalog

    lines = []
    for pid, spec in load_catalog().providers.items():
        lines += [f"[providers.{pid}]", 'api_key = "sim-key"', f'base_url = "{sim_url}/{pid}{spec.base_path}"', ""]
    return "\n".join(lines)


def litellm_config(sim_url: str) -> str:
    model = MODEL.split("/", 1)[1]
    return "\n".join(
        [
            "model_list:",
            "  - model_name: bench",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: {sim_url}/openai/v1",
            "      api_key: sim-key",
            "litellm_settings:",
            "  request_timeout: 30",
            "",
        ]
    )


def ensure_litellm(venv: Path) -> Path:
    """LiteLLM's proxy in its own venv (never a dependency of P402); installed on first use."""
    binary = venv / "bin" / "litellm"
    probe = [str(venv / "bin" / "python"), "-c", "import litellm.proxy.proxy_server"]
    if binary.exists() and subprocess.run(probe, capture_output=True, env=_litellm_env()).returncode == 0:
        return binary
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True, stdin=subprocess.DEVNULL,
    )
    return binary


def _litellm_env() -> dict[str, str]:
    # Without this, importing litellm fetches a price list over the network at start.
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def in_netns() -> bool:
    return os.environ.get("P402_BENCH_NETNS") == "1"


def reexec_in_netns(argv: list[str]) -> None:
    """Run again inside a loopback-only network namespace, when unshare allows it."""
    if in_netns() or not shutil.which("unshare") or not shutil.which("ip"):
        return
    for flags in (["-n"], ["-rn"]):
        if subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0:
            inner = 'ip link set lo up && P402_BENCH_NETNS=1 exec "$0" "$@"'
            os.execvp("unshare", ["unshare", *flags, "bash", "-c", inner, sys.executable, *argv])


def pg_cluster_module():
    """tests/postgres.py, the one place that knows how to start a throwaway cluster, loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("p402_bench_pgcluster", ROOT / "tests" / "postgres.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building PgCluster
    spec.loader.exec_module(module)
    return module


PG_OPTIONS = "fsync=off, as the tests' cluster: SQLite's WAL at synchronous=NORMAL does not sync a commit either"


def start_pg_cluster():
    try:
        return pg_cluster_module().start_cluster()
    except LookupError as error:
        raise SystemExit(f"the *_postgres variants need a PostgreSQL server: {error}") from None


def remove_pg_cluster(cluster) -> None:
    pg_cluster_module().remove_cluster(cluster)


# --- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="p402-bench-"))
    python = sys.executable
    children: list[Child] = []
    result: dict[str, Any] = {
        "bench": "gateway",
        "model": MODEL,
        "max_tokens": args.max_tokens,
        "sim_speed": args.sim_speed,  # None: no latency at all
        "duration_s_per_run": args.duration,
        "repeats": args.repeats,
        "max_requests_per_run": args.requests,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": os.getloadavg()},
        "network_namespace": in_netns(),
        "variants": {name: VARIANTS[name] for name in args.variants},
        "rows": ROWS if "p402" in args.variants else {},
        "floor": None if args.skip_floor else FLOOR,
    }
    bed = result["testbed"] = testbed(args)
    extras = bed["driver"] == "aiohttp" and bed["upstream"] == "sim"  # rows wrk or nginx cannot serve
    if not extras:
        result["rows"] = {}
    cluster, postmaster = None, None
    try:
        if any(variant.endswith("_postgres") for variant in args.variants):
            cluster = start_pg_cluster()
            result["postgres"] = {"port": cluster.port, "bin": str(cluster.bin_dir), "options": PG_OPTIONS}
            postmaster = int((cluster.folder / "data" / "postmaster.pid").read_text().split()[0])
        if bed["upstream"] == "static":
            sim, sim_url = start_static_upstream(scratch)
            children.append(sim)
        else:
            sim_port = free_port()
            pace = ["--no-latency"] if args.sim_speed is None else ["--speed", str(args.sim_speed)]
            sim = Child("p402 sim", [python, "-m", "p402_tui.cli", "sim", *pace, "--port", str(sim_port)],
                        scratch / "sim.log")
            children.append(sim)
            sim_url = f"http://127.0.0.1:{sim_port}"
            sim.wait_ready(f"{sim_url}/_sim/stats", 30)
        config = scratch / "p402.toml"
        config.write_text(sim_config(sim_url))

        targets: list[dict[str, Any]] = [
            {"name": "direct", "url": f"{sim_url}/openai/v1/chat/completions", "model": MODEL.split("/", 1)[1],
             "headers": {"authorization": "Bearer sim-key"}, "pid": sim.pid},
        ]
        for variant in args.variants:
            variant_config = config
            if variant == "p402_proxied":
                proxy_port = free_port()
                forward = Child("forward proxy", [python, "-m", "proxy", "--hostname", "127.0.0.1", "--port",
                                str(proxy_port), "--num-workers", "1", "--num-acceptors", "1"], scratch / "proxy.log")
                children.append(forward)
                _wait_for_port(proxy_port, 30)
                variant_config = scratch / "p402-proxied.toml"
                variant_config.write_text(f'[network]\nproxy = "http://127.0.0.1:{proxy_port}"\n\n' + config.read_text())
            port = free_port()
            db = cluster.create_database() if variant.endswith("_postgres") else str(scratch / f"{variant}.db")
            gateway = Child(
                variant,
                [python, str(Path(__file__).resolve()), "_serve", variant, "--config", str(variant_config),
                 "--port", str(port), "--db", db],
                scratch / f"{variant}.log",
            )
            children.append(gateway)
            url = f"http://127.0.0.1:{port}"
            started = gateway.wait_ready(f"{url}/health", 30)
            if variant.startswith("p402_workers2"):  # /health answers once the first worker is up; the line, once all are
                started += gateway.wait_logged("p402 gateway at ", 60)
            result.setdefault("startup_s", {})[variant] = round(started, 3)
            if variant == "p402" and extras:
                # The default configuration first: the cache on, every prompt new (each misses and is
                # inserted). Waits for the cache's static vectors (made once per machine, 1-3 minutes).
                result["p402_cache_ready_s"] = round(gateway.wait_ready(f"{url}/api/v2/cache", 300, embedder=True), 3)
                time.sleep(2.0)  # idle: past the gateway's trim after a spell of requests (these readiness polls)
                result["p402_idle_rss_mib"] = rss_mib(gateway.pid)
                targets.append({"name": "p402_default", "url": f"{url}/v1/chat/completions", "model": MODEL,
                                "headers": {}, "pid": gateway.pid, "unique": True, "stats": f"{url}/api/v2/cache"})
            # Cache off (what earlier READMEs quoted): `cache-control: no-cache` skips lookup and insert.
            targets.append({"name": variant, "url": f"{url}/v1/chat/completions", "model": MODEL,
                            "headers": {"cache-control": "no-cache"}, "pid": gateway.pid,
                            "store_pid": postmaster if variant.endswith("_postgres") else None})
            if variant == "p402" and extras:  # cache off with every prompt new: what unique prompts cost without the cache
                targets.append({"name": "p402_unique", "url": f"{url}/v1/chat/completions", "model": MODEL,
                                "headers": {"cache-control": "no-cache"}, "pid": gateway.pid, "unique": True})
            if variant == "p402" and extras:  # the same request through Anthropic's Messages API, same process
                targets.append({"name": "p402_messages", "url": f"{url}/v1/messages", "model": MODEL,
                                "headers": {"cache-control": "no-cache"}, "pid": gateway.pid, "shape": "messages"})
            if variant == "p402" and extras:  # the same request through the Responses API, beside chat in the same run
                targets.append({"name": "p402_responses", "url": f"{url}/v1/responses", "model": MODEL,
                                "headers": {"cache-control": "no-cache"}, "pid": gateway.pid, "api": "responses"})
        if not args.skip_floor:
            port = free_port()
            floor = Child("floor", [python, str(ROOT / "bench" / "floor_proxy.py"), sim_url, str(port)],
                          scratch / "floor.log")
            children.append(floor)
            url = f"http://127.0.0.1:{port}"
            result.setdefault("startup_s", {})["floor"] = round(floor.wait_ready(f"{url}/health", 30), 3)
            targets.append({"name": "floor", "url": f"{url}/v1/chat/completions", "model": MODEL, "headers": {},
                            "pid": floor.pid})
        if args.litellm_venv:
            binary = ensure_litellm(Path(args.litellm_venv))
            (scratch / "litellm.yaml").write_text(litellm_config(sim_url))
            port = free_port()
            master = "sk-" + secrets.token_hex(24)  # the proxy refuses to start without a master key
            proxy = Child(
                "litellm proxy",
                [str(binary), "--config", str(scratch / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port),
                 "--num_workers", "1"],
                scratch / "litellm.log",
                env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": master},
            )
            children.append(proxy)
            url = f"http://127.0.0.1:{port}"
            started = proxy.wait_ready(f"{url}/health/liveliness", 120)
            result.setdefault("startup_s", {})["litellm"] = round(started, 3)
            targets.append({"name": "litellm", "url": f"{url}/v1/chat/completions", "model": "bench",
                            "headers": {"authorization": f"Bearer {master}"}, "pid": proxy.pid})

        runs: dict[str, Any] = {}
        for stream in args.streams:
            for concurrency in args.concurrency:
                key = f"{'stream' if stream else 'plain'}_c{concurrency}"
                repeats: dict[str, list[dict[str, Any]]] = {t["name"]: [] for t in targets}
                for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits all alike
                    for target in targets:
                        payload: dict[str, Any] = {"model": target["model"], "messages": MESSAGES,
                                                   "max_tokens": args.max_tokens}
                        if stream and target.get("shape") == "messages":
                            payload["stream"] = True
                        elif stream:
                            payload.update(stream=True, stream_options={"include_usage": True})
                        if target.get("api") == "responses":
                            payload = {"model": target["model"], "input": MESSAGES[0]["content"],
                                       "max_output_tokens": args.max_tokens, "stream": stream}
                        ours = [*(c.pid for c in children), *filter(None, [postmaster])]
                        upstream_pid = None if target["pid"] == sim.pid else sim.pid
                        if bed["driver"] == "wrk":
                            measured = load_wrk(target["url"], payload, target["headers"], concurrency=concurrency,
                                                duration=args.duration, server_pid=target["pid"], ours=ours,
                                                scratch=scratch, upstream_pid=upstream_pid,
                                                store_pid=target.get("store_pid"))
                        else:
                            measured = asyncio.run(load(
                                target["url"], payload, target["headers"], concurrency=concurrency,
                                duration=args.duration, max_requests=args.requests, stream=stream,
                                server_pid=target["pid"], ours=ours, upstream_pid=upstream_pid,
                                store_pid=target.get("store_pid"), unique=target.get("unique", False),
                                first_content=FIRST_DELTA if target.get("api") == "responses" else FIRST_CONTENT))
                        repeats[target["name"]].append(measured)
                        print(f"{key:>10} {target['name']:>14}: {measured['rps']:>8} req/s  p50 "
                              f"{measured['latency_ms']['p50']} ms  cpu/req {measured.get('server_cpu_ms_per_request')} ms"
                              f"  others {measured['other_processes_cores']} cores", file=sys.stderr, flush=True)
                row: dict[str, Any] = {name: _median_of(runs_) for name, runs_ in repeats.items()}
                row["added"] = _added(row)
                runs[key] = row
        result["runs"] = runs
        if args.c1_slices and {"p402", "p402_postgres"} <= {t["name"] for t in targets}:
            measure = {t["name"]: t for t in targets if t["name"] in ("p402", "p402_postgres")}
            result["c1_slices"] = c1_slices(measure, args, bed, scratch, sim.pid,
                                            [*(c.pid for c in children), *filter(None, [postmaster])])
        for target in targets:
            if "stats" in target:
                import urllib.request

                with urllib.request.urlopen(target["stats"], timeout=5) as answer:
                    stats = json.loads(answer.read())
                result[f"{target['name']}_cache"] = {
                    k: stats.get(k) for k in ("entries", "index_bytes", "exact_hit_rate", "semantic_hit_rate",
                                              "semantic_lookups", "semantic_batches", "semantic_cpu_ms_per_lookup",
                                              "confirmations")
                }
                result[f"{target['name']}_rss_mib_after"] = rss_mib(target["pid"])
        result["verdict"] = _verdict(runs, args)
        if "c1_slices" in result:
            result["verdict"].setdefault("p402_postgres", {})["plain_c1_sliced_p50_ms_over_sqlite<=0.3"] = (
                result["c1_slices"]["postgres_minus_sqlite_p50_ms"]["median_of_medians"])
        if "p402_idle_rss_mib" in result:
            result["verdict"].setdefault("p402_default", {})["idle_rss_mib<120"] = result["p402_idle_rss_mib"]
        result["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        for child in reversed(children):
            child.stop()
        if cluster is not None:
            remove_pg_cluster(cluster)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def c1_slices(targets: dict[str, dict[str, Any]], args: argparse.Namespace, bed: dict[str, Any], scratch: Path,
              upstream_pid: int, ours: list[int]) -> dict[str, Any]:
    """Rows p402 (SQLite) and p402_postgres at concurrency 1 in alternating slices (ABBA: neither always
    goes first), so that drift in the machine's load reaches both alike and the spread shows the noise."""
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": args.max_tokens}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for i in range(args.c1_slices):
        for name in (list(targets) if i % 2 == 0 else list(reversed(targets))):
            target = targets[name]
            common = {"concurrency": 1, "duration": args.slice_duration, "server_pid": target["pid"], "ours": ours,
                      "upstream_pid": upstream_pid, "store_pid": target.get("store_pid")}
            if bed["driver"] == "wrk":
                one = load_wrk(target["url"], payload, target["headers"], scratch=scratch, **common)
            else:
                one = asyncio.run(load(target["url"], payload, target["headers"], max_requests=args.requests,
                                       stream=False, **common))
            measured[name].append(one)
            print(f"  c1 slice {i + 1} {name:>14}: p50 {one['latency_ms']['p50']} ms  cpu/req "
                  f"{one.get('server_cpu_ms_per_request')} ms  others {one['other_processes_cores']} cores",
                  file=sys.stderr, flush=True)
    out: dict[str, Any] = {"slices": args.c1_slices, "slice_s": args.slice_duration}
    for name, slices in measured.items():
        p50s = [m["latency_ms"]["p50"] for m in slices]
        out[name] = {
            "p50_ms": p50s, "median_p50_ms": round(statistics.median(p50s), 3), "min_p50_ms": min(p50s),
            "max_p50_ms": max(p50s), "errors": sum(m["errors"] for m in slices),
            "server_cpu_ms_per_request": _med([m.get("server_cpu_ms_per_request") for m in slices]),
            "store_cpu_ms_per_request": _med([m.get("store_cpu_ms_per_request") for m in slices]),
            "other_processes_cores": _med([m.get("other_processes_cores") for m in slices]),
        }
    pg, sq = out["p402_postgres"], out["p402"]
    paired = [round(a - b, 3) for a, b in zip(pg["p50_ms"], sq["p50_ms"])]
    out["postgres_minus_sqlite_p50_ms"] = {
        "median_of_medians": round(pg["median_p50_ms"] - sq["median_p50_ms"], 3),
        "per_slice": paired, "min": min(paired), "max": max(paired),
    }
    return out


def _med(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's repeats folded into medians (a single run is returned as it is)."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[Any]) -> Any:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    out: dict[str, Any] = {
        "repeats": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "rps": med([r["rps"] for r in runs]),
        "other_processes_cores": med([r["other_processes_cores"] for r in runs]),
        "machine_busy_cores": med([r.get("machine_busy_cores") for r in runs]),
    }
    for part in ("latency_ms", "ttft_ms"):
        if part in runs[0]:
            out[part] = {q: med([r[part][q] for r in runs]) for q in ("p50", "p90", "p99", "mean")}
    for part in ("server_cpu_ms_per_request", "client_cpu_ms_per_request", "upstream_cpu_ms_per_request",
                 "store_cpu_ms_per_request"):
        if part in runs[0]:
            out[part] = med([r.get(part) for r in runs])
    return out


def _added(row: dict[str, Any]) -> dict[str, Any]:
    """Each gateway minus direct, at the same concurrency: the latency it adds."""
    direct = row["direct"]
    out: dict[str, Any] = {}
    for name, measured in row.items():
        if name == "direct":
            continue
        added = {
            "latency_p50_ms": _minus(measured["latency_ms"]["p50"], direct["latency_ms"]["p50"]),
            "latency_p99_ms": _minus(measured["latency_ms"]["p99"], direct["latency_ms"]["p99"]),
        }
        if "ttft_ms" in measured:
            added["ttft_p50_ms"] = _minus(measured["ttft_ms"]["p50"], direct["ttft_ms"]["p50"])
            added["ttft_p99_ms"] = _minus(measured["ttft_ms"]["p99"], direct["ttft_ms"]["p99"])
        if "floor" in row and (name in VARIANTS or name in ROWS):
            added["cpu_ms_per_request_over_floor"] = _minus(
                measured.get("server_cpu_ms_per_request"), row["floor"].get("server_cpu_ms_per_request")
            )
        out[name] = added
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _verdict(runs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's targets, checked for each P402 variant."""
    verdict: dict[str, Any] = {}
    for name in args.variants:
        checks: dict[str, Any] = {}
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            c1 = runs.get(f"{kind}_c1")
            if c1:
                added = c1["added"][name]
                checks[f"{kind}_c1_added_p50_ms<=1"] = added["latency_p50_ms"]
                if stream:
                    checks["stream_c1_added_ttft_p50_ms<=1"] = added["ttft_p50_ms"]
            cpu = [runs[k][name].get("server_cpu_ms_per_request") for k in runs if k.startswith(kind)]
            cpu = [c for c in cpu if c is not None]
            if cpu:
                checks[f"{kind}_max_cpu_ms_per_request<=1"] = max(cpu)
            c64 = runs.get(f"{kind}_c64")
            if c64 and "litellm" in c64 and c64["litellm"]["rps"]:
                checks[f"{kind}_c64_rps_vs_litellm>=5x"] = round(c64[name]["rps"] / c64["litellm"]["rps"], 1)
        verdict[name] = checks
    if "p402" in args.variants:
        checks = {}
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            c64 = runs.get(f"{kind}_c64")
            if c64 and c64["p402"]["rps"] and "p402_default" in c64:
                checks[f"{kind}_c64_rps_vs_cache_off>=0.7"] = round(c64["p402_default"]["rps"] / c64["p402"]["rps"], 2)
            if c64 and c64.get("p402_unique", {}).get("rps"):
                # The split of that ratio: the cache's own share (against unique prompts, cache off) and what is
                # left to unique prompts themselves (token counts, cost estimates and decision rows not memoised).
                checks[f"{kind}_c64_rps_vs_unique_cache_off"] = round(
                    c64["p402_default"]["rps"] / c64["p402_unique"]["rps"], 2)
                checks[f"{kind}_c64_cpu_ms_cache_minus_unique"] = _minus(
                    c64["p402_default"].get("server_cpu_ms_per_request"),
                    c64["p402_unique"].get("server_cpu_ms_per_request"))
                checks[f"{kind}_c64_cpu_ms_unique_minus_fixed"] = _minus(
                    c64["p402_unique"].get("server_cpu_ms_per_request"), c64["p402"].get("server_cpu_ms_per_request"))
            if c64 and "litellm" in c64 and c64["litellm"]["rps"] and "p402_default" in c64:
                checks[f"{kind}_c64_rps_vs_litellm>=10x"] = round(c64["p402_default"]["rps"] / c64["litellm"]["rps"], 1)
        if checks:
            verdict["p402_default"] = checks
        messages = {}
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            over = [_minus(runs[k]["p402_messages"].get("server_cpu_ms_per_request"),
                           runs[k]["p402"].get("server_cpu_ms_per_request"))
                    for k in runs if k.startswith(kind) and "p402_messages" in runs[k]]
            over = [o for o in over if o is not None]
            if over:
                messages[f"{kind}_max_cpu_ms_per_request_over_chat<=0.2"] = max(over)
        if messages:
            verdict["p402_messages"] = messages
        checks = {}  # the Responses API's CPU beside chat's, same process, same run
        for key, row in runs.items():
            if "p402_responses" in row:
                checks[f"{key}_cpu_ms_minus_chat<=0.2"] = _minus(
                    row["p402_responses"].get("server_cpu_ms_per_request"), row["p402"].get("server_cpu_ms_per_request")
                )
        if checks:
            verdict["p402_responses"] = checks
    if "p402" in args.variants and "p402_workers2" in args.variants:
        checks = {}  # two workers beside one, same run, both with the cache off
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            c64 = runs.get(f"{kind}_c64")
            if c64 and c64["p402"]["rps"]:
                checks[f"{kind}_c64_rps_vs_one_worker>=1.6x"] = round(c64["p402_workers2"]["rps"] / c64["p402"]["rps"], 2)
        verdict["p402_workers2"] = checks
    if "p402" in args.variants and "p402_postgres" in args.variants:
        checks = {}  # the same gateway on the two engines, same run, both with the cache off
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            for key, row in runs.items():
                if key.startswith(kind):
                    checks[f"{key}_cpu_ms_per_request_over_sqlite"] = _minus(
                        row["p402_postgres"].get("server_cpu_ms_per_request"),
                        row["p402"].get("server_cpu_ms_per_request"))
                    pg = row["p402_postgres"]
                    if pg.get("server_cpu_ms_per_request") is not None and pg.get("store_cpu_ms_per_request") is not None:
                        checks[f"{key}_cpu_ms_per_request_with_server_over_sqlite"] = _minus(
                            pg["server_cpu_ms_per_request"] + pg["store_cpu_ms_per_request"],
                            row["p402"].get("server_cpu_ms_per_request"))
            c1 = runs.get(f"{kind}_c1")
            if c1:
                checks[f"{kind}_postgres_c1_added_p50_ms_over_sqlite<=0.3"] = _minus(
                    c1["p402_postgres"]["latency_ms"]["p50"], c1["p402"]["latency_ms"]["p50"])
            c64 = runs.get(f"{kind}_c64")
            if c64 and c64["p402"]["rps"]:
                checks[f"{kind}_c64_rps_vs_sqlite"] = round(c64["p402_postgres"]["rps"] / c64["p402"]["rps"], 2)
        verdict["p402_postgres"] = checks
    if "p402_postgres" in args.variants and "p402_workers2_postgres" in args.variants:
        checks = {}
        for stream in args.streams:
            kind = "stream" if stream else "plain"
            c64 = runs.get(f"{kind}_c64")
            if c64 and c64["p402_postgres"]["rps"]:
                checks[f"{kind}_c64_rps_vs_one_worker>=1.6x"] = round(
                    c64["p402_workers2_postgres"]["rps"] / c64["p402_postgres"]["rps"], 2)
        verdict["p402_workers2_postgres"] = checks
    for variant, one in (("p402_workers2_nofleet", "p402"), ("p402_workers2_nofleet_postgres", "p402_postgres")):
        if one in args.variants and variant in args.variants:
            checks = {}
            for stream in args.streams:
                c64 = runs.get(f"{'stream' if stream else 'plain'}_c64")
                if c64 and c64[one]["rps"]:
                    checks[f"{'stream' if stream else 'plain'}_c64_rps_vs_one_worker"] = round(
                        c64[variant]["rps"] / c64[one]["rps"], 2)
            verdict[variant] = checks
    return verdict


ROWS = {
    "p402_default": "p402 serve in its default configuration: cache on, every prompt new (each one misses, is "
                    "embedded, searched and inserted); measured first, in steady state: its warm-up sends one "
                    "paraphrase pair, so MiniLM's one-time load (at the first candidate) is not in the run",
    "p402": "the same process with `cache-control: no-cache` on every request: the cache neither read nor written",
    "p402_unique": "the same process, cache off as in row p402, every prompt new as in row p402_default: "
                   "p402_default minus this row is the cache's own cost, this row minus p402 what unique prompts "
                   "cost a gateway with no cache",
    "p402_messages": "the same request in Anthropic's Messages shape on /v1/messages, same process, cache off",
    "p402_responses": "the same request through /v1/responses (OpenAI's Responses API), cache off like row p402",
}
VARIANTS = {
    "p402": "p402 serve as shipped: our HTTP client upstream, ledger and cache on",
    "p402_nostore": "the same with no store or cache behind it (Runtime persist=False)",
    "p402_workers2": "p402 serve --workers 2: two gateway processes on one port under a supervising parent, "
                     "cache off like row p402; CPU per request counts the parent and both workers",
    "p402_postgres": "p402 serve as row p402 (cache off) with its store on PostgreSQL: a cluster this bench starts "
                     "on loopback (tests/postgres.py), one new database per variant",
    "p402_workers2_postgres": "p402 serve --workers 2 as row p402_workers2, its store on that PostgreSQL",
    "p402_workers2_nofleet": "p402 serve --workers 2 with the fleet bus off (P402_FLEET=0): each worker alone, "
                             "none telling the others its circuits, cached answers and events; what the bus costs",
    "p402_workers2_nofleet_postgres": "the same, its store on that PostgreSQL",
    "p402_proxied": "p402 serve reaching the simulator through a forward proxy on loopback (proxy.py, "
                    "[network] proxy; plain http, so absolute-form requests): the gateway's CPU per request, "
                    "the proxy's own not counted",
}


FLOOR = ("bench/floor_proxy.py: uvicorn and our HTTP client served as p402 serve is, passing the answer through with no "
         "logic; the CPU any gateway on this stack spends. added.<variant>.cpu_ms_per_request_over_floor is "
         "P402's own work")


def serve_with(variant: str, serve_args: list[str]) -> int:
    """`p402 serve` as one of the VARIANTS."""
    sys.path.insert(0, str(ROOT))
    from p402_tui import cli, runtime

    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
    if variant.startswith("p402_workers2"):
        serve_args = ["--workers", "2", *serve_args]
    if "_nofleet" in variant:
        os.environ["P402_FLEET"] = "0"
    if variant == "p402_nostore":
        open_runtime = runtime.Runtime.open
        runtime.Runtime.open = lambda settings, **kw: open_runtime(settings, **{**kw, "persist": False})
    return cli.main(["serve", *serve_args])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return serve_with(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured run (default 3)")
    parser.add_argument("--requests", type=int, default=20_000, help="at most this many requests per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per target, interleaved; medians are reported")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated (default 1,16,64)")
    parser.add_argument("--modes", default="plain,stream", help="plain, stream or both (default both)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"answer length (default {MAX_TOKENS})")
    parser.add_argument("--sim-speed", type=float, help="pace the simulator this many times a model's real speed "
                        "(default: no latency)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="gateways to measure, each its own process: "
                        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--litellm-venv", default=str(Path(tempfile.gettempdir()) / "p402-bench-litellm"),
                        help="LiteLLM's venv (created on first use)")
    parser.add_argument("--skip-litellm", action="store_true", help="leave the peer out")
    parser.add_argument("--skip-floor", action="store_true", help="leave out the no-logic proxy (bench/floor_proxy.py)")
    parser.add_argument("--no-netns", action="store_true", help="run in the host's network namespace")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, configs)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--driver", choices=("aiohttp", "wrk"), default="aiohttp",
                        help="the load generator: this process (aiohttp, default) or wrk (C, installed if missing)")
    parser.add_argument("--upstream", choices=("sim", "static"), default="sim",
                        help="behind the gateways: `p402 sim` (default) or nginx answering one fixed completion")
    parser.add_argument("--c1-slices", type=int, default=0, help="also measure rows p402 and p402_postgres at "
                        "concurrency 1 in this many alternating slices each (default 0: none)")
    parser.add_argument("--slice-duration", type=float, default=5.0, help="seconds per c1 slice (default 5)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.streams = [m == "stream" for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    if args.upstream == "static" and any(args.streams):
        parser.error("--upstream static answers whole completions only: use --modes plain")
    if not in_netns():  # before the namespace: installing needs the package mirror
        ensure_tools([tool for tool, asked in (("wrk", args.driver == "wrk"), ("nginx", args.upstream == "static"))
                      if asked])
    if args.skip_litellm:
        args.litellm_venv = None
    elif not in_netns():
        ensure_litellm(Path(args.litellm_venv))  # before the namespace: installing needs the package index
    if not args.no_netns:
        reexec_in_netns([str(Path(__file__).resolve()), *argv])
    os.chdir(ROOT)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
