"""Gateway keys on the request path: `Authorization: Bearer p402-...` (or `x-api-key: p402-...`).

Keys are checked only when they are in force: once any key was made, or always
when the gateway listens beyond loopback. The store is asked at most once per
token and per half second (answers are remembered briefly), so a key made, changed
or revoked with `p402 keys` in another process takes effect within `ttl_s`; one
made, changed or revoked in this process, at once (`forget`). Whether any key exists
is asked again in the background once the answer is half that old, so that with no
key in force a request under steady traffic never waits for the store (on PostgreSQL,
a round trip). Tokens are looked up
by their SHA-256 and compared with `hmac.compare_digest`: never in the clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import Scope

from .errors import GatewayError

log = logging.getLogger("p402.gateway")

if TYPE_CHECKING:
    from ..service import Service


class KeyBackend(Protocol):
    async def verify(self, token: str) -> dict[str, Any] | None:
        """The record (id, name, role, policy) of the active key `token` is, or None."""

    async def key_count(self) -> int:
        """How many keys were ever made, revoked ones included."""


class StoreKeys:
    """Keys as the store keeps them (hashes only), through the keys use case."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def verify(self, token: str) -> dict[str, Any] | None:
        return await self.service.verify_key(token)

    async def key_count(self) -> int:
        return await self.service.key_count()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere


def bearer(scope: Scope) -> str | None:
    """The key in `Authorization: Bearer`, else in `x-api-key` (as Anthropic's SDKs send it)."""
    api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip() or None
    return api_key


class GatewayAuth:
    """Decides per request whether a key is needed and whose it is."""

    MAX_REMEMBERED = 4096

    def __init__(
        self, backend: KeyBackend | None, *, required: bool, ttl_s: float = 0.5,
        describe: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.backend = backend
        # What a verified key's record becomes for the request path (the gateway's: `policy.KeyInfo`).
        self.describe: Callable[[dict[str, Any]], Any] = describe or (lambda record: record)
        self.required = required  # listening beyond loopback: keys always, even if none exist yet
        self.ttl_s = ttl_s
        self._keys_exist = False
        self._keys_checked_at = float("-inf")
        self._generation = 0  # bumped by `forget`: an answer asked for before it is not kept
        self._refresh: asyncio.Task[None] | None = None
        self._remembered: dict[bytes, tuple[Any, float]] = {}

    def forget(self) -> None:
        """Drop what was remembered: the next request asks the store again."""
        self._remembered.clear()
        self._keys_checked_at = float("-inf")
        self._generation += 1
        self._refresh = None  # one asked before this may not see the change: the next request asks anew

    async def any_keys(self) -> bool:
        return self.backend is not None and await self.backend.key_count() > 0

    async def enforced(self) -> bool:
        if self.required:
            return True
        if self.backend is None:
            return False
        age = time.monotonic() - self._keys_checked_at
        loop = asyncio.get_running_loop()
        if self._refresh is not None and self._refresh.get_loop() is not loop:
            self._refresh = None  # asked on a loop that has gone (a test client runs one per call): never answers
        if age > self.ttl_s / 2 and self._refresh is None:
            # One question at a time, however many requests find the answer old.
            task = self._refresh = loop.create_task(self._count_keys(), name="p402-key-count")
            task.add_done_callback(self._counted)
        if age > self.ttl_s:
            await asyncio.shield(self._refresh)  # type: ignore[arg-type]  # its error (the store away) is ours
        return self._keys_exist

    async def _count_keys(self) -> None:
        asked_at, generation = time.monotonic(), self._generation
        exist = await self.backend.key_count() > 0  # type: ignore[union-attr]
        if generation == self._generation:
            self._keys_exist, self._keys_checked_at = exist, asked_at

    def _counted(self, task: asyncio.Task[None]) -> None:
        if self._refresh is task:
            self._refresh = None
        if not task.cancelled() and task.exception() is not None:  # asked in the background: the next request
            log.debug("gateway keys: counting failed: %s", task.exception())  # past ttl_s gets the error

    async def check(self, scope: Scope) -> Any:
        """The key behind the request, described (None when keys are not in force); a 401 when it has none."""
        if not await self.enforced():
            return None
        token = bearer(scope)
        if token is None:
            raise GatewayError(401, "this gateway needs a key: send Authorization: Bearer <key>", code="missing_api_key")
        key = await self._verify(token)
        if key is None:
            raise GatewayError(401, "the gateway key is not valid or has been revoked", code="invalid_api_key")
        return key

    async def _verify(self, token: str) -> Any:
        if self.backend is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        remembered = self._remembered.get(digest)
        if remembered is not None and now - remembered[1] <= self.ttl_s:
            return remembered[0]
        record = await self.backend.verify(token)
        key = None if record is None else self.describe(record)
        if len(self._remembered) >= self.MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[digest] = (key, now)
        return key
