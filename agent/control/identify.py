"""Identifying one miner: as the inventory knows it first, then by pyasic's probes.

Start-up identification (agent/control/inventory.py) and the telemetry workers
(agent/control/workers.py), which identify the miners handed to them unidentified,
share it; it imports no more than a worker needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from siteagent.agent.control.devices import close_quietly
from siteagent.agent.control.inventory_store import KnownMiner, backend_of, identity_key
from siteagent.agent.control.startup import settle_tasks
from siteagent.agent.credentials import NO_CREDENTIALS, MinerCredentials
from siteagent.domain import DeviceError, DeviceFaulted, DeviceIdentity, DevicePermissionError
from siteagent.domain.credentials import Login
from siteagent.drivers.asic import AsicDriver

log = logging.getLogger("siteagent.inventory")


class Identified(Protocol):
    """A miner identification connected: a driver here, or one a telemetry worker holds."""

    @property
    def identity(self) -> DeviceIdentity | None: ...

    async def close(self) -> None: ...


# identify() or a stand-in with its signature (the telemetry workers' identification).
Identifier = Callable[..., Awaitable[Mapping[str, Identified]]]


@dataclass(frozen=True, slots=True)
class KnownFirmware:
    """What answered at an address when last identified: firmware, model, lasting key."""

    backend: str
    model: str
    key: str

    @classmethod
    def of(cls, known: KnownMiner | None) -> KnownFirmware | None:
        """The inventory's record of a miner, as its firmware (None for none)."""
        return None if known is None else cls(known.backend, known.model, known.key)

    @classmethod
    def identified(cls, identity: DeviceIdentity, address: str) -> KnownFirmware:
        """A miner just identified at ``address``, as its firmware."""
        return cls(backend_of(identity), identity.model, identity_key(identity, address))


def identify_deadline_s(timeout_s: float) -> float:
    """The longest (s) one address's identification takes: its known firmware asked
    first, then pyasic's probes (get_miner, a 1 s port probe to say why it failed),
    then the firmware's identify, each under ``timeout_s``."""
    return 3 * timeout_s + 1.0


async def identify_one(
    address: str,
    known: KnownFirmware | None,
    timeout_s: float,
    logins: Mapping[str, Login],
    *,
    listed: bool,
) -> AsicDriver | None:
    """The miner at ``address``, connected and identified, or None if none answered as
    one (``connect_known``). A listed miner that refuses our credentials is not warned
    of here: it says so as it turns read-only."""
    try:
        return await connect_known(address, known, timeout_s, logins)
    except DevicePermissionError as e:
        if not listed:
            # A miner is there but refuses our credentials: say so (once per scan).
            log.warning("identify: %s: %s", address, e)
        return None
    except DeviceError as e:
        log.debug("identify: %s: %s", address, e)
        return None


async def connect_known(
    address: str, known: KnownFirmware | None, timeout_s: float, logins: Mapping[str, Login]
) -> AsicDriver:
    """The miner at ``address``, connected and identified: as ``known`` first, without
    pyasic's probes, then by the probes (whose error, a DeviceError, is raised)."""
    if known is not None:
        # Known firmware and model: one identify, without pyasic's probes (about a
        # quarter of their cost); it must still be the same miner (MAC, serial).
        try:
            drv = await AsicDriver.from_inventory(
                address,
                address,
                backend=known.backend,
                model=known.model,
                timeout_s=timeout_s,
                logins=logins,
            )
        except Exception as e:
            log.debug("identify: %s: as known %s: %s", address, known.backend, e)
        else:
            if drv.identity is not None and identity_key(drv.identity, address) == known.key:
                return drv
            await close_quietly([drv], "an identification driver")
    drv = await AsicDriver.connect(address, address, timeout_s=timeout_s, logins=logins)
    if drv.identity is None:
        await close_quietly([drv], "an identification driver")
        raise DeviceFaulted(f"{address}: answered no identity")
    return drv


async def identify(
    addresses: Sequence[str],
    known: Mapping[str, KnownFirmware],
    *,
    concurrency: int,
    timeout_s: float,
    on_done: Callable[[], object] | None = None,
    creds: MinerCredentials = NO_CREDENTIALS,
    ids: Mapping[str, str] | None = None,
    quiet_s: float | None = None,
) -> dict[str, AsicDriver]:
    """Identify the miners at ``addresses``, ``concurrency`` at a time: connected drivers
    by address for those that answered. ``on_done`` is called as each address finishes.
    Each logs in with its credentials in ``creds``, by its device id in ``ids`` (address
    -> id, for listed miners) or else by its address.

    Bounded because an unbounded get_miner() fan-out fails wholesale (1,000 at once
    identified none), and because each identification's deadline runs while it
    waits for the CPU: 500 at once on two cores timed most of 10,000 out at 3 s.

    With ``quiet_s``, listed miners (in ``ids``) still unanswered once every other
    address is done and none has finished for ``quiet_s`` are given up on: they
    count at their worst case and connect on a later read (agent/control/startup.py).
    """
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(address: str) -> AsicDriver | None:
        async with sem:
            try:
                device_id = (ids or {}).get(address)
                logins = creds.for_miner(device_id, address)
                return await identify_one(
                    address,
                    known.get(address),
                    timeout_s,
                    logins,
                    listed=device_id is not None,
                )
            finally:
                if on_done is not None:
                    on_done()

    tasks = [asyncio.ensure_future(one(a)) for a in addresses]
    listed = ids or {}
    await settle_tasks(
        tasks, quiet_s, [t for a, t in zip(addresses, tasks, strict=True) if a not in listed]
    )
    drivers = [None if t.cancelled() else t.result() for t in tasks]
    return {a: d for a, d in zip(addresses, drivers, strict=True) if d is not None}
