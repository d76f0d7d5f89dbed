"""Building the agent's device list from the config: static miners and discovered ones."""

from __future__ import annotations

import logging

from agent.config import Config, MinerConfig, parse_address_range
from agent.devices import Connector, DeviceTracker, MinerDriver
from drivers.asic import AsicDriver, discover

log = logging.getLogger("siteagent.inventory")

SITE_DOMAIN = "site"


def _connector(device_id: str, address: str, timeout_s: float) -> Connector:
    async def connect() -> MinerDriver:
        return await AsicDriver.connect(device_id, address, timeout_s=timeout_s)

    return connect


def default_id(address: str) -> str:
    """A stable device id for a miner known only by its address."""
    return "miner-" + address.replace(".", "-").replace(":", "-")


def tracker_for(cfg: Config, m: MinerConfig) -> DeviceTracker:
    """A tracker for one configured miner; it connects on its first read."""
    inv = cfg.inventory
    device_id = m.id or default_id(m.address)
    return DeviceTracker(
        device_id,
        address=m.address,
        domain=m.domain or SITE_DOMAIN,
        nameplate_power_w=m.nameplate_power_w or inv.default_nameplate_power_w,
        nameplate_hashrate_ths=m.nameplate_hashrate_ths or inv.default_nameplate_hashrate_ths,
        sleep_power_w=inv.sleep_power_w,
        connect=_connector(device_id, m.address, cfg.telemetry.timeout_s),
    )


async def build_trackers(cfg: Config) -> list[DeviceTracker]:
    """Trackers for every static miner plus every miner found in the scan ranges."""
    trackers = [tracker_for(cfg, m) for m in cfg.inventory.miners]
    known = {t.address for t in trackers}
    to_scan = [
        a for item in cfg.inventory.scan for a in parse_address_range(item) if a not in known
    ]
    if to_scan:
        found = await discover(
            to_scan,
            concurrency=cfg.inventory.discovery_concurrency,
            timeout_s=cfg.telemetry.timeout_s,
        )
        log.info("discovery: %d miner(s) answered in %d address(es)", len(found), len(to_scan))
        for address, ident in found:
            m = MinerConfig(
                address=address,
                domain=cfg.inventory.scan_domain,
                nameplate_power_w=ident.nameplate_power_w,
                nameplate_hashrate_ths=ident.nameplate_hashrate_ths,
            )
            trackers.append(tracker_for(cfg, m))
    return trackers
