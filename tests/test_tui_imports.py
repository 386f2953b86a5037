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

