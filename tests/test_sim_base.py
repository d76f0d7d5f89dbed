"""What every simulated miner gets from ``sim.base``: its ports follow a fault at once."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from siteagent.sim.site import BACKEND_NAMES, SimMiner, SimSite

BASE = "127.1.214.1"  # this module's own loopback range
# What each firmware listens on (the JSON API on 4028 everywhere).
PORTS = {
    "braiins": (80, 4028, 50051),
    "antminer": (80, 4028),
    "vnish": (80, 4028),
    "whatsminer": (4028,),
    "luxos": (4028,),
}


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(len(BACKEND_NAMES), base_address=BASE, backends=BACKEND_NAMES) as s:
        yield s


def connect_now(m: SimMiner, port: int) -> socket.socket:
    """A blocking connect: nothing of the event loop runs before the port answers it."""
    return socket.create_connection((m.address, port), timeout=2.0)


async def version_reply(sock: socket.socket) -> bytes:
    """The 4028 reply to ``version`` on an already connected socket."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b'{"command": "version"}')
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def refused(site: SimSite, backend: str) -> SimMiner:
    """The site's miner of ``backend``, just set to refuse connections."""
    m = next(x for x in site.miners if site.backend_of(x) == backend)
    m.set_fault("refuse")
    return m


@pytest.mark.parametrize("backend", BACKEND_NAMES)
async def test_refuse_closes_every_port_before_set_fault_returns(
    site: SimSite, backend: str
) -> None:
    m = refused(site, backend)
    for port in PORTS[backend]:
        with pytest.raises(ConnectionRefusedError):
            connect_now(m, port).close()
    await site.ready()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
async def test_leaving_refuse_binds_at_once_and_answers_once_ready(
    site: SimSite, backend: str
) -> None:
    m = refused(site, backend)
    await site.ready()
    m.set_fault("none")
    # Bound before the servers are back: the connections wait in the backlog.
    socks = {port: connect_now(m, port) for port in PORTS[backend]}
    await site.ready()
    assert (await version_reply(socks.pop(4028))).startswith(b"{")
    for sock in socks.values():
        sock.close()


def test_each_firmware_listens_where_the_table_says() -> None:
    s = SimSite(len(BACKEND_NAMES), base_address=BASE, backends=BACKEND_NAMES)
    assert {s.backend_of(m): m.PORTS for m in s.miners} == PORTS
