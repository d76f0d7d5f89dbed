"""No device vanishes under another's id: the agent refuses or counts every clash (issue 15.1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from siteagent.agent.config import Config, MinerConfig, parse_config
from siteagent.agent.control.fleet import DuplicateDeviceError
from siteagent.agent.control.inventory import (
    build_devices,
    gpu_links,
    miner_link,
    node_driver,
    scan,
)
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceState
from siteagent.sim.site import SimSite

BASE = "127.1.204.1"  # .1 and .2 listed, .3 found by a scan
GPU_HOST = "127.2.204.1"
KEY = "/nonexistent/key"  # the SSH node is never connected here


def mac_id(miner_mac: str) -> str:
    """The id a scan gives a miner with this MAC (agent.inventory.discovered_id)."""
    return "miner-" + miner_mac.replace(":", "").lower()


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    s = SimSite(n_miners=3, base_address=BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def clash_config(site: SimSite, cap_w: float, *, scan_third: bool) -> Config:
    """Listed .1 under the id a scan derives from .3's MAC; .2 listed plainly."""
    first, second, third = site.miners
    return parse_config(
        {
            "site": {"cap_w": cap_w, "safety_margin_w": 0},
            "inventory": {
                "miners": [
                    {"address": first.address, "id": mac_id(third.mac)},
                    {"address": second.address},
                ],
                "scan": [third.address] if scan_third else [],
            },
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            "telemetry": {"interval_s": 60, "timeout_s": 2.0},
            "control": {"interval_s": 60},
        }
    )


async def settle(agent: Agent, rounds: int = 10) -> None:
    for _ in range(rounds):
        await agent.tick()
        await asyncio.sleep(0.3)
        await agent.sweep()


def full_w(site: SimSite) -> float:
    return sum(m.nameplate_power_w for m in site.miners)


async def test_a_scanned_miner_under_a_listed_id_is_counted_and_the_site_stays_under_cap(
    site: SimSite,
) -> None:
    cap_w = 0.75 * full_w(site)
    cfg = clash_config(site, cap_w, scan_third=True)
    agent = Agent(cfg, await build_devices(cfg))
    first, _, third = site.miners
    try:
        listed = agent.fleet[mac_id(third.mac)]
        assert listed.address == first.address
        # The scanned miner is counted at its nameplate under an id of its own, never read.
        placeholder = agent.fleet[f"{mac_id(third.mac)}@{third.address}"]
        assert placeholder.driver is None
        await agent.sweep()
        await settle(agent)
        counted = next(d for d in agent.snapshot().devices if d.device_id == placeholder.device_id)
        assert counted.budget_w >= third.nameplate_power_w
        assert placeholder.state is DeviceState.UNKNOWN
        # By the simulator's own power, not the agent's view.
        assert site.total_power_w(time.monotonic()) <= cap_w
    finally:
        from siteagent.agent.control.inventory import close_drivers

        await close_drivers(agent.fleet.links())


async def test_a_rescan_never_moves_a_listed_miner_onto_another_with_its_id(
    site: SimSite,
) -> None:
    cap_w = 0.75 * full_w(site)
    first, _, third = site.miners
    cfg = clash_config(site, cap_w, scan_third=False)
    agent = Agent(cfg, await build_devices(cfg))
    try:
        await agent.sweep()
        scanning = clash_config(site, cap_w, scan_third=True)
        dropped = agent.adopt(await scan(scanning))
        assert dropped == []
        # The listed miner stays where it is; the newcomer is counted, not controlled.
        assert agent.fleet[mac_id(third.mac)].address == first.address
        assert f"{mac_id(third.mac)}@{third.address}" in agent.fleet
        # A second scan finds it again: nothing more is added.
        n = len(agent.fleet)
        agent.adopt(await scan(scanning))
        assert len(agent.fleet) == n
        await settle(agent)
        assert site.total_power_w(time.monotonic()) <= cap_w
    finally:
        from siteagent.agent.control.inventory import close_drivers

        await close_drivers(agent.fleet.links())


def gpu_site_config() -> Config:
    return parse_config(
        {
            "site": {"cap_w": 8_000},
            "gpu_nodes": [
                {"id": "gpu-node-1", "host": GPU_HOST, "gpus": 2, "client_key": KEY},
            ],
        }
    )


def test_the_agent_refuses_a_miner_under_a_gpus_id_naming_both_addresses() -> None:
    cfg = gpu_site_config()
    gpus = gpu_links(cfg, cfg.gpu_nodes[0], node_driver(cfg, cfg.gpu_nodes[0]))
    miner = miner_link(cfg, MinerConfig(address="127.1.204.9", id="gpu-node-1/gpu0"))
    with pytest.raises(DuplicateDeviceError) as e:
        Agent(cfg, [*gpus, miner])
    assert "gpu-node-1/gpu0" in str(e.value)
    assert GPU_HOST in str(e.value) and "127.1.204.9" in str(e.value)


async def test_build_trackers_refuses_listed_ids_that_clash_before_identifying() -> None:
    # Past the config's own checks (as a config edited after validation would be).
    cfg = gpu_site_config()
    miners = [
        MinerConfig(address="127.1.204.9", id="gpu-node-1/gpu0"),
        MinerConfig(address="127.1.204.10", id="gpu-node-1/gpu1"),
    ]
    cfg = cfg.model_copy(update={"inventory": cfg.inventory.model_copy(update={"miners": miners})})
    with pytest.raises(DuplicateDeviceError, match="gpu-node-1/gpu0"):
        await build_devices(cfg)
