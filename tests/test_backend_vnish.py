"""VNish (presets, mining stop/start, token web API): the simulator through pyasic, the driver.

The simulated miners run on an injected clock: the tests move time (preset
re-tunes, stop, start) instead of waiting for it. Faults and deadlines are on
real time, and a rebooting miner's listeners come back on real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pyasic
import pytest
from pyasic.miners.backends.vnish import VNish
from pyasic.web.vnish import VNishWebAPI

from siteagent.agent.control.devices import Connector, DeviceDriver, DeviceLink
from siteagent.agent.control.inventory import close_drivers
from siteagent.agent.control.inventory_store import backend_of
from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver, discover
from siteagent.drivers.backends import BACKENDS
from siteagent.drivers.backends.vnish import KEEPALIVE_BUDGET, PRESET_REFRESH_READS, VNishBackend
from siteagent.sim.base import IDLE_POWER_W
from siteagent.sim.site import SimSite
from siteagent.sim.vnish import PRESET_STEP_W, VNISH_VERSION, SimVNish

BASE = "127.1.160.1"  # this module's own loopback range (127.1.160.x-127.1.169.x)
TIMEOUT_S = 0.5
SETTLE_S, PAUSE_S, WAKE_S, RESTART_S = 20.0, 3.0, 10.0, 5.0
SLEEP_W = 20.0
# Miners 0, 1, 2 run S19 XP (3010 W), S21 (3500 W), S19j Pro (3068 W).
XP, S21, JPRO = 0, 1, 2
T = TypeVar("T")


class Clock:
    """The simulated miners' clock (s), moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def site(clock: Clock) -> AsyncIterator[SimSite]:
    async with SimSite(
        3,
        base_address=BASE,
        backends=["vnish"],
        clock=clock,
        settle_s=SETTLE_S,
        pause_s=PAUSE_S,
        wake_s=WAKE_S,
        restart_s=RESTART_S,
        sleep_power_w=SLEEP_W,
    ) as s:
        yield s


def sim(site: SimSite, i: int = XP) -> SimVNish:
    m = site.miners[i]
    assert isinstance(m, SimVNish)
    return m


async def connect(site: SimSite, i: int = XP) -> AsicDriver:
    drv = await AsicDriver.connect(f"v{i}", site.miners[i].address, timeout_s=TIMEOUT_S)
    # The slow fields on the first reading and every 12th after it (phase 0), as these
    # tests count them; tests/test_stagger.py covers the miners' phases.
    drv.backend.fields.phase = 0
    return drv


async def eventually(fn: Callable[[], Awaitable[T]], timeout_s: float = 3.0) -> T:
    """``fn()`` once it stops raising a device error (polled), or its last error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await fn()
        except DeviceError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll ``cond`` until it holds."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def usable_watts(m: SimVNish) -> list[float]:
    return [p.watts for p in m.presets if not p.modded_psu_required]


# -- pyasic, unmodified -----------------------------------------------------------------


async def test_pyasic_identifies_vnish_make_model_and_firmware(site: SimSite) -> None:
    for m in site.miners:
        miner = await pyasic.get_miner(m.address)
        assert isinstance(miner, VNish), type(miner).__mro__
        assert str(miner.make) == "AntMiner"
        assert str(miner.raw_model) == m.model.key
        assert str(miner.firmware) == "VNish"
        data = await miner.get_data()
        assert data.mac == m.mac
        assert data.fw_ver == VNISH_VERSION
        assert data.wattage == pytest.approx(m.power_w(), abs=1)
        assert data.wattage_limit == int(m.nameplate_power_w)
        assert data.is_mining is True
        assert float(data.hashrate) == pytest.approx(m.nameplate_hashrate_ths, rel=1e-3)
        assert len(data.hashboards) == m.model.hashboards


async def test_pyasic_own_set_power_limit_changes_nothing(site: SimSite) -> None:
    """Why the adapter writes ``settings`` itself (pyasic 0.79; see drivers/backends/vnish.py)."""
    m = sim(site)
    for p in m.presets:
        p.tuned = True  # not even tuned presets help
    miner = await pyasic.get_miner(m.address)
    assert await miner.set_power_limit(2500) is False
    assert m.preset == "3010" and m.writes == 0


# -- the driver -------------------------------------------------------------------------


async def test_connect_reads_identity_presets_and_telemetry(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    ident = drv.identity
    assert ident is not None and drv.backend_name == "vnish"
    assert ident.mac == m.mac and ident.serial == m.serial
    assert ident.make == "AntMiner" and ident.model == "S19 XP"
    assert ident.firmware == f"VNish {VNISH_VERSION}"
    assert backend_of(ident) == "vnish"
    caps = ident.capabilities
    watts = usable_watts(m)
    # The overclocking presets need a modded PSU this miner does not have.
    assert max(p.watts for p in m.presets) > 3010.0
    assert caps.power_target and caps.can_sleep and caps.reports_power
    assert caps.power_target_min_w == watts[0] == 2110.0
    assert caps.power_target_max_w == watts[-1] == 3010.0
    assert caps.power_target_default_w == 3010.0
    assert caps.power_target_step_w == PRESET_STEP_W
    assert ident.nameplate_power_w == 3010.0
    r = await drv.read()
    assert r.state is DeviceState.MINING and not r.errors and not r.power_estimated
    assert r.power_w == pytest.approx(m.power_w(), abs=1)
    assert r.hashrate_ths == pytest.approx(140.0, rel=1e-3)
    assert r.temperature_c == pytest.approx(m.power.chip_temp_c(m.clock()), abs=1)
    assert r.power_target_w == 3010.0


async def test_a_steady_read_costs_one_web_request_and_nothing_on_4028(
    site: SimSite, clock: Clock
) -> None:
    m = sim(site)
    drv = await connect(site)
    both = {"GET /api/v1/summary": 1, "GET /api/v1/perf-summary": 1}
    m.requests.clear()
    assert (await drv.read()).power_target_w == 3010.0
    assert dict(m.requests) == both  # the first reading learns the running preset
    m.requests.clear()
    r = await drv.read()
    assert dict(m.requests) == {"GET /api/v1/summary": 1}
    assert r.power_target_w == 3010.0  # the preset as last read


async def test_the_preset_is_read_again_whenever_it_may_have_moved(
    site: SimSite, clock: Clock
) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()

    def preset_reads() -> int:
        return m.requests["GET /api/v1/perf-summary"]

    # After the agent's own write.
    await drv.set_power_target(2500.0)
    before = preset_reads()
    assert (await drv.read()).power_target_w == 2470.0 and preset_reads() == before + 1
    clock.advance(RESTART_S + 2 * WAKE_S)
    await drv.read()  # ramped to the new preset: power moved, read again
    settled = preset_reads()
    await drv.read()
    assert preset_reads() == settled  # nothing moved: not read
    # By the firmware (or by hand): power moves, so the preset is read again.
    m.switcher_move(-2)
    clock.advance(2 * WAKE_S)
    r = await drv.read()
    assert preset_reads() == settled + 1 and r.power_target_w == m.preset_watts(m.running)
    # And at least every PRESET_REFRESH_READS readings, whatever happens.
    start = preset_reads()
    for _ in range(PRESET_REFRESH_READS):
        await drv.read()
    assert preset_reads() == start + 1


async def test_from_inventory_needs_no_probe(site: SimSite) -> None:
    m = sim(site, S21)
    drv = await AsicDriver.from_inventory(
        "v1", m.address, backend="vnish", model="S21", timeout_s=TIMEOUT_S
    )
    assert drv.identity is not None and drv.identity.serial == m.serial
    assert drv.identity.capabilities.power_target_max_w == 3500.0
    # No identification probes: no page fetch, nothing on 4028.
    assert m.requests["GET /"] == 0
    assert not [k for k in m.requests if k.startswith("rpc ")]
    assert m.requests["POST /api/v1/unlock"] == 1
    r = await drv.read()
    assert r.power_w == pytest.approx(3500.0, abs=1)


async def test_target_goes_to_the_highest_preset_below_and_retunes(
    site: SimSite, clock: Clock
) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    assert await drv.set_power_target(2500.0) == 2470.0
    assert m.preset == m.running == "2470" and m.writes == 1
    assert not m.presets[usable_watts(m).index(2470.0)].tuned
    r = await drv.read()  # mining restarts to apply the preset
    assert r.state is DeviceState.MINING and r.hashrate_ths == 0.0
    assert r.power_w == pytest.approx(IDLE_POWER_W, abs=1) and r.power_target_w == 2470.0
    assert any("restarting" in e for e in r.errors)
    clock.advance(RESTART_S + WAKE_S / 2)  # ramping: a preset never run auto-tunes
    assert m.miner_state(clock())[0] == "auto-tuning"
    r = await drv.read()
    assert r.hashrate_ths is not None and r.hashrate_ths > 0 and not r.errors
    assert IDLE_POWER_W < m.power_w() < 2470.0
    clock.advance(WAKE_S)
    r = await drv.read()
    assert r.power_w == pytest.approx(2470.0, abs=1) and m.power_w() == pytest.approx(2470.0)
    assert m.miner_state(clock())[0] == "mining"
    assert m.presets[usable_watts(m).index(2470.0)].tuned
    # Rounded onto the same preset: nothing written.
    assert await drv.set_power_target(2520.0) == 2470.0
    assert m.writes == 1
    # Out of range: clamped to the range, never above the stock preset.
    assert await drv.set_power_target(10_000.0) == 3010.0
    assert m.preset == "3010" and m.writes == 2
    assert await drv.set_power_target(100.0) == 2110.0
    assert m.preset == "2110" and m.writes == 3


async def test_a_preset_the_firmware_does_not_take_is_refused_with_the_range(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    # The miner's list changed after identify (a firmware update, a new tune):
    # the firmware ignores a preset it no longer has.
    m.presets = [p for p in m.presets if p.watts > 2300.0]
    with pytest.raises(DeviceRefused, match=r"kept preset 3010.*device range 2110-3010 W"):
        await drv.set_power_target(2200.0)
    assert m.preset == "3010"


async def test_the_preset_switcher_is_switched_off_by_a_target(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    m.switcher_enabled = True
    m.switcher_move(-2)  # hot: the firmware moved the running preset by itself
    r = await drv.read()
    assert r.power_target_w == 2830.0 and m.preset == "3010"
    # Same preset as configured, but the switcher is on: it is written.
    assert await drv.set_power_target(3010.0) == 3010.0
    assert not m.switcher_enabled and m.running == m.preset == "3010"


async def test_stop_and_start(site: SimSite, clock: Clock) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.sleep()
    assert m.power.paused and m.miner_state(clock())[0] == "stopped"
    clock.advance(PAUSE_S)
    r = await drv.read()
    assert r.state is DeviceState.SLEEPING and r.hashrate_ths == 0.0 and not r.errors
    assert r.power_w == pytest.approx(SLEEP_W, abs=1) and m.power_w() == SLEEP_W
    await drv.sleep()  # idempotent
    assert m.power.paused
    await drv.wake()
    assert not m.power.paused
    clock.advance(WAKE_S)
    r = await drv.read()
    assert r.state is DeviceState.MINING and r.power_w == pytest.approx(3010.0, abs=1)
    assert m.power_w() == pytest.approx(3010.0)


async def test_a_preset_set_while_stopped_applies_on_start(site: SimSite, clock: Clock) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.sleep()
    clock.advance(PAUSE_S)
    assert await drv.set_power_target(2600.0) == 2560.0
    assert m.power.paused and m.preset == "2560"
    assert m.power_w() == SLEEP_W
    await drv.wake()
    clock.advance(WAKE_S)
    assert m.power_w() == pytest.approx(2560.0)
    assert (await drv.read()).power_target_w == 2560.0


# -- faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["no_answer", "slow", "refuse"])
async def test_silent_slow_or_refusing_miner_is_unreachable(site: SimSite, fault: str) -> None:
    m = sim(site)
    drv = await connect(site)
    site.set_fault(m.address, fault, delay_s=3.0)
    await site.ready()
    for op in (drv.read(), drv.sleep(), drv.set_power_target(2500.0)):
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable):
            await op
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    with pytest.raises(DeviceUnreachable):
        await AsicDriver.connect("x", m.address, timeout_s=TIMEOUT_S)
    if fault == "refuse":
        # First contact without probes: pyasic's login fails quietly; 4028 says why.
        with (
            pytest.warns(UserWarning, match="Could not authenticate"),
            pytest.raises(DeviceUnreachable),
        ):
            await AsicDriver.from_inventory(
                "x", m.address, backend="vnish", model="S19 XP", timeout_s=TIMEOUT_S
            )
    site.set_fault(m.address, "none")
    await site.ready()
    # A slow miner still acts on the stop the driver gave up on (released now);
    # the driver reads that instead of assuming either outcome.
    acted = fault == "slow"
    if acted:
        await until(lambda: m.power.paused)
    assert m.power.paused is acted and m.writes == int(acted)
    r = await drv.read()
    assert r.state is (DeviceState.SLEEPING if acted else DeviceState.MINING)


async def test_garbage_is_faulted(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    site.set_fault(m.address, "garbage")
    with pytest.raises(DeviceFaulted):
        await drv.read()
    with pytest.raises(DeviceFaulted):
        await drv.sleep()
    with pytest.raises(DeviceFaulted):
        await AsicDriver.connect("x", m.address, timeout_s=TIMEOUT_S)
    site.set_fault(m.address, "none")
    await drv.sleep()
    assert m.power.paused


async def test_refused_commands_are_refused_with_the_range(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    site.set_fault(m.address, "refuse_commands")
    assert (await drv.read()).state is DeviceState.MINING
    with pytest.raises(DeviceRefused, match=r"declined.*device range 2110-3010 W"):
        await drv.set_power_target(2500.0)
    with pytest.raises(DeviceRefused):
        await drv.sleep()
    with pytest.raises(DeviceRefused):
        await drv.wake()
    assert m.writes == 0 and m.preset == "3010" and not m.power.paused
    site.set_fault(m.address, "none")
    assert await drv.set_power_target(2500.0) == 2470.0
    assert m.preset == "2470"


async def test_misreported_power_is_passed_on(site: SimSite) -> None:
    m = sim(site, S21)
    drv = await connect(site, S21)
    site.set_fault(m.address, "misreport_power", factor=0.5)
    r = await drv.read()
    assert r.power_w == pytest.approx(m.power_w() * 0.5, abs=1)
    assert m.power_w() == pytest.approx(3500.0)


async def test_reboot_is_unreachable_then_back_with_a_new_session(
    site: SimSite, clock: Clock
) -> None:
    m = sim(site)
    drv = await connect(site)
    clock.advance(100.0)
    assert not (await drv.read()).errors
    old_tokens = set(m.tokens)
    n = m.http_connections
    site.set_fault(m.address, "reboot", down_s=0.3)
    await site.ready()
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    assert not m.tokens  # the miner forgot every session
    clock.advance(1.0)
    # The driver's token is stale: pyasic logs on again and gives up; the adapter retries.
    r = await eventually(drv.read)
    assert r.state is DeviceState.MINING
    assert "mining restarted (uptime reset)" in r.errors
    assert m.tokens and not (m.tokens & old_tokens)
    # The connection died with the old process: one new one, kept after the reboot.
    assert m.http_connections == n + 1 and m.open_http_connections == 1
    clock.advance(WAKE_S)
    r = await drv.read()
    assert r.power_w == pytest.approx(3010.0, abs=1) and not r.errors


async def test_wrong_web_password_is_a_permission_error(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    m.set_password("not-admin")
    with pytest.warns(UserWarning, match="Could not authenticate"):
        with pytest.raises(DevicePermissionError, match="wrong web password"):
            await drv.read()
        with pytest.raises(DevicePermissionError):
            await drv.sleep()
        with pytest.raises(DevicePermissionError):
            await drv.set_power_target(2500.0)
        # First contact: the login fails, 4028 answers, so it is the password.
        with pytest.raises(DevicePermissionError):
            await AsicDriver.from_inventory(
                "x", m.address, backend="vnish", model="S19 XP", timeout_s=TIMEOUT_S
            )
    assert m.writes == 0 and not m.power.paused
    m.set_password("admin")
    assert (await drv.read()).state is DeviceState.MINING
    await drv.sleep()
    assert m.power.paused


async def test_a_write_of_unknown_outcome_is_not_repeated_blind(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    drv.timeout_s = 0.8
    site.set_fault(m.address, "slow", delay_s=0.3)
    # settings read answered at 0.3 s, the write at 0.6 s (applied), the
    # check read would be at 0.9 s: the driver has given up at 0.8 s.
    with pytest.raises(DeviceUnreachable):
        await drv.set_power_target(2500.0)
    assert m.writes == 1 and m.preset == "2470"
    site.set_fault(m.address, "none")
    # The driver re-reads first, sees the preset already set, and sends nothing.
    assert await drv.set_power_target(2500.0) == 2470.0
    assert m.writes == 1


# -- one kept web connection per miner --------------------------------------------------


def backend(drv: AsicDriver) -> VNishBackend:
    b = drv.backend
    assert isinstance(b, VNishBackend)
    return b


async def test_sim_keeps_http11_connections_until_asked_to_close(site: SimSite) -> None:
    m = sim(site)
    reader, writer = await asyncio.open_connection(m.address, 80)

    async def get(extra: str = "") -> bytes:
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        return head + await reader.readexactly(n)

    assert b"keep-alive" in await get() and b"AnthillOS" in await get()
    assert b"Connection: close" in await get("Connection: close\r\n")
    assert await reader.read() == b""  # closed after the answer
    writer.close()
    assert m.http_connections == 1 and m.requests["GET /"] == 3


async def test_pyasic_own_client_opens_a_connection_per_request(site: SimSite) -> None:
    """Why the adapter keeps its own (and that ``http_connections`` counts them)."""
    m = sim(site)
    web = VNishWebAPI(m.address)
    for _ in range(3):
        await web.summary()
    assert m.http_connections == 4  # unlock, then one per summary


async def test_readings_reuse_one_connection_until_closed(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    before = m.http_connections  # identification's probes and pyasic's own calls
    drv2 = await AsicDriver.from_inventory(
        "v0", m.address, backend="vnish", model="S19 XP", timeout_s=TIMEOUT_S
    )
    await drv.close()  # the identifying driver's: not used again
    assert backend(drv2).web.keeps_connection
    for _ in range(PRESET_REFRESH_READS + 2):
        assert (await drv2.read()).power_w == pytest.approx(3010.0, abs=1)
    await drv2.set_power_target(2500.0)
    await drv2.sleep()
    await drv2.wake()
    # Unlock, identify's three calls, every reading and write: one connection.
    assert m.http_connections == before + 1 and m.open_http_connections == 1
    assert m.requests["GET /api/v1/summary"] >= PRESET_REFRESH_READS + 2
    held = KEEPALIVE_BUDGET.held
    await drv2.close()
    assert KEEPALIVE_BUDGET.held == held - 1
    await until(lambda: m.open_http_connections == 0)
    assert (await drv2.read()).state is DeviceState.MINING  # a closed driver opens a new one
    assert m.http_connections == before + 2
    await drv2.close()


def already(d: AsicDriver) -> Connector:
    async def connect() -> DeviceDriver:
        return d

    return connect


async def test_the_agent_closes_the_kept_connections_on_its_way_out(site: SimSite) -> None:
    drivers = [await connect(site, i) for i in range(3)]
    links = []
    for d in drivers:
        t = DeviceLink(
            d.device_id,
            address=d.address,
            domain="site",
            nameplate_power_w=3000.0,
            nameplate_hashrate_ths=100.0,
            sleep_power_w=SLEEP_W,
            connect=already(d),
        )
        t.driver = d
        links.append(t)
    assert all(sim(site, i).open_http_connections == 1 for i in range(3))
    await close_drivers(links)
    await until(lambda: all(sim(site, i).open_http_connections == 0 for i in range(3)))


async def test_past_the_descriptor_budget_a_connection_is_not_kept(
    site: SimSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = sim(site)
    monkeypatch.setattr(KEEPALIVE_BUDGET, "limit", lambda: KEEPALIVE_BUDGET.held)
    drv = await connect(site)
    assert not backend(drv).web.keeps_connection
    await drv.read()  # the first reading asks for the preset too
    before = m.http_connections
    for _ in range(3):
        assert (await drv.read()).power_w == pytest.approx(3010.0, abs=1)
    assert m.http_connections == before + 3
    await until(lambda: m.open_http_connections == 0)
    await drv.close()


async def test_a_web_server_restart_or_idle_close_is_recovered_without_a_failure(
    site: SimSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    n = m.http_connections
    m.restart_web()
    await until(lambda: m.open_http_connections == 0)
    m.requests.clear()
    assert (await drv.read()).state is DeviceState.MINING
    # The closed connection was seen before use: a new one, one request, no resend.
    assert m.http_connections == n + 1 and dict(m.requests) == {"GET /api/v1/summary": 1}
    # The miner closes a connection left idle.
    monkeypatch.setattr("siteagent.sim.vnish.KEEPALIVE_IDLE_S", 0.2)
    await drv.read()  # the next wait for a request is the short one
    await until(lambda: m.open_http_connections == 0)
    assert (await drv.read()).state is DeviceState.MINING
    assert m.http_connections == n + 2
    await drv.close()


async def test_a_read_cut_mid_request_is_sent_once_more_on_a_fresh_connection(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    n = m.http_connections
    m.requests.clear()
    m.drop_next_request("GET /api/v1/summary")
    r = await drv.read()
    assert r.power_w == pytest.approx(3010.0, abs=1) and not r.errors
    assert m.dropped_requests == 1 and m.http_connections == n + 1
    assert dict(m.requests) == {"GET /api/v1/summary": 1}
    # An answer that is not HTTP is a fault, and is not asked again: the connection
    # did not close under the request, it carried garbage.
    site.set_fault(m.address, "garbage")
    with pytest.raises(DeviceFaulted):
        await drv.read()
    assert m.http_connections == n + 1
    site.set_fault(m.address, "none")
    assert (await drv.read()).state is DeviceState.MINING
    assert m.http_connections == n + 2  # the one that carried garbage was closed
    await drv.close()


async def test_a_write_cut_mid_request_is_not_sent_again(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    # Cut before the miner acted: nothing happened, and nothing is resent.
    m.drop_next_request("POST /api/v1/mining/stop")
    with pytest.raises(DeviceFaulted):
        await drv.sleep()
    assert m.dropped_requests == 1 and m.requests["POST /api/v1/mining/stop"] == 0
    assert not m.power.paused
    # The driver reads before it writes again, then stops the miner.
    m.requests.clear()
    await drv.sleep()
    assert next(iter(m.requests)) == "GET /api/v1/summary"
    assert m.requests["POST /api/v1/mining/stop"] == 1 and m.power.paused
    await drv.wake()
    # Cut after the miner acted: only the answer is lost. The write is not resent,
    # and the next one finds the preset set by reading and sends nothing.
    m.drop_next_request("POST /api/v1/settings", act=True)
    with pytest.raises(DeviceFaulted):
        await drv.set_power_target(2500.0)
    assert m.writes == 3 and m.preset == "2470"  # stop, start, this preset
    assert m.requests["POST /api/v1/settings"] == 1
    assert await drv.set_power_target(2500.0) == 2470.0
    assert m.writes == 3 and m.requests["POST /api/v1/settings"] == 1
    await drv.close()


async def test_a_late_answer_is_never_taken_for_the_next_request(site: SimSite) -> None:
    m = sim(site)
    drv = await connect(site)
    await drv.read()
    n = m.http_connections
    site.set_fault(m.address, "slow", delay_s=0.8)
    with pytest.raises(DeviceUnreachable):
        await drv.read()  # summary asked, no answer within 0.5 s
    site.set_fault(m.address, "none")  # the late summary answer goes out now
    reply = await backend(drv).web.settings()
    assert "overclock" in reply["miner"]  # the settings answer, not the summary
    assert m.http_connections == n + 1  # the timed-out connection was not reused
    await drv.close()


# -- registration -----------------------------------------------------------------------


async def test_the_site_mix_and_discovery_include_vnish() -> None:
    mix = ["antminer", "braiins", "luxos", "vnish", "whatsminer"]
    assert "vnish" in BACKENDS
    async with SimSite(5, base_address="127.1.161.1", backends=mix) as site:
        assert [site.backend_of(m) for m in site.miners] == mix
        found = await discover([m.address for m in site.miners], timeout_s=2.0)
        assert [backend_of(i) for _, i in found] == mix
        vn = dict(found)[site.miners[3].address]
        assert vn.firmware.startswith("VNish") and vn.mac == site.miners[3].mac
