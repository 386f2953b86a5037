"""Semantic cache: lookup and insert latency of the vector index, memory, and the costs around it.

For N in (10k, 100k) unit vectors of dimension 384 in one scope (the worst case: the
cache searches one namespace+scope at a time, and one scope holds everything here):
- lookup p50/p99 of `index.search` for a miss (a random query: nothing within the
  threshold) and for a hit (a stored row plus noise, cosine ~0.95), each the top-1 at
  threshold 0.90; and, for comparison, the plain full scan `argmax(M @ q)`;
- insert p50/p99 of `index.add` (appending one row, growing by doubling);
- memory: bytes of the matrix and sign codes, and the process's peak RSS.
Plus, once: MiniLM embedding of one prompt, an exact-tier lookup through the real
cache, and rebuilding a 100k-entry cache from SQLite at start.

Target: lookup p50 <= 2 ms at 100k. Prints JSON.

    python bench/cache.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from p402_tui.cache.embedders import load_embedder
from p402_tui.cache.index import VectorIndex, search
from p402_tui.cache.semantic import SemanticCache, request_keys
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.store.store import Store

DIM = 384
THRESHOLD = 0.90


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def bench_size(n: int, rounds: int, rng: np.random.Generator) -> dict:
    rows = unit(rng.standard_normal((n, DIM), dtype=np.float32))
    index = VectorIndex(DIM)
    inserts = []
    for i in range(n):
        started = time.perf_counter()
        index.add(rows[i], i)
        inserts.append(time.perf_counter() - started)
    misses = unit(rng.standard_normal((rounds, DIM), dtype=np.float32))
    targets = rng.integers(0, n, rounds)
    hits = unit(rows[targets] + rng.standard_normal((rounds, DIM), dtype=np.float32) * 0.017)

    miss_samples, hit_samples, full_samples = [], [], []
    found_right = 0
    for i in range(rounds):
        snapshot = index.snapshot()
        started = time.perf_counter()
        result = search(snapshot, misses[i], THRESHOLD)
        miss_samples.append(time.perf_counter() - started)
        assert result == []
        started = time.perf_counter()
        result = search(snapshot, hits[i], THRESHOLD)
        hit_samples.append(time.perf_counter() - started)
        found_right += bool(result) and result[0][0] == targets[i]
        started = time.perf_counter()
        int(np.argmax(snapshot.vectors @ hits[i]))
        full_samples.append(time.perf_counter() - started)
    return {
        "entries": n,
        "dim": DIM,
        "lookup_miss": percentiles(miss_samples),
        "lookup_hit": percentiles(hit_samples),
        "hits_found": f"{found_right}/{rounds}",
        "full_scan_matvec_argmax": percentiles(full_samples),
        "insert": percentiles(inserts),
        "index_mb": round(index.nbytes / 2**20, 1),
    }


async def bench_cache(embedder, rounds: int) -> dict:
    """The real cache around the index: MiniLM on one prompt, the exact tier, and a 100k rebuild from SQLite."""
    prompts = [f"How do I sort a list of {i} numbers in Python?" for i in range(rounds)]
    embed: list[float] = []
    for prompt in prompts:
        started = time.perf_counter()
        await embedder.embed([prompt])
        embed.append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"
        store = await Store.open(path)
        cache = SemanticCache(store, embedder=embedder)
        request = ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}])
        await cache.lookup(request, None, "default", request_id="seed")
        cache.insert("seed", ChatResponse(provider="openai", model="gpt-4o", content="Paris.", usage=Usage(9, 2)), 0.001)
        await store.flush()
        exact = []
        for i in range(rounds):
            started = time.perf_counter()
            assert await cache.lookup(request, None, "default", request_id=f"r{i}") is not None
            exact.append(time.perf_counter() - started)
        await store.aclose()

        # 100k stored entries of one scope, written straight to the file, then a cold start.
        n = 100_000
        keys = request_keys(request)
        vectors = unit(np.random.default_rng(1).standard_normal((n, DIM), dtype=np.float32))
        with sqlite3.connect(path) as conn:
            now = time.time()
            conn.executemany(
                "INSERT INTO semantic_cache (namespace, exact_key, scope_key, prompt, model, response, cost_usd, "
                "created, last_hit, hits, embedder, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (("default", f"k{i}", keys.scope, f"prompt {i}", "openai/gpt-4o", "{}", 0.001, now, now + i,
                  embedder.name, vectors[i].tobytes()) for i in range(n)),
            )  # fmt: skip
        store = await Store.open(path)
        cache = SemanticCache(store, embedder=embedder, max_entries=200_000)
        started = time.perf_counter()
        await cache.ready()
        load_s = time.perf_counter() - started
        indexed = cache.info()["indexed"]
        await store.aclose()
    return {
        "minilm_embed_one_prompt": percentiles(embed),
        "exact_tier_lookup": percentiles(exact),
        "rebuild_100k_from_sqlite_s": round(load_s, 3),
        "rebuild_indexed": indexed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="lookups per size (default 300)")
    args = parser.parse_args()
    # Loaded first, as in the app: loading MiniLM holds BLAS to one thread for the whole process.
    started = time.perf_counter()
    embedder, _ = load_embedder("minilm")
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(402)
    sizes = [bench_size(n, args.rounds, rng) for n in (10_000, 100_000)]
    around = asyncio.run(bench_cache(embedder, min(args.rounds, 100)))
    result = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},  # fmt: skip
        "threshold": THRESHOLD,
        "sizes": sizes,
        "minilm_load_s": round(load_s, 3),
        **around,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "target_p50_ms_at_100k": 2.0,
        "target_met": max(sizes[-1]["lookup_miss"]["p50_ms"], sizes[-1]["lookup_hit"]["p50_ms"]) <= 2.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
