"""Stock Antminer (miner modes over digest-auth CGI): the simulator through pyasic, the driver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pyasic
import pytest
from pyasic.miners.backends.antminer import AntminerModern

from siteagent.domain.errors import (
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver
from siteagent.drivers.backends.antminer import (
    MODE_REFRESH_READS,
    SLEEP_ESTIMATE_W,
    AntminerBackend,
)
from siteagent.sim.antminer import MODE_LOW, MODE_NORMAL, MODE_SLEEP, SimAntminer
from siteagent.sim.site import SimSite

BASE = "127.1.150.1"  # this module's own loopback range (127.1.150.x-127.1.159.x)
TIMEOUT_S = 0.5
# Miners 0, 1, 2 run S19 XP (no power report), S21 (reports power), S19j Pro.
XP, S21 = 0, 1


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(
        3,
        base_address=BASE,
        backends=["antminer"],
        settle_s=0.3,
        pause_s=0.1,
        wake_s=0.3,
        restart_s=0.4,
    ) as s:
        yield s


def sim(site: SimSite, i: int = XP) -> SimAntminer:
    m = site.miners[i]
    assert isinstance(m, SimAntminer)
    return m


async def connect(site: SimSite, i: int = XP) -> AsicDriver:
    drv = await AsicDriver.connect(f"a{i}", site.miners[i].address, timeout_s=TIMEOUT_S)
    # The slow fields on the first reading and every 12th after it (phase 0), as these
    # tests count them; tests/test_stagger.py covers the miners' phases.
    drv.backend.fields.phase = 0
    return drv


async def test_pyasic_identifies_stock_antminer(site: SimSite) -> None:
    for m in site.miners:
        miner = await pyasic.get_miner(m.address)
        assert isinstance(miner, AntminerModern), type(miner).__mro__
        assert str(miner.make) == "AntMiner"
        assert str(miner.raw_model) == m.model.key
        assert str(miner.firmware) == "Stock"
        data = await miner.get_data()
        assert data.mac == m.mac
        assert data.serial_number == m.serial
        assert data.is_mining is True
        assert float(data.hashrate) == pytest.approx(m.nameplate_hashrate_ths, rel=1e-3)


async def test_connect_identifies_and_estimates_power_where_none_is_reported(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await connect(site)
    ident = drv.identity
    assert ident is not None and drv.backend_name == "antminer"
    assert ident.mac == m.mac and ident.serial == m.serial
    assert ident.model == "S19 XP" and ident.firmware.startswith("Antminer stock")
    caps = ident.capabilities
    assert caps.power_target and caps.can_sleep and not caps.reports_power
    assert caps.power_target_max_w == 3010.0
    assert caps.power_target_min_w == m.low_power_w
    assert caps.power_target_step_w == 3010.0 - m.low_power_w
    r = await drv.read()
    assert r.state is DeviceState.MINING and r.power_estimated
    assert r.power_w == 3010.0 and r.power_target_w == 3010.0
    assert r.hashrate_ths == pytest.approx(140.0, rel=1e-3)
    assert r.temperature_c is not None


async def test_a_model_that_reports_power_is_read_not_estimated(site: SimSite) -> None:
    drv = await connect(site, S21)
    assert drv.identity is not None and drv.identity.capabilities.reports_power
    r = await drv.read()
    assert not r.power_estimated
    assert r.power_w == pytest.approx(sim(site, S21).power_w(), abs=1)
    site.set_fault(site.miners[S21].address, "misreport_power", factor=0.5)
    r = await drv.read()
    assert r.power_w == pytest.approx(sim(site, S21).power_w() * 0.5, abs=1)


async def test_from_inventory_needs_no_probe(site: SimSite) -> None:
    m = sim(site, 2)
    drv = await AsicDriver.from_inventory(
        "a2", m.address, backend="antminer", model="S19j Pro", timeout_s=TIMEOUT_S
    )
    assert drv.identity is not None and drv.identity.serial == m.serial
    assert drv.identity.capabilities.power_target_max_w == 3068.0


async def test_low_then_normal_restarts_mining_each_time(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    # Anything below normal is low power (the planner sees a two-step target).
    assert await drv.set_power_target(2900.0) == m.low_power_w
    assert m.mode == MODE_LOW and m.writes == 1
    assert m.pools[0]["url"] == "stratum+tcp://pool.invalid:3333"  # config sent back intact
    r = await drv.read()
    assert r.hashrate_ths == 0.0 and r.state is DeviceState.MINING
    assert any("restarting" in e for e in r.errors)
    assert r.power_target_w == m.low_power_w and r.power_estimated
    await asyncio.sleep(0.8)
    r = await drv.read()
    assert r.hashrate_ths is not None and r.hashrate_ths > 0
    assert m.power_w() == pytest.approx(m.low_power_w, abs=1)
    assert await drv.set_power_target(2500.0) == m.low_power_w  # unchanged: not written
    assert m.writes == 1
    assert await drv.set_power_target(5000.0) == 3010.0  # clamped to normal
    assert m.mode == MODE_NORMAL and m.writes == 2
    assert m.power.hashrate_ths(m.clock()) == 0.0  # restarted again


async def test_sleep_and_wake_back_into_the_mode_of_before(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.set_power_target(m.low_power_w)
    await drv.sleep()
    assert m.mode == MODE_SLEEP
    await asyncio.sleep(0.2)
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING and r.hashrate_ths == 0.0
    assert r.power_w == SLEEP_ESTIMATE_W and r.power_estimated
    writes = m.writes
    await drv.sleep()  # idempotent: already asleep, nothing written
    assert m.writes == writes
    await drv.wake()
    assert m.mode == MODE_LOW
    await asyncio.sleep(0.8)
    r = await drv.read()
    assert r.state is DeviceState.MINING and r.hashrate_ths is not None and r.hashrate_ths > 0


async def test_a_target_set_while_asleep_waits_for_wake(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.sleep()
    await drv.read()
    writes = m.writes
    assert await drv.set_power_target(100.0) == m.low_power_w
    assert m.mode == MODE_SLEEP and m.writes == writes  # still asleep
    await drv.wake()
    assert m.mode == MODE_LOW


async def test_wrong_web_password_is_a_permission_error(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    m.set_password("not-root")
    with pytest.raises(DevicePermissionError):
        await drv.sleep()
    with pytest.raises(DevicePermissionError):
        await drv.read()


@pytest.mark.parametrize("fault", ["no_answer", "slow", "refuse"])
async def test_silent_slow_or_refusing_miner_is_unreachable(site: SimSite, fault: str) -> None:
    drv = await connect(site)
    addr = site.miners[XP].address
    site.set_fault(addr, fault, delay_s=3.0)
    await site.ready()
    for op in (drv.read(), drv.sleep(), drv.set_power_target(2000.0)):
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable):
            await op
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    with pytest.raises(DeviceUnreachable):
        await AsicDriver.connect("x", addr, timeout_s=TIMEOUT_S)


async def test_garbage_is_faulted_and_refused_commands_refused(site: SimSite) -> None:
    drv = await connect(site)
    addr = site.miners[XP].address
    site.set_fault(addr, "garbage")
    with pytest.raises(DeviceFaulted):
        await drv.read()
    with pytest.raises(DeviceFaulted):
        await drv.sleep()
    site.set_fault(addr, "refuse_commands")
    assert (await drv.read()).state is DeviceState.MINING
    with pytest.raises(DeviceRefused, match="M002"):
        await drv.set_power_target(2000.0)
    with pytest.raises(DeviceRefused):
        await drv.sleep()
    assert sim(site).writes == 0


async def test_spontaneous_reboot_is_unreachable_then_back_with_uptime_reset(
    site: SimSite,
) -> None:
    drv = await connect(site)
    await asyncio.sleep(1.1)
    await drv.read()
    site.set_fault(site.miners[XP].address, "reboot", down_s=0.3)
    await site.ready()
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    await asyncio.sleep(0.4)
    await site.ready()
    r = await drv.read()
    assert any("restart" in e for e in r.errors)


async def test_a_write_of_unknown_outcome_is_not_repeated_blind(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    drv.timeout_s = 0.7
    site.set_fault(m.address, "slow", delay_s=0.2)
    # Digest auth: every request is two round trips (401, then authorised). The
    # conf read takes 0.4 s, the authorised write is sent at 0.6 s and answered
    # at 0.8 s: the driver has given up at 0.7 s.
    with pytest.raises(DeviceUnreachable):
        await drv.set_power_target(2000.0)
    await asyncio.sleep(0.3)  # the miner did act on it, after the driver gave up
    assert m.writes == 1 and m.mode == MODE_LOW
    site.set_fault(m.address, "none")
    # The driver re-reads first, sees low power already set, and sends nothing.
    assert await drv.set_power_target(2000.0) == m.low_power_w
    assert m.writes == 1


async def test_the_mode_is_read_only_when_it_may_have_moved(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    backend = drv.backend
    assert isinstance(backend, AntminerBackend)
    reads: list[str] = []
    conf = backend._conf

    async def counting(what: str, *, reading: bool = False) -> tuple[dict[str, Any], int]:
        if reading:
            reads.append(what)
        return await conf(what, reading=reading)

    backend._conf = counting  # type: ignore[method-assign]
    await drv.read()
    assert len(reads) == 1  # the first reading learns the mode
    r = await drv.read()
    assert len(reads) == 1 and r.state is DeviceState.MINING  # steady: stats only
    # Put to sleep by hand (the web UI): hashrate stops, so the mode is read again.
    m.apply_mode(MODE_SLEEP, m.clock())
    await asyncio.sleep(0.2)
    r = await drv.read()
    assert len(reads) == 2 and r.state is DeviceState.SLEEPING
    # After the agent's own write, whatever the hashrate does.
    await drv.wake()
    r = await drv.read()
    assert len(reads) == 3 and r.state is DeviceState.MINING
    # And at least every MODE_REFRESH_READS readings.
    await asyncio.sleep(0.8)
    await drv.read()
    start = len(reads)
    for _ in range(MODE_REFRESH_READS):
        await drv.read()
    assert len(reads) - start == 1  # settled: only the periodic refresh
