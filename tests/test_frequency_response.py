"""Under-frequency response: the armed block shed at once on a dip, held, restored, re-armed.

The frequency comes from the simulator's SunSpec meter (sim/meter.py) over Modbus TCP
on loopback, read by the real driver; a dip is the meter's ``frequency_dip`` fault.
The miners are recording drivers (tests/fakesite.py) with hashrates that differ, so
the block's order (least efficient first) shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fakesite import SLEEP_W, CommandLog, RecordingDriver
from test_meter_loop import meter_config

from siteagent.agent.api.runtime import alarm_auditor
from siteagent.agent.api.store import Store
from siteagent.agent.config import Config, ConfigError
from siteagent.agent.control.alarms import UNDER_FREQUENCY
from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.agent.control.frequency import SOURCE
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import families, render_text
from siteagent.sim.meter import SimMeter, energy_counter

METER_HOST = "127.4.2.1"
PORT = 15021
NAMEPLATE_W = 3000.0


def links(
    log: CommandLog, hashrates_ths: list[float]
) -> tuple[list[DeviceLink], list[RecordingDriver]]:
    """Recording miners m0000.. with the given nameplate hashrates (TH/s)."""
    out, drivers = [], []
    for i, ths in enumerate(hashrates_ths):
        d = RecordingDriver(f"m{i:04d}", NAMEPLATE_W, log)
        drivers.append(d)

        async def connect(d: RecordingDriver = d) -> DeviceDriver:
            return d

        out.append(
            DeviceLink(
                d.device_id,
                address=f"fake-{i}",
                domain="site",
                nameplate_power_w=NAMEPLATE_W,
                nameplate_hashrate_ths=ths,
                sleep_power_w=SLEEP_W,
                connect=connect,
            )
        )
    return out, drivers


def uf_config(state_dir: Path, **fr: Any) -> Config:
    """The metered fake site of test_meter_loop, with an under-frequency response."""
    response = {"enabled": True, "trigger_hz": 59.7, "trigger_s": 0.1, "restore_after_s": 1.0}
    return meter_config(
        state_dir, PORT, cap_w=100_000.0, host=METER_HOST, frequency_response=response | fr
    )


@pytest.fixture
async def meter() -> AsyncIterator[SimMeter]:
    m = SimMeter(energy_counter(lambda _: 20_000.0), METER_HOST, PORT)
    await m.start()
    try:
        yield m
    finally:
        await m.stop()


async def until(cond: Callable[[], bool], what: str, *, tries: int = 500) -> None:
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_a_dip_sheds_the_armed_block_at_once_holds_it_then_restores_and_rearms(
    meter: SimMeter, tmp_path: Path
) -> None:
    log = CommandLog()
    # Six miners, 3000 W each; the least efficient (lowest hashrate) first: m0003, m0001.
    trackers, drivers = links(log, [100.0, 60.0, 110.0, 50.0, 120.0, 90.0])
    agent = Agent(uf_config(tmp_path, block_w=5000.0), trackers)
    store = Store.in_dir(tmp_path)
    agent.alarms.subscribe(alarm_auditor(store))
    try:
        await agent.sweep()
        await agent.tick()
        assert agent.frequency is not None
        armed = [c.device_id for c in agent.frequency.armed.changes]
        assert armed == ["m0003", "m0001"]  # 50 and 60 TH/s; 6000 W covers the 5000 W block
        agent.start()
        await until(lambda: agent.meters.samples >= 3, "meter samples")
        ticks = agent.ticks
        await meter.set_fault("frequency_dip", hz=59.5, duration_s=0.6)
        await until(lambda: drivers[3].asleep and drivers[1].asleep, "the block asleep")
        # Shed by the response itself, not by a tick's plan.
        sleeps = [e[1] for e in log.entries if e[2] == "sleep"]
        assert sorted(sleeps) == ["m0001", "m0003"]
        assert agent.frequency.triggered
        assert agent.alarms.get(UNDER_FREQUENCY) is not None
        text = render_text(families(agent)).decode()
        assert "siteagent_frequency_response_triggered 1.0" in text
        # Held: a tick with all the room in the world keeps them asleep (pinned).
        await agent.sweep()
        record = await agent.tick()
        assert agent.ticks > ticks
        pins = [p for p in record.limits.pins if p.source == SOURCE]
        assert sorted(p.device_id for p in pins) == ["m0001", "m0003"]
        assert drivers[3].asleep and drivers[1].asleep
        # Frequency back for restore_after_s: released, the plan wakes them, re-armed.
        await until(lambda: not agent.frequency.triggered, "the block released")  # type: ignore[union-attr]
        assert agent.alarms.get(UNDER_FREQUENCY) is None
        await until(lambda: not drivers[3].asleep and not drivers[1].asleep, "the block awake")
        await agent.sweep()
        await agent.tick()
        assert [c.device_id for c in agent.frequency.armed.changes] == ["m0003", "m0001"]
        assert agent.frequency.triggers == 1
        actions = [r.action for r in store.audit(20)]
        assert f"alarm raised: {UNDER_FREQUENCY}" in actions
        assert f"alarm cleared: {UNDER_FREQUENCY}" in actions
    finally:
        await agent.stop()
        store.close()


async def test_a_dip_shorter_than_the_trigger_time_sheds_nothing(
    meter: SimMeter, tmp_path: Path
) -> None:
    log = CommandLog()
    trackers, drivers = links(log, [100.0, 60.0])
    agent = Agent(uf_config(tmp_path, block_w=3000.0, trigger_s=5.0), trackers)
    try:
        await agent.sweep()
        await agent.tick()
        agent.start()
        await until(lambda: agent.meters.samples >= 3, "meter samples")
        await meter.set_fault("frequency_dip", hz=59.5, duration_s=0.3)
        await asyncio.sleep(0.6)
        assert agent.frequency is not None and not agent.frequency.triggered
        assert not any(d.asleep for d in drivers)
    finally:
        await agent.stop()


async def test_a_listed_block_is_shed_whatever_its_efficiency(
    meter: SimMeter, tmp_path: Path
) -> None:
    log = CommandLog()
    trackers, drivers = links(log, [100.0, 60.0, 110.0])
    agent = Agent(uf_config(tmp_path, devices=["m0002"], action="min_power"), trackers)
    try:
        await agent.sweep()
        await agent.tick()
        agent.start()
        await until(lambda: agent.meters.samples >= 3, "meter samples")
        await meter.set_fault("frequency_dip", hz=59.0, duration_s=0.4)
        await until(lambda: drivers[2].target_w == NAMEPLATE_W * 0.5, "m0002 at its minimum")
        assert {e[1] for e in log.entries} == {"m0002"}
    finally:
        await agent.stop()


def test_an_enabled_response_without_a_block_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        uf_config(tmp_path)
    text = str(err.value)
    assert "frequency_response" in text and "block_w" in text


def test_a_response_reading_an_unknown_meter_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        uf_config(tmp_path, block_w=1000.0, meter="feeder-9")
    text = str(err.value)
    assert "frequency_response.meter" in text and "'feeder-9'" in text and "poi" in text
