"""Discovery over a firmware mix, and the inventory kept by MAC across address changes."""

from __future__ import annotations

from pathlib import Path

from agent.inventory_store import InventoryStore
from drivers.asic import AsicDriver, discover
from sim.power import SIM_MODELS, PowerTiming
from sim.site import SimSite
from sim.whatsminer import SimWhatsminer

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
