"""The control loop against simulated Braiins OS miners over loopback, through pyasic."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakesite import CommandLog, RecordingDriver, fake_agent

from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.inventory import build_devices
from siteagent.agent.control.loop import NOT_SENT_IN_TIME, Agent
from siteagent.agent.control.safety import order_changes
from siteagent.domain import DeviceState
from siteagent.sim.site import SimSite

BASE = "127.1.30.1"
N = 6


def make_config(addresses: list[str], cap_w: float, **over: Any) -> Config:
    data: dict[str, Any] = {
        "site": {"cap_w": cap_w, "safety_margin_w": 0, "correction_window_s": 10},
        "inventory": {"scan": [f"{addresses[0]}-{addresses[-1]}"], "sleep_power_w": 25},
        "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
        "telemetry": {"interval_s": 60, "timeout_s": 1.0, "stale_after_s": 30},
        "control": {"interval_s": 60, "actuation_timeout_s": 3, "confirm_timeout_s": 30},
    }
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    s = SimSite(n_miners=N, base_address=BASE, settle_s=0.5, pause_s=0.3, wake_s=0.5)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def make_agent(site: SimSite, cap_w: float) -> Agent:
    cfg = make_config([m.address for m in site.miners], cap_w)
    trackers = await build_devices(cfg)
    assert len(trackers) == N
    return Agent(cfg, trackers)


def full_power_w(site: SimSite) -> float:
    return sum(m.nameplate_power_w for m in site.miners)


async def test_sweep_reads_every_miner_through_pyasic(site: SimSite) -> None:
    agent = await make_agent(site, cap_w=full_power_w(site) * 2)
    await agent.sweep()
    snap = agent.snapshot()
    assert {d.state for d in snap.devices} == {DeviceState.MINING}
    assert all(d.controllable for d in snap.devices)
    truth = site.total_power_w(time.monotonic())
    assert snap.measured_w == pytest.approx(truth, rel=0.05)


async def test_shed_under_cap_then_restore(site: SimSite) -> None:
    full = full_power_w(site)
    agent = await make_agent(site, cap_w=full * 2)
    await agent.sweep()
    cap = 0.5 * full
    agent.set_cap("test", cap)
    for _ in range(20):
        await asyncio.sleep(0.3)
        await agent.sweep()
        await agent.tick()
    assert site.total_power_w(time.monotonic()) <= cap
    assert agent.actuations["set_power_target"] + agent.actuations["sleep"] > 0
    # The worst case the agent counts is never below the truth.
    assert agent.snapshot().budget_w >= site.total_power_w(time.monotonic()) - 1.0
    agent.set_cap("test", None)
    for _ in range(20):
        await asyncio.sleep(0.3)
        await agent.sweep()
        await agent.tick()
    assert site.total_power_w(time.monotonic()) > cap
    assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)


async def test_unreachable_and_garbage_miners_count_at_nameplate_and_loop_goes_on(
    site: SimSite, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await make_agent(site, cap_w=full_power_w(site) * 2)
    await agent.sweep()
    silent, garbage = site.miners[0].address, site.miners[1].address
    site.set_fault(silent, "no_answer")
    site.set_fault(garbage, "garbage")
    await site.ready()
    caplog.set_level(logging.INFO, logger="siteagent.devices")
    for t in agent.fleet.links():
        t.next_read_s = 0.0
    await agent.sweep()
    by_addr = {t.address: t for t in agent.fleet.records()}
    snap = {d.device_id: d for d in agent.snapshot().devices}
    s, g = snap[by_addr[silent].device_id], snap[by_addr[garbage].device_id]
    assert s.state is DeviceState.UNREACHABLE
    assert g.state is DeviceState.FAULTED
    assert s.budget_w >= s.nameplate_power_w and g.budget_w >= g.nameplate_power_w
    assert not s.controllable and not g.controllable
    # A second failed sweep logs nothing new: one line on the change only.
    for t in agent.fleet.links():
        t.next_read_s = 0.0
    await agent.sweep()
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 2
    record = await agent.tick()  # the loop keeps running with two devices gone
    assert record.plan is not None
    site.set_fault(silent, "none")
    site.set_fault(garbage, "none")
    await site.ready()
    for t in agent.fleet.links():
        t.next_read_s = 0.0
    await agent.sweep()
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 2
    assert {d.state for d in agent.snapshot().devices} == {DeviceState.MINING}


async def test_cap_drop_ticks_at_once_and_ticks_never_overlap(site: SimSite) -> None:
    agent = await make_agent(site, cap_w=full_power_w(site) * 2)
    await agent.sweep()
    active = 0
    most = 0
    ticks: list[float] = []
    original = agent._tick

    async def counting_tick() -> Any:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            await asyncio.sleep(0.05)
            return await original()
        finally:
            ticks.append(time.monotonic())
            active -= 1

    agent._tick = counting_tick  # type: ignore[method-assign]
    agent.start()  # control interval is 60 s: only the cap drop can tick now
    try:
        await asyncio.sleep(0.3)
        assert ticks == []
        agent.set_cap("grid", 0.6 * full_power_w(site))
        await asyncio.sleep(1.0)
        assert len(ticks) == 1
        assert agent.actuations.total() > 0
        await asyncio.gather(agent.tick(), agent.tick(), agent.tick())
        assert most == 1
    finally:
        await agent.stop()


async def test_stop_lets_a_scheduled_tick_in_flight_finish(
    site: SimSite, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await make_agent(site, cap_w=full_power_w(site) * 2)
    await agent.sweep()
    started: list[float] = []
    finished: list[float] = []
    original = agent._tick

    async def slow_tick() -> Any:
        started.append(time.monotonic())
        await asyncio.sleep(0.3)
        record = await original()
        finished.append(time.monotonic())
        return record

    agent._tick = slow_tick  # type: ignore[method-assign]
    agent.start()
    assert agent._scheduler is not None
    agent._scheduler.modify_job("control", next_run_time=datetime.now(UTC))
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.01)
    assert started, "the scheduled tick did not start"
    await agent.stop()
    # The scheduler's shutdown cancels what it runs: the tick must be done before it.
    assert len(finished) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_tick_sends_at_most_control_concurrency_changes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cap drop that changes many miners sends ``control.concurrency`` at a time, in
    the tick's order, all under one deadline: what has not started by then is not sent
    (deferred, planned again next tick), what it cuts counts at its worst case."""
    in_flight, most, calls = [0], [0], [0]
    never = asyncio.Event()

    async def set_target(self: RecordingDriver, power_w: float) -> float:
        calls[0] += 1
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            if calls[0] <= 3:
                await asyncio.sleep(0.5)  # the first round takes half the deadline
            elif calls[0] <= 6:
                await never.wait()  # the second round hangs until the deadline cuts it
            self.log.entries.append(
                (time.perf_counter(), self.device_id, "set_power_target", power_w)
            )
            self.target_w = power_w
            return power_w
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(RecordingDriver, "set_power_target", set_target)
    n = 24
    cfg = parse_config(
        {
            "site": {"cap_w": n * 3000.0 * 0.75},
            "policy": {"min_off_s": 0},
            "telemetry": {"interval_s": 60, "stale_after_s": 3600},
            "control": {"interval_s": 60, "concurrency": 3, "actuation_timeout_s": 1.0},
            "state": {"dir": str(tmp_path)},
        }
    )
    log = CommandLog()
    agent = await fake_agent(cfg, n, log)
    plan = order_changes(
        agent.plan(agent.snapshot(), agent.limits()),
        agent.snapshot(),
        agent.limits(),
        max_increase_w=0.0,
    )
    planned = [c.device_id for c in plan.now]
    assert len(planned) > 6
    t0 = time.monotonic()
    record = await agent.tick()
    # One deadline for the whole tick (1 s), not one per change: the second round, begun
    # at 0.5 s, is cut at 1 s, not at 1.5 s.
    assert time.monotonic() - t0 < 1.3
    assert most[0] == 3 and calls[0] == 6  # nothing started after the deadline
    assert record.applied == tuple(planned[:3])
    assert record.failed == tuple(planned[3:6])
    assert [c.device_id for c in record.ordered.now] == planned[:6]
    late = [c.device_id for c, why in record.ordered.deferred if why == NOT_SENT_IN_TIME]
    assert late == planned[6:]
    # Cut, they count at their worst case until read; not sent, they count as before.
    cut = agent.fleet[planned[3]]
    assert cut.pending is not None
    assert agent.fleet[planned[6]].pending is None
    # Each cut one says why (a timeout's own text is empty).
    why = [r.getMessage() for r in caplog.records if " failed: " in r.getMessage()]
    assert len(why) == 3, why
    assert all(t.endswith("not done within control.actuation_timeout_s (1 s)") for t in why)
