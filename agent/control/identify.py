"""Identifying one miner: as the inventory knows it first, then by pyasic's probes.

Start-up identification (agent/control/inventory.py) and the telemetry workers
(agent/control/workers.py), which identify the miners handed to them unidentified,
share it; it imports no more than a worker needs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from siteagent.agent.control.devices import close_quietly
from siteagent.agent.control.inventory_store import KnownMiner, backend_of, identity_key
from siteagent.domain import DeviceError, DeviceFaulted, DeviceIdentity, DevicePermissionError
from siteagent.domain.credentials import Login
from siteagent.drivers.asic import AsicDriver

log = logging.getLogger("siteagent.inventory")


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
