"""bench/gateway.py's lean testbed, briefly: wrk drives, nginx answers, one and two workers on SQLite and
on a real PostgreSQL in one run, and the c1 slices that set the two engines side by side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from postgres import find_bin_dir

ROOT = Path(__file__).resolve().parent.parent


def _missing() -> str | None:
    """Why this machine cannot run the lean testbed, or None. Under CI the bench installs wrk and nginx."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (no initdb; Debian: apt-get install postgresql)"
    if os.environ.get("CI"):
        return None
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    absent = [tool for tool in ("wrk", "nginx") if not shutil.which(tool, path=sbin)]
    return f"{' and '.join(absent)} not installed (Debian: apt-get install wrk nginx-light)" if absent else None


def test_wrk_and_nginx_measure_workers_and_engines_in_one_run(tmp_path):
    why = _missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI needs the lean testbed: {why}")
    if why:
        pytest.skip(why)
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "bench" / "gateway.py"), "--driver", "wrk", "--upstream", "static",
            "--modes", "plain", "--concurrency", "1,64", "--duration", "1", "--skip-litellm", "--skip-floor",
            "--variants", "p402,p402_workers2,p402_postgres", "--c1-slices", "2", "--slice-duration", "1",
            "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    bed = result["testbed"]
    assert (bed["driver"], bed["upstream"]) == ("wrk", "static"), bed  # no fallback to the Python testbed
    assert bed["wrk_version"].startswith("wrk") and "nginx" in bed["nginx_version"]
    for key in ("plain_c1", "plain_c64"):
        row = result["runs"][key]
        assert set(row) == {"direct", "p402", "p402_workers2", "p402_postgres", "added"}
        for name in ("p402", "p402_workers2", "p402_postgres"):
            measured = row[name]
            assert measured["requests"] > 0 and measured["errors"] == 0, (key, name, measured)
            assert measured["latency_ms"]["p50"] > row["direct"]["latency_ms"]["p50"]
            assert measured["server_cpu_ms_per_request"] > 0
            # The testbed's own share, counted beside the gateway's: nginx and wrk are each a small part of it.
            assert 0 < measured["upstream_cpu_ms_per_request"] < measured["server_cpu_ms_per_request"]
            assert 0 < measured["client_cpu_ms_per_request"] < measured["server_cpu_ms_per_request"]
        assert row["p402_postgres"]["store_cpu_ms_per_request"] > 0  # the PostgreSQL server's backends
    assert result["verdict"]["p402_workers2"]["plain_c64_rps_vs_one_worker>=1.6x"] > 0

    slices = result["c1_slices"]
    assert len(slices["p402"]["p50_ms"]) == len(slices["p402_postgres"]["p50_ms"]) == 2
    assert slices["p402"]["errors"] == slices["p402_postgres"]["errors"] == 0
    diff = slices["postgres_minus_sqlite_p50_ms"]
    assert diff["per_slice"] == [round(pg - sq, 3) for pg, sq in zip(slices["p402_postgres"]["p50_ms"],
                                                                      slices["p402"]["p50_ms"])]
    assert diff["median_of_medians"] == round(slices["p402_postgres"]["median_p50_ms"] - slices["p402"]["median_p50_ms"], 3)
    assert result["verdict"]["p402_postgres"]["plain_c1_sliced_p50_ms_over_sqlite<=0.3"] == diff["median_of_medians"]
