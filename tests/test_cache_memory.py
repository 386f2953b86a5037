"""What the semantic cache says it keeps in memory (`memory_bytes`) against what Python allocated for it
and what the OS holds resident in its index's mappings."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import tempfile
import tracemalloc
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest

from p402_tui.cache.embedders import HashedNgramEmbedder
from p402_tui.cache.index import _PLANES, VectorIndex, mapping_of, planes_bytes
from p402_tui.cache.semantic import SemanticCache
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.store.engine import open_store


async def fill(cache: SemanticCache, start: int, count: int) -> None:
    for i in range(start, start + count):
        request = ChatRequest(messages=[{"role": "user", "content": f"question {i}: what is {i} plus {i % 7}?"}])
        assert await cache.lookup(request, None, "default", request_id=f"r{i}") is None
        answer = ChatResponse(provider="openai", model="gpt-4o-mini", content=f"{i} plus {i % 7} is {i + i % 7}. " * (1 + i % 5),
                              usage=Usage(20, 12))  # fmt: skip
        assert cache.insert(f"r{i}", answer, 0.0001)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_by_start() -> dict[int, int]:
    """Each mapping's resident bytes (smaps' Rss), by its start address."""
    found: dict[int, int] = {}
    start = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):
            start = int(first.split("-")[0], 16)
        elif first == "Rss:":
            found[start] = int(line.split()[1]) * 1024
    return found


def index_arrays(index: VectorIndex) -> list[np.ndarray]:
    return [a for a in (index.vectors, index.codes, index.bucket_of, index.slot_of, index.heads) if a is not None]


def mapped_resident(arrays: list[np.ndarray]) -> int:
    """What the OS holds resident in the mappings of those arrays that are mappings of their own."""
    resident = resident_by_start()
    return sum(resident.get(a.ctypes.data, 0) for a in arrays)


@linux_only
async def test_memory_bytes_tracks_what_python_allocated_for_the_entries(tmp_path):
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 200)  # the embedder, the index and the store's statements warmed
        await store.flush()
        gc.collect()
        tracemalloc.start()
        try:
            mapped_before = mapped_resident([a for i in cache._indexes.values() for a in index_arrays(i)])
            before, reported_before = tracemalloc.take_snapshot(), cache.memory_bytes()
            await fill(cache, 200, 4096 - 200)  # the index's arrays exactly full (they double from 16 rows)
            await store.flush()  # committed: each entry's encoded answer is let go
            gc.collect()
            after, reported = tracemalloc.take_snapshot(), cache.memory_bytes() - reported_before
            mapped = mapped_resident([a for i in cache._indexes.values() for a in index_arrays(i)]) - mapped_before
        finally:
            tracemalloc.stop()
        # What the cache's own code allocated and still holds (not the test's requests, nor whatever
        # else the process did meanwhile), and the pages of its large arrays, which are mappings of their
        # own that tracemalloc does not see.
        through_cache = [tracemalloc.Filter(True, "*/p402_tui/cache/*")]
        grown = sum(s.size_diff for s in after.filter_traces(through_cache).compare_to(
            before.filter_traces(through_cache), "filename")) + mapped
        assert mapped > 3896 * 1024 * 4  # the vectors (1,024 floats a row here) are in a mapping
        assert cache.info()["memory_bytes"] == cache.memory_bytes()
        assert reported > 3896 * 500  # the vectors alone are 1 kB an entry
        assert abs(reported - grown) <= 0.15 * grown, (reported, grown)

        # Evicting gives it back, as far as the count goes.
        held = cache.memory_bytes()
        await cache.clear()
        assert cache.memory_bytes() - planes_bytes() < held / 20  # the planes are the process's, kept for later codes
        assert cache._held == 0
    finally:
        await cache.aclose()
        await store.aclose()


class RandomEmbedder(HashedNgramEmbedder):
    """Random unit vectors, too short for a projection (under 2 * PROJECT_DIMS): the index codes its rows."""

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@linux_only
async def test_a_coded_index_counts_the_hyperplanes_of_its_codes(tmp_path):
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=RandomEmbedder(dim=120))
    try:
        await fill(cache, 0, 2048)  # the arrays full, one row short of the size the index codes its rows at
        await store.flush()
        (index,) = cache._indexes.values()
        assert not index.coded and index.needs_codes(index.size + 1)
        _PLANES.clear()  # made again, under tracemalloc, as the index first codes its rows
        gc.collect()
        tracemalloc.start()
        try:
            before, reported_before = tracemalloc.take_snapshot(), cache.memory_bytes()
            cache._code(index)  # as a lookup would have it done once an insert took the index past 2,048 rows
            for _ in range(500):
                if index.coded:
                    break
                await asyncio.sleep(0.01)
            gc.collect()
            after, reported = tracemalloc.take_snapshot(), cache.memory_bytes() - reported_before
        finally:
            tracemalloc.stop()
        assert index.coded
        through_cache = [tracemalloc.Filter(True, "*/p402_tui/cache/*")]
        grown = sum(s.size_diff for s in after.filter_traces(through_cache).compare_to(
            before.filter_traces(through_cache), "filename"))
        # The codes go in an array the index already holds (and counts); what coding keeps besides is the planes.
        assert planes_bytes() == 120 * 384 * 4
        assert abs(reported - grown) <= 0.02 * grown, (reported, grown)
    finally:
        await cache.aclose()
        await store.aclose()


async def test_a_cache_in_use_runs_what_a_large_index_needs_and_makes_its_planes_early(tmp_path):
    """The first index to pass 16,384 rows would bring numpy's code for buckets and sign codes into
    memory then: RSS that no entry holds (bench/soak.py rss_batches). Once an index has 1,024 rows it
    is run on a worker instead, and the hyperplanes of its vector size are made; an idle cache does
    neither."""
    _PLANES.clear()
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=RandomEmbedder(dim=72))
    try:
        await fill(cache, 0, 1000)
        assert not _PLANES
        await fill(cache, 1000, 30)  # past 1,024: the next lookup's batch sends the warm-up
        for _ in range(500):
            if _PLANES:
                break
            await asyncio.sleep(0.01)
        (index,) = cache._indexes.values()
        assert set(_PLANES) == {72} and not index.coded and not index.buckets
        assert cache.memory_bytes() >= planes_bytes() == 72 * 384 * 4
    finally:
        await cache.aclose()
        await store.aclose()


def small_objects_bytes() -> int | None:
    """What CPython's small-object allocator has handed out, in its own count (None elsewhere)."""
    if not hasattr(sys, "_debugmallocstats"):
        return None
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        found = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", out.read().decode())
    return int(found.group(1).replace(",", "")) if found else None


async def test_each_entry_is_counted_as_the_allocator_hands_its_objects_out(tmp_path):
    # An entry's strings and numbers are small objects, each given a multiple of 16 bytes: counted by
    # their sizes alone, 10,000 entries took 0.9 MB more than the cache said.
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 4200)  # past the index's projection and sign codes, short of its next doubling
        await store.flush()
        gc.collect()
        before, held = small_objects_bytes(), cache._held
        if before is None:
            pytest.skip("not CPython's allocator")
        count = 3000
        for i in range(4200, 4200 + count):
            request = ChatRequest(messages=[{"role": "user", "content": f"question {i}: what is {i} plus {i % 7}?"}])
            assert await cache.lookup(request, None, "default", request_id=f"r{i}") is None
            assert cache.insert(f"r{i}", ChatResponse(provider="openai", model="gpt-4o-mini", content=f"{i}"), i * 1e-7)
        await store.flush()
        gc.collect()
        allocated = small_objects_bytes() - before
        # The LRU table's nodes (32 bytes each) are small objects too; `memory_bytes` has them from its size.
        counted = cache._held - held + 32 * count
        # Within 1 %: what else the loop allocates meanwhile (its own bookkeeping, a few kB) is in the
        # allocator's count too.
        assert 0.99 * allocated <= counted <= 1.1 * allocated, (allocated / count, counted / count)
    finally:
        await cache.aclose()
        await store.aclose()


async def test_an_answer_is_counted_until_its_row_is_committed(tmp_path):
    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 1)
        await store.flush()
        committed = cache.memory_bytes()
        request = ChatRequest(messages=[{"role": "user", "content": "a question with a long answer"}])
        assert await cache.lookup(request, None, "default", request_id="long") is None
        assert cache.insert("long", ChatResponse(provider="openai", model="gpt-4o", content="x" * 100_000), 0.0)
        assert cache.memory_bytes() - committed > 100_000
        await store.flush()
        assert cache.memory_bytes() - committed < 20_000
    finally:
        await cache.aclose()
        await store.aclose()


def unit_rows(count: int, dim: int = 256) -> np.ndarray:
    rows = np.random.default_rng(4).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@linux_only
def test_an_index_holds_pages_only_for_its_rows_and_a_grow_gives_the_old_arrays_back():
    rows = unit_rows(6000)
    index = VectorIndex(256)
    for i in range(4096):
        index.add(rows[i], i)
    snapshot = index.snapshot()
    old = weakref.ref(mapping_of(index.vectors))
    index.add(rows[4096], 4096)  # doubles to 8,192 rows: 8 MB of vectors
    assert index.vectors.shape[0] == 8192
    assert old() is not None  # a search's snapshot still reads the old rows
    del snapshot
    gc.collect()
    assert old() is None  # and then they are unmapped, not kept in a heap

    def measured() -> int:
        arrays = index_arrays(index)
        mapped = [a for a in arrays if mapping_of(a) is not None]
        unmapped = [a for a in arrays if mapping_of(a) is None]
        return mapped_resident(mapped) + sum(a.nbytes for a in unmapped) + sys.getsizeof(index.owners)

    # The capacity past the last row is not resident: not even the rest of a 2 MB page.
    assert resident_by_start()[index.vectors.ctypes.data] == -(-4097 * 1024 // 4096) * 4096
    assert index.memory_bytes == measured()
    for i in range(4097, 6000):
        index.add(rows[i], i)
    for row in range(5999, 5000, -1):  # the rows removed stay written: counted until a grow drops them
        index.remove(row)
    assert index.memory_bytes == measured()


async def test_an_entry_hit_for_the_first_time_is_counted_with_its_own_last_hit(tmp_path):
    # Until its first hit an entry's last_hit is its created float, one object counted once.
    from p402_tui.cache.semantic import _held_by

    store = await open_store(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    try:
        await fill(cache, 0, 20)
        await store.flush()  # each entry's payload is let go once its row is written: not during the hits below
        assert cache._held == _held_by(cache._entries)
        before = cache._held
        request = ChatRequest(messages=[{"role": "user", "content": "question 3: what is 3 plus 3?"}])
        for _ in range(2):
            assert await cache.lookup(request, None, "default", request_id="hit") is not None
        assert cache._held == _held_by(cache._entries) > before
    finally:
        await cache.aclose()
        await store.aclose()


def test_the_static_stage_counts_its_word_memo(static_table, monkeypatch):
    from p402_tui.cache import embedders

    embedder = embedders.StaticEmbedder(static_table.pieces, static_table.table, static_table.name)
    embedder.encode(["warm up the tokenizer"])
    gc.collect()
    tracemalloc.start()
    try:
        before, counted_before = tracemalloc.take_snapshot(), embedder.memory_bytes
        # New words in every prompt, as a gateway's traffic has (names, numbers, ids); some split in parts.
        embedder.encode([f"ticket {i}: is order-{i * 7} for customer{i} shipped?" for i in range(3000)])
        gc.collect()
        after, counted = tracemalloc.take_snapshot(), embedder.memory_bytes - counted_before
    finally:
        tracemalloc.stop()
    here = [tracemalloc.Filter(True, embedders.__file__)]
    grown = sum(s.size_diff for s in after.filter_traces(here).compare_to(before.filter_traces(here), "filename"))
    assert counted > 3000 * 100  # three new words a prompt
    assert abs(counted - grown) <= 0.15 * grown, (counted, grown)
    # Full, the memo starts again: so does its count.
    monkeypatch.setattr(embedders, "MEMO_WORDS", len(embedder._pieces))
    held = embedder.memory_bytes
    embedder.encode(["zyzzyva"])
    assert embedder.memory_bytes < held / 100
