"""Large request bodies: parsed with their long strings decoded in pieces (core/jsonpieces.py), to the same
values the whole-document parser gives, and without one step holding the GIL (and so the event loop) for long."""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import pytest

from p402_tui.core import jsonpieces
from p402_tui.core.types import ChatRequest, json_value
from p402_tui.gateway.bodies import validate_json
from p402_tui.gateway.errors import GatewayError

PROMPT = ("All work and no play makes a very long prompt indeed. " * 150_000)[:8_000_000]
ALPHABET = ["a", " ", '"', "\\", "\n", "é", "✓", "😀", "\ud83d", "\udc00", "/", "\t", "z", "\u2028"]


def _text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(size))


def _encode(doc: object, ascii_only: bool) -> bytes:
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Literals over 16 bytes cut, in pieces of a few bytes: every escape, character and pair gets split somewhere."""
    monkeypatch.setattr(jsonpieces, "LONG", 16)

    def use(piece: int) -> None:
        monkeypatch.setattr(jsonpieces, "PIECE", piece)

    return use


@pytest.mark.parametrize("piece", [1, 3, 7, 64])
def test_pieces_decode_to_what_the_whole_parse_gives(tiny_pieces, piece):
    tiny_pieces(piece)
    rng = random.Random(piece)
    for _ in range(200):
        text = _text(rng, rng.randint(0, 400))
        doc = {"k": text, "list": [text[::-1], 1, {"x": text[:40], text[:30] or "key": [text, None]}]}
        for ascii_only in (True, False):
            try:
                body = _encode(doc, ascii_only)
                expected = json_value(body)
            except (UnicodeEncodeError, ValueError):
                continue  # a lone surrogate written raw: not JSON either way
            assert jsonpieces.loads(body) == expected


def test_a_body_the_whole_parse_refuses_is_refused_in_pieces_too(tiny_pieces):
    rng = random.Random(7)
    refused = 0
    for _ in range(2000):
        tiny_pieces(rng.choice([1, 3, 8, 50]))
        body = bytearray(_encode({"k": [_text(rng, 200)], "x": _text(rng, 50)}, rng.random() < 0.5))
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.choice(b'"\\u0\x01\xc3\xa9{}[],:e')
        try:
            expected = json_value(bytes(body))
        except ValueError:
            refused += 1
            with pytest.raises(ValueError):
                jsonpieces.loads(bytes(body))
        else:
            assert jsonpieces.loads(bytes(body)) == expected
    assert refused > 500


def test_only_long_literals_are_cut_and_a_placeholder_cannot_be_sent():
    body = json.dumps({"short": "p402-long-0000000000000000-0", "long": "x" * (jsonpieces.LONG + 1)}).encode()
    spans = jsonpieces.long_literals(body, jsonpieces.LONG)
    assert len(spans) == 1 and body[spans[0][0] : spans[0][1]] == b"x" * (jsonpieces.LONG + 1)
    assert jsonpieces.loads(body) == json.loads(body)


def test_a_large_chat_body_validates_as_a_small_one_does():
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
                       "temperature": 1, "p402": {"tag": "big"}}).encode()  # fmt: skip
    large = validate_json(ChatRequest, body)
    assert large == ChatRequest.model_validate_json(body)
    assert large.messages[0].content == PROMPT
    bad = body.replace(b'"max_tokens": 16', b'"max_tokens": 0')
    with pytest.raises(GatewayError) as refused:
        validate_json(ChatRequest, bad)
    assert refused.value.status == 400 and refused.value.param == "max_tokens"
    with pytest.raises(GatewayError) as broken:
        validate_json(ChatRequest, body[:-2])
    assert broken.value.code == "invalid_json"


def _longest_c_call_ms(work) -> float:
    """The most thread CPU time one C function call took while `work()` ran (on this thread): how long
    the GIL stayed held, for calls that do not release it."""
    longest = [0.0]
    started: list[float] = []

    def profile(frame, event, arg):
        if event == "c_call":
            started.append(time.thread_time())
        elif event in ("c_return", "c_exception") and started:
            longest[0] = max(longest[0], time.thread_time() - started.pop())

    result: list[object] = []
    thread = threading.Thread(target=lambda: (sys.setprofile(profile), result.append(work()), sys.setprofile(None)))
    thread.start()
    thread.join()
    assert result
    return longest[0] * 1000


def test_an_8_mb_prompt_is_parsed_without_holding_the_gil_for_long():
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}).encode()
    whole = min(_longest_c_call_ms(lambda: ChatRequest.model_validate_json(body)) for _ in range(2))
    pieces = min(_longest_c_call_ms(lambda: validate_json(ChatRequest, body)) for _ in range(2))
    # The whole parse is one call of 5-40 ms (CPU, by machine); in pieces the longest is joining the
    # decoded text, a copy of 8 MB. Thread CPU time, so a busy machine does not move it much.
    assert pieces < 10, (pieces, whole)
