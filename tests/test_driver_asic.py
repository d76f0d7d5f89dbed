"""The pyasic-based ASIC driver against live simulated Braiins OS miners on loopback."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from siteagent.domain.errors import DeviceFaulted, DeviceRefused, DeviceUnreachable
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver, discover
from siteagent.drivers.backends.braiins import SLOW_REFRESH_READS
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.site import SimSite

BASE = "127.1.11.1"  # this module's own loopback range
TIMEOUT_S = 0.5


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(3, base_address=BASE, settle_s=0.4, pause_s=0.2, wake_s=0.3) as s:
        yield s


async def connect(site: SimSite, i: int = 0) -> AsicDriver:
    drv = await AsicDriver.connect(f"m{i}", site.miners[i].address, timeout_s=TIMEOUT_S)
    # The slow fields on the first reading and every 12th after it (phase 0), as these
    # tests count them; tests/test_stagger.py covers the miners' phases.
    drv.backend.fields.phase = 0
    return drv


async def test_connect_identifies_model_and_constraints(site: SimSite) -> None:
    for i, sim in enumerate(site.miners):
        drv = await connect(site, i)
        ident = drv.identity
        assert ident is not None
        assert ident.model == sim.model.key
        assert ident.mac == sim.mac
        assert ident.serial == sim.serial
        caps = ident.capabilities
        assert caps.power_target and caps.can_sleep
        assert caps.power_target_min_w == sim.model.power_target_min_w
        assert caps.power_target_max_w == sim.model.power_target_max_w
        assert caps.power_target_default_w == sim.model.power_target_default_w
        assert ident.nameplate_power_w == sim.nameplate_power_w
        assert ident.nameplate_hashrate_ths == sim.nameplate_hashrate_ths


async def test_read_reports_power_hashrate_temperature_target(site: SimSite) -> None:
    drv = await connect(site)
    r = await drv.read()
    assert r.device_id == "m0"
    assert r.state is DeviceState.MINING
    assert r.power_w == pytest.approx(site.miners[0].power_w(), abs=1)
    assert r.hashrate_ths == pytest.approx(140.0, rel=1e-3)
    assert r.power_target_w == 3010.0
    assert r.temperature_c is not None and 25.0 < r.temperature_c < 100.0


async def test_set_power_target_clamps_and_settles(site: SimSite) -> None:
    drv = await connect(site)
    await drv.read()
    assert await drv.set_power_target(2000.4) == 2000.0
    assert await drv.set_power_target(100.0) == 1505.0  # clamped to the device's minimum
    assert await drv.set_power_target(99999.0) == 3010.0  # and to its maximum
    assert await drv.set_power_target(2000.0) == 2000.0
    await asyncio.sleep(0.5)
    r = await drv.read()
    assert r.power_target_w == 2000.0
    assert r.power_w == pytest.approx(2000.0, abs=1)


async def test_set_power_target_skips_an_unchanged_write(site: SimSite) -> None:
    drv = await connect(site)
    await drv.read()  # target 3010 W
    site.set_fault(site.miners[0].address, "refuse_commands")
    assert await drv.set_power_target(3010.0) == 3010.0  # no write, so no refusal


async def test_out_of_range_target_is_refused_with_the_range(site: SimSite) -> None:
    drv = await connect(site)
    assert drv.identity is not None
    # Widen our idea of the range so the clamp lets a bad value through to the device.
    wide = dataclasses.replace(drv.identity.capabilities, power_target_min_w=10.0)
    drv.identity = dataclasses.replace(drv.identity, capabilities=wide)
    with pytest.raises(DeviceRefused, match=r"1505.*3010"):
        await drv.set_power_target(500.0)


async def test_sleep_then_wake(site: SimSite) -> None:
    drv = await connect(site)
    await drv.sleep()
    await drv.sleep()  # idempotent
    await asyncio.sleep(0.3)
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING
    assert r.power_w is not None and r.power_w < 30.0
    assert r.hashrate_ths == 0.0
    await drv.wake()
    await asyncio.sleep(0.4)
    r = await drv.read()
    assert r.state is DeviceState.MINING
    assert r.power_w == pytest.approx(3010.0, abs=1)


@pytest.mark.parametrize("fault", ["no_answer", "slow"])
async def test_silent_or_slow_miner_is_unreachable_within_the_timeout(
    site: SimSite, fault: str
) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    site.set_fault(addr, fault, delay_s=3.0)
    await site.ready()
    for op in (drv.read(), drv.set_power_target(2000.0), drv.sleep()):
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable):
            await op
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable):
        await AsicDriver.connect("x", addr, timeout_s=TIMEOUT_S)
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


async def test_refusing_miner_is_unreachable(site: SimSite) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    site.set_fault(addr, "refuse")
    await site.ready()
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    with pytest.raises(DeviceUnreachable):
        await AsicDriver.connect("x", addr, timeout_s=TIMEOUT_S)
    site.set_fault(addr, "none")
    await site.ready()
    assert (await drv.read()).state is DeviceState.MINING  # recovers


async def test_garbage_is_faulted(site: SimSite) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    site.set_fault(addr, "garbage")
    await site.ready()
    with pytest.raises(DeviceFaulted):
        await drv.read()
    with pytest.raises(DeviceFaulted):
        await drv.wake()
    with pytest.raises(DeviceFaulted):
        await AsicDriver.connect("x", addr, timeout_s=TIMEOUT_S)


async def test_refused_commands_are_refused_but_reads_work(site: SimSite) -> None:
    drv = await connect(site)
    site.set_fault(site.miners[0].address, "refuse_commands")
    assert (await drv.read()).state is DeviceState.MINING
    with pytest.raises(DeviceRefused):
        await drv.set_power_target(2000.0)
    with pytest.raises(DeviceRefused):
        await drv.sleep()
    with pytest.raises(DeviceRefused):
        await drv.wake()


async def test_misreported_power_is_read_as_reported(site: SimSite) -> None:
    drv = await connect(site)
    site.set_fault(site.miners[0].address, "misreport_power", factor=0.5)
    r = await drv.read()
    assert r.power_w == pytest.approx(site.miners[0].power_w() * 0.5, abs=1)


async def test_discover_finds_the_sims_and_skips_empty_addresses(site: SimSite) -> None:
    empty = ["127.1.11.201", "127.1.11.202", "127.1.11.203"]
    addrs = [m.address for m in site.miners] + empty
    found = await discover(addrs, concurrency=4, timeout_s=TIMEOUT_S)
    assert [a for a, _ in found] == [m.address for m in site.miners]
    assert [ident.model for _, ident in found] == [m.model.key for m in site.miners]


def _grpc_calls(site: SimSite) -> collections.Counter[str]:
    """The gRPC calls the first simulated miner (Braiins OS) was asked, by method."""
    m = site.miners[0]
    assert isinstance(m, SimBraiinsMiner)
    return m.grpc_calls


def _slow_asked(site: SimSite) -> tuple[int, int, int]:
    """How often the first simulated miner was asked for each of a reading's slow
    sources: its details (the status), its performance mode (the target), its cooling."""
    calls = _grpc_calls(site)
    return (
        calls["GetMinerDetails"],
        calls["GetActivePerformanceMode"],
        calls["GetCoolingState"],
    )


async def test_status_target_and_cooling_are_asked_for_only_when_they_may_have_moved(
    site: SimSite,
) -> None:
    drv = await connect(site)
    calls = _grpc_calls(site)
    before = _slow_asked(site)
    first = await drv.read()
    assert first.power_target_w is not None  # the first reading asks for all three
    assert _slow_asked(site) == tuple(n + 1 for n in before)
    stats = calls["GetMinerStats"]
    await drv.read()
    assert _slow_asked(site) == tuple(n + 1 for n in before)  # steady: the stats only
    assert calls["GetMinerStats"] == stats + 1
    await drv.set_power_target(first.power_target_w - 300)
    r = await drv.read()  # after the agent's own write: what it can move, the target
    assert _slow_asked(site) == (before[0] + 1, before[1] + 2, before[2] + 1)
    assert r.power_target_w == first.power_target_w - 300
    await asyncio.sleep(0.6)  # settled at the new target: power moved, all asked again
    await drv.read()
    settled = _slow_asked(site)
    assert settled == (before[0] + 2, before[1] + 3, before[2] + 2)
    for _ in range(SLOW_REFRESH_READS):
        await drv.read()
    # ... and at least every SLOW_REFRESH_READS readings
    assert _slow_asked(site) == tuple(n + 1 for n in settled)


async def test_a_pause_and_a_resume_by_hand_show_in_the_next_reading(site: SimSite) -> None:
    # The status is a slow field: a pause or resume the agent did not send shows as
    # the hashrate stopping or starting, and the status is asked again then.
    drv = await connect(site)
    await drv.read()
    assert (await drv.read()).state is DeviceState.MINING
    m = site.miners[0]
    m.power.pause(m.clock())  # as an operator's pause in the miner's own web page
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING and r.hashrate_ths == 0.0
    assert (await drv.read()).state is DeviceState.SLEEPING
    m.power.resume(m.clock())
    await asyncio.sleep(0.3)  # hashing again
    r = await drv.read()
    assert r.state is DeviceState.MINING and r.hashrate_ths is not None and r.hashrate_ths > 0
