"""`python -m p402_tui.cache.static_child FOLDER SHA256`: distils the cache's static table into the user
cache dir for `embedders.build_static_table`, then exits. It stops between two batches, leaving no table,
when its stdin closes: the gateway closing or dying, so no build outlives its gateway."""

import os
import sys
import threading
from pathlib import Path

from ..core import gil
from .embedders import STOPPED_EXIT, BuildStopped, save_static_table


def _stop_at_end_of_stdin(stop: threading.Event) -> None:
    # The bare file descriptor: a daemon thread blocked in sys.stdin's buffered read aborts the
    # interpreter's exit (it cannot take the buffer's lock).
    while os.read(0, 4096):
        pass
    stop.set()


if __name__ == "__main__":
    gil.background()  # a minute and a half of CPU that waits for the gateway, not the other way round
    stop = threading.Event()
    threading.Thread(target=_stop_at_end_of_stdin, args=(stop,), daemon=True).start()
    try:
        save_static_table(Path(sys.argv[1]), sys.argv[2], stop)
    except (BuildStopped, KeyboardInterrupt):  # Ctrl-C reaches the whole process group, this child too
        sys.exit(STOPPED_EXIT)
    except Exception as error:  # noqa: BLE001 - one line for the parent to report, not a traceback
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
