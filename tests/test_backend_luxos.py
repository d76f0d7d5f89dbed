"""LuxOS: the simulator through unmodified pyasic, and the driver (profiles, curtail, ATM)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pyasic
import pytest
from pyasic.miners.backends.luxminer import LUXMiner

from siteagent.domain.errors import DeviceFaulted, DeviceRefused, DeviceUnreachable
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver
from siteagent.sim.luxos import SimLuxOS
from siteagent.sim.site import SimSite

BASE = "127.1.130.1"  # this module's own loopback range
TIMEOUT_S = 0.5


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(
        3, base_address=BASE, backends=["luxos"], settle_s=0.2, pause_s=0.1, wake_s=0.2
    ) as s:
        yield s


def sim(site: SimSite, i: int = 0) -> SimLuxOS:
    m = site.miners[i]
    assert isinstance(m, SimLuxOS)
    return m


async def connect(site: SimSite, i: int = 0) -> AsicDriver:
    return await AsicDriver.connect(f"l{i}", site.miners[i].address, timeout_s=TIMEOUT_S)


async def test_pyasic_identifies_luxos_and_model(site: SimSite) -> None:
    for m in site.miners:
        miner = await pyasic.get_miner(m.address)
        assert isinstance(miner, LUXMiner), type(miner).__mro__
        assert str(miner.raw_model) == m.model.key
        assert str(miner.firmware) == "LuxOS"
        data = await miner.get_data()
        assert data.wattage == pytest.approx(m.power_w(), abs=1)
        assert data.wattage_limit == int(m.nameplate_power_w)


async def test_profiles_become_a_stepped_power_target(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    ident = drv.identity
    assert ident is not None and drv.backend_name == "luxos"
    assert ident.mac == m.mac and ident.serial == m.serial
    caps = ident.capabilities
    watts = [w for _, w, _ in m.profiles]
    assert caps.power_target_min_w == watts[0] and caps.power_target_max_w == watts[-1]
    assert caps.power_target_step_w == pytest.approx(watts[1] - watts[0], abs=1)
    r = await drv.read()
    assert r.state is DeviceState.MINING and r.power_target_w == watts[-1]
    applied = await drv.set_power_target(watts[3] + 10)
    assert applied == watts[3]
    await asyncio.sleep(0.3)
    r = await drv.read()
    assert r.power_w == pytest.approx(watts[3], abs=1) and r.power_target_w == watts[3]


async def test_atm_is_switched_off_before_a_profile_change(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    m.atm_enabled = True
    m.atm_move(-2)  # ATM moved power by itself
    r = await drv.read()
    assert r.power_target_w == m.profiles[-3][1]
    await drv.set_power_target(m.profiles[-2][1])
    assert not m.atm_enabled and m.profile == m.profiles[-2][0]


async def test_curtail_sleep_and_wakeup(site: SimSite) -> None:
    drv = await connect(site)
    await drv.sleep()
    await asyncio.sleep(0.2)
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING and r.hashrate_ths == 0.0
    await drv.wake()
    await asyncio.sleep(0.3)
    assert (await drv.read()).state is DeviceState.MINING


async def test_faults(site: SimSite) -> None:
    drv = await connect(site)
    addr = site.miners[0].address
    for fault, err in (
        ("no_answer", DeviceUnreachable),
        ("slow", DeviceUnreachable),
        ("refuse", DeviceUnreachable),
        ("garbage", DeviceFaulted),
    ):
        site.set_fault(addr, fault, delay_s=3.0)
        await site.ready()
        t0 = time.monotonic()
        with pytest.raises(err):
            await drv.read()
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    site.set_fault(addr, "refuse_commands")
    await site.ready()
    assert (await drv.read()).state is DeviceState.MINING
    with pytest.raises(DeviceRefused):
        await drv.sleep()
    site.set_fault(addr, "misreport_power", factor=0.5)
    r = await drv.read()
    assert r.power_w == pytest.approx(site.miners[0].power_w() * 0.5, abs=1)


async def test_a_lost_session_is_renewed(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.sleep()
    m.session_id = ""  # session expired on the miner
    with pytest.raises(Exception):  # noqa: B017  # the first write after expiry fails...
        await drv.wake()
    await drv.wake()  # ...and the driver logs on afresh
    assert not m.power.paused
