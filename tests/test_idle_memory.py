"""What an idle `p402 serve --sim` holds: no optional engine loaded, freed start-up memory handed back."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from p402_tui.core.malloc import release_free_memory
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

# Each is imported only where its feature is configured, or when a request first needs it (`tokenizers`:
# the cache's first non-ASCII word or first candidate to confirm): an idle default gateway pays for none.
NOT_AT_IDLE = ("psycopg", "psycopg_pool", "opentelemetry", "p402_tui.fleet", "p402_tui.store.postgres",
               "p402_tui.telemetry.otel", "tokenizers", "websockets")

PROBE = textwrap.dedent("""
    import json, os, sys, threading, time, urllib.request
    import p402_tui.core.malloc as malloc
    calls = []
    real = malloc.release_free_memory
    malloc.release_free_memory = lambda: calls.append(1) or real()
    port, db = sys.argv[1], sys.argv[2]

    def probe():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/cache", timeout=2) as r:
                    if json.loads(r.read()).get("embedder") and len(calls) >= 2:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        print(json.dumps({"modules": sorted(sys.modules), "trims": len(calls)}), flush=True)
        os._exit(0)

    threading.Thread(target=probe, daemon=True).start()
    from p402_tui.cli import main
    main(["serve", "--sim", "--port", port, "--db", db])
""")


def test_release_free_memory_reaches_glibc():
    assert release_free_memory() is (sys.platform == "linux")


def test_an_idle_serve_loads_no_optional_engine_and_trims_after_start_up(tmp_path, static_table):
    out = subprocess.run([sys.executable, "-c", PROBE, str(free_port()), str(tmp_path / "p.db")],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = [m for m in seen["modules"] if m.split(".")[0] in NOT_AT_IDLE or m in NOT_AT_IDLE
              or any(m.startswith(name + ".") for name in NOT_AT_IDLE)]
    assert loaded == []
    assert seen["trims"] >= 2  # tiktoken's warm-up and the cache's load each hand back what they freed
