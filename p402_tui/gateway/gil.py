"""How soon the event loop gets the GIL back from a busy thread, in a gateway process.

A thread that wants the GIL waits `sys.getswitchinterval()` (5 ms by default) before it asks the
holder to let go. The loop lets go at every wait for I/O, so each of its steps waits that long
again while the pool threads work through a large request's pieces, and the ledger writer's
thread waits as long after each statement: six 8 MB prompts at once kept `/health` waiting
50-180 ms, in steps of 5. At 1 ms a busy thread is asked sooner; the cost is a switch at most
every millisecond while two threads want the GIL, and none while one does.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.001


def share_promptly(interval_s: float = SWITCH_INTERVAL_S) -> None:
    sys.setswitchinterval(interval_s)
