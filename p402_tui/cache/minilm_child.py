"""`python -m p402_tui.cache.minilm_child FOLDER`: the MiniLM confirmer's child process (`confirmer.serve`)."""

import functools
import sys
from pathlib import Path

from ..core import gil
from .confirmer import serve
from .embedders import MiniLMEmbedder

if __name__ == "__main__":
    gil.background()  # a confirmation's 16 ms of CPU waits for the gateway's loop, not the other way round
    # The parent checked the weights' hash before starting this.
    serve(functools.partial(MiniLMEmbedder.load, Path(sys.argv[1]), verified=True), sys.stdin.buffer, sys.stdout.buffer)
