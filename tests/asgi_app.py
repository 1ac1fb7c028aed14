"""A minimal ASGI app for the gunicorn + uvicorn drain-hook recipe (tests/test_hook_recipes.py).

`GET /?delay=S` answers after S seconds (a request in flight); `X-Backend` names the worker
process, so a test can tell an old worker from a new one. No framework: uvicorn speaks HTTP.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = parse_qs(scope.get("query_string", b"").decode())
    delay = float(query.get("delay", ["0"])[0])
    if delay > 0:
        await asyncio.sleep(min(delay, 60.0))
    body = f"hello from worker {os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-backend", str(os.getpid()).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
