#!/usr/bin/env python3
"""How often the semantic cache serves a paraphrase its answer, and how often it serves a near-miss one.

Data: the project's own pairs (tests/data/cache_pairs.json, split "project") and
bench/data/cache_pairs.jsonl (written for this: paraphrases, and near-misses that
keep the topic but change the answer: a number, an entity, a negation, a unit, a
direction). That file has a "tune" split, which chose the thresholds, and a
"heldout" split, which nothing was tuned on.

For each split, the real cache (in a scratch SQLite file) holds the first prompt of
every pair and is asked the second of every pair. A paraphrase counts as recalled
when it is served its own pair's answer; a near-miss counts as served when it is
served any answer other than one cached for exactly its own text.

    python bench/cache_eval.py                 # the default configuration (static stage + MiniLM)
    python bench/cache_eval.py --minilm-only   # MiniLM on every lookup, at --threshold (0.90 before)
    python bench/cache_eval.py --fill 20000    # amid 20,000 gateway-like prompts: the index searched by buckets

Targets: near-misses served <= 1 in 50 on every split; held-out paraphrase recall >= 50 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not whichever p402_tui is installed

from p402_tui.cache.semantic import SemanticCache  # noqa: E402
from p402_tui.core.types import ChatRequest, ChatResponse, Usage  # noqa: E402
from p402_tui.store.store import Store  # noqa: E402

DATA = ROOT / "bench" / "data" / "cache_pairs.jsonl"
PROJECT = ROOT / "tests" / "data" / "cache_pairs.json"
NEAR_MISS_TARGET = 1 / 50
HELDOUT_RECALL_TARGET = 0.5


def load_pairs() -> dict[str, list[dict[str, str]]]:
    splits: dict[str, list[dict[str, str]]] = {"project": []}
    project = json.loads(PROJECT.read_text(encoding="utf-8"))
    for kind in ("paraphrase", "near_miss"):
        splits["project"] += [{"kind": kind, "a": a, "b": b} for a, b in project[kind]]
    for line in DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        splits.setdefault(row["split"], []).append(row)
    return splits


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}])


def make_cache(store: Store, args: argparse.Namespace) -> SemanticCache:
    if args.minilm_only:
        from p402_tui.cache.embedders import load_embedder

        embedder, _ = load_embedder("minilm")
        return SemanticCache(store, embedder=embedder, threshold=args.threshold or 0.90)
    from p402_tui.cache.embedders import plan_embedders

    plan = plan_embedders("auto")
    if plan.embedder is None and plan.build is not None:
        plan.embedder = plan.build()  # first use on this machine: the static table is made now
    kwargs = {"threshold": args.threshold} if args.threshold else {}
    if args.candidate_threshold:
        kwargs["candidate_threshold"] = args.candidate_threshold
    return SemanticCache(store, embedder=plan.embedder, confirmer=plan.confirmer, **kwargs)


async def fill(cache: SemanticCache, namespace: str, count: int) -> None:
    """`count` gateway-like prompts (ten words drawn from the pairs, as bench/gateway.py sends) cached
    first, 64 at a time as concurrent requests arrive, so the index is searched by its buckets."""
    import random
    import re

    words = sorted(set(re.findall(r"[a-z]{3,}", DATA.read_text(encoding="utf-8").lower())))
    rng = random.Random(402)
    filler = ChatResponse(provider="sim", model="m", content="(filler)", usage=Usage(5, 5))

    async def one(i: int) -> None:
        text = " ".join(rng.choices(words, k=10)).capitalize() + "?"
        if await cache.lookup(ask(text), None, namespace, request_id=f"fill-{i}") is None:
            cache.insert(f"fill-{i}", filler, 0.0)

    for start in range(0, count, 64):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 64))))
    for _ in range(200):  # the last training of the buckets, if one is still on the pool
        if all(not index.training for index in cache._indexes.values()):
            break
        await asyncio.sleep(0.05)


async def evaluate(split: str, pairs: list[dict[str, str]], args: argparse.Namespace, folder: Path) -> dict:
    store = await Store.open(folder / f"{split}.db")
    try:
        cache = make_cache(store, args)
    except BaseException:
        await store.aclose()
        raise
    try:
        if args.fill:
            await fill(cache, split, args.fill)
        for i, text in enumerate(dict.fromkeys(pair["a"] for pair in pairs)):
            await cache.lookup(ask(text), None, split, request_id=f"seed-{i}")
            cache.insert(f"seed-{i}", ChatResponse(provider="sim", model="m", content=text, usage=Usage(5, 5)), 0.001)
        recalled = wrong = served_near = 0
        paraphrases = [p for p in pairs if p["kind"] == "paraphrase"]
        near = [p for p in pairs if p["kind"] == "near_miss"]
        examples: list[list[str]] = []
        started = time.process_time()
        before = cache.stats.semantic_lookups, cache.stats.semantic_cpu_s, cache.stats.confirmations
        for i, pair in enumerate(pairs):
            hit = await cache.lookup(ask(pair["b"]), None, split, request_id=f"q-{i}")
            served = None if hit is None else hit.response.content
            if pair["kind"] == "paraphrase":
                recalled += served == pair["a"]
                wrong += served is not None and served != pair["a"]
            elif served is not None and served != pair["b"]:
                served_near += 1
                examples.append([pair["b"], served])
        cpu_s = time.process_time() - started
        lookups = cache.stats.semantic_lookups - before[0]
    finally:
        await cache.aclose()
        await store.aclose()
    return {
        "filled_with": args.fill,
        "paraphrase_pairs": len(paraphrases),
        "paraphrase_recall": round(recalled / len(paraphrases), 3),
        "paraphrases_served_another_answer": wrong,
        "near_miss_pairs": len(near),
        "near_misses_served": served_near,
        "near_miss_rate": round(served_near / len(near), 4),
        "near_misses_served_examples": examples[:5],
        "semantic_cpu_ms_per_lookup": round((cache.stats.semantic_cpu_s - before[1]) * 1000 / max(lookups, 1), 3),
        "confirmations": cache.stats.confirmations - before[2],
        "queries": len(pairs),
        "process_cpu_ms_per_query": round(cpu_s * 1000 / len(pairs), 3),
    }


async def main_async(args: argparse.Namespace) -> dict:
    splits = load_pairs()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: await evaluate(name, pairs, args, Path(folder)) for name, pairs in splits.items()}
    return {
        "bench": "cache_eval",
        "configuration": "minilm-only" if args.minilm_only else "default (static candidates + MiniLM confirmation)",
        "threshold": args.threshold or (0.90 if args.minilm_only else "default"),
        "splits": results,
        "targets": {"near_miss_rate_max": NEAR_MISS_TARGET, "heldout_paraphrase_recall_min": HELDOUT_RECALL_TARGET},
        "targets_met": all(r["near_miss_rate"] <= NEAR_MISS_TARGET for r in results.values())
        and results["heldout"]["paraphrase_recall"] >= HELDOUT_RECALL_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-only", action="store_true", help="MiniLM on every lookup, no static stage")
    parser.add_argument("--fill", type=int, default=0, help="cache this many gateway-like prompts first, so the "
                        "index is large enough to search by buckets (e.g. 20000)")
    parser.add_argument("--threshold", type=float, help="the hit threshold (MiniLM cosine)")
    parser.add_argument("--candidate-threshold", type=float, help="the static stage's cosine for a candidate")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
