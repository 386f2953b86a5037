"""A gateway process hands the GIL back to a waiting thread within 1 ms (`gateway/gil.py`), not 5."""

from __future__ import annotations

import sys
import threading
import time

from p402_tui.cache.semantic import _normalise_text
from p402_tui.gateway import gil

PROMPT = ("All work and no play makes a very long prompt indeed. " * 150_000)[:4_000_000]


def _handoffs(interval_s: float, count: int = 30) -> float:
    """Seconds for `count` short waits (each lets go of the GIL) while a thread keys a long prompt in pieces."""
    old = sys.getswitchinterval()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            _normalise_text(PROMPT)

    worker = threading.Thread(target=busy)
    gil.share_promptly(interval_s)
    try:
        worker.start()
        time.sleep(0.05)
        began = time.perf_counter()
        for _ in range(count):
            time.sleep(0.0001)  # as the loop does at each wait for I/O
        return time.perf_counter() - began
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(old)


def test_a_waiting_thread_gets_the_gil_back_sooner():
    default = min(_handoffs(0.005) for _ in range(2))
    prompt = min(_handoffs(gil.SWITCH_INTERVAL_S) for _ in range(2))
    assert default >= 30 * 0.004  # each of the 30 waits for the busy thread's 5 ms
    assert prompt < default / 2, (prompt, default)
