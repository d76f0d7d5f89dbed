"""Kept HTTP: one aiohttp connection per miner (VNish), the digest challenge kept (Antminer).

The rules of ``drivers.transport.rules`` for HTTP/1.1: a connection is kept between
requests while ``KEPT_CONNECTIONS`` allows; a read cut as a kept connection closed
under it goes out once more on a fresh one (aiohttp does this itself for a GET on a
reused connection; ``once_more_if_dropped`` for a read sent as a POST, such as a
login); a write is never sent again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import weakref
from typing import Any

import aiohttp
import httpx
import yarl
from pyasic import settings

from siteagent.domain.errors import DeviceError, DeviceFaulted, DeviceUnreachable
from siteagent.drivers.transport.rpc import translate_rpc
from siteagent.drivers.transport.rules import KEPT_CONNECTIONS, KeepBudget, once_more_if_dropped

# A kept web connection idle this long (s) is closed by us rather than reused. It must
# outlast the time between two readings of one miner, which is the telemetry interval
# only while a sweep fits in it: at 15 s, 10,000 simulated miners (a sweep of 20-40 s
# on 2 shared cores) found every connection expired and paid a new one per reading
# on top of the kept client's cost: 35.1 s of CPU a sweep, against 23.3 s at 120 s
# and 33.4 s with pyasic's own client (one connection per request; all three with
# httpx). A miner that closes an idle connection first costs nothing extra: aiohttp
# drops a pooled connection whose peer has closed, and a read cut as it goes out is
# sent again.
KEEPALIVE_EXPIRY_S = 120.0


def dropped(e: BaseException) -> bool:
    """Whether a request failed as a connection closed under it (idle timeout, web
    server restart, reboot) rather than as no connection made at all."""
    return isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and not (
        isinstance(e, aiohttp.ClientConnectorError)
    )


def _never(e: BaseException) -> bool:
    return False


@functools.cache
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """pyasic's per-request timeout (httpx's ``timeout=``: connect, pool and each read)."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)


class KeptSession:
    """One miner's HTTP/1.1 connection, kept alive between requests (aiohttp).

    One ``aiohttp.ClientSession`` made on first use (in the running loop) and closed
    by ``aclose``. Its pool holds one connection (requests of one miner queue for
    it; a miner's web server is small), kept for ``KEEPALIVE_EXPIRY_S`` between
    requests while the budget allows, and otherwise closed after each request.
    aiohttp closes a connection whose exchange did not finish (a timeout, a
    cancel, a cut) rather than pooling it, so a late answer is never read as the
    next request's. An httpx request cost 0.75 ms of CPU on a kept connection
    against 0.14-0.33 ms for aiohttp (2,000 simulated miners), hence aiohttp.
    """

    def __init__(self, budget: KeepBudget = KEPT_CONNECTIONS) -> None:
        self.budget = budget
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: weakref.finalize[Any, Any] | None = None

    @property
    def keeps_connection(self) -> bool:
        """Whether this miner's connection is kept between requests."""
        return self._release is not None and self._release.alive

    def _http(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client
        if self._client is not None:
            # A connection belongs to the loop that opened it, gone by now: close its
            # sockets without that loop (the synchronous part of the connector's close).
            connector = self._client.connector
            self._client.detach()
            if connector is not None:
                connector._close()
        self._drop_budget()
        kept = self.budget.take()
        if kept:
            self._release = weakref.finalize(self, self.budget.give)
        connector = aiohttp.TCPConnector(
            limit=1, force_close=not kept, keepalive_timeout=KEEPALIVE_EXPIRY_S if kept else None
        )
        # The miners' web APIs answer tokens in headers, never cookies.
        self._client = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._loop = loop
        return self._client

    def _drop_budget(self) -> None:
        if self._release is not None:
            self._release()  # runs once: gives the kept connection back
            self._release = None

    async def aclose(self) -> None:
        """Close the kept connection and give its slot back (a later request opens anew)."""
        client, self._client, self._loop = self._client, None, None
        self._drop_budget()
        if client is not None:
            await client.close()

    async def _exchange(
        self,
        method: str,
        url: yarl.URL,
        headers: dict[str, str] | None,
        json_body: Any,
        limit_s: float,
    ) -> tuple[int, bytes]:
        async with self._http().request(
            method, url, headers=headers, json=json_body, timeout=_timeout(limit_s)
        ) as response:
            return response.status, await response.read()

    async def request(
        self,
        method: str,
        url: yarl.URL,
        *,
        write: bool,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        limit_s: float = 5.0,
    ) -> tuple[int, bytes]:
        """One exchange: the status and the whole body (``limit_s``: connect, each read).

        ``write``: the request changes the miner, so it is sent once whatever happens.
        """
        # aiohttp sends a GET again by itself when a reused connection fails under
        # it: the same rule, so it is not applied twice.
        return await once_more_if_dropped(
            lambda: self._exchange(method, url, headers, json_body, limit_s),
            write=write,
            dropped=_never if method == "GET" else dropped,
        )


class KeptDigest:
    """pyasic's stock-Antminer web GETs (identification, readings), the digest challenge kept.

    pyasic (0.79.0) makes a new ``httpx.DigestAuth`` on every web call
    (``pyasic/web/antminer.py:63``, in ``AntminerModernWebAPI.send_command``), so
    every call is two HTTP exchanges: a 401 carrying the challenge, then the
    authorised request. httpx's ``DigestAuth`` answers a known challenge at once
    (and takes a new one when the miner sends a 401 again, as for a stale nonce
    or a changed password), so a reading keeps one per miner: one exchange
    instead of two. Everything else is pyasic's ``send_command``
    (``web/antminer.py:42-83``): the URL, the client and its transport (a
    connection per request: nothing held, so no budget), the error dicts.
    Writes, and the conf read before a write, stay pyasic's own. Reads only: a
    failed one is not sent again (pyasic's web client does not resend either).
    """

    def __init__(self, web: Any) -> None:
        self.web = web
        self._auth: httpx.DigestAuth | None = None
        self._creds: tuple[str, str] | None = None

    async def get(self, command: str) -> dict[str, Any]:
        """``GET /cgi-bin/<command>.cgi``: the JSON reply, or pyasic's error dict."""
        web = self.web
        creds = (str(web.username), str(web.pwd))
        if self._auth is None or creds != self._creds:
            self._auth, self._creds = httpx.DigestAuth(*creds), creds
        url = f"http://{web.ip}:{web.port}/cgi-bin/{command}.cgi"
        try:
            async with httpx.AsyncClient(transport=settings.transport()) as client:
                data = await client.get(url, auth=self._auth)
        except httpx.HTTPError as e:
            return {"success": False, "message": f"HTTP error occurred: {e!s}"}
        if data.status_code == 200:
            try:
                reply: dict[str, Any] = data.json()
            except json.JSONDecodeError:
                return {"success": False, "message": "Failed to decode JSON"}
            return reply
        return {"success": False, "message": "Unknown error occurred"}


def _http_cause(e: BaseException) -> BaseException | None:
    """The httpx, aiohttp or JSON error behind ``e``, following ``__cause__`` and
    ``__context__``."""
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            return None
        if isinstance(cur, httpx.HTTPError | aiohttp.ClientError | json.JSONDecodeError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def translate_http(address: str, what: str, e: BaseException, *, control: bool) -> DeviceError:
    """Map an error of pyasic's raising web clients to one of ours (not raised).

    Those clients (``VNishWebAPI.send_command`` among them) re-raise httpx's
    errors as ``APIError`` from inside the ``except`` block without ``from``:
    the transport error survives only as the implicit ``__context__``. The
    VNish adapter's own client raises aiohttp's ``from``. A timeout or a
    connection never made is unreachable; anything else the
    transport or the JSON parser rejected (a reply that is not HTTP, a
    connection dropped mid-answer, a body that is not JSON) is faulted. The
    rest (an ``APIError`` of its own, a missing field) goes to ``translate_rpc``.
    """
    cause = None if isinstance(e, TimeoutError) else _http_cause(e)
    if cause is None:
        return translate_rpc(address, what, e, control=control)
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, httpx.TimeoutException | TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, httpx.ConnectError | aiohttp.ClientConnectorError):
        return DeviceUnreachable(msg)
    return DeviceFaulted(msg)
