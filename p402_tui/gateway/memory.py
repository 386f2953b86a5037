"""Giving memory back to the OS after large requests, where the C library is glibc.

glibc keeps what Python frees in its arenas, one per thread that allocated, and
returns little of it: one 8 MB prompt parsed, counted and embedded left the
process ~1 GB larger for good. `limit_arenas` caps the arenas (to one) and pins glibc's
thresholds (`p402 serve` sets both once, before its threads start); `Trimmer.soon` runs `malloc_trim(0)` shortly
after a large request, off the event loop, at most one at a time; `trim_when_idle`
runs it once a burst of requests is over, so what the burst freed is not kept.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Callable

log = logging.getLogger("p402.gateway")

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# One arena, the main one, for every thread: malloc_trim shrinks the free top of the main arena only. With
# a second one, what the workers freed at its top (a bucket training's 3 MB sample, sign codes' products)
# stayed resident under the trim threshold: 1.4 to 2.5 MB of 10,000 cached requests' RSS, changing from run
# to run (bench/soak.py rss_batches; 0.0 in two runs with one arena).
ARENAS = 1
# glibc raises both thresholds each time a large mapped block is freed (up to 32 and 64 MB). Once the cache's
# index had doubled past 16 MB, the sign codes and bucket training of its next doubling (a 24 MB product at
# 16k rows) were carved from the worker thread's arena, and an arena's free top is kept below the trim
# threshold and never returned by malloc_trim: 16 MB resident after 10,000 requests (bench/soak.py
# rss_batches). Pinned: a block from 4 MB on (numpy asks for huge pages from there) is a mapping of its own,
# unmapped when freed, and an arena gives back what its top holds past 4 MB. Smaller blocks, a search's
# per-batch products among them, stay on the heaps and are reused.
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 4 << 20
TRIM_AFTER_S = 0.2  # a large request's memory is freed once its answer has gone; trim a moment later
# Idle for this long after serving requests: trimmed. Between 0.5 and 1 s after the last answer; a trim
# walks the arenas (a few ms) on a thread, while nothing is in flight.
IDLE_CHECK_S = 0.5

_libc: ctypes.CDLL | None = None
if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        _libc = None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process and pin its mmap and trim thresholds; False where that is
    not glibc."""
    if _libc is None:
        return False
    return all(_libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, arenas), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def trim() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


async def trim_when_idle(activity: Callable[[], tuple[int, int]], every_s: float = IDLE_CHECK_S) -> None:
    """Forever: `malloc_trim` once after each busy spell. `activity()` gives (requests begun, requests in
    flight); a spell is over when none began over a whole check and none is in flight."""
    if _libc is None:
        return
    trimmed = seen = activity()[0]
    while True:
        await asyncio.sleep(every_s)
        begun, in_flight = activity()
        if begun == seen and begun != trimmed and not in_flight:
            await asyncio.to_thread(trim)
            trimmed = begun
        seen = begun


class Trimmer:
    """`soon()` after each large request; one trim runs `TRIM_AFTER_S` later, on a thread."""

    def __init__(self) -> None:
        self._pending: asyncio.TimerHandle | None = None
        self.trims = 0

    def soon(self) -> None:
        if _libc is None or self._pending is not None:
            return
        self._pending = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._start)

    def _start(self) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(trim))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._pending = None
        self.trims += 1
        if task.exception() is not None:
            log.warning("malloc_trim failed: %s", task.exception())
