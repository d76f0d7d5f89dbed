"""The simulated Braiins OS miner: unmodified pyasic identifies and reads it; power model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pyasic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyasic.miners.backends.braiins_os import BOSer

from siteagent.sim.power import SIM_MODELS, MinerPowerModel, PowerTiming
from siteagent.sim.site import SimSite

BASE = "127.1.10.1"  # this module's own loopback range


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(3, base_address=BASE, settle_s=0.5, pause_s=0.2, wake_s=0.3) as s:
        yield s


async def test_pyasic_identifies_each_model_as_boser(site: SimSite) -> None:
    expected = {"S19 XP": "BOSMinerS19XP", "S21": "BOSMinerS21", "S19j Pro": "BOSMinerS19jPro"}
    for m in site.miners:
        miner = await pyasic.get_miner(m.address)
        assert isinstance(miner, BOSer), type(miner)
        assert type(miner).__name__ == expected[m.model.key]
        assert str(miner.raw_model) == m.model.key


async def test_get_data_reports_the_sims_power_and_hashrate(site: SimSite) -> None:
    m = site.miners[1]  # S21
    miner = await pyasic.get_miner(m.address)
    data = await miner.get_data()
    assert data.wattage == pytest.approx(m.power_w(), abs=1)
    assert data.wattage_limit == 3500
    assert float(data.hashrate) == pytest.approx(200.0, rel=1e-3)
    assert data.is_mining is True
    assert data.mac == m.mac
    assert data.serial_number == m.serial
    assert len(data.hashboards) == 3


async def test_power_target_pause_and_resume_over_grpc(site: SimSite) -> None:
    m = site.miners[0]
    miner = await pyasic.get_miner(m.address)
    assert await miner.set_power_limit(2000)
    assert m.power.target_w == 2000
    assert not await miner.set_power_limit(10)  # outside the constraints: refused
    assert await miner.stop_mining()
    assert m.power.paused
    assert (await miner.web.pause_mining())["alreadyPaused"] is True  # idempotent
    assert await miner.resume_mining()
    assert not m.power.paused


async def test_refuse_closes_listeners_and_none_reopens_them(site: SimSite) -> None:
    addr = site.miners[2].address
    site.set_fault(addr, "refuse")
    await site.ready()
    assert await pyasic.get_miner(addr) is None
    site.set_fault(addr, "none")
    await site.ready()
    assert isinstance(await pyasic.get_miner(addr), BOSer)


async def test_rpc_multicommand_is_keyed_by_command(site: SimSite) -> None:
    m = site.miners[0]
    reply = m.rpc_reply(b'{"command": "summary+devs+tunerstatus"}')
    assert set(reply) == {"summary", "devs", "tunerstatus"}
    assert reply["summary"][0]["SUMMARY"][0]["MHS 1m"] == pytest.approx(140e6)


def test_site_total_is_the_sum_of_miners() -> None:
    s = SimSite(4, base_address="127.1.10.101", clock=lambda: 0.0)
    assert s.total_power_w(0.0) == pytest.approx(3010 + 3500 + 3068 + 3010)
    with pytest.raises(ValueError):
        SimSite(1, base_address="10.0.0.1")


# --- power model, injected clock --------------------------------------------------

TIMING = PowerTiming(settle_s=20.0, pause_s=3.0, wake_s=10.0, sleep_power_w=20.0)


def test_target_settles_linearly_over_settle_time() -> None:
    pm = MinerPowerModel(SIM_MODELS["S19 XP"], TIMING, now_s=0.0)
    pm.set_target(2010.0, now_s=100.0)
    assert pm.power_w(100.0) == 3010.0
    assert pm.power_w(110.0) == pytest.approx(2510.0)
    assert pm.power_w(120.0) == 2010.0
    assert pm.power_w(1000.0) == 2010.0
    assert pm.hashrate_ths(120.0) < 140.0
    # Lower power, better J/TH.
    assert 2010.0 / pm.hashrate_ths(120.0) < 3010.0 / 140.0


def test_pause_falls_to_a_few_watts_and_wake_ramps_back() -> None:
    pm = MinerPowerModel(SIM_MODELS["S21"], TIMING, now_s=0.0)
    assert pm.pause(now_s=10.0) is False
    assert pm.hashrate_ths(10.0) == 0.0
    assert pm.power_w(13.0) == 20.0
    assert pm.pause(now_s=14.0) is True  # already paused
    assert pm.resume(now_s=20.0) is False
    assert 20.0 < pm.power_w(25.0) < 3500.0
    assert pm.power_w(30.0) == 3500.0


def test_target_set_while_paused_applies_on_wake() -> None:
    pm = MinerPowerModel(SIM_MODELS["S21"], TIMING, now_s=0.0)
    pm.pause(now_s=0.0)
    pm.set_target(2000.0, now_s=5.0)
    assert pm.power_w(6.0) == 20.0
    pm.resume(now_s=10.0)
    assert pm.power_w(20.0) == 2000.0


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 30.0),
            st.sampled_from(["target", "pause", "resume"]),
            st.floats(1505.0, 3010.0),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_power_never_leaves_the_envelope_of_old_and_new(
    steps: list[tuple[float, str, float]],
) -> None:
    pm = MinerPowerModel(SIM_MODELS["S19 XP"], TIMING, now_s=0.0)
    t = 0.0
    for dt, action, w in steps:
        t += dt
        old = pm.power_w(t)
        if action == "target":
            pm.set_target(w, t)
        elif action == "pause":
            pm.pause(t)
        else:
            pm.resume(t)
        new_end = pm.power_w(t + 1e6)
        for k in range(21):
            p = pm.power_w(t + k)
            assert min(old, new_end) - 1e-9 <= p <= max(old, new_end) + 1e-9


def test_default_clock_is_monotonic() -> None:
    s = SimSite(1, base_address="127.1.10.201")
    assert s.clock is time.monotonic
