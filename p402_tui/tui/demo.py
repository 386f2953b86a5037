"""`p402 demo`: until the console lands, say what it will be."""

from __future__ import annotations

import argparse

PLAN = """P402 Console demo (offline, simulated providers)

The full demo starts the simulator in-process, points all 12 providers at it and
opens the Textual console: live router decisions, provider health, spend and
sessions, while a traffic generator and scripted incidents keep it moving.
"""


def run(args: argparse.Namespace) -> int:
    print(PLAN)
    return 0
