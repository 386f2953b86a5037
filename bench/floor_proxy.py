"""The least a Python gateway on our stack can cost: uvicorn in, our HTTP client out, no logic.

A reference target for bench/gateway.py, not a product. It reads the body, maps
`provider/model` to the upstream's model name, calls the simulator through one
pool of the client the adapters use (p402_tui/providers/http.py) and passes the
answer back: a whole answer re-encoded, a stream's bytes as they arrive. No routing, no parsing of chunks, no ledger, no metrics.
It is served exactly as `p402 serve` is (uvicorn with httptools on uvloop, the
same switches), so what P402 costs beyond it is P402's own work.

    python bench/floor_proxy.py UPSTREAM_BASE_URL PORT
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
import uvicorn

from p402_tui.providers import http

JSON = [(b"content-type", b"application/json")]
EVENTS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def make_app(upstream: str) -> Any:
    target = http.target(upstream.rstrip("/") + "/openai/v1/chat/completions")
    client = http.Client({"Authorization": "Bearer sim-key"})
    timeouts = http.Timeouts(connect=30, read=30)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = orjson.loads(body)
        request["model"] = request["model"].split("/", 1)[-1]
        response = await client.request("POST", target, orjson.dumps(request), timeouts=timeouts)
        try:
            if request.get("stream"):
                await send({"type": "http.response.start", "status": response.status, "headers": EVENTS})
                async for data in response:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                answer = orjson.loads(await response.read())
                await send({"type": "http.response.start", "status": response.status, "headers": JSON})
                await send({"type": "http.response.body", "body": orjson.dumps(answer)})
        finally:
            response.close()

    return app


def main() -> None:
    upstream, port = sys.argv[1], int(sys.argv[2])
    config = uvicorn.Config(
        make_app(upstream), host="127.0.0.1", port=port, log_level="warning", access_log=False,
        proxy_headers=False, lifespan="off", server_header=False, loop="uvloop", http="httptools",
    )  # fmt: skip
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
