"""AI demand from the inference servers: the simulated node's vLLM metrics scraped over HTTP on
loopback and parsed by prometheus-client's parser, demand -> the power that serves it, and busy %
as the fallback (with one alarm and one recovery line) when the endpoint is down or garbage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from ai_site import Clock, node_config, node_site

from siteagent.agent.config import parse_config
from siteagent.agent.control.ai_demand import (
    NodeDemandReader,
    demand_frac,
    need_frac,
    need_w,
)
from siteagent.agent.control.alarms import AI_DEMAND_FALLBACK
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.domain import (
    DeviceControls,
    DeviceFaulted,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DeviceUnreachable,
    Limits,
    Snapshot,
)
from siteagent.drivers.inference import MetricsEndpoint
from siteagent.policies.economic import EconomicParams, GpuCurve, plan
from siteagent.policies.prices import Prices
from siteagent.sim.gpu import SimGpuSite
from siteagent.sim.gpu import capacity_frac as sim_capacity_frac
from siteagent.sim.inference import InferenceLoad, InferenceService

GPU_BASE = "127.8.1.1"


@pytest.fixture
async def site_and_clock() -> AsyncIterator[tuple[SimGpuSite, Clock]]:
    async with node_site(GPU_BASE, seed=3) as pair:
        yield pair


async def test_the_sim_nodes_vllm_metrics_are_scraped_over_http_and_mean_demand(
    site_and_clock: tuple[SimGpuSite, Clock],
) -> None:
    site, clock = site_and_clock
    node = site.nodes[0]
    assert node.service is not None
    # Half the node's power: the afternoon's demand no longer fits, a queue builds.
    for i in range(2):
        node.set_power_limit(i, 300.0)
    clock.t += 600.0
    cfg = parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node_config(site)]})
    endpoint = MetricsEndpoint(node.metrics_url, timeout_s=2.0, clock=clock)
    reader = NodeDemandReader(cfg.gpu_nodes[0], endpoint)
    try:
        d = await reader.read()
        svc = node.service
        assert d.running == pytest.approx(svc.running, abs=1e-3)
        assert d.waiting == pytest.approx(svc.waiting, abs=1e-3) and d.waiting > 10
        assert d.kv_cache_frac == pytest.approx(svc.running / 256, abs=1e-5)
        assert d.demand_frac == pytest.approx((svc.running + svc.waiting) / 256, abs=1e-4)
        assert d.need_frac == min(1.0, d.demand_frac / 0.8)
        assert d.tokens_per_s is None  # a rate needs two reads of the counter
        clock.t += 10.0
        again = await reader.read()
        assert again.tokens_per_s is not None and again.tokens_per_s > 0
    finally:
        await endpoint.close()


async def test_a_queue_over_the_service_level_asks_for_the_nodes_full_capacity(
    site_and_clock: tuple[SimGpuSite, Clock],
) -> None:
    site, clock = site_and_clock
    node = site.nodes[0]
    svc = node.service
    assert svc is not None
    cfg = parse_config(
        {"site": {"cap_w": 10_000}, "gpu_nodes": [node_config(site, contract_max_queue=16)]}
    )
    endpoint = MetricsEndpoint(node.metrics_url, timeout_s=2.0, clock=clock)
    try:
        # The server holds 100 sequences and queues 20 (read at this very instant).
        svc.advance(clock.t)
        svc.running, svc.waiting = 100.0, 20.0
        plain = await NodeDemandReader(cfg.gpu_nodes[0], endpoint).read()
        contracted = await NodeDemandReader(cfg.gpu_nodes[0], endpoint, max_queue=16).read()
        # The margin alone asks for 120 / 256 / 0.8 of peak; over the service level, all.
        assert plain.need_frac == pytest.approx(120 / 256 / 0.8)
        assert contracted.need_frac == 1.0
        svc.waiting = 16.0
        at_limit = await NodeDemandReader(cfg.gpu_nodes[0], endpoint, max_queue=16).read()
        assert at_limit.need_frac == pytest.approx(116 / 256 / 0.8)
    finally:
        await endpoint.close()


def test_demand_becomes_the_limit_that_serves_it_with_the_margin() -> None:
    curve = GpuCurve()
    # Requests in the system over full-power capacity, at least the KV cache in use.
    assert demand_frac(30, 98, 0.2, 256) == 0.5
    assert demand_frac(0, 10, 0.6, 256) == 0.6
    assert need_frac(0.4, 0.2) == 0.5 and need_frac(0.9, 0.2) == 1.0
    # Full capacity at the knee (80 % of TDP), not at the top; 0.7 of peak at half TDP.
    assert need_w(1.0, 700.0, curve) == 560.0
    assert need_w(0.7, 700.0, curve) == 350.0
    # The simulator's own curve (not shared code) serves at least the need at that limit.
    for k in range(1, 21):
        need = k / 20
        assert sim_capacity_frac(need_w(need, 700.0, curve), 700.0) >= need - 1e-9


def test_the_queue_grows_below_the_power_demand_needs_and_drains_above() -> None:
    cap = [0.5]
    load = InferenceLoad(1, night=0.6, peak=0.6, bursts=False)
    svc = InferenceService(load, lambda: cap[0], 0.0)
    svc.advance(300.0)
    assert svc.waiting > 100 and svc.running == pytest.approx(128.0)
    over, minutes = svc.minutes_over(16)
    assert minutes == 5 and over >= 4
    cap[0] = 1.0
    svc.advance(900.0)
    assert svc.waiting == 0.0 and svc.running == pytest.approx(0.6 * 256, rel=1e-3)


def test_the_daily_cycle_and_bursts_are_seeded_and_bounded() -> None:
    a, b = InferenceLoad(5), InferenceLoad(5)
    ts = [k * 37.0 for k in range(0, 86_400 // 37)]
    assert [a.at(t) for t in ts] == [b.at(t) for t in ts]
    assert max(a.at(t) for t in ts) <= 0.95
    flat = InferenceLoad(5, bursts=False)
    assert a.at(3 * 3600.0) >= flat.at(3 * 3600.0)
    assert flat.at(14 * 3600.0) > flat.at(2 * 3600.0)  # the afternoon peak, the night trough
    assert any(a.at(t) > flat.at(t) + 0.05 for t in ts)  # bursts happen


def gpu_status(demand: float | None, util: float) -> DeviceStatus:
    caps = DeviceControls(power_target=True, power_target_min_w=200.0, power_target_max_w=700.0)
    reading = DeviceReading(
        "g", 0.0, 400.0, DeviceState.RUNNING, utilization_frac=util, demand_frac=demand
    )
    return DeviceStatus(
        "g",
        DeviceKind.GPU,
        "site",
        DeviceState.RUNNING,
        700.0,
        0.0,
        0.0,
        caps,
        700.0,
        700.0,
        True,
        reading=reading,
        reading_age_s=1.0,
        power_target_w=700.0,
        awake=True,
    )


def miner_status() -> DeviceStatus:
    caps = DeviceControls(
        power_target=True, power_target_min_w=1500.0, power_target_max_w=3000.0, can_sleep=True
    )
    return DeviceStatus(
        "m",
        DeviceKind.MINER,
        "site",
        DeviceState.MINING,
        3000.0,
        200.0,
        20.0,
        caps,
        3000.0,
        3000.0,
        True,
        power_target_w=3000.0,
        awake=True,
    )


def test_the_economic_plan_serves_the_inference_servers_demand_before_busy_percent() -> None:
    # Room for a profitable miner and part of the GPU: what the GPU gets is what its
    # demand is worth, the rest goes to mining.
    prices, lim = Prices(0.1, 0.03, 2.0), Limits(3400.0, 3400.0, "t")

    def planned(demand: float | None) -> float:
        devices = (gpu_status(demand, util=0.1), miner_status())
        p = plan(Snapshot(0.0, devices), lim, prices, EconomicParams())
        sp = p.setpoint_for("g")
        assert sp is not None
        return sp.planned_w

    # Busy % alone says 10 %: the GPU gets what the miner leaves (3298 W - 3000 W) ...
    assert planned(None) == 298.0
    # ... the server's queue says 90 %: the limit covers that.
    assert planned(0.9) >= need_w(0.9, 700.0, GpuCurve())


async def test_an_endpoint_down_or_garbage_falls_back_to_busy_percent_with_one_alarm(
    site_and_clock: tuple[SimGpuSite, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    site, clock = site_and_clock
    node = site.nodes[0]
    assert node.service is not None
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "gpu_nodes": [node_config(site, contract_max_queue=16)],
            "policy": {"name": "economic", "min_off_s": 0},
            # Every sweep reads the node anew (its shared read lives 50 ms).
            "telemetry": {"interval_s": 0.1, "timeout_s": 3.0},
        }
    )
    agent = Agent(cfg, await build_devices(cfg), clock=clock)

    async def tick() -> DeviceReading | None:
        clock.t += 5.0
        await asyncio.sleep(0.06)
        await agent.sweep()
        await agent.tick()
        rows = [d for d in agent.snapshot().devices if d.kind is DeviceKind.GPU]
        return rows[0].reading

    try:
        with caplog.at_level(logging.INFO, logger="siteagent.alarms"):
            r = await tick()
            assert r is not None and r.demand_frac is not None and r.errors == ()
            assert agent.alarms.get(AI_DEMAND_FALLBACK) is None

            await node.stop_metrics()
            for _ in range(3):
                r = await tick()
                assert r is not None and r.demand_frac is None and r.utilization_frac is not None
            alarm = agent.alarms.get(AI_DEMAND_FALLBACK)
            assert alarm is not None and "gpu-a" in alarm.reason, alarm
            # Without a queue to read, the contracted node is held at its full power.
            assert agent.last_tick is not None
            floors = {f.device_id: f.power_w for f in agent.last_tick.limits.floors}
            assert floors == {"gpu-a/gpu0": 700.0, "gpu-a/gpu1": 700.0}

            await node.start_metrics()
            node.service.garbage = True
            r = await tick()
            assert r is not None and r.demand_frac is None
            alarm = agent.alarms.get(AI_DEMAND_FALLBACK)
            assert alarm is not None and "not Prometheus text" in alarm.reason, alarm

            node.service.garbage = False
            r = await tick()
            assert r is not None and r.demand_frac is not None
            assert agent.alarms.get(AI_DEMAND_FALLBACK) is None
        # One line when it went wrong, one when it recovered; none per tick between.
        lines = [r.levelname for r in caplog.records if AI_DEMAND_FALLBACK in r.getMessage()]
        assert lines == ["WARNING", "INFO"], caplog.text
    finally:
        await close_drivers(agent.fleet.links())


async def test_the_endpoint_reader_says_why_it_has_no_demand(
    site_and_clock: tuple[SimGpuSite, Clock],
) -> None:
    site, clock = site_and_clock
    node = site.nodes[0]
    assert node.service is not None
    cfg = parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node_config(site)]})
    endpoint = MetricsEndpoint(node.metrics_url, timeout_s=1.0, clock=clock)
    reader = NodeDemandReader(cfg.gpu_nodes[0], endpoint)
    try:
        node.service.garbage = True
        with pytest.raises(DeviceFaulted, match="not Prometheus text"):
            await reader.read()
        node.service.garbage = False
        await node.stop_metrics()
        with pytest.raises(DeviceUnreachable):
            await reader.read()
        assert reader.error is not None and reader.last is None
        await node.start_metrics()
        await asyncio.sleep(0)
        assert (await reader.read()).running > 0 and reader.error is None
    finally:
        await endpoint.close()
