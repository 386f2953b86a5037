"""How the threads of a gateway process share the GIL and the cores.

A thread that wants the GIL waits `sys.getswitchinterval()` (5 ms by default) before it asks the
holder to let go. The loop lets go at every wait for I/O, so each of its steps waits that long
again while the pool threads work through a large request's pieces: six 8 MB prompts at once kept
`/health` waiting 50-180 ms, in steps of 5. A gateway asks after 1 ms; the cost is a switch at most
every millisecond while two threads want the GIL, and none while one does.

While the ledger writer commits a batch it asks after 0.2 ms. It takes the GIL back after each
statement it sends, some eight a batch, and a gateway serving a thousand requests a second on two
cores kept it waiting 5-20 ms a statement at 1 ms, so a batch that should take a few ms took up to
120, and a `kill -9` lost rows answered that long before (bench/soak.py kill9: windows of 10 to
117 ms at 1 ms, 0 to 12 ms at 0.2, side by side). 0.2 ms for good cost 3 to 10 % of the default
configuration's requests a second (the loop and the cache's worker switch five times as often);
only while a batch commits, that cost is paid a fraction of the time.

A worker woken by the loop (the cache's lookups are handed over a batch at a time) is woken on the
loop's own core when the other one is busy, and Linux runs a thread that has slept ahead of the one
that woke it: the loop is taken off the core holding the GIL, and the worker it woke can do nothing
but wait for it. `background()` marks such a thread SCHED_BATCH: it runs when the loop's time slice
ends, not at once. On two busy cores, a loop handing work to such a thread got 24 to 70 % more
done than with a normal one.

The ledger writer is the other way round: what a `kill -9` loses is what it has not yet committed, so
it must run as soon as it can. On two saturated cores (the gateway, the load and the simulator) it
gave up the GIL some hundred times a batch, and after each it waited in the run queue behind the
other processes: half of a batch's time was spent there (/proc schedstat), batches of 5 ms of CPU
took 30 to 120 ms, and kill9 lost rows answered up to 115 ms before. `promptly()` makes it a
real-time thread at the lowest priority (SCHED_FIFO 1), which runs the moment it wakes: run-queue
waits fell to 1 % of a batch, the slowest batch from 86-120 ms to 23 ms, at the same requests a
second. Linux allows it to root with CAP_SYS_NICE (a container's root lacks it: docker's
`--cap-add SYS_NICE`) or under an RLIMIT_RTPRIO of at least 1 (systemd's LimitRTPRIO=1, unless
RestrictRealtime=yes); elsewhere the writer runs as any thread. A real-time thread runs until it
sleeps, so the writer asks only where it has a core to itself besides the loop's (two or more), and
drains a backlog as any thread (`ordinarily()`): back to back, its batches would keep the loop off
that core, on one core for as long as the backlog lasted. What real-time costs otherwise: while it
runs SQLite's C code without the GIL, the loop cannot run on its core either; one saturated worker
served about 4 % fewer requests a second with it (four interleaved pairs, inside their spread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

PR_SET_NAME = 15  # prctl's option (linux/prctl.h)
SWITCH_INTERVAL_S = 0.001
WRITING_INTERVAL_S = 0.0002

_lock = threading.Lock()
_writing = 0
_base: float | None = None  # set by share_promptly: None leaves the interpreter's interval alone


def share_promptly(interval_s: float = SWITCH_INTERVAL_S) -> None:
    """Ask for the GIL after `interval_s`, and after `WRITING_INTERVAL_S` while a `writing()` block runs."""
    global _base
    with _lock:
        _base = interval_s
        sys.setswitchinterval(WRITING_INTERVAL_S if _writing else interval_s)


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """A store writer's batch: threads ask for the GIL sooner until it ends (nested and concurrent ones too)."""
    global _writing
    with _lock:
        _writing += 1
        if _base is not None and _writing == 1:
            sys.setswitchinterval(WRITING_INTERVAL_S)
    try:
        yield
    finally:
        with _lock:
            _writing -= 1
            if _base is not None and _writing == 0:
                sys.setswitchinterval(_base)


def promptly() -> str | None:
    """Called on a thread that must run as soon as it wakes (the store's writer): it becomes real-time
    (SCHED_FIFO at the lowest priority; threads and processes it starts do not). None once it is, else why not."""
    try:
        if len(os.sched_getaffinity(0)) < 2:
            return "one CPU: a real-time thread would only keep the loop off it"
        _schedule(os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 1)
    except AttributeError:
        return "no real-time scheduling here (Linux only)"
    except OSError as error:
        return f"not allowed ({error.strerror}): it needs CAP_SYS_NICE or an RLIMIT_RTPRIO of 1"
    return None


def ordinarily() -> bool:
    """Called on a thread `promptly()` made real-time: whether it runs as any thread again. The reset-on-fork
    flag stays: clearing it needs CAP_SYS_NICE, which a thread real-time by its RLIMIT_RTPRIO lacks."""
    try:
        _schedule(os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, 0)
    except (AttributeError, OSError):
        return False
    return True


def _schedule(policy: int, priority: int) -> None:
    os.sched_setscheduler(threading.get_native_id(), policy, os.sched_param(priority))


def named() -> None:
    """Called on a thread: the OS shows it by its Python name (`ps -L`, `top -H`, first 15 characters), where
    Python 3.11 shows every thread as "python": which one is real-time, which one burns a core."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_NAME, threading.current_thread().name.encode("utf-8", "replace")[:15], 0, 0, 0)
    except (AttributeError, OSError):  # not Linux (no prctl): the thread keeps its name there
        pass


def background() -> None:
    """Called on a worker thread: it no longer takes the core from the thread that wakes it (Linux)."""
    named()
    try:
        _schedule(os.SCHED_BATCH, 0)
    except (AttributeError, OSError):  # no such policy here, or not allowed: the thread runs as before
        pass
