"""What state a session is in: one type for the store, the gateway, the CLI and the console.

Kept free of heavy imports, so the CLI's parser can offer the choices without loading pydantic.
"""

from __future__ import annotations

from typing import Literal

SessionStatus = Literal["active", "paused", "closed"]  # a paused or closed session takes no requests
SESSION_STATUSES: tuple[str, ...] = SessionStatus.__args__  # type: ignore[attr-defined]
