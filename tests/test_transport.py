"""The transport rules (drivers.transport) and the staggered slow-field refresh.

One retry of a read on a dropped kept connection, never a resent write: against a
bare HTTP/1.1 server on loopback that answers or cuts each request as told, and
through the drivers against the simulated miners. The slow fields (Braiins OS mode
and cooling, VNish preset, stock-Antminer mode) are read on each miner's own phase:
over 12 sweeps each sweep carries about a twelfth of them.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yarl

from siteagent.domain.errors import DeviceError
from siteagent.drivers.asic import AsicDriver
from siteagent.drivers.backends.antminer import AntminerBackend
from siteagent.drivers.transport.http import KeptSession
from siteagent.drivers.transport.rules import KeepBudget, all_of
from siteagent.sim.antminer import SimAntminer
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.site import SimSite
from siteagent.sim.vnish import SimVNish

# This module's loopback range: 127.1.213.0/24.
SERVER = "127.1.213.1"
SITE_BASE = "127.1.213.10"
TIMEOUT_S = 1.0
EVERY = 12
BACKEND = {SimBraiinsMiner: "braiins", SimVNish: "vnish", SimAntminer: "antminer"}


class CuttingServer:
    """HTTP/1.1 on loopback: each request answered (connection kept) or cut unanswered,
    as ``plan`` says in turn ("answer" once it runs out); counts what it received."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = collections.deque(plan)
        self.received: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, SERVER, 80)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.received[f"{method.decode()} {path.decode()}"] += 1
                if (self.plan.popleft() if self.plan else "answer") == "cut":
                    return  # closed unanswered: the request arrived, no reply will
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def http_server() -> AsyncIterator[Callable[[list[str]], Any]]:
    servers: list[CuttingServer] = []

    async def make(plan: list[str]) -> CuttingServer:
        s = CuttingServer(plan)
        await s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.stop()


URL = yarl.URL(f"http://{SERVER}:80/api/v1/x")


async def test_a_read_cut_on_a_kept_connection_is_sent_once_more(
    http_server: Callable[[list[str]], Any],
) -> None:
    server = await http_server(["answer", "cut"])
    session = KeptSession(KeepBudget(limit=1))
    try:
        assert (await session.request("POST", URL, write=False, json_body={}))[0] == 200
        # The kept connection is cut under the second read: it goes once more, fresh.
        assert (await session.request("POST", URL, write=False, json_body={}))[0] == 200
    finally:
        await session.aclose()
    assert server.received["POST /api/v1/x"] == 3 and server.connections == 2


async def test_a_read_cut_twice_fails_after_one_retry(
    http_server: Callable[[list[str]], Any],
) -> None:
    server = await http_server(["answer", "cut", "cut"])
    session = KeptSession(KeepBudget(limit=1))
    try:
        await session.request("POST", URL, write=False, json_body={})
        with pytest.raises(aiohttp.ClientError):
            await session.request("POST", URL, write=False, json_body={})
    finally:
        await session.aclose()
    assert server.received["POST /api/v1/x"] == 3  # the first, then the cut one twice


async def test_a_write_cut_on_a_kept_connection_is_never_sent_again(
    http_server: Callable[[list[str]], Any],
) -> None:
    # Writes are POSTs (aiohttp itself sends a GET cut on a reused connection again).
    server = await http_server(["answer", "cut"])
    session = KeptSession(KeepBudget(limit=1))
    try:
        await session.request("GET", URL, write=False)
        with pytest.raises(aiohttp.ClientError):
            await session.request("POST", URL, write=True, json_body={"w": 1})
    finally:
        await session.aclose()
    assert server.received["POST /api/v1/x"] == 1


# -- through the drivers, against the simulated miners ---------------------------------


@pytest.fixture
async def site(request: pytest.FixtureRequest) -> AsyncIterator[SimSite]:
    backend, n = request.param
    async with SimSite(n, base_address=SITE_BASE, backends=[backend]) as s:
        yield s


async def drivers_of(site: SimSite) -> list[AsicDriver]:
    """Drivers as the agent builds them from its inventory, one after another."""
    out = []
    for i, m in enumerate(site.miners):
        out.append(
            await AsicDriver.from_inventory(
                f"m{i}",
                m.address,
                backend=BACKEND[type(m)],
                model=m.model.key,
                timeout_s=TIMEOUT_S,
            )
        )
    return out


@pytest.mark.parametrize("site", [("braiins", 1), ("vnish", 1)], indirect=True)
async def test_a_write_whose_connection_drops_after_it_arrived_is_not_resent(
    site: SimSite,
) -> None:
    (drv,) = await drivers_of(site)
    m = site.miners[0]
    first = await drv.read()
    assert first.power_target_w is not None
    if isinstance(m, SimBraiinsMiner):
        m.cut_next_call("SetPowerTarget", applied=True)
        with pytest.raises(DeviceError):
            await drv.set_power_target(first.power_target_w - 300)
        assert m.grpc_calls["SetPowerTarget"] == 1
    else:
        assert isinstance(m, SimVNish)
        m.drop_next_request("POST /api/v1/settings", act=True)
        with pytest.raises(DeviceError):
            await drv.set_power_target(first.power_target_w - 300)
        assert m.requests["POST /api/v1/settings"] == 1
    await drv.close()


def slow_reads(site: SimSite, drivers: list[AsicDriver]) -> Callable[[], int]:
    """How many times the miners' slow fields were read so far."""
    counts = collections.Counter[str]()
    for d in drivers:
        backend = d.backend
        if isinstance(backend, AntminerBackend):
            # The stock-Antminer simulator counts no requests: count the conf reads.
            conf = backend._conf

            async def counting(
                what: str, *, reading: bool = False, conf: Any = conf
            ) -> tuple[dict[str, Any], int]:
                if reading:
                    counts["conf"] += 1
                return await conf(what, reading=reading)  # type: ignore[no-any-return]

            backend._conf = counting  # type: ignore[method-assign]

    def total() -> int:
        n = counts["conf"]
        for m in site.miners:
            if isinstance(m, SimBraiinsMiner):
                n += m.grpc_calls["GetActivePerformanceMode"]
            elif isinstance(m, SimVNish):
                n += m.requests["GET /api/v1/perf-summary"]
        return n

    return total


@pytest.mark.parametrize("site", [("braiins", 24), ("vnish", 24), ("antminer", 24)], indirect=True)
async def test_the_slow_fields_are_read_on_each_miners_own_phase(site: SimSite) -> None:
    drivers = await drivers_of(site)
    count = slow_reads(site, drivers)
    n = len(drivers)
    await asyncio.gather(*(d.read() for d in drivers))  # the first sweep learns them all
    assert count() == n
    per_sweep = []
    for _ in range(EVERY):
        before = count()
        await asyncio.gather(*(d.read() for d in drivers))
        per_sweep.append(count() - before)
    # No sweep carries them all: each about a twelfth, every miner once in 12.
    assert all(math.floor(n / EVERY) <= k <= math.ceil(n / EVERY) for k in per_sweep), per_sweep
    assert sum(per_sweep) == n
    for d in drivers:
        await d.close()


async def test_an_exchanges_requests_each_end_and_no_error_goes_unseen() -> None:
    """``all_of``: when one request fails, the others run to their end before its error
    is raised; when the caller is cancelled (a worker stopping), each request ends and
    an error one raises as it ends is taken in, not left for asyncio to log."""
    loop = asyncio.get_running_loop()
    unseen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unseen.append(context))
    ended: list[str] = []

    async def fails_at_once() -> int:
        ended.append("first")
        raise DeviceError("no answer")

    async def fails_later() -> str:
        try:
            await asyncio.sleep(0.05)
        finally:
            ended.append("second")
        raise DeviceError("the connection closed")

    with pytest.raises(DeviceError, match="no answer"):
        await all_of(fails_at_once(), fails_later())
    assert ended == ["first", "second"]  # the second ran to its end first

    async def closed_on_cancel() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # As grpclib's stream does when its channel closes under it.
            raise DeviceError("connection closed") from None
        return "never"

    async def slow() -> str:
        await asyncio.sleep(10)
        return "never"

    caller = asyncio.ensure_future(all_of(closed_on_cancel(), slow()))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()  # a task's unretrieved error is reported as it is collected
    assert unseen == []
