"""Semantic cache: lookup and insert latency of the vector index, memory, and the costs around it.

For N in (10k, 100k) unit vectors of dimension 256 (the static stage's) in one scope (the worst case: the
cache searches one namespace+scope at a time, and one scope holds everything here):
- lookup p50/p99 of `index.search` for a miss (a random query: nothing within the
  threshold) and for a hit (a stored row plus noise, cosine ~0.95), each the top-1 at
  threshold 0.90; and, for comparison, the plain full scan `argmax(M @ q)`;
- insert p50/p99 of `index.add` (appending one row, growing by doubling); lookups are measured
  with the index's buckets trained (`bucket_training_cpu_s`: what that cost);
- bucket_recall: of the bench/data pairs whose partner a full scan finds amid 10k, 30k and 100k
  gateway-like prompts, the share the bucketed search finds too;
- memory: bytes of the matrix and sign codes, and the process's peak RSS.
Plus, once: the static and the MiniLM embedding of one prompt, an exact-tier lookup
through the real cache, rebuilding a 100k-entry cache from SQLite at start; the
memory the default cache holds at its entry cap (100,000 different prompts put through
lookup and insert, as the gateway does: RSS growth, index bytes); and the RSS an 8 MB
prompt leaves behind once embedded by both stages.

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

import sys

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's p402_tui, not an installed one

from p402_tui.cache.embedders import load_embedder, plan_embedders  # noqa: E402
from p402_tui.cache.index import Snapshot, VectorIndex, search, sign_codes, train_buckets  # noqa: E402
from p402_tui.cache.semantic import SemanticCache, request_keys  # noqa: E402
from p402_tui.core.types import ChatRequest, ChatResponse, Usage  # noqa: E402
from p402_tui.store.store import Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import cpu_seconds, rss_mib  # noqa: E402 - bench/gateway.py, beside this file

DIM = 256
THRESHOLD = 0.74  # the static stage's search threshold (cache.candidate_threshold)
GATEWAY_CONCURRENCY = 64  # lookups in flight together while the default cache fills (bench/gateway.py's c64)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def rss_mb() -> float:
    """Resident MB of this process and its children (the cache's MiniLM confirmer is one, once started)."""
    return rss_mib(os.getpid()) or 0.0


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def bench_size(n: int, rounds: int, rng: np.random.Generator) -> dict:
    rows = unit(rng.standard_normal((n, DIM), dtype=np.float32))
    index = VectorIndex(DIM)
    inserts = []
    for i in range(n):
        if index.wants_coding():  # as the cache does, on its pool: from then on each row comes with its code
            index.install_codes(sign_codes(index.start_coding()))
        started = time.perf_counter()
        index.add(rows[i], i)
        inserts.append(time.perf_counter() - started)
    started = time.process_time()
    index.install(train_buckets(index.start_training()))  # as the cache does, on its pool
    train_s = time.process_time() - started
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
        "buckets": len(index.buckets.centres),
        "bucket_training_cpu_s": round(train_s, 3),
        "index_mb": round(index.nbytes / 2**20, 1),
    }


def bucket_recall(static, n: int) -> dict:
    """How often the buckets keep a close row from a lookup: the first prompt of every pair of
    bench/data amid n gateway-like prompts (ten random words), each second prompt searched with
    buckets and with a full scan; of the partners the full scan finds at the candidate threshold,
    the share the bucketed search finds too."""
    import random
    import re

    data = [json.loads(line) for line in (Path(__file__).parent / "data" / "cache_pairs.jsonl").open()]
    words = sorted(set(re.findall(r"[a-z]{3,}", (Path(__file__).parent / "data" / "cache_pairs.jsonl").read_text().lower())))
    rng = random.Random(7)
    filler = [" ".join(rng.choices(words, k=10)).capitalize() + "?" for _ in range(n)]
    firsts = static.encode([pair["a"] for pair in data])
    seconds = static.encode([pair["b"] for pair in data])
    index = VectorIndex(static.dim)
    index.extend(np.vstack([static.encode(filler), firsts]), list(range(n + len(data))))
    index.install(train_buckets(index.start_training()))
    bucketed = index.snapshot()
    flat = Snapshot(bucketed.vectors, bucketed.codes, None)
    codes = sign_codes(seconds)
    close = kept = 0
    for i, query in enumerate(seconds):
        if float(bucketed.vectors[n + i] @ query) >= THRESHOLD:
            close += 1
            in_full = n + i in [row for row, _ in search(flat, query, THRESHOLD, k=64, code=codes[i])]
            kept += in_full and n + i in [row for row, _ in search(bucketed, query, THRESHOLD, k=64, code=codes[i])]
    return {"entries": len(index), "buckets": len(index.buckets.centres), "close_pairs": close,
            "bucket_recall": round(kept / close, 4)}  # fmt: skip


async def bench_cache(embedder, static, rounds: int) -> dict:
    """The real cache around the index: MiniLM on one prompt, the exact tier, and a 100k rebuild from SQLite
    (the cache indexing `static`'s vectors, as the default one does)."""
    prompts = [f"How do I sort a list of {i} numbers in Python?" for i in range(rounds)]
    embed: list[float] = []
    for prompt in prompts:
        started = time.perf_counter()
        await embedder.embed([prompt])
        embed.append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"
        store = await Store.open(path)
        cache = SemanticCache(store, embedder=static)
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
                  static.name, vectors[i].tobytes()) for i in range(n)),
            )  # fmt: skip
        store = await Store.open(path)
        cache = SemanticCache(store, embedder=static, max_entries=200_000)
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


async def bench_at_cap(plan, max_entries: int) -> dict:
    """The default cache filled to its cap with different prompts: what it holds in memory, and what a request
    cost this process and MiniLM's child over each tenth of the fill (the child's CPU is read while it lives:
    one that died and started again would lose its share)."""
    import random
    import re

    words = sorted(set(re.findall(r"[a-z]{3,}", (Path(__file__).parent / "data" / "cache_pairs.jsonl").read_text().lower())))
    rng = random.Random(402)
    answer = ChatResponse(provider="openai", model="gpt-4o-mini", content="A short answer of about ten words here.",
                          usage=Usage(20, 10))  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        store = await Store.open(Path(folder) / "cap.db")
        cache = SemanticCache(store, embedder=plan.embedder, confirmer=plan.confirmer, max_entries=max_entries)
        await cache.ready()
        before = rss_mb()
        started = time.process_time()
        slice_size = max(1, max_entries // 10)
        slices, mark = [], (time.process_time(), children_cpu_s(), 0)

        async def one(i: int) -> None:
            prompt = " ".join(rng.choices(words, k=10)).capitalize() + "?"
            request = ChatRequest(messages=[{"role": "user", "content": prompt}])
            await cache.lookup(request, None, "default", request_id=f"r{i}")
            cache.insert(f"r{i}", answer, 0.0001)

        done = 0
        while done < max_entries:  # GATEWAY_CONCURRENCY requests in flight, as the gateway at c64 has them
            batch = min(GATEWAY_CONCURRENCY, max_entries - done)
            await asyncio.gather(*(one(done + j) for j in range(batch)))
            done += batch
            if done % 1024 == 0:
                await store.flush()
            if done // slice_size > len(slices) or done == max_entries:
                now = (time.process_time(), children_cpu_s(), done)
                slices.append({"entries": done,
                               "cpu_ms_per_request": round((now[0] - mark[0]) * 1000 / (done - mark[2]), 3),
                               "confirmer_cpu_ms_per_request": round((now[1] - mark[1]) * 1000 / (done - mark[2]), 3)})
                mark = now
        await store.flush()
        cpu_ms = (time.process_time() - started) * 1000 / max_entries
        info = cache.snapshot()
        grown = rss_mb() - before
        await cache.aclose()
        await store.aclose()
    return {
        "max_entries": max_entries,
        "entries": info["entries"],
        "rss_growth_mb": round(grown, 1),
        "index_mb": round(info["index_bytes"] / 2**20, 1),
        "confirmer_loaded": info["confirmer"] != {"loaded": False},
        "confirmations": info["confirmations"],
        "semantic_cpu_ms_per_lookup": round(info["semantic_cpu_ms_per_lookup"], 3),
        "process_cpu_ms_per_lookup_and_insert": round(cpu_ms, 3),
        # As it fills: this process's CPU and the confirmer's child's, a lookup and insert, over each tenth of
        # the cap (the index's scan, its buckets past 16,384 rows, and confirmations of chance neighbours grow).
        "as_it_fills": slices,
    }


def children_cpu_s() -> float:
    """CPU seconds of this process's live descendants (the confirmer's MiniLM process): `gateway.cpu_seconds`
    of this process, which sums them from /proc, less its own."""
    return cpu_seconds(os.getpid()) - sum(os.times()[:2])


def eight_mb_prompt(plan) -> dict:
    """RSS left behind by embedding one 8 MB prompt with both stages (it is cut to 4,096 characters first)."""
    from p402_tui.cache.embedders import release_memory

    confirmer = plan.confirmer()
    confirmer.encode(["warm up"])
    plan.embedder.encode(["warm up"])
    release_memory()
    prompt = "lorem ipsum dolor sit amet " * (8 * 2**20 // 27)
    before = rss_mb()
    started = time.perf_counter()
    plan.embedder.encode([prompt])
    confirmer.encode([prompt])
    release_memory()
    return {"prompt_mb": round(len(prompt) / 2**20, 1), "rss_growth_mb": round(rss_mb() - before, 1),
            "both_stages_s": round(time.perf_counter() - started, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="lookups per size (default 300)")
    parser.add_argument("--cap", type=int, default=100_000, help="entries for the at-cap figure (default 100,000)")
    args = parser.parse_args()
    # The default cache first, in a fresh process state: its memory at the cap is the README's figure.
    plan = plan_embedders("auto")
    if plan.embedder is None and plan.build is not None:
        plan.embedder = plan.build()
    at_cap = asyncio.run(bench_at_cap(plan, args.cap))
    static_embed = []
    for i in range(min(args.rounds, 100)):
        started = time.perf_counter()
        plan.embedder.encode([f"How do I sort a list of {i} numbers in Python?"])
        static_embed.append(time.perf_counter() - started)
    big = eight_mb_prompt(plan)
    recall = [bucket_recall(plan.embedder, n) for n in (10_000, 30_000, 100_000)]
    # Loaded first, as in the app: loading MiniLM holds BLAS to one thread for the whole process.
    started = time.perf_counter()
    embedder, _ = load_embedder("minilm")
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(402)
    sizes = [bench_size(n, args.rounds, rng) for n in (10_000, 100_000)]
    around = asyncio.run(bench_cache(embedder, plan.embedder, min(args.rounds, 100)))
    result = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},  # fmt: skip
        "threshold": THRESHOLD,
        "sizes": sizes,
        "minilm_load_s": round(load_s, 3),
        "static_embed_one_prompt": percentiles(static_embed),
        **around,
        "default_cache_at_cap": at_cap,
        "bucket_recall": recall,
        "eight_mb_prompt": big,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "target_p50_ms_at_100k": 2.0,
        "target_met": max(sizes[-1]["lookup_miss"]["p50_ms"], sizes[-1]["lookup_hit"]["p50_ms"]) <= 2.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
