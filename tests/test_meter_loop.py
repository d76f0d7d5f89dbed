"""The site meter in the loop: measured, not summed; the unexplained load; fallback; guard.

The meter is the simulator's SunSpec meter (sim/meter.py, a pymodbus server) read
by the real driver over Modbus TCP on loopback; its truth is the recording miners'
levels (tests/fakesite.py), each miner drawing more than it reports, plus an
auxiliary load the test moves.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fakesite import SLEEP_W, CommandLog, RecordingDriver, fake_trackers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siteagent.agent.api.auth import Scope, TokenEntry, TokenStore, hash_token
from siteagent.agent.api.http import create_app, make_services
from siteagent.agent.config import Config, MeterConfig, parse_config
from siteagent.agent.control.alarms import METER_FAULT
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.meter import MeteringParams, Meters, MeterState
from siteagent.agent.ops.metrics import families, render_text
from siteagent.domain import PlanMode
from siteagent.domain.site import SITE
from siteagent.drivers.meter import MeterReading
from siteagent.sim.meter import SimMeter, energy_counter

METER_HOST = "127.4.1.1"
NAMEPLATE_W = 3000.0
TOKEN = "tok-read-meter-loop-0123"


def meter_config(
    state_dir: Path,
    port: int,
    *,
    cap_w: float,
    overhead_w: float = 500.0,
    host: str = METER_HOST,
    **extra: Any,
) -> Config:
    """A fake site with a SunSpec meter at the POI; timers slow so the test drives ticks."""
    return parse_config(
        {
            "site": {"name": "metered", "cap_w": cap_w, "overhead_w": overhead_w},
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1e9},
            "telemetry": {"interval_s": 60, "stale_after_s": 3600},
            "control": {"interval_s": 60},
            "state": {"dir": str(state_dir)},
            "meters": [
                {
                    "id": "poi",
                    "address": host,
                    "port": port,
                    "interval_s": 0.05,
                    "timeout_s": 0.05,
                    "stale_after_s": 0.3,
                    "frozen_after_reads": 4,
                }
            ],
            **extra,
        }
    )


@dataclass
class MeteredSite:
    """Recording miners that under-report, an auxiliary load, and the meter reading both."""

    drivers: list[RecordingDriver]
    under_report_frac: float
    aux_w: float
    meter: SimMeter

    def true_w(self) -> float:
        """What the site really draws (W): each miner's level over what it reports, and aux."""
        miners = sum(SLEEP_W if d.asleep else d.target_w for d in self.drivers)
        return miners / (1.0 - self.under_report_frac) + self.aux_w


async def metered_site(
    n: int, port: int, *, under_report_frac: float = 0.1, aux_w: float = 3000.0
) -> tuple[MeteredSite, list[Any]]:
    """n recording miners and a SimMeter on loopback whose truth is theirs."""
    log = CommandLog()
    links = fake_trackers(n, log, nameplate_w=NAMEPLATE_W)
    drivers = [await link.connect() for link in links]
    holder: list[MeteredSite] = []
    truth = energy_counter(lambda _: holder[0].true_w())
    meter = SimMeter(truth, METER_HOST, port, noise_frac=0.0005)
    site = MeteredSite(
        [d for d in drivers if isinstance(d, RecordingDriver)], under_report_frac, aux_w, meter
    )
    holder.append(site)
    await meter.start()
    return site, links


@pytest.fixture
async def site_and_links() -> AsyncIterator[tuple[MeteredSite, list[Any]]]:
    site, links = await metered_site(10, 15020)
    try:
        yield site, links
    finally:
        await site.meter.stop()


async def until(cond: Callable[[], bool], what: str, *, tries: int = 400) -> None:
    """Wait (on the loop) until ``cond`` holds; fail naming ``what``."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def started_agent(cfg: Config, links: list[Any]) -> Agent:
    agent = Agent(cfg, links)
    await agent.sweep()
    agent.start()
    return agent


async def test_a_fresh_meter_is_the_site_power_and_its_excess_replaces_the_overhead(
    site_and_links: tuple[MeteredSite, list[Any]], tmp_path: Path
) -> None:
    site, links = site_and_links
    # 10 miners x 3000 W reported = 30 kW; they really draw 33.3 kW, with 3 kW of aux.
    agent = await started_agent(meter_config(tmp_path, 15020, cap_w=60_000), links)
    try:
        await until(lambda: agent.meters.samples >= 3, "three meter samples")
        snap = agent.snapshot()
        assert snap.meter_power_w is not None
        assert snap.meter_power_w == pytest.approx(site.true_w(), rel=0.01)
        limits = agent.limits()
        unexplained = site.true_w() - 30_000.0
        # The configured 500 W overhead is replaced by what the meter shows beyond the devices.
        assert limits.overhead_w == pytest.approx(unexplained, rel=0.02)
        record = await agent.tick()
        assert record.snapshot.meter_power_w == pytest.approx(site.true_w(), rel=0.01)
        (view,) = record.meters
        assert view.state is MeterState.FRESH and view.domain == SITE
        text = render_text(families(agent)).decode()
        assert 'siteagent_domain_metered_power_watts{domain="site"}' in text
        assert 'siteagent_meter_state{meter="poi",domain="site",state="fresh"} 1.0' in text
    finally:
        await agent.stop()


async def test_over_the_cap_with_devices_under_reporting_the_meter_sheds_the_truth(
    site_and_links: tuple[MeteredSite, list[Any]], tmp_path: Path
) -> None:
    site, links = site_and_links
    # Devices report 30 kW + 500 W overhead = 30.5 kW, under a 34 kW cap (capping threshold
    # 0.98: 33.3 kW); the meter reads 36.3 kW. Summed, nothing is shed; metered, enough is.
    cap_w = 34_000.0
    agent = await started_agent(meter_config(tmp_path, 15020, cap_w=cap_w), links)
    try:
        await until(lambda: agent.ticks >= 1, "a tick the fast guard asked for")
        await until(lambda: agent.meters.samples >= 5, "more samples")
        for _ in range(3):
            await agent.sweep()
            await agent.tick()
        assert site.true_w() <= cap_w, f"true draw {site.true_w():.0f} W over the {cap_w:.0f} W cap"
    finally:
        await agent.stop()


async def test_status_shows_each_meter_metered_and_estimated(
    site_and_links: tuple[MeteredSite, list[Any]], tmp_path: Path
) -> None:
    site, links = site_and_links
    agent = await started_agent(meter_config(tmp_path, 15020, cap_w=60_000), links)
    tokens = TokenStore(None, [TokenEntry("reader", Scope.READ, hash_token(TOKEN))])
    app = create_app(make_services(agent, agent.config, tokens=tokens))
    transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 5555))
    try:
        await until(lambda: agent.meters.samples >= 3, "three meter samples")
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://agent",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as http:
            body = (await http.get("/v1/status")).json()
        (meter,) = body["meters"]
        assert meter["meter_id"] == "poi" and meter["state"] == "fresh"
        assert meter["metered_w"] == pytest.approx(site.true_w(), rel=0.01)
        # Estimated: the 30 kW the miners report plus the configured 500 W.
        assert meter["estimated_w"] == pytest.approx(30_500.0)
        assert meter["unexplained_w"] == pytest.approx(site.true_w() - 30_000.0, rel=0.02)
        assert body["frequency_response"] is None
    finally:
        await agent.stop()


async def test_a_meter_sample_over_the_threshold_ticks_at_once_without_a_sweep(
    site_and_links: tuple[MeteredSite, list[Any]], tmp_path: Path
) -> None:
    site, links = site_and_links
    site.aux_w = 0.0
    cfg = meter_config(tmp_path, 15020, cap_w=40_000)
    agent = await started_agent(cfg, links)
    try:
        await until(lambda: agent.meters.samples >= 3, "three meter samples")
        await asyncio.sleep(0.1)
        ticks, sweeps = agent.ticks, agent.sweeps
        assert ticks == 0  # the scheduled tick is a minute away; nothing was over
        site.aux_w = 10_000.0  # cooling kicks in: 43.3 kW on the meter, 40 kW cap
        await until(lambda: agent.ticks > ticks, "a tick asked for by the meter")
        assert agent.sweeps == sweeps
        record = agent.last_tick
        assert record is not None and record.plan.mode is PlanMode.CAP
        assert record.applied, "the guard's tick shed nothing"
    finally:
        await agent.stop()


async def test_a_silent_meter_goes_stale_alarms_once_and_falls_back_then_recovers(
    site_and_links: tuple[MeteredSite, list[Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site, links = site_and_links
    agent = await started_agent(meter_config(tmp_path, 15020, cap_w=60_000), links)
    caplog.set_level(logging.INFO, logger="siteagent.alarms")
    try:
        await until(lambda: agent.meters.samples >= 3, "three meter samples")
        seen_w = site.true_w() - 30_000.0
        await site.meter.set_fault("unreachable", mode="silent")
        await until(lambda: agent.alarms.get(METER_FAULT) is not None, "the meter alarm")
        assert agent.snapshot().meter_power_w is None
        limits = agent.limits()
        # Fallback: device sum + configured overhead + the largest unexplained load seen.
        assert limits.overhead_w >= 500.0 + seen_w * 0.98
        assert agent.snapshot().measured_w + limits.overhead_w >= 30_000 + 500.0
        await asyncio.sleep(0.3)  # more failed reads: no more log lines
        await site.meter.set_fault("clear")
        await until(lambda: agent.alarms.get(METER_FAULT) is None, "the alarm cleared")
        lines = [r.getMessage() for r in caplog.records if "meter-fault" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "stale" in lines[0] and "cleared" in lines[1]
    finally:
        await agent.stop()


@pytest.mark.parametrize(
    ("fault", "options", "state"),
    [
        ("garbage", {"what": "nan"}, MeterState.GARBAGE),
        ("garbage", {"what": "scale"}, MeterState.GARBAGE),
        ("garbage", {"what": "negative"}, MeterState.GARBAGE),
        # 1000 times too small: a light load, below what the miners report alone.
        ("garbage", {"what": "scale_low"}, MeterState.GARBAGE),
        ("frozen", {}, MeterState.FROZEN),
    ],
)
async def test_a_garbage_or_frozen_meter_alarms_and_never_counts_below_sum_plus_overhead(
    site_and_links: tuple[MeteredSite, list[Any]],
    tmp_path: Path,
    fault: str,
    options: dict[str, Any],
    state: MeterState,
) -> None:
    site, links = site_and_links
    agent = await started_agent(meter_config(tmp_path, 15020, cap_w=60_000), links)
    try:
        await until(lambda: agent.meters.samples >= 3, "three meter samples")
        await site.meter.set_fault(fault, **options)
        await until(
            lambda: agent.meters.views(agent.clock())[0].state is state, f"the meter {state}"
        )
        alarm = agent.alarms.get(METER_FAULT)
        assert alarm is not None and state.value in alarm.reason
        assert agent.snapshot().meter_power_w is None
        assert agent.limits().overhead_w >= 500.0
    finally:
        await agent.stop()


def reading(power_w: float, hz: float = 60.0) -> MeterReading:
    return MeterReading(0.0, power_w, (), hz, None)


SPEC = MeterConfig.model_validate(
    {"id": "m", "address": METER_HOST, "interval_s": 1.0, "timeout_s": 0.5, "stale_after_s": 3.0}
)


def test_the_unexplained_load_is_held_at_its_recent_maximum_and_a_rise_is_carried_on() -> None:
    from siteagent.agent.control.alarms import Alarms

    meters = Meters([SPEC], MeteringParams(10.0, 2.0, 900.0), Alarms())
    for t, w in [(0.0, 1000.0), (1.0, 3000.0), (2.0, 1500.0), (3.0, 1200.0)]:
        meters.record("m", reading(10_000.0 + w), 10_000.0, t)
    # A fall is forgotten only after the window: the 3000 W seen at t=1 still counts.
    assert meters.planned_unexplained_w("m", 3.0) == 3000.0
    for t, w in [(12.0, 1200.0), (13.0, 1100.0)]:
        meters.record("m", reading(10_000.0 + w), 10_000.0, t)
    assert meters.planned_unexplained_w("m", 13.0) == 1200.0
    # A steady climb of 100 W/s to new highs over the whole window: carried on at that
    # rate for the 2 s horizon.
    for t in range(16, 27):
        meters.record("m", reading(10_000.0 + 2000.0 + 100.0 * t), 10_000.0, float(t))
    assert meters.planned_unexplained_w("m", 26.0) == pytest.approx(4600.0 + 100.0 * 2.0)
    # A return to the usual level after a dip (a shed the devices had not reported yet)
    # is no new high: the plan counts the window's maximum, nothing carried on.
    meters.record("m", reading(10_000.0 - 3000.0), 10_000.0, 27.0)
    meters.record("m", reading(10_000.0 + 4600.0), 10_000.0, 28.0)
    assert meters.planned_unexplained_w("m", 28.0) == 4600.0
    # A step within one sample: held by the window's maximum, carried on only at its rate
    # over the window (from 3900 W at t=19, the oldest sample in it, over 10 s, for 2 s),
    # not at its one-sample rate (5000 W in 0.1 s).
    meters.record("m", reading(10_000.0 + 9600.0), 10_000.0, 28.1)
    expected_w = 9600.0 + (9600.0 - 3900.0) / 10.0 * 2.0
    assert meters.planned_unexplained_w("m", 28.1) == pytest.approx(expected_w)
    # Devices over-reporting (a negative excess) are never credited.
    fresh = Meters([SPEC], MeteringParams(10.0, 2.0, 900.0), Alarms())
    fresh.record("m", reading(9000.0), 10_000.0, 0.0)
    assert fresh.planned_unexplained_w("m", 0.0) == 0.0


@st.composite
def metered_cases(draw: st.DrawFn) -> tuple[list[tuple[float, bool, float]], float, float]:
    """Miners (level W, asleep, under-report fraction), an aux load (W) and a cap (W)."""
    n = draw(st.integers(1, 8))
    miners = [
        (
            draw(st.floats(NAMEPLATE_W * 0.5, NAMEPLATE_W)),
            draw(st.booleans()),
            draw(st.floats(0.0, 0.1)),
        )
        for _ in range(n)
    ]
    aux_w = draw(st.floats(0.0, 20_000.0))
    cap_w = draw(st.floats(1_000.0, 60_000.0))
    return miners, aux_w, cap_w


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metered_cases())
def test_with_a_meter_no_raise_lets_the_metered_worst_case_exceed_the_cap(
    case: tuple[list[tuple[float, bool, float]], float, float],
) -> None:
    """If a tick raises anything, the meter plus every device's possible rise above its
    measurement, after the raise, stays within the effective cap."""
    miners, aux_w, cap_w = case

    async def run() -> None:
        with tempfile.TemporaryDirectory() as state_dir:
            cfg = meter_config(Path(state_dir), 15029, cap_w=cap_w, metering={"fast_guard": False})
            log = CommandLog()
            trackers = fake_trackers(len(miners), log, nameplate_w=NAMEPLATE_W)
            true_w = aux_w
            for link, (level_w, asleep, under) in zip(trackers, miners, strict=True):
                d = await link.connect()
                assert isinstance(d, RecordingDriver)
                d.target_w, d.asleep = level_w, asleep
                true_w += (SLEEP_W if asleep else level_w) / (1.0 - under)
            agent = Agent(cfg, trackers)
            await agent.sweep()
            agent.metering.on_reading("poi", MeterReading(0.0, true_w, (), 60.0, None))
            record = await agent.tick()
            raised = [c for c in record.ordered.now if not c.is_decrease]
            if not raised:
                return
            now = agent.clock()
            tab = agent.fleet.table(now, cfg.telemetry.stale_after_s)
            measured = np.nan_to_num(tab.power_w, nan=0.0)
            metered_worst_w = true_w + float(np.maximum(tab.budget_w - measured, 0.0).sum())
            assert metered_worst_w <= record.limits.effective_cap_w + 1e-6, (
                f"metered worst case {metered_worst_w:.1f} W over the cap "
                f"{record.limits.effective_cap_w:.1f} W after raising {len(raised)}"
            )

    asyncio.run(run())


async def test_a_feeder_meter_takes_its_unexplained_load_off_its_domain_and_the_site(
    tmp_path: Path,
) -> None:
    def feeder(poi: bool) -> Config:
        meters = [{"id": "feeder-a", "domain": "rack-a", "address": METER_HOST, "port": 15028}]
        if poi:
            meters.append({"id": "poi", "address": "127.4.1.2", "port": 15028})
        return parse_config(
            {
                "site": {"cap_w": 60_000, "overhead_w": 500},
                "domains": [{"id": "rack-a", "limit_w": 20_000}],
                "state": {"dir": str(tmp_path)},
                "meters": meters,
            }
        )

    log = CommandLog()
    # Five miners (15 kW reported) in rack-a, five at the site.
    trackers = fake_trackers(10, log, domain=lambda i: "rack-a" if i < 5 else "site")
    agent = Agent(feeder(poi=False), trackers)
    await agent.sweep()
    agent.metering.on_reading("feeder-a", MeterReading(0.0, 17_000.0, (), 60.0, None))
    limits = agent.limits()
    (rack,) = limits.domains
    # The rack's 2 kW beyond its devices: off what its devices may draw, and on the site.
    assert rack.limit_w == pytest.approx(18_000.0)
    assert limits.overhead_w == pytest.approx(500.0 + 2_000.0)
    # With a POI meter too, the site counts its own meter's excess (which holds the rack's).
    agent = Agent(feeder(poi=True), trackers)
    await agent.sweep()
    agent.metering.on_reading("feeder-a", MeterReading(0.0, 17_000.0, (), 60.0, None))
    agent.metering.on_reading("poi", MeterReading(0.0, 34_000.0, (), 60.0, None))
    limits = agent.limits()
    assert limits.domains[0].limit_w == pytest.approx(18_000.0)
    assert limits.overhead_w == pytest.approx(4_000.0)


def test_a_meter_failing_its_first_reads_alarms_only_once_its_stale_time_has_passed() -> None:
    from siteagent.agent.control.alarms import Alarms

    now = [100.0]
    alarms = Alarms()
    meters = Meters([SPEC], MeteringParams(), alarms, clock=lambda: now[0])
    meters.record_failure("m", "timeout", TimeoutError(), 100.5)
    assert alarms.get(METER_FAULT) is None  # connecting: 0.5 s of its 3 s
    meters.record_failure("m", "timeout", TimeoutError(), 103.5)
    alarm = alarms.get(METER_FAULT)
    assert alarm is not None and "never read" in alarm.reason
    # Garbage is an alarm at once, start or not.
    fresh = Meters([SPEC], MeteringParams(), Alarms(), clock=lambda: now[0])
    fresh.record_failure("m", "garbage", ValueError("power nan W"), 100.1)
    assert fresh.alarms.get(METER_FAULT) is not None
