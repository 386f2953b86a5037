"""Hand freed heap memory back to the operating system (glibc's `malloc_trim`).

Start-up parses, reads and builds several megabytes it frees again (the cache's rows, tokenizer
files, tiktoken's blob check); glibc keeps such pages mapped after a large free has raised its
trim threshold, so an idle gateway would carry them in its RSS. A no-op where libc has no
`malloc_trim` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; whether this libc could."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
