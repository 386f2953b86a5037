"""MiniLM in a process of its own, for the cache's confirmations (`ConfirmerProcess`).

A confirmation is a MiniLM pass over two short texts: about 16 ms of CPU, and some two hundred numpy
calls, each of which lets go of the GIL and takes it back. In the gateway's process every take-back
waits for the event loop to yield, so the loop was interrupted a couple of hundred times per
confirmation, and the pass's CPU counted against the loop's one core. Here the pass runs on the
other core and the worker thread that asked waits on a pipe, holding nothing.

The child is `python -m p402_tui.cache.minilm_child FOLDER`, started at the first confirmation (its
weights are read there, not in the gateway). It reads requests from stdin and answers on stdout, one
frame each way: a 4-byte big-endian length, then the body. A request's body is the texts as a JSON
list; an answer's is `ok` and the float32 rows, or `no` and the error's text. It exits when its stdin
closes, which happens when the gateway closes the cache or dies: no child outlives its gateway. A
child that died is started again at the next confirmation.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..core.errors import ConfigError

_LENGTH = struct.Struct(">I")
START_TIMEOUT_S = 60.0  # importing numpy and reading 90 MB of weights, on a busy machine


def one_core_env() -> dict[str, str]:
    """This process's environment for a child that runs numpy: its BLAS on one thread, beside the gateway."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _write_frame(stream: IO[bytes], body: bytes) -> None:
    stream.write(_LENGTH.pack(len(body)) + body)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """A frame's body, or None at the end of the stream."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


class ConfirmerProcess:
    """An embedder run by a child process (`embedders.MiniLMProcess`: MiniLM's), answered over a pipe."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dim = 0
        self._lock = threading.Lock()  # one request on the pipe at a time (the cache has two workers)
        self._child: subprocess.Popen[bytes] | None = None
        with self._lock:
            self._start()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._start()
            child = self._child
            assert child is not None and child.stdin is not None and child.stdout is not None
            try:
                _write_frame(child.stdin, json.dumps(texts).encode("utf-8"))
                answer = _read_frame(child.stdout)
            except (BrokenPipeError, OSError):
                answer = None
            if answer is None:
                self._stop(child)
                raise ConfigError(f"the MiniLM confirmer process exited (code {child.poll()}); it starts again at the next confirmation")
        if answer[:2] != b"ok":
            raise ConfigError(f"the MiniLM confirmer failed: {answer[2:].decode('utf-8', 'replace')}")
        return np.frombuffer(answer, np.float32, offset=2).reshape(len(texts), self.dim)

    def close(self) -> None:
        """End the child (it exits once its stdin closes)."""
        with self._lock:
            if self._child is not None:
                self._stop(self._child)

    def _start(self) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "p402_tui.cache.minilm_child", str(self.folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=one_core_env(),
        )
        assert child.stdout is not None
        # The first frame says whether the weights loaded: their dimension, or why not.
        timer = threading.Timer(START_TIMEOUT_S, child.kill)
        timer.start()
        try:
            ready = _read_frame(child.stdout)
        finally:
            timer.cancel()
        if ready is None or ready[:2] != b"ok":
            self._stop(child)
            reason = ready[2:].decode("utf-8", "replace") if ready else f"it exited with code {child.poll()}"
            raise ConfigError(f"cannot start the MiniLM confirmer: {reason}")
        self.dim = int(ready[2:])
        self._child = child

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if self._child is child:
            self._child = None

    def __del__(self) -> None:
        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.kill()


def serve(load: Callable[[], Any], requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child's loop: `load()` the model, then answer until `requests` ends."""
    try:
        model = load()
    except Exception as error:  # noqa: BLE001 - told to the parent, which raises it
        _write_frame(answers, b"no" + str(error).encode("utf-8"))
        return
    _write_frame(answers, b"ok" + str(model.dim).encode("ascii"))
    while (body := _read_frame(requests)) is not None:
        try:
            texts: Any = json.loads(body)
            vectors = model.encode([str(text) for text in texts])
        except Exception as error:  # noqa: BLE001 - one bad request, not the process
            _write_frame(answers, b"no" + f"{type(error).__name__}: {error}".encode())
            continue
        _write_frame(answers, b"ok" + np.ascontiguousarray(vectors, np.float32).tobytes())
