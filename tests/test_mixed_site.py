"""One agent, one cap, a site of all five firmwares: shed under the cap, then restore.

Every miner is identified by unmodified pyasic, read and commanded through its
own adapter; the ground truth is the simulator's own power model.
"""

from __future__ import annotations

import asyncio
import time

from test_loop import make_config

from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.sim.site import SimSite

BASE = "127.1.170.1"
MIX = ["antminer", "braiins", "luxos", "vnish", "whatsminer"]


async def run_ticks(agent: Agent, n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0.3)
        await agent.sweep()
        await agent.tick()


async def test_one_cap_over_all_five_firmwares_sheds_every_kind_then_restores() -> None:
    async with SimSite(
        10, base_address=BASE, backends=MIX, settle_s=0.5, pause_s=0.3, wake_s=0.5, restart_s=0.3
    ) as site:
        cfg = make_config([m.address for m in site.miners], cap_w=1e9)
        trackers = await build_devices(cfg)
        assert len(trackers) == 10
        agent = Agent(cfg, trackers)
        try:
            await agent.sweep()
            snap = agent.snapshot()
            assert all(d.controllable for d in snap.devices), [d.last_error for d in snap.devices]
            full = sum(m.power_w() for m in site.miners)

            cap = 0.35 * full
            agent.set_cap("test", cap)
            await run_ticks(agent, 25)
            assert site.total_power_w(time.monotonic()) <= cap
            assert agent.snapshot().budget_w >= site.total_power_w(time.monotonic()) - 1.0
            shed = {
                site.backend_of(m)
                for m in site.miners
                if m.power.paused or m.power.target_w < m.model.power_target_default_w
            }
            assert shed == set(MIX)

            agent.set_cap("test", 2 * full)
            await run_ticks(agent, 25)
            assert not any(m.power.paused for m in site.miners)
            assert site.total_power_w(time.monotonic()) > 0.9 * full
        finally:
            await close_drivers(trackers)
