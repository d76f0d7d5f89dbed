"""The CGMiner-style JSON API on TCP 4028, through pyasic's socket clients.

One request per connection: the firmware answers one JSON document and closes the
socket, so nothing is kept (no budget) and nothing is sent again (pyasic's socket
client does not resend either): a read that fails is one failed reading.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from pyasic.errors import APIError

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)


def no_answer(address: str, what: str) -> DeviceUnreachable:
    """pyasic's socket client returns ``{}`` when the connection is refused."""
    return DeviceUnreachable(f"{address}: {what}: no answer (connection refused or empty reply)")


async def rpc_call(address: str, what: str, reply: Awaitable[Any]) -> dict[str, Any]:
    """The reply of one pyasic socket call (``miner.rpc.stats()``); ``{}`` is no answer."""
    data = await reply
    # pyasic's socket client answers a refused connection with {} instead of raising.
    if not data:
        raise no_answer(address, what)
    return dict(data)


# (API class, commands) -> the commands pyasic's check keeps.
_CHECKED: dict[tuple[type[Any], tuple[str, ...]], list[str]] = {}


async def multicommand(rpc: Any, commands: tuple[str, ...]) -> dict[str, Any]:
    """pyasic's ``multicommand`` with its command check done once per API class.

    pyasic (0.79.0, ``pyasic/rpc/base.py:117``) checks every name against
    ``get_commands()`` on each call: ``dir()`` of the API object, twice, and a
    ``getattr`` per attribute, ~0.3 ms, as much as the rest of a reading. The
    answer depends only on the class, so it is kept; the rest is pyasic's own
    (``base.py:118-125``): one ``+``-joined command, the split fallback on
    ``APIError``, the ``multicommand`` mark.
    """
    key = (type(rpc), commands)
    valid = _CHECKED.get(key)
    if valid is None:
        valid = _CHECKED[key] = list(rpc._check_commands(*commands))
    try:
        data: dict[str, Any] = await rpc.send_command("+".join(valid), allow_warning=True)
    except APIError:
        data = await rpc._send_split_multicommand(*commands)
    data["multicommand"] = True
    return data


def translate_rpc(address: str, what: str, e: BaseException, *, control: bool) -> DeviceError:
    """Map an error of pyasic's socket / HTTP clients to one of ours (not raised here).

    pyasic's RPC clients raise ``APIError`` both for an answer that is not JSON
    ("Decode Error ...") and for a well-formed error status (``STATUS: E``). The
    first is a broken device; the second is the firmware declining: a refusal
    for a control call, a fault for a read (a read that is declined is useless).
    """
    cause: BaseException = e.__cause__ if isinstance(e, APIError) and e.__cause__ else e
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, ConnectionRefusedError):
        return DeviceUnreachable(msg)
    if isinstance(cause, ConnectionError):
        return DeviceFaulted(msg)
    if isinstance(cause, OSError):
        return DeviceUnreachable(msg)
    if isinstance(cause, APIError):
        text = str(cause)
        if "Decode Error" in text or "decode error" in text:
            return DeviceFaulted(msg)
        if "No data" in text or "Connection refused" in text:
            return DeviceUnreachable(msg)
        low = text.lower()
        # Whatsminer: wrong admin password ("check token err") or write API
        # disabled ("can't access write cmd"); LuxOS / VNish: bad session.
        if any(w in low for w in ("token", "write cmd", "unauthor", "session", "password")):
            return DevicePermissionError(msg)
        return DeviceRefused(msg) if control else DeviceFaulted(msg)
    if isinstance(cause, (LookupError, TypeError, ValueError, AttributeError)):
        return DeviceFaulted(f"{address}: {what}: missing or malformed field: {cause!r}")
    return DeviceFaulted(msg)
