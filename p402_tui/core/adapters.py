"""What the core calls on a provider, and the registry of the wire families that provide it.

The core defines the adapter it calls; `providers` implements one per wire family and
registers it here when the package is imported (as harlequin's adapters register
themselves), so nothing in the core imports a provider module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import ResolvedProvider
from .errors import ProviderError
from .types import ChatChunk, ChatRequest, ChatResponse, Embeddings


@dataclass(slots=True)
class HealthResult:
    ok: bool
    latency_ms: float
    detail: str = ""


class Adapter(Protocol):
    """One provider's API, in our request and answer types."""

    async def complete(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse: ...

    def stream_batches(self, request: ChatRequest, *, model: str | None = None) -> AsyncIterator[list[ChatChunk]]:
        """The answer as it arrives, the chunks of one upstream read together."""
        ...

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings: ...

    async def health_check(self) -> HealthResult: ...

    async def aclose(self) -> None: ...


# (provider, transport or None) -> adapter. The transport is opaque here: whatever the
# providers package's adapters send their requests through (None: they pick their own).
AdapterFactory = Callable[[ResolvedProvider, Any], Adapter]

# Wire family (a catalog provider's `wire`) -> what makes its adapter.
WIRE_FAMILIES: dict[str, AdapterFactory] = {}


def register_wire_family(wire: str, factory: AdapterFactory) -> None:
    WIRE_FAMILIES[wire] = factory


def make_adapter(provider: ResolvedProvider, transport: Any = None) -> Adapter:
    """The adapter for a provider, from its wire family's registered factory, calling through `transport`."""
    wire = provider.spec.wire
    factory = WIRE_FAMILIES.get(wire)
    if factory is None:
        known = ", ".join(sorted(WIRE_FAMILIES)) or "none (p402_tui.providers registers the built-in ones)"
        raise ProviderError(f"no adapter for wire family {wire!r}; registered: {known}", provider=provider.id)
    return factory(provider, transport)
