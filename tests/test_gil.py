"""A gateway process hands the GIL back to a waiting thread within 0.2 ms (`gateway/gil.py`), not 5."""

from __future__ import annotations

import statistics
import sys
import threading
import time

from p402_tui.cache.semantic import _normalise_text
from p402_tui.gateway import gil

PROMPT = ("All work and no play makes a very long prompt indeed. " * 150_000)[:4_000_000]


def _handoffs(interval_s: float, count: int = 40) -> float:
    """The median time a short wait takes (each lets go of the GIL, as the loop does at each wait for I/O)
    while two other threads key a long prompt in pieces: the wait itself, then the GIL's return."""
    old = sys.getswitchinterval()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            _normalise_text(PROMPT)

    workers = [threading.Thread(target=busy) for _ in range(2)]  # always another one ready for the GIL
    gil.share_promptly(interval_s)
    waits = []
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.05)
        for _ in range(count):
            began = time.perf_counter()
            time.sleep(0.0001)
            waits.append(time.perf_counter() - began)
        return statistics.median(waits)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        sys.setswitchinterval(old)


def test_a_waiting_thread_gets_the_gil_back_sooner():
    # On an idle machine about 0.2 ms against 5; on one busy with other work every thread also waits for a
    # core, now and then long enough to hide the difference, so the best of three interleaved tries counts.
    tries = [(_handoffs(gil.SWITCH_INTERVAL_S), _handoffs(0.005)) for _ in range(3)]
    assert min(prompt / default for prompt, default in tries) < 0.6, tries
