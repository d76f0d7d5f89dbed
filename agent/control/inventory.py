"""Building the agent's device list from the config: static miners and discovered ones."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence

from siteagent.agent.config import (
    Config,
    GpuNodeConfig,
    MinerConfig,
    default_id,
    gpu_device_id,
    overhead_device_id,
    parse_address_range,
)
from siteagent.agent.control.ai_demand import NodeDemandReader, node_contract
from siteagent.agent.control.devices import Connector, DeviceDriver, DeviceLink, close_quietly
from siteagent.agent.control.fleet import DuplicateDeviceError, clash_message
from siteagent.agent.control.gpus import FixedLoad, GpuDevice, GpuNode
from siteagent.agent.control.identify import Identified, Identifier, KnownFirmware, identify
from siteagent.agent.control.inventory_store import (
    InventoryStore,
    KnownMiner,
    backend_of,
    identity_key,
)
from siteagent.agent.control.startup import straggler_quiet_s
from siteagent.agent.credentials import MinerCredentials, load_credentials
from siteagent.domain import (
    DeviceIdentity,
    DeviceKind,
    DeviceRefused,
)
from siteagent.domain.site import SITE
from siteagent.drivers.asic import AsicDriver
from siteagent.drivers.gpu import GpuNodeDriver
from siteagent.drivers.inference import MetricsEndpoint
from siteagent.drivers.nvml import NvmlNodeDriver
from siteagent.drivers.ssh import SshNodeDriver

log = logging.getLogger("siteagent.inventory")


def _connector(
    device_id: str, address: str, timeout_s: float, creds: MinerCredentials
) -> Connector:
    logins = creds.for_miner(device_id, address)

    async def connect() -> DeviceDriver:
        return await AsicDriver.connect(device_id, address, timeout_s=timeout_s, logins=logins)

    return connect


def credentials(cfg: Config) -> MinerCredentials:
    """The miner credentials ``cfg`` names (file or systemd credential); CredentialsError
    (a ConfigError) if the file is unusable."""
    return load_credentials(cfg.inventory.credentials_file)


def miner_link(cfg: Config, m: MinerConfig, creds: MinerCredentials | None = None) -> DeviceLink:
    """A link to one configured miner; it connects on its first read (``creds``:
    loaded from ``cfg`` when not given)."""
    creds = credentials(cfg) if creds is None else creds
    inv = cfg.inventory
    device_id = m.id or default_id(m.address)
    return DeviceLink(
        device_id,
        address=m.address,
        domain=m.domain or SITE,
        nameplate_power_w=m.nameplate_power_w or inv.default_nameplate_power_w,
        nameplate_hashrate_ths=m.nameplate_hashrate_ths or inv.default_nameplate_hashrate_ths,
        sleep_power_w=inv.sleep_power_w,
        connect=_connector(device_id, m.address, cfg.telemetry.timeout_s, creds),
        # Precedence: the config's own figures, then the identified model's, then the default.
        nameplate_is_default=(m.nameplate_power_w is None, m.nameplate_hashrate_ths is None),
    )


def _known_connector(
    device_id: str, address: str, ident: DeviceIdentity, timeout_s: float, creds: MinerCredentials
) -> Connector:
    logins = creds.for_miner(device_id, address)

    # Identified already: connect without pyasic's probes (they cost seconds at 10k miners).
    async def connect() -> DeviceDriver:
        return await AsicDriver.from_inventory(
            device_id,
            address,
            backend=backend_of(ident),
            model=ident.model,
            timeout_s=timeout_s,
            logins=logins,
        )

    return connect


def discovered_id(address: str, ident: DeviceIdentity) -> str:
    """A discovered miner's device id: from its MAC or serial, so a new address keeps it."""
    key = identity_key(ident, address)
    kind, _, value = key.partition(":")
    if kind == "address":
        return default_id(address)
    return "miner-" + value.replace(":", "").lower()


def discovered_link(
    cfg: Config, address: str, ident: DeviceIdentity, creds: MinerCredentials | None = None
) -> DeviceLink:
    """A link to a miner found by a scan (``creds``: loaded from ``cfg`` when not given)."""
    creds = credentials(cfg) if creds is None else creds
    inv = cfg.inventory
    device_id = discovered_id(address, ident)
    return DeviceLink(
        device_id,
        address=address,
        domain=inv.scan_domain or SITE,
        nameplate_power_w=ident.nameplate_power_w or inv.default_nameplate_power_w,
        nameplate_hashrate_ths=ident.nameplate_hashrate_ths or inv.default_nameplate_hashrate_ths,
        sleep_power_w=inv.sleep_power_w,
        connect=_known_connector(device_id, address, ident, cfg.telemetry.timeout_s, creds),
        nameplate_is_default=(not ident.nameplate_power_w, not ident.nameplate_hashrate_ths),
    )


def scan_addresses(cfg: Config) -> list[str]:
    """Every address of the scan ranges that is not a listed miner."""
    listed = {m.address for m in cfg.inventory.miners}
    return [a for item in cfg.inventory.scan for a in parse_address_range(item) if a not in listed]


def known_by_address(store: InventoryStore | None) -> dict[str, KnownMiner]:
    """The miner last seen at each address, of those that answered their last scan."""
    if store is None:
        return {}
    out: dict[str, KnownMiner] = {}
    for m in store.miners(include_missing=False):
        old = out.get(m.address)
        if old is None or m.last_seen_unix_s > old.last_seen_unix_s:
            out[m.address] = m
    return out


async def _survey(
    cfg: Config,
    store: InventoryStore | None,
    addresses: Sequence[str],
    on_done: Callable[[], object] | None,
    creds: MinerCredentials,
    quiet_s: float | None = None,
    identifier: Identifier = identify,
) -> Mapping[str, Identified]:
    """Identify ``addresses``; record what answered (new, moved, missing) in the store."""
    if not addresses:
        return {}
    # Off the event loop: 70 ms at 10,000 miners, more on a slow disk.
    by_address = await asyncio.to_thread(known_by_address, store)
    drivers = await identifier(
        addresses,
        {a: k for a, m in by_address.items() if (k := KnownFirmware.of(m)) is not None},
        concurrency=cfg.inventory.discovery_concurrency,
        timeout_s=cfg.telemetry.timeout_s,
        on_done=on_done,
        creds=creds,
        ids={m.address: m.id or default_id(m.address) for m in cfg.inventory.miners},
        quiet_s=quiet_s,
    )
    found = [(a, d.identity) for a, d in drivers.items() if d.identity is not None]
    log.info("discovery: %d miner(s) answered in %d address(es)", len(found), len(addresses))
    await record_found(store, found, addresses)
    return drivers


async def record_found(
    store: InventoryStore | None, found: list[tuple[str, DeviceIdentity]], scanned: Sequence[str]
) -> None:
    """Record in ``store`` the miners ``found`` among ``scanned`` addresses (new, moved,
    missing), one line for each change."""
    if store is None:
        return
    # Off the event loop: a write can wait on the disk or on a lock (issue 20).
    report = await asyncio.to_thread(store.record_scan, found, scanned)
    for m in report.new:
        log.info("inventory: new miner %s %s at %s", m.make, m.model, m.address)
    for mv in report.moved:
        log.warning(
            "inventory: %s moved from %s to %s", mv.miner.key, mv.old_address, mv.miner.address
        )
    for m in report.missing:
        log.warning("inventory: %s (%s) did not answer this scan", m.key, m.address)


def _discovered(
    cfg: Config, drivers: Mapping[str, Identified], creds: MinerCredentials
) -> list[DeviceLink]:
    return [
        discovered_link(cfg, a, d.identity, creds)
        for a, d in drivers.items()
        if d.identity is not None
    ]


async def scan(
    cfg: Config, store: InventoryStore | None = None, *, identifier: Identifier = identify
) -> list[DeviceLink]:
    """Identify the miners in the scan ranges; record new, moved and missing ones in the store.

    The links connect on their first read: the agent keeps the links it
    has, so identification's drivers are closed here rather than left open
    (``identifier``: the telemetry workers', which keep theirs until the agent
    has taken in what it found, ``WorkerTelemetry.take``).
    """
    creds = credentials(cfg)  # read again: a fixed password is taken at the next scan
    # The ranges' addresses and the links found, off the event loop: each is one piece
    # of work (62 and 88 ms under a profiler at 10,000 miners) while ticks are due.
    addresses = await asyncio.to_thread(scan_addresses, cfg)
    drivers = await _survey(cfg, store, addresses, None, creds, identifier=identifier)
    links = await asyncio.to_thread(_discovered, cfg, drivers, creds)
    await close_quietly(drivers.values(), "an identification driver")
    return links


def _adopt_driver(t: DeviceLink, drv: Identified) -> None:
    if isinstance(drv, AsicDriver):  # else held by a telemetry worker, adopted there
        drv.device_id = t.device_id  # readings carry the device's id, not the address
        t.driver = drv  # the fleet adopts what it identified as it takes the link in


async def build_devices(
    cfg: Config,
    store: InventoryStore | None = None,
    *,
    on_identified: Callable[[], object] | None = None,
    identifier: Identifier = identify,
) -> list[DeviceLink]:
    """Trackers for every listed miner, every miner found in the scan ranges, every GPU node.

    Listed and scanned miners are identified here, together and bounded by
    ``inventory.discovery_concurrency``; each link keeps the driver its
    identification connected, so the first sweep only reads. A listed miner
    that did not answer connects on a later read. ``on_identified`` is called as
    each address (``startup_addresses``) finishes. Listed miners that hang are not
    waited out (``identify``'s ``quiet_s``): they count at their worst case until read.
    ``identifier`` identifies them: by default here, or in the telemetry workers that
    will read them (agent/control/workers.py), which keep them connected.
    """
    creds = credentials(cfg)
    listed = [miner_link(cfg, m, creds) for m in cfg.inventory.miners]
    gpus = [t for n in cfg.gpu_nodes for t in gpu_links(cfg, n, node_driver(cfg, n))]
    # Configured ids must differ (the second would hide the first from every snapshot):
    # refused before identification, which takes minutes at scale.
    taken: dict[str, DeviceLink] = {}
    for t in [*listed, *gpus]:
        _take(taken, t)
    scanned = scan_addresses(cfg)
    addresses = [t.address for t in listed] + scanned
    quiet_s = straggler_quiet_s(cfg.telemetry.timeout_s)
    drivers = await _survey(cfg, store, addresses, on_identified, creds, quiet_s, identifier)
    for t in listed:
        drv = drivers.get(t.address)
        if drv is not None:
            _adopt_driver(t, drv)
    links = listed
    for address in scanned:
        drv = drivers.get(address)
        if drv is not None and drv.identity is not None:
            t = discovered_link(cfg, address, drv.identity, creds)
            old = taken.get(t.device_id)
            if old is not None:
                # A miner on the wire under a taken id is still drawing power.
                await close_quietly([drv], "an identification driver")
                t = counted_only(t, old)
            elif t.device_id in creds.miners:
                # Identified with the credentials for its address; its own (by the id
                # found) are used when the link connects, on its first read.
                await close_quietly([drv], "an identification driver")
            else:
                _adopt_driver(t, drv)
            _take(taken, t)
            links.append(t)
    links.extend(gpus)
    return links


def _take(taken: dict[str, DeviceLink], t: DeviceLink) -> None:
    old = taken.setdefault(t.device_id, t)
    if old is not t:
        raise DuplicateDeviceError(clash_message(t.device_id, old, t))


def counted_only(t: DeviceLink, taken_by: DeviceLink) -> DeviceLink:
    """A device found under an id ``taken_by`` holds: tracked under its own id, never
    read or controlled, so it counts at its nameplate (worst case) in every snapshot."""
    placeholder_id = f"{t.device_id}@{t.address}"
    log.warning(
        "%s at %s: id already taken by a %s at %s; not controlled, counted at its "
        "nameplate %.0f W as %s until the ids differ",
        t.device_id,
        t.address,
        taken_by.kind,
        taken_by.address,
        t.spec.nameplate_power_w,
        placeholder_id,
    )

    async def refuse() -> DeviceDriver:
        raise DeviceRefused(f"id {t.device_id!r} is taken by the device at {taken_by.address}")

    spec = t.spec
    out = DeviceLink(
        placeholder_id,
        address=t.address,
        domain=spec.domain,
        nameplate_power_w=spec.nameplate_power_w,
        nameplate_hashrate_ths=spec.nameplate_hashrate_ths,
        sleep_power_w=spec.sleep_power_w,
        connect=refuse,
        kind=spec.kind,
    )
    out.next_read_s = math.inf  # never read: unknown, so at its worst case
    return out


def same_device(old: DeviceLink, new: DeviceLink) -> bool:
    """Whether ``new`` (found by a scan at another address) is ``old`` moved: same kind,
    and ``old``'s own identity, where known, gives ``new``'s id."""
    if old.kind is not new.kind:
        return False
    ident = old.driver.identity if old.driver is not None else None
    return ident is None or discovered_id(old.address, ident) == new.device_id


def startup_addresses(cfg: Config) -> int:
    """How many addresses ``build_devices`` identifies: listed miners and scan ranges."""
    return len(cfg.inventory.miners) + len(scan_addresses(cfg))


def node_driver(cfg: Config, n: GpuNodeConfig) -> GpuNodeDriver:
    """The driver for one configured GPU node: NVML for this host, SSH for the others."""
    if n.host == "local":
        return NvmlNodeDriver(
            n.id,
            timeout_s=cfg.telemetry.timeout_s,
            restore_on_close=n.restore_limits_on_exit,
            drain_command=n.drain_command,
            undrain_command=n.undrain_command,
        )
    assert n.client_key is not None  # the config requires it for SSH nodes
    return SshNodeDriver(
        n.id,
        n.host,
        port=n.port,
        username=n.username,
        client_keys=[n.client_key],
        known_hosts=n.known_hosts,
        command_timeout_s=cfg.telemetry.timeout_s,
        connect_timeout_s=cfg.telemetry.timeout_s,
        drain_command=n.drain_command,
        undrain_command=n.undrain_command,
    )


def gpu_links(cfg: Config, n: GpuNodeConfig, driver: GpuNodeDriver) -> list[DeviceLink]:
    """One link per GPU of a node (connected on first read), plus its fixed overhead."""
    demand = None
    if n.demand_endpoint is not None:
        # Half the read's timeout: the GPUs are read in the same time, alongside.
        endpoint = MetricsEndpoint(n.demand_endpoint, timeout_s=cfg.telemetry.timeout_s / 2)
        contract = node_contract(cfg, n)
        demand = NodeDemandReader(n, endpoint, None if contract is None else contract.max_queue)
    node = GpuNode(driver, max_age_s=min(0.5, cfg.telemetry.interval_s / 2), demand=demand)
    domain = n.domain or SITE

    def gpu_connector(device_id: str, index: int) -> Connector:
        async def connect() -> DeviceDriver:
            await node.connect()
            return GpuDevice(device_id, node, index)

        return connect

    def fixed_connector(device_id: str) -> Connector:
        async def connect() -> DeviceDriver:
            return FixedLoad(device_id, n.overhead_w)

        return connect

    out = []
    for i in range(n.gpus):
        device_id = gpu_device_id(n.id, i)
        out.append(
            DeviceLink(
                device_id,
                address=n.host,
                domain=domain,
                nameplate_power_w=n.gpu_max_power_w,
                nameplate_hashrate_ths=0.0,
                sleep_power_w=0.0,
                connect=gpu_connector(device_id, i),
                kind=DeviceKind.GPU,
                node=n.id,
            )
        )
    if n.overhead_w > 0:
        device_id = overhead_device_id(n.id)
        out.append(
            DeviceLink(
                device_id,
                address=n.host,
                domain=domain,
                nameplate_power_w=n.overhead_w,
                nameplate_hashrate_ths=0.0,
                sleep_power_w=n.overhead_w,
                connect=fixed_connector(device_id),
                kind=DeviceKind.AUX,
            )
        )
    return out


async def close_drivers(links: list[DeviceLink]) -> None:
    """Close every GPU node once (SSH sessions; NVML limits restored where configured),
    and every miner driver that keeps a connection open (VNish's web connection)."""
    miners = [t.driver for t in links if isinstance(t.driver, AsicDriver)]
    await close_quietly(miners, "a miner driver")
    nodes = {id(t.driver.node): t.driver.node for t in links if isinstance(t.driver, GpuDevice)}
    results = await asyncio.gather(
        *(n.driver.close() for n in nodes.values()), return_exceptions=True
    )
    for node, result in zip(nodes.values(), results, strict=True):
        if isinstance(result, BaseException):
            log.warning("%s: close failed: %s", node.driver.node_id, result)
