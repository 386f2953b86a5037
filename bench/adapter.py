"""Adapter overhead: our stream parser against the official openai SDK's, on the same simulated stream.

A `p402 sim --no-latency` process on a free loopback port streams an answer of exactly
1,000 content chunks (the `x-p402-sim-pieces` header fixes the length). In one event
loop, alternating round by round, our OpenAI-compatible adapter and the SDK's
`AsyncOpenAI` each read that stream; chunks/s is 1,000 over the wall time from sending
the request to the last chunk. Prints JSON with the medians and their ratio (target:
ours / SDK >= 1).

`ours` is the adapter as shipped, on our own client (p402_tui/providers/http.py); the
SDK reads through httpx. So the two transports differ as well as the parsers, and
readers that parse nothing show how much is which: `raw_ours`, `raw_httpx` and
`raw_aiohttp` (the client the adapters used before) read the same stream's bytes
on each transport (the simulator's own pace, a ceiling for any parser on it). Read
`ours` against `raw_ours` and `openai_sdk` against `raw_httpx` for each parser's
own cost. `cpu_us_per_chunk` is this process's CPU time per chunk; the simulator
runs in another process, so that is the client's reading and parsing alone.

    python bench/adapter.py [--rounds N] [--chunks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import aiohttp
import httpx
import openai

from p402_tui.core.adapters import make_adapter
from p402_tui.core.catalog import load_catalog
from p402_tui.core.config import ConfigFile, Settings
from p402_tui.core.types import ChatRequest
from p402_tui.providers import http
from p402_tui.sim.openai_family import PIECES_HEADER

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Stream a long answer."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_sim(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--port", str(port), "--no-latency"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=0.5)
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"p402 sim did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)


async def ours(adapter, request: ChatRequest) -> int:
    pieces = 0
    async for chunk in adapter.stream(request, model=MODEL):
        if chunk.content:
            pieces += 1
    return pieces


async def sdk(client: openai.AsyncOpenAI) -> int:
    pieces = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
    return pieces


BODY = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}


def raw_headers(chunks: int) -> dict[str, str]:
    return {"Authorization": "Bearer sim-key", PIECES_HEADER: str(chunks)}


async def raw_httpx(client: httpx.AsyncClient, url: str, chunks: int) -> int:
    async with client.stream("POST", f"{url}/openai/v1/chat/completions", json=BODY, headers=raw_headers(chunks)) as response:
        async for _ in response.aiter_bytes():
            pass
    return chunks  # nothing parsed: the count is what the simulator was asked for


async def raw_ours(client: http.Client, url: str, chunks: int) -> int:
    target = http.target(f"{url}/openai/v1/chat/completions")
    response = await client.request("POST", target, json.dumps(BODY).encode(), timeouts=http.Timeouts(30, 30))
    try:
        async for _ in response:
            pass
    finally:
        response.close()
    return chunks


async def raw_aiohttp(session: aiohttp.ClientSession, url: str, chunks: int) -> int:
    async with session.post(f"{url}/openai/v1/chat/completions", json=BODY, headers=raw_headers(chunks)) as response:
        async for _ in response.content.iter_any():
            pass
    return chunks


async def run(url: str, rounds: int, chunks: int) -> dict:
    catalog = load_catalog()
    provider = Settings(ConfigFile(), catalog, env={}).point_at(url).providers["openai"]
    provider = replace(provider, headers={PIECES_HEADER: str(chunks)})
    adapter = make_adapter(provider)
    client = openai.AsyncOpenAI(
        base_url=f"{url}/openai/v1", api_key="sim-key", default_headers={PIECES_HEADER: str(chunks)}, max_retries=0
    )
    plain_httpx = httpx.AsyncClient()
    plain_aiohttp = aiohttp.ClientSession()
    plain_ours = http.Client(raw_headers(chunks))
    request = ChatRequest(messages=MESSAGES)
    readers = {
        "ours": lambda: ours(adapter, request),
        "openai_sdk": lambda: sdk(client),
        "raw_ours": lambda: raw_ours(plain_ours, url, chunks),
        "raw_aiohttp": lambda: raw_aiohttp(plain_aiohttp, url, chunks),
        "raw_httpx": lambda: raw_httpx(plain_httpx, url, chunks),
    }
    wall: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    try:
        for read in readers.values():  # warm-up: connections, imports, caches
            await read()
        for _ in range(rounds):
            for name, read in readers.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                pieces = await read()
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
                if pieces != chunks:
                    raise SystemExit(f"{name} read {pieces} content chunks, expected {chunks}")
    finally:
        await adapter.aclose()
        await client.close()
        await plain_httpx.aclose()
        await plain_aiohttp.close()
        await plain_ours.aclose()

    def summary(name: str) -> dict:
        rates = sorted(chunks / s for s in wall[name])
        return {
            "median_chunks_per_s": round(statistics.median(rates)),
            "min_chunks_per_s": round(rates[0]),
            "max_chunks_per_s": round(rates[-1]),
            "median_ms_per_stream": round(statistics.median(wall[name]) * 1000, 3),
            "cpu_us_per_chunk": round(statistics.median(cpu[name]) / chunks * 1e6, 2),
        }

    result = {name: summary(name) for name in readers}
    sdk_rate = result["openai_sdk"]["median_chunks_per_s"]
    ratio = result["ours"]["median_chunks_per_s"] / sdk_rate
    return {
        "benchmark": "adapter stream parser, OpenAI wire",
        "chunks_per_stream": chunks,
        "rounds": rounds,
        "simulator": "p402 sim --no-latency, separate process, loopback HTTP",
        "python": platform.python_version(),
        "openai_sdk_version": openai.__version__,
        "our_transport": "p402_tui.providers.http (httptools parser)",
        "sdk_transport": f"httpx {httpx.__version__}",
        "ours": result["ours"],
        "openai_sdk": result["openai_sdk"],
        "raw_ours": result["raw_ours"],
        "raw_aiohttp": result["raw_aiohttp"],
        "raw_httpx": result["raw_httpx"],
        "ratio_ours_over_sdk": round(ratio, 3),
        "cpu_ratio_sdk_over_ours": round(
            result["openai_sdk"]["cpu_us_per_chunk"] / result["ours"]["cpu_us_per_chunk"], 3
        ),
        "target_met": ratio >= 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunks", type=int, default=1000)
    args = parser.parse_args()
    port = free_port()
    sim = start_sim(port)
    try:
        result = asyncio.run(run(f"http://127.0.0.1:{port}", args.rounds, args.chunks))
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
