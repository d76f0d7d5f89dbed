"""Operator directives applied to the loop: domain caps, modes, pins, against simulated miners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.inventory import build_devices
from siteagent.agent.control.loop import Agent, OverrideRefused
from siteagent.domain import DeviceState
from siteagent.sim.site import SimSite

BASE = "127.1.50.1"
N = 4


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    s = SimSite(n_miners=N, base_address=BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def make_agent(site: SimSite, *, rack_w: float | None = None) -> Agent:
    full = sum(m.nameplate_power_w for m in site.miners)
    miners: list[dict[str, Any]] = [
        {"address": m.address, "id": f"m{i}", "domain": "rack" if i < 2 else None}
        for i, m in enumerate(site.miners)
    ]
    for m in miners:
        if m["domain"] is None:
            del m["domain"]
    cfg = parse_config(
        {
            "site": {"cap_w": full * 2},
            "domains": [{"id": "rack", "limit_w": rack_w or full * 2}],
            "inventory": {"miners": miners},
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            "telemetry": {"interval_s": 60, "timeout_s": 1.0},
            "control": {"interval_s": 60},
        }
    )
    agent = Agent(cfg, await build_devices(cfg))
    await agent.sweep()
    return agent


async def settle(agent: Agent, rounds: int = 10) -> None:
    for _ in range(rounds):
        await agent.tick()
        await asyncio.sleep(0.25)
        await agent.sweep()


def states(agent: Agent) -> dict[str, DeviceState]:
    return {d.device_id: d.state for d in agent.snapshot().devices}


async def test_mining_off_sleeps_every_miner_and_clearing_restores(site: SimSite) -> None:
    agent = await make_agent(site)
    agent.set_mode("ovr-1", "mining-off")
    await settle(agent)
    assert set(states(agent).values()) == {DeviceState.SLEEPING}
    assert site.total_power_w(time.monotonic()) < N * 50
    agent.clear_source("ovr-1")
    await settle(agent)
    assert set(states(agent).values()) == {DeviceState.MINING}


async def test_monitor_only_sends_nothing(site: SimSite) -> None:
    agent = await make_agent(site)
    agent.set_mode("ovr-2", "monitor-only")
    agent.set_cap("ovr-3", 0.3 * sum(m.nameplate_power_w for m in site.miners))
    record = await agent.tick()
    assert record.plan.mode == "cap"
    assert record.ordered.now == ()
    assert record.ordered.deferred
    assert all("monitor-only" in why for _, why in record.ordered.deferred)
    assert agent.actuations.total() == 0


async def test_domain_cap_sheds_only_that_domain(site: SimSite) -> None:
    agent = await make_agent(site)
    rack = [site.miners[0], site.miners[1]]
    rack_full = sum(m.nameplate_power_w for m in rack)
    agent.set_domain_cap("rack", "ovr-4", 0.6 * rack_full)
    await settle(agent)
    now = time.monotonic()
    assert sum(m.power_w(now) for m in rack) <= 0.6 * rack_full
    others = site.miners[2:]
    assert all(m.power_w(now) == pytest.approx(m.nameplate_power_w, rel=0.01) for m in others)
    with pytest.raises(KeyError):
        agent.set_domain_cap("no-such-rack", "ovr-5", 1000.0)


async def test_pins_apply_and_a_pin_that_breaks_a_cap_is_refused(site: SimSite) -> None:
    agent = await make_agent(site)
    agent.set_pin("ovr-6", "m3", 0.0)
    await settle(agent)
    assert states(agent)["m3"] is DeviceState.SLEEPING
    full = sum(m.nameplate_power_w for m in site.miners)
    # With m3 asleep, a cap just above the others' draw leaves no room to pin it back on.
    agent.set_cap("ovr-7", full - site.miners[3].nameplate_power_w + 200)
    await settle(agent, 3)
    with pytest.raises(OverrideRefused, match="worst case"):
        agent.set_pin("ovr-8", "m3", site.miners[3].nameplate_power_w)
    with pytest.raises(OverrideRefused, match="unknown device"):
        agent.set_pin("ovr-9", "nope", 100.0)
    agent.set_pin("ovr-6", "m3", None)
    agent.set_cap("ovr-7", None)
    await settle(agent)
    assert states(agent)["m3"] is DeviceState.MINING
