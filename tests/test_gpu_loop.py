"""A mixed site: simulated miners (pyasic) and GPU nodes (SSH), one agent, one cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.gpus import GpuDevice
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceKind, DeviceState
from siteagent.drivers.ssh import SshNodeDriver
from siteagent.sim.gpu import SimGpuSite
from siteagent.sim.site import SimSite

MINER_BASE = "127.1.60.1"
GPU_BASE = "127.2.60.1"


@pytest.fixture
async def sites() -> AsyncIterator[tuple[SimSite, SimGpuSite]]:
    miners = SimSite(n_miners=3, base_address=MINER_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3)
    gpus = SimGpuSite(1, 4, base_address=GPU_BASE, port=0, seed=7)
    await miners.start()
    await gpus.start()
    try:
        yield miners, gpus
    finally:
        await gpus.stop()
        await miners.stop()


async def make_agent(miners: SimSite, gpus: SimGpuSite, **node_extra: Any) -> Agent:
    node = gpus.inventory()[0]
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "inventory": {"miners": [{"address": m.address} for m in miners.miners]},
            "gpu_nodes": [
                {
                    "id": "gpu-a",
                    "host": node["address"],
                    "port": node["port"],
                    "username": node["username"],
                    "client_key": node["client_key"],
                    "known_hosts": node["known_hosts"],
                    "gpus": node["gpus"],
                    "overhead_w": node["overhead_w"],
                    **node_extra,
                }
            ],
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            "telemetry": {"interval_s": 60, "timeout_s": 3.0},
            "control": {"interval_s": 60},
        }
    )
    agent = Agent(cfg, await build_devices(cfg))
    await agent.sweep()
    return agent


async def settle(agent: Agent, rounds: int = 8) -> None:
    for _ in range(rounds):
        await agent.tick()
        await asyncio.sleep(0.3)
        await agent.sweep()


async def test_mining_is_shed_before_any_gpu_and_gpus_only_below_that(
    sites: tuple[SimSite, SimGpuSite],
) -> None:
    miners, gpus = sites
    agent = await make_agent(miners, gpus)
    snap = agent.snapshot()
    kinds = {d.device_id: d.kind for d in snap.devices}
    assert sum(1 for k in kinds.values() if k is DeviceKind.GPU) == 4
    assert all(d.controllable for d in snap.devices if d.kind is DeviceKind.GPU)
    gpu_ids = [i for i, k in kinds.items() if k is DeviceKind.GPU]
    limits_before = {i: agent.fleet[i].power_target_w for i in gpu_ids}
    node = gpus.nodes[0]
    gpu_max_w = 4 * 700.0 + node.overhead_w
    # Room for the GPU node at full limits plus a little mining: miners sleep, GPUs untouched.
    agent.set_cap("test", (gpu_max_w + 1000.0) / 0.97)
    await settle(agent)
    states = {d.device_id: d.state for d in agent.snapshot().devices}
    assert all(states[m] is DeviceState.SLEEPING for m, k in kinds.items() if k is DeviceKind.MINER)
    assert {i: agent.fleet[i].power_target_w for i in gpu_ids} == limits_before
    # Below that, the GPUs' limits come down, and the true site power is under the cap.
    cap = (node.overhead_w + 4 * 400.0 + 3 * 25.0) / 0.97
    agent.set_cap("test", cap)
    await settle(agent, 12)
    limits_after = [agent.fleet[i].power_target_w or 700.0 for i in gpu_ids]
    # 1600 W shared in merit order (ties by id): the first GPUs keep more.
    assert sum(limits_after) <= 4 * 400.0 + 1.0
    assert min(limits_after) >= 200.0 and limits_after == sorted(limits_after, reverse=True)
    now = time.monotonic()
    assert miners.total_power_w(now) + gpus.total_power_w(now) <= cap
    # Shutdown closes each node's SSH session once.
    device = agent.fleet[gpu_ids[0]].driver
    assert isinstance(device, GpuDevice) and isinstance(device.node.driver, SshNodeDriver)
    assert device.node.driver.link._conn is not None
    await close_drivers(agent.fleet.links())
    assert device.node.driver.link._conn is None


async def test_ai_at_minimum_drains_the_node_and_resuming_undrains_it(
    sites: tuple[SimSite, SimGpuSite],
) -> None:
    miners, gpus = sites
    agent = await make_agent(
        miners,
        gpus,
        drain_command="sudo -n systemctl stop inference",
        undrain_command="sudo -n systemctl start inference",
    )
    node = gpus.nodes[0]
    assert not node.drained
    agent.set_mode("ovr-ai", "ai-min")
    await settle(agent, 4)
    gpu_limits = [t.power_target_w for t in agent.fleet.records() if t.kind is DeviceKind.GPU]
    assert gpu_limits == [200.0] * 4
    assert node.drained
    agent.clear_source("ovr-ai")
    await settle(agent, 4)
    assert not node.drained
    assert all(t.power_target_w == 700.0 for t in agent.fleet.records() if t.kind is DeviceKind.GPU)
