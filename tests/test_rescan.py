"""Discovery into the agent: ids from the MAC, the inventory persisted, moved miners followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.inventory import build_devices, scan
from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceState
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.power import SIM_MODELS, PowerTiming
from siteagent.sim.site import SimSite

BASE = "127.1.70.1"
NEW_ADDRESS = "127.1.70.5"


async def test_a_miner_that_moves_keeps_its_device_and_the_store_remembers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "inventory": {"scan": ["127.1.70.1-127.1.70.6"]},
            "telemetry": {"timeout_s": 1.0},
        }
    )
    store = InventoryStore(tmp_path / "inventory.sqlite")
    site = SimSite(n_miners=2, base_address=BASE)
    await site.start()
    moved: SimBraiinsMiner | None = None
    try:
        trackers = await build_devices(cfg, store)
        assert len(trackers) == 2
        leaving = site.miners[1]
        device_id = next(t.device_id for t in trackers if t.address == leaving.address)
        assert device_id == "miner-" + leaving.mac.replace(":", "").lower()
        agent = Agent(cfg, trackers, rescan=lambda: scan(cfg, store))
        await agent.sweep()
        # The same miner (same MAC) comes back on another address.
        await leaving.stop()
        moved = SimBraiinsMiner(
            NEW_ADDRESS,
            SIM_MODELS[leaving.model.key],
            PowerTiming(),
            index=int(leaving.serial.removeprefix("SIMBOS")),
        )
        await moved.start()
        assert moved.mac == leaving.mac
        assert agent.rescan is not None
        # The driver of the old address is closed (its kept connection with it).
        old = agent.fleet[device_id].driver
        assert old is not None
        closed: list[object] = []
        close = getattr(old, "close")  # noqa: B009  # not in the DeviceDriver protocol

        async def recording_close() -> None:
            closed.append(old)
            await close()

        monkeypatch.setattr(old, "close", recording_close)
        await agent._scan_job()
        assert closed == [old]
        assert len(agent.fleet) == 2
        assert agent.fleet[device_id].address == NEW_ADDRESS
        await agent.sweep()
        assert agent.fleet[device_id].state is DeviceState.MINING
        known = {m.key: m for m in store.miners()}
        assert known["mac:" + leaving.mac.upper()].address == NEW_ADDRESS
        # The store outlives the agent.
        store.close()
        again = InventoryStore(tmp_path / "inventory.sqlite")
        assert len(again.miners()) == 2
        again.close()
    finally:
        if moved is not None:
            await moved.stop()
        await site.stop()
