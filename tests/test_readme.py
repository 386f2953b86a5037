"""Every shell, Python and TOML block of the README runs, against `p402 serve --sim` and `p402 sim`.

Blocks run in the README's order in one environment (a session a shell block creates is the one a
Python block names), with the README's placeholders filled in. A block that cannot run here is in
SKIPPED with the reason; an entry that matches no block fails, so the list cannot go stale.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, run_cli, sim_config_text
from helpers import Served

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNABLE = ("sh", "python", "toml")
# A block's first line (as in the README) -> why it does not run here.
SKIPPED = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/p402 demo": (
        "installs from PyPI and runs the whole suite; .ci/run runs this test line on a clean clone"
    ),
    "p402                              # the console, providers from your config": (
        "opens the console, a full-screen TUI; tests/test_tui*.py drive it headless"
    ),
    "p402 serve --sim --port 4020 &": "installs schemathesis from PyPI and fuzzes for minutes",
}
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(README.read_text()) if lang in RUNNABLE]


def block_id(block: tuple[str, str]) -> str:
    lang, body = block
    return f"{lang}: {body.splitlines()[0][:50]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory, catalog):
    """A gateway (`p402 serve --sim`) with a key in force, a `p402 sim`, a config pointing at it, one database."""
    home = tmp_path_factory.mktemp("readme")
    db = home / "p402.db"
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "p402_tui.cli", "sim", "--port", str(sim_port), "--no-latency"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    served = None
    try:
        assert sim.stdout.readline().startswith("p402 sim:")
        config = home / "config.toml"
        config.write_text(sim_config_text(f"http://127.0.0.1:{sim_port}", catalog))
        variables = {"P402_CONFIG": str(config), "P402_DB": str(db)}
        key = run_cli("keys", "create", "--name", "readme-test", "--json", env=variables)
        assert key.returncode == 0, key.stderr
        served = Served("--sim", "--db", str(db))
        secret = json.loads(key.stdout)["key"]
        spare = free_port()  # for a block that starts a gateway of its own
        yield {
            "variables": variables,
            "home": home,
            # What the README leaves for the reader to fill in.
            "placeholders": {
                "http://127.0.0.1:4020": served.url,
                "http://host:4020": served.url,
                "127.0.0.1:P/": f"127.0.0.1:{sim_port}/",
                "p402-...": secret,
                "--key K": f"--key {secret}",
                "--port 4031": f"--port {spare}",
                "127.0.0.1:4031": f"127.0.0.1:{spare}",
            },
        }
    finally:
        if served is not None:
            served.stop()
        sim.terminate()
        sim.wait(10)


def fill(text: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        text = text.replace(placeholder, value)
    return text


def test_the_skip_list_names_only_blocks_that_exist():
    firsts = {body.splitlines()[0] for _, body in blocks()}
    assert set(SKIPPED) <= firsts, set(SKIPPED) - firsts


def test_ci_runs_the_readme_test_line():
    """The README's second quick-start line is what CI runs."""
    quick_start = next(body for lang, body in blocks() if lang == "sh")
    test_line = quick_start.splitlines()[1]
    assert "pytest" in test_line and test_line in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("block", blocks(), ids=block_id)
def test_readme_block_runs(block, env):
    lang, body = block
    first = body.splitlines()[0]
    if first in SKIPPED:
        pytest.skip(SKIPPED[first])
    text = fill(body, env["placeholders"])
    process_env = {**os.environ, **env["variables"]}
    if lang == "toml":
        config = env["home"] / "example.toml"
        config.write_text(text)
        run = subprocess.run([sys.executable, "-m", "p402_tui.cli", "--config", str(config), "providers", "--json"],
                             capture_output=True, text=True, cwd=ROOT, env=process_env, timeout=60)
    elif lang == "python":
        run = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, cwd=ROOT,
                             env=process_env, timeout=60)
    else:
        # `p402` is this checkout's code, whatever is on PATH; every line must succeed. A command of its own
        # rather than a shell function, so `p402 serve ... &` makes `$!` the server itself.
        bin_dir = env["home"] / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "p402").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m p402_tui.cli "$@"\n')
        (bin_dir / "p402").chmod(0o755)
        script = f"set -euo pipefail\n{text}"
        process_env["PATH"] = f"{bin_dir}{os.pathsep}{process_env['PATH']}"
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=env["home"],
                             env=process_env, timeout=120)
    assert run.returncode == 0, f"{block_id(block)}\n{text}\nstdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
