"""glibc's mmap and trim thresholds, pinned by `p402 serve`: a worker's large temporaries go back to the OS."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from p402_tui.gateway import memory

pytestmark = pytest.mark.skipif(memory._libc is None, reason="the thresholds are glibc's")

ROOT = Path(__file__).resolve().parent.parent

# One worker thread (one arena) makes an index-sized product twice; in between, a 16 MB mapped block is
# freed, as an index's doubling frees its old rows, which raises glibc's thresholds unless they are pinned.
JOB = textwrap.dedent("""
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from p402_tui.gateway import memory

    if sys.argv[1] == "pinned":
        assert memory.limit_arenas()

    def rss_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    def job():
        rows = np.ones((8192, 256), np.float32)
        product = rows @ np.ones((256, 384), np.float32)  # 12 MB, as sign codes made for 8,192 rows at once
        del rows, product

    pool = ThreadPoolExecutor(1)
    pool.submit(job).result()  # the worker's arena and BLAS buffers exist
    freed = np.ones(4 << 20, np.float32)
    del freed
    memory.trim()
    before = rss_mb()
    pool.submit(job).result()
    memory.trim()
    print(json.dumps({"kept_mb": rss_mb() - before}))
""")


def kept_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", JOB, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["kept_mb"]


def test_a_workers_large_temporaries_are_given_back_once_the_thresholds_are_pinned():
    # glibc's own way: the raised thresholds put 20 MB of temporaries in the worker's arena, whose free
    # top neither free() (under the raised trim threshold) nor malloc_trim (not the main arena) gives back.
    assert kept_mb("dynamic") > 15
    assert kept_mb("pinned") < 2


# A worker's temporaries under the trim threshold (a bucket training's 3 MB sample and products, at 16,384
# rows), freed at the top of its heap.
SMALL_JOB = textwrap.dedent("""
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from p402_tui.gateway import memory

    assert memory.limit_arenas(int(sys.argv[1]))

    def rss_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    def job():
        sample = np.ones((3072, 256), np.float32)  # 3 MB: from the heap, under the 4 MB mmap threshold
        del sample

    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: np.ones(16, np.float32)).result()  # the worker has allocated once
    memory.trim()
    before = rss_mb()
    pool.submit(job).result()
    memory.trim()
    print(json.dumps({"kept_mb": rss_mb() - before}))
""")


@pytest.mark.parametrize("arenas, kept", [(2, (2.5, 4)), (memory.ARENAS, (-1, 0.5))])
def test_with_one_arena_what_a_worker_frees_under_the_trim_threshold_goes_back(arenas, kept):
    # A second arena's free top is kept below the trim threshold (malloc_trim shrinks only the main
    # arena's): 1.4 to 2.5 MB of 10,000 cached requests' RSS, varying run to run (bench/soak.py
    # rss_batches). One arena, the main one, gives it back at the next trim.
    out = subprocess.run([sys.executable, "-c", SMALL_JOB, str(arenas)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    low, high = kept
    assert low < json.loads(out.stdout.strip().splitlines()[-1])["kept_mb"] < high
