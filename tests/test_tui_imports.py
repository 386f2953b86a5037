"""Import hygiene: the core never imports Textual, and neither does anything `p402 serve` runs.

Checked in a fresh interpreter, since this test process has Textual loaded already.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import p402_tui

HEADLESS_PACKAGES = ("core", "providers", "store", "cache", "service", "client", "gateway", "sim")
HEADLESS_MODULES = ("p402_tui.cli", "p402_tui.runtime", "p402_tui.tui.state", "p402_tui.tui.format", "p402_tui.tui.source")


def modules_of(package: str) -> list[str]:
    path = [f"{p402_tui.__path__[0]}/{package}"]
    return [f"p402_tui.{package}.{m.name}" for m in pkgutil.iter_modules(path)]


def textual_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip())  # a printed list of module names


def test_core_never_imports_textual():
    modules = modules_of("core")
    assert "p402_tui.core.orchestrator" in modules
    assert textual_after_importing(modules) == []


def test_what_p402_serve_runs_never_imports_textual():
    """The gateway, the runtime, the store, the adapters, the simulator and its traffic generator."""
    modules = [m for package in HEADLESS_PACKAGES for m in modules_of(package)] + list(HEADLESS_MODULES)
    assert "p402_tui.sim.traffic" in modules
    assert textual_after_importing(modules) == []



# What a report command has no use for: the decision codec's numpy and the router, the key policy, the gateway,
# the providers' HTTP, the cache's embedders and Textual. Each costs start-up time on every run of the command.
NOT_FOR_REPORTS = ("numpy", "textual", "httpx", "starlette", "uvicorn", "p402_tui.core.router",
                   "p402_tui.store.decisions", "p402_tui.core.events", "p402_tui.policy", "p402_tui.gateway", "p402_tui.cache",
                   "p402_tui.providers", "p402_tui.runtime")  # fmt: skip


def test_report_commands_import_only_what_they_use(tmp_path):
    db = tmp_path / "empty.db"
    made = subprocess.run([sys.executable, "-m", "p402_tui", "db", "migrate", "--db", str(db)], check=False,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    for command in (["spend", "--period", "30d", "--by", "model"], ["recommendations"], ["sessions", "list"]):
        code = (
            "import sys\n"
            "from p402_tui.cli import main\n"
            f"code = main({[*command, '--db', str(db), '--json']!r})\n"
            f"print(sorted({{m.partition('.')[0] if not m.startswith('p402_tui') else m for m in sys.modules}}))\n"
            "sys.exit(code)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = eval(done.stdout.strip().splitlines()[-1])
        assert "p402_tui.store.analytics" in loaded or command[0] == "sessions"  # the report did run
        assert [m for m in loaded if m.startswith(NOT_FOR_REPORTS)] == [], command
