"""How soon the event loop gets the GIL back from a busy thread, in a gateway process.

A thread that wants the GIL waits `sys.getswitchinterval()` (5 ms by default) before it asks the
holder to let go. The loop lets go at every wait for I/O, so each of its steps waits that long
again while the pool threads work through a large request's pieces, and the ledger writer's
thread waits as long after each statement: six 8 MB prompts at once kept `/health` waiting
50-180 ms, in steps of 5. At 1 ms a busy thread is asked sooner; the cost is a switch at most
every millisecond while two threads want the GIL, and none while one does.

0.2 ms, not 1: the ledger writer takes the GIL back after each statement it sends, some eight a
batch, and a gateway serving a thousand requests a second on two cores kept it waiting 5-20 ms a
statement, so a batch that should have taken a few ms took up to 120, and a `kill -9` lost rows
answered that long before (bench/soak.py kill9: windows of 10 to 117 ms at 1 ms, 0 to 12 ms at
0.2, side by side). The cost: more switches while the cache's workers want the GIL too, 3 to 10 %
fewer requests a second in the default configuration (four pairs side by side; cache off within the
host's drift).
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0002


def share_promptly(interval_s: float = SWITCH_INTERVAL_S) -> None:
    sys.setswitchinterval(interval_s)
