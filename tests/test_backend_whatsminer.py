"""Whatsminer (btminer API V2): the simulator through unmodified pyasic, and the driver."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pyasic
import pytest
from pyasic.miners.backends.btminer import BTMinerV2

from siteagent.domain.errors import (
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver
from siteagent.sim.site import SimSite
from siteagent.sim.whatsminer import FW_VERSION, SimWhatsminer

BASE = "127.1.120.1"  # this module's own loopback range
TIMEOUT_S = 0.5


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(
        3,
        base_address=BASE,
        backends=["whatsminer"],
        settle_s=0.3,
        pause_s=0.1,
        wake_s=0.3,
        restart_s=0.4,
    ) as s:
        yield s


def sim(site: SimSite, i: int = 0) -> SimWhatsminer:
    m = site.miners[i]
    assert isinstance(m, SimWhatsminer)
    return m


async def connect(site: SimSite, i: int = 0) -> AsicDriver:
    return await AsicDriver.connect(f"w{i}", site.miners[i].address, timeout_s=TIMEOUT_S)


async def test_pyasic_identifies_make_model_and_v2_api(site: SimSite) -> None:
    expected = {"M50S": "M50S VH50", "M60S": "M60S VK30", "M30S++": "M30S++ VH40"}
    for m in site.miners:
        miner = await pyasic.get_miner(m.address)
        assert isinstance(miner, BTMinerV2), type(miner).__mro__
        assert str(miner.make) == "WhatsMiner"
        assert str(miner.raw_model) == expected[m.model.key]
        data = await miner.get_data()
        assert data.mac == m.mac
        assert data.serial_number == m.serial
        assert data.wattage == pytest.approx(m.power_w(), abs=1)
        assert float(data.hashrate) == pytest.approx(m.nameplate_hashrate_ths, rel=1e-3)


async def test_connect_identifies_and_reads(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    ident = drv.identity
    assert ident is not None and drv.backend_name == "whatsminer"
    assert ident.mac == m.mac and ident.serial == m.serial
    assert ident.firmware == f"Whatsminer {FW_VERSION}"
    caps = ident.capabilities
    assert caps.power_target and caps.can_sleep and caps.reports_power
    assert caps.power_target_max_w == m.model.power_target_max_w
    assert caps.power_target_min_w == m.model.power_target_min_w
    assert ident.nameplate_power_w == m.nameplate_power_w
    r = await drv.read()
    assert r.state is DeviceState.MINING
    assert r.power_w == pytest.approx(m.power_w(), abs=1)
    assert r.hashrate_ths == pytest.approx(126.0, rel=1e-3)
    assert r.power_target_w == m.model.power_target_max_w


async def test_power_limit_restarts_the_service_then_ramps(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    assert await drv.set_power_target(2500.7) == 2500.0
    r = await drv.read()
    # The limit is applied by restarting btminer: no hashing for a while.
    assert r.hashrate_ths == 0.0 and r.state is DeviceState.MINING
    assert "mining service restarting" in r.errors
    assert r.power_target_w == 2500.0
    await asyncio.sleep(0.8)
    r = await drv.read()
    assert r.power_w == pytest.approx(2500.0, abs=1)
    assert r.hashrate_ths is not None and r.hashrate_ths > 0
    assert m.writes == 1
    assert await drv.set_power_target(2500.0) == 2500.0  # unchanged: not written
    assert m.writes == 1
    assert await drv.set_power_target(10.0) == m.model.power_target_min_w  # clamped


async def test_out_of_range_limit_is_refused_with_the_range(site: SimSite) -> None:
    drv = await connect(site)
    assert drv.identity is not None
    wide = dataclasses.replace(drv.identity.capabilities, power_target_max_w=9000.0)
    drv.identity = dataclasses.replace(drv.identity, capabilities=wide)
    with pytest.raises(DeviceRefused, match=r"out of range.*1638.*3276"):
        await drv.set_power_target(5000.0)


async def test_wrong_admin_password_is_a_permission_error(site: SimSite) -> None:
    m = sim(site, 1)
    drv = await connect(site, 1)
    m.set_password("not-admin")  # changed with the Whatsminer tool; pyasic still says admin
    with pytest.raises(DevicePermissionError, match="token"):
        await drv.sleep()


async def test_sleep_and_wake(site: SimSite) -> None:
    drv = await connect(site)
    await drv.sleep()
    await asyncio.sleep(0.2)
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING
    assert r.power_w is not None and r.power_w < 30
    assert r.hashrate_ths == 0.0
    await drv.wake()
    await asyncio.sleep(0.4)
    r = await drv.read()
    assert r.state is DeviceState.MINING
    assert r.power_w == pytest.approx(sim(site).power_w(), abs=1)


@pytest.mark.parametrize("fault", ["no_answer", "slow", "refuse"])
async def test_silent_slow_or_refusing_miner_is_unreachable(site: SimSite, fault: str) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    site.set_fault(addr, fault, delay_s=3.0)
    await site.ready()
    for op in (drv.read(), drv.sleep()):
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable):
            await op
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    with pytest.raises(DeviceUnreachable):
        await AsicDriver.connect("x", addr, timeout_s=TIMEOUT_S)


async def test_garbage_is_faulted_and_refused_commands_refused(site: SimSite) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    site.set_fault(addr, "garbage")
    with pytest.raises(DeviceFaulted):
        await drv.read()
    site.set_fault(addr, "refuse_commands")
    assert (await drv.read()).state is DeviceState.MINING
    for op in (drv.set_power_target(2000.0), drv.sleep(), drv.wake()):
        with pytest.raises(DeviceRefused):
            await op


async def test_misreported_power_is_read_as_reported(site: SimSite) -> None:
    drv = await connect(site)
    site.set_fault(site.miners[0].address, "misreport_power", factor=0.5)
    r = await drv.read()
    assert r.power_w == pytest.approx(site.miners[0].power_w() * 0.5, abs=1)


async def test_spontaneous_reboot_is_unreachable_then_back_with_uptime_reset(
    site: SimSite,
) -> None:
    drv = await connect(site)
    await asyncio.sleep(1.1)
    await drv.read()
    site.set_fault(site.miners[0].address, "reboot", down_s=0.3)
    await site.ready()
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    await asyncio.sleep(0.4)
    await site.ready()
    r = await drv.read()
    assert any("restart" in e for e in r.errors)
    await asyncio.sleep(0.4)
    r = await drv.read()
    assert r.power_w == pytest.approx(sim(site).model.nameplate_power_w, abs=1)


async def test_a_write_of_unknown_outcome_is_not_repeated_blind(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    await drv.set_power_target(2600.0)  # fetches and caches the write token
    assert m.writes == 1
    site.set_fault(m.address, "slow", delay_s=TIMEOUT_S + 0.2)
    with pytest.raises(DeviceUnreachable):
        await drv.set_power_target(2000.0)
    await asyncio.sleep(0.4)  # the miner did act on it, after the driver gave up
    assert m.writes == 2 and m.power.target_w == 2000.0
    site.set_fault(m.address, "none")
    # The driver re-reads first, sees 2000 W already set, and sends nothing.
    assert await drv.set_power_target(2000.0) == 2000.0
    assert m.writes == 2
