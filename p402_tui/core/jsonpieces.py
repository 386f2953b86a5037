"""JSON with long strings decoded a piece at a time.

A JSON parser is one C call that holds the GIL until the whole document is built: 8 MB of
prompt take 20 to 40 ms, and on a pool thread that is still 20 to 40 ms in which the event
loop cannot run (six such bodies at once stalled `/health` past 150 ms). `loads` cuts every
string literal longer than `LONG` bytes out of the body, decodes it in pieces of `PIECE`
bytes (the GIL is free between them), parses what is left, and puts the strings back. What
it returns is what `json_value(body)` returns.

What is left is still parsed in one call, so a body made of a million small values holds the
GIL as long as it ever did; only long strings, the usual way a body gets large, are cut.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from .types import json_value

LONG = 256 * 1024  # a string literal longer than this (in bytes, as sent) is decoded in pieces
PIECE = 256 * 1024  # about 1 ms of decoding each
_SHIFTS = 8  # a cut moved this far still inside an escape or a character: the literal is malformed
_LOW_ESCAPE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")  # the second half of a surrogate pair
_BACKSLASH = 0x5C


def loads(body: bytes) -> Any:
    """`body` parsed as JSON (ValueError when it is not), no single step holding the GIL for long."""
    spans = long_literals(body, LONG) if len(body) > LONG else []
    if not spans:
        return json_value(body)
    nonce = secrets.token_hex(8)  # a placeholder no client can send on purpose
    parts: list[bytes] = []
    texts: dict[str, str] = {}
    at = 0
    for index, (start, end) in enumerate(spans):
        mark = f"p402-long-{nonce}-{index}"
        texts[mark] = decode_literal(body, start, end, PIECE)
        parts += (body[at:start], mark.encode())
        at = end
    parts.append(body[at:])
    return _put_back(json_value(b"".join(parts)), texts)


def long_literals(body: bytes, longer_than: int) -> list[tuple[int, int]]:
    """Where the string literals longer than `longer_than` bytes lie: (first, past last) byte of
    each one's content, between its quotes. Outside strings JSON has no quote, so the quotes pair up."""
    spans: list[tuple[int, int]] = []
    find = body.find
    at = 0
    while (start := find(b'"', at)) != -1:
        end = start
        while True:
            end = find(b'"', end + 1)
            if end == -1:
                return spans  # unterminated: the parse of what is left says so
            if not _escaped(body, end):
                break
        if end - start - 1 > longer_than:
            spans.append((start + 1, end))
        at = end + 1
    return spans


def decode_literal(body: bytes, start: int, end: int, piece: int) -> str:
    """The string literal whose content is `body[start:end]`, decoded `piece` bytes at a time.

    A cut that falls inside an escape (`\\u00e9`) or a UTF-8 character makes that piece fail, so
    the cut moves on a byte and is tried again; one between the halves of a surrogate pair moves past the second.
    """
    out: list[str] = []
    while start < end:
        cut = min(start + piece, end)
        text = _piece(body[start:cut])
        for _ in range(_SHIFTS):
            if text is not None or cut == end:
                break
            cut += 1
            text = _piece(body[start:cut])
        if text is None:
            raise ValueError(f"invalid string literal between bytes {start} and {end}")
        if text and "\ud800" <= text[-1] <= "\udbff" and _LOW_ESCAPE.match(body, cut, end):
            pair = _piece(body[cut - 6 : cut + 6])  # the two halves of one character, decoded together
            if pair is None:
                raise ValueError(f"invalid string literal between bytes {start} and {end}")
            text = text[:-1] + pair
            cut += 6
        out.append(text)
        start = cut
    return "".join(out)


def _piece(raw: bytes) -> str | None:
    try:
        value = json_value(b'"' + raw + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _escaped(body: bytes, at: int) -> bool:
    """Whether the quote at `at` is escaped: an odd run of backslashes before it."""
    run = 0
    while at - run > 0 and body[at - run - 1] == _BACKSLASH:
        run += 1
    return run % 2 == 1


def _put_back(value: Any, texts: dict[str, str]) -> Any:
    """`value` with each placeholder (a value or a key) replaced by its string; no recursion, as
    JSON may nest deeper than Python's stack."""
    if isinstance(value, str):
        return texts.get(value, value)
    left = len(texts)
    stack = [value]
    while stack and left:
        node = stack.pop()
        if isinstance(node, dict) and any(key in texts for key in node):  # rebuilt, so the keys keep their order
            items = list(node.items())
            node.clear()
            node.update((texts.get(key, key), item) for key, item in items)
            left -= sum(key in texts for key, _ in items)
        for place, item in enumerate(node) if isinstance(node, list) else node.items():
            if isinstance(item, str):
                if item in texts:
                    node[place] = texts[item]  # a value replaced in place: the dict's size does not change
                    left -= 1
            elif isinstance(item, (list, dict)):
                stack.append(item)
    return value


__all__ = ["LONG", "PIECE", "decode_literal", "loads", "long_literals"]
