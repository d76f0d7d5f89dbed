"""Discovery over a firmware mix, and the inventory kept by MAC across address changes."""

from __future__ import annotations

from pathlib import Path

from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.domain.types import DeviceControls, DeviceIdentity
from siteagent.drivers.asic import AsicDriver, discover
from siteagent.sim.power import SIM_MODELS, PowerTiming
from siteagent.sim.site import SimSite
from siteagent.sim.whatsminer import SimWhatsminer

BASE = "127.1.140.1"  # this module's own loopback range
TIMEOUT_S = 1.0


async def test_discover_a_mix_then_keep_identity_when_an_address_changes(tmp_path: Path) -> None:
    empty = ["127.1.140.201", "127.1.140.202"]
    async with SimSite(6, base_address=BASE, backends=["braiins", "whatsminer", "luxos"]) as site:
        addrs = [m.address for m in site.miners] + empty
        found = await discover(addrs, concurrency=8, timeout_s=TIMEOUT_S)
        assert [a for a, _ in found] == [m.address for m in site.miners]
        assert [i.firmware.split()[0] for _, i in found] == ["Braiins", "Whatsminer", "LuxOS"] * 2
        assert [i.mac for _, i in found] == [m.mac for m in site.miners]
        store = InventoryStore(tmp_path / "inventory.sqlite")
        report = store.record_scan(found, addrs)
        assert len(report.new) == 6 and not report.moved and not report.missing
        assert [k.backend for k in store.miners()] == ["braiins", "whatsminer", "luxos"] * 2
        wm = site.miners[1]
        assert isinstance(wm, SimWhatsminer)
        index = int(wm.serial.removeprefix("SIMWM"))
    # The same Whatsminer (same MAC) comes back at another address; the rest are gone.
    moved_to = "127.1.140.77"
    again = SimWhatsminer(moved_to, SIM_MODELS["M50S"], PowerTiming(), index=index)
    await again.start()
    try:
        found = await discover([*addrs, moved_to], concurrency=8, timeout_s=TIMEOUT_S)
    finally:
        await again.stop()
    assert [a for a, _ in found] == [moved_to]
    report = store.record_scan(found, [*addrs, moved_to])
    assert not report.new
    assert [(m.miner.address, m.old_address) for m in report.moved] == [(moved_to, addrs[1])]
    assert len(report.missing) == 5
    store.close()
    # Persisted: a new store on the same file knows all six, one at its new address.
    store = InventoryStore(tmp_path / "inventory.sqlite")
    known = store.miners()
    assert len(known) == 6
    assert [k.address for k in known if not k.missing] == [moved_to]
    store.close()


async def test_from_inventory_skips_the_probes(tmp_path: Path) -> None:
    async with SimSite(
        3, base_address="127.1.141.1", backends=["whatsminer", "luxos", "braiins"]
    ) as site:
        for m, (backend, model) in zip(
            site.miners,
            [("whatsminer", "M50S VH50"), ("luxos", "S19 XP"), ("braiins", "S19j Pro")],
            strict=True,
        ):
            drv = await AsicDriver.from_inventory(
                "x", m.address, backend=backend, model=model, timeout_s=TIMEOUT_S
            )
            assert drv.backend_name == backend
            assert drv.identity is not None and drv.identity.mac == m.mac
            r = await drv.read()
            assert r.power_w is not None and r.power_w > 1000


def test_a_scan_keeps_first_seen_and_moves_last_seen(tmp_path: Path) -> None:
    now = [1000.0]
    store = InventoryStore(tmp_path / "inventory.sqlite", clock=lambda: now[0])
    caps = DeviceControls(power_target=False, can_sleep=True)

    def ident(mac: str) -> DeviceIdentity:
        return DeviceIdentity(
            make="WhatsMiner",
            model="M50S",
            firmware="Whatsminer 2024",
            mac=mac,
            serial=None,
            capabilities=caps,
        )

    a, b = ident("02:00:00:00:00:0a"), ident("02:00:00:00:00:0b")
    report = store.record_scan([("10.0.0.1", a), ("10.0.0.2", b)], ["10.0.0.1", "10.0.0.2"])
    assert [m.address for m in report.new] == ["10.0.0.1", "10.0.0.2"] and report.seen == 2
    now[0] = 2000.0
    report = store.record_scan([("10.0.0.3", a)], ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert not report.new and report.seen == 1
    assert [(m.miner.address, m.old_address) for m in report.moved] == [("10.0.0.3", "10.0.0.1")]
    assert report.moved[0].miner.first_seen_unix_s == 1000.0
    assert [m.address for m in report.missing] == ["10.0.0.2"]
    kept = {m.mac: m for m in store.miners()}
    assert kept[a.mac].first_seen_unix_s == 1000.0 and kept[a.mac].last_seen_unix_s == 2000.0
    assert kept[b.mac].missing and kept[b.mac].last_seen_unix_s == 1000.0
    # A missing miner is reported once, and comes back as neither new nor moved.
    now[0] = 3000.0
    assert not store.record_scan([], ["10.0.0.2"]).missing
    report = store.record_scan([("10.0.0.2", b)], ["10.0.0.2"])
    assert not report.new and not report.moved and not report.missing
    assert not {m.mac: m for m in store.miners()}[b.mac].missing
    store.close()
