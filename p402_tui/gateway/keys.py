"""`/api/v2/keys`: the admin's routes for gateway keys (the role check is `scoping.role_refusal`).

What the CLI's `p402 keys` does, plus this gateway's live figures for each key:
requests in the last minute and refusals in the last hour.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request



class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "user", "viewer"] = "user"
    policy: dict[str, Any] = Field(default_factory=dict)


class KeyPatch(BaseModel):
    """Only what is sent changes; `policy` is merged into the key's, a field sent as null goes."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    role: Literal["admin", "user", "viewer"] | None = None
    policy: dict[str, Any] | None = None


def _live(gateway: Any, key: dict[str, Any]) -> dict[str, Any]:
    key["live"] = gateway.policy.live(key["id"])
    return key


async def list_keys(gateway: Any, request: Request) -> Any:
    from .app import json_response

    data = [_live(gateway, key) for key in await gateway.service.keys()]
    return json_response({"object": "list", "data": data})


async def create_key(gateway: Any, request: Request) -> Any:
    from .app import json_response, read_json
    from .bodies import validate

    body = validate(KeyCreate, await read_json(request, gateway.max_body))
    record, secret = await gateway.service.create_key(body.name, role=body.role, policy=body.policy)
    return json_response({**record, "key": secret}, status=201)


async def show_key(gateway: Any, request: Request) -> Any:
    from .app import json_response

    return json_response(_live(gateway, await gateway.service.key(request.path_params["key_id"])))


async def key_requests(gateway: Any, request: Request) -> Any:
    from .app import json_response

    data = await gateway.service.key_requests(request.path_params["key_id"])
    return json_response({"object": "list", "data": data})


async def update_key(gateway: Any, request: Request) -> Any:
    from .app import json_response, read_json
    from .bodies import validate

    body = validate(KeyPatch, await read_json(request, gateway.max_body))
    changed = await gateway.service.update_key(
        request.path_params["key_id"], name=body.name, role=body.role, policy=body.policy
    )
    return json_response(_live(gateway, changed))


async def revoke_key(gateway: Any, request: Request) -> Any:
    from .app import json_response

    return json_response(await gateway.service.revoke_key(request.path_params["key_id"]))
