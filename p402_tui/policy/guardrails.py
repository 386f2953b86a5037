"""Guardrails: redact what must not leave (built-in detectors and named regexes), deny what must not pass.

Only rule names and counts come out of here; the matched text is replaced and never kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..core.types import ChatRequest


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


# (name, pattern, check on the match); the order matters: a card number is not also a phone number.
BUILTINS: dict[str, tuple[str, Callable[[str], bool] | None]] = {
    "secret": (
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|p402-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+)",
        None,
    ),
    "email": (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", None),
    "card": (r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", lambda m: luhn_ok(_digits(m))),
    "iban": (r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", iban_ok),
    "phone": (r"(?<![\w+])\+?\(?\d[\d ().-]{6,}\d(?!\w)", lambda m: 7 <= len(_digits(m)) <= 15 and not _DATE.fullmatch(m)),
}


@dataclass(slots=True)
class Redactor:
    rules: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]]

    def text(self, text: str, counts: Counter[str]) -> str:
        for name, pattern, check in self.rules:
            def replace(match: re.Match[str], name: str = name, check=check) -> str:
                if check is not None and not check(match.group(0)):
                    return match.group(0)
                counts[name] += 1
                return f"[REDACTED:{name}]"

            text = pattern.sub(replace, text)
        return text

    def request(self, request: ChatRequest) -> Counter[str]:
        """Redact every message's text in place; how often each rule fired."""
        counts: Counter[str] = Counter()
        for message in request.messages:
            if isinstance(message.content, str):
                message.content = self.text(message.content, counts)
            elif message.content:
                for part in message.content:
                    if part.text:
                        part.text = self.text(part.text, counts)
        return counts


def compile_redactor(rules: list[str]) -> Redactor:
    """Each rule a built-in's name or `NAME=REGEX`; ValueError for anything else."""
    compiled = []
    for rule in rules:
        if rule in BUILTINS:
            pattern, check = BUILTINS[rule]
            compiled.append((rule, re.compile(pattern), check))
            continue
        name, sep, regex = rule.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][\w.-]{0,39}", name) or name in BUILTINS:
            raise ValueError(
                f"redact rule {rule!r}: use one of {', '.join(BUILTINS)}, or NAME=REGEX with a new name"
            )
        try:
            compiled.append((name, re.compile(regex), None))
        except re.error as error:
            raise ValueError(f"redact rule {name!r}: {error}") from None
    # Built-ins keep their own order whatever order they were listed in; custom rules run after them.
    order = {name: i for i, name in enumerate(BUILTINS)}
    compiled.sort(key=lambda rule: order.get(rule[0], len(order)))
    return Redactor(compiled)


def denied(request: ChatRequest, deny: list[tuple[str, re.Pattern[str]]]) -> str | None:
    """The first deny rule a message's text matches, or None."""
    for message in request.messages:
        text = message.text()
        for name, pattern in deny:
            if pattern.search(text):
                return name
    return None
