"""Wire helpers every simulated firmware's JSON socket API (port 4028) uses."""

from __future__ import annotations

import asyncio
import contextlib
import json


async def read_json_request(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    """Read one JSON request: clients send one object and wait, so read until it parses
    (or the peer closes, or ``timeout_s`` passes) and return the bytes read."""
    raw = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                raw += chunk
                try:
                    json.loads(raw)
                    break
                except ValueError:
                    continue
    return raw
