"""Braiins OS: one gRPC channel per miner kept across readings, against the simulator.

Unmodified pyasic and grpclib on loopback; the simulator counts the HTTP/2
connections and calls it takes, and ends connections the way a miner does
(GOAWAY, close, reset, reboot, a call cut before its reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import pytest
from grpclib import Status
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos

from siteagent.domain.errors import DeviceError, DeviceFaulted, DeviceRefused, DeviceUnreachable
from siteagent.domain.types import DeviceState
from siteagent.drivers.asic import AsicDriver
from siteagent.drivers.backends import braiins_wire as wire
from siteagent.drivers.backends import known_backend
from siteagent.drivers.backends.base import KeepBudget
from siteagent.drivers.backends.braiins import STREAMS_PER_CONNECTION, BraiinsBackend
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.site import SimSite

BASE = (
    "127.1.180.1"  # this module's own loopback range (clear of a 10,000-miner bench from 127.1.0.1)
)
TIMEOUT_S = 0.5


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    async with SimSite(2, base_address=BASE, settle_s=0.4, pause_s=0.2, wake_s=0.3) as s:
        yield s


def sim(site: SimSite, i: int = 0) -> SimBraiinsMiner:
    m = site.miners[i]
    assert isinstance(m, SimBraiinsMiner)
    return m


async def driver(site: SimSite, i: int = 0, budget: KeepBudget | None = None) -> AsicDriver:
    """A driver as the agent builds one from its inventory (identified, no probes)."""
    m = sim(site, i)
    known = known_backend(m.address, "braiins", m.model.key)
    assert isinstance(known, BraiinsBackend)
    backend = known if budget is None else BraiinsBackend(known.miner, budget=budget)
    drv = AsicDriver(f"m{i}", m.address, backend, timeout_s=TIMEOUT_S)
    await drv.identify()
    # The slow fields on the first reading and every 12th after it (phase 0), as these
    # tests count them; tests/test_stagger.py covers the miners' phases.
    drv.backend.fields.phase = 0
    return drv


async def test_one_connection_carries_identify_login_and_every_reading(site: SimSite) -> None:
    m = sim(site)
    drv = await driver(site)
    for _ in range(5):
        assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_connections == 1
    assert m.grpc_open_connections == 1
    assert m.grpc_calls["Login"] == 1
    assert m.grpc_calls["GetMinerStats"] == 5


async def test_past_the_budget_a_reading_opens_and_closes_its_own(site: SimSite) -> None:
    m = sim(site)
    budget = KeepBudget(limit=0)
    drv = await driver(site, budget=budget)
    for _ in range(3):
        await drv.read()
    await asyncio.sleep(0.05)  # let the simulator see the last close
    assert m.grpc_connections == 4  # identify, then one per reading
    assert m.grpc_open_connections == 0
    assert budget.held == 0


async def test_the_budget_is_taken_once_per_miner_and_given_back_on_close(
    site: SimSite,
) -> None:
    budget = KeepBudget(limit=1)
    first = await driver(site, 0, budget=budget)
    second = await driver(site, 1, budget=budget)
    await first.read()
    await second.read()
    assert budget.held == 1
    assert isinstance(first.backend, BraiinsBackend)
    assert first.backend._wire.client.keeps_channel
    assert isinstance(second.backend, BraiinsBackend)
    assert not second.backend._wire.client.keeps_channel
    await first.backend.close()
    assert budget.held == 0
    await asyncio.sleep(0.05)
    assert sim(site, 0).grpc_open_connections == 0


@pytest.mark.parametrize("how", ["goaway", "close", "reset"])
async def test_a_connection_the_miner_ended_while_idle_is_reopened(site: SimSite, how: str) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    if how == "goaway":
        m.goaway()
    else:
        m.drop_connections(reset=how == "reset")
    assert (await drv.read()).state is DeviceState.MINING  # no reading lost
    assert m.grpc_connections == 2
    assert m.grpc_open_connections == 1


async def test_a_reading_cut_mid_call_is_sent_once_more_on_a_fresh_connection(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.cut_next_call("GetMinerStats", applied=True)
    r = await drv.read()
    assert r.power_w == pytest.approx(m.power_w(), abs=1)
    assert m.grpc_calls["GetMinerStats"] == 3  # first reading, the cut call, its retry
    assert m.grpc_connections == 2


async def test_a_goaway_mid_reading_is_recovered_on_a_fresh_connection(
    site: SimSite,
) -> None:
    # And the reading's task keeps its deadline: grpclib ends a call whose connection
    # went away by cancelling the task that waits on it, and never takes that cancel
    # back. On the reading's own task, a deadline around the reading then ended in a
    # CancelledError instead of a TimeoutError: a worker's reading ended so had no
    # outcome, and its miner was never read again.
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.set_fault("slow", delay_s=0.15)  # holds the calls in flight
    states: list[DeviceState] = []

    async def read_under_a_deadline() -> str:
        try:
            async with asyncio.timeout(0.8):
                states.append((await drv.read()).state)  # cut, sent again: about 0.2 s
                await asyncio.sleep(5)  # past the deadline
        except TimeoutError:
            return "timed out"
        return "no deadline"

    task = asyncio.create_task(read_under_a_deadline())
    await asyncio.sleep(0.05)
    m.goaway()
    assert await task == "timed out"
    assert states == [DeviceState.MINING]
    assert m.grpc_calls["GetMinerStats"] == 3  # first reading, the one cut, its retry
    assert m.grpc_connections == 2


async def test_calls_cut_at_every_point_of_a_connect_leave_no_channel_unclosed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Calls of one miner at once (readings, and a command the tick's deadline cuts):
    # the one cut drops the channel while another is connecting it, and grpclib
    # finishes that connect on the closed channel all the same: a connection nothing
    # closes, which grpclib logs as an error ("Unclosed connection") once collected.
    # Cuts at many points of the connect, on a busy loop, as a tick's are.
    cuts_s = (0.0005, 0.002, 0.005, 0.01, 0.03, 0.1, 1.0)
    async with SimSite(30, base_address="127.1.182.1", settle_s=0.4) as site:
        drivers = [await driver(site, i) for i in range(len(site.miners))]
        low_w = sim(site).model.power_target_min_w
        for d in drivers:
            await d.set_power_target(low_w)  # logged in

        async def cut(k: int, call: Awaitable[object]) -> None:
            with contextlib.suppress(TimeoutError, DeviceError):
                async with asyncio.timeout(cuts_s[k % len(cuts_s)]):
                    await call

        for n in range(5):
            for i in range(len(site.miners)):
                sim(site, i).drop_connections()  # every call connects again
            await asyncio.sleep(0.05)
            calls = []
            for i, d in enumerate(drivers):
                target = low_w + 100 * n
                calls += [
                    cut(3 * i + n, d.read()),
                    cut(3 * i + n + 1, d.read()),
                    cut(3 * i + n + 2, d.set_power_target(target)),
                ]
            await asyncio.gather(*calls)
        for d in drivers:
            await d.close()
        del drivers, calls
        gc.collect()  # grpclib logs a channel collected with its connection open
        await asyncio.sleep(0.1)  # let the simulators see the closes
        assert [sim(site, i).grpc_open_connections for i in range(30)] == [0] * 30
    assert not [r for r in caplog.records if "Unclosed connection" in r.getMessage()]


async def test_a_pause_cut_by_goaway_is_not_sent_again(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.set_fault("slow", delay_s=0.15)
    pausing = asyncio.create_task(drv.sleep())
    await asyncio.sleep(0.05)
    m.goaway()
    with pytest.raises(DeviceFaulted, match="Connection lost"):  # grpclib's words for it
        await pausing
    await asyncio.sleep(0.2)
    assert m.grpc_calls["PauseMining"] == 1
    assert not m.power.paused  # the miner dropped the call with its connection


async def test_a_reading_is_retried_at_most_once(site: SimSite) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.cut_next_call("GetMinerStats", applied=True, calls=2)
    with pytest.raises(DeviceFaulted, match="Connection lost"):
        await drv.read()
    assert m.grpc_calls["GetMinerStats"] == 3
    assert (await drv.read()).state is DeviceState.MINING  # and then recovers


async def test_a_reboot_is_recovered_on_a_new_connection(site: SimSite) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.set_fault("reboot", down_s=0.3)
    assert m.grpc_open_connections == 0  # a reboot ends its connections at once
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    await asyncio.sleep(0.4)
    await m.ready()
    assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_connections == 2


async def test_a_call_without_an_answer_in_time_drops_the_channel(site: SimSite) -> None:
    # A miner that lost power sends no FIN: a channel that did not answer in time is
    # not trusted again.
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.set_fault("slow", delay_s=3.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable):
        await drv.read()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    m.set_fault("none")
    await m.ready()
    assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_connections == 2


async def test_a_target_cut_after_it_was_applied_is_not_sent_again(site: SimSite) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.cut_next_call("SetPowerTarget", applied=True)
    with pytest.raises(DeviceFaulted, match="Connection lost"):
        await drv.set_power_target(2000.0)
    assert m.power.target_w == 2000.0
    asked = m.grpc_calls["GetActivePerformanceMode"]
    # The next write reads the miner first, sees the target set, and sends nothing.
    assert await drv.set_power_target(2000.0) == 2000.0
    assert m.grpc_calls["GetActivePerformanceMode"] == asked + 1
    assert m.grpc_calls["SetPowerTarget"] == 1


async def test_a_target_cut_before_it_was_applied_is_sent_after_a_reread(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.cut_next_call("SetPowerTarget", applied=False)
    with pytest.raises(DeviceFaulted, match="Connection lost"):
        await drv.set_power_target(2000.0)
    assert m.power.target_w == 3010.0
    assert m.grpc_calls["SetPowerTarget"] == 1
    asked = m.grpc_calls["GetActivePerformanceMode"]
    assert await drv.set_power_target(2000.0) == 2000.0
    assert m.grpc_calls["GetActivePerformanceMode"] == asked + 1  # read first
    assert m.grpc_calls["SetPowerTarget"] == 2
    assert m.power.target_w == 2000.0


@pytest.mark.parametrize(("method", "op"), [("PauseMining", "sleep"), ("ResumeMining", "wake")])
async def test_a_pause_or_resume_cut_mid_call_is_not_sent_again(
    site: SimSite, method: str, op: str
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.cut_next_call(method, applied=True)
    with pytest.raises(DeviceFaulted, match="Connection lost"):
        await getattr(drv, op)()
    assert m.grpc_calls[method] == 1
    await asyncio.sleep(0.05)
    assert m.grpc_calls[method] == 1  # nothing re-sent behind the caller's back


async def test_a_token_the_miner_forgot_is_renewed_on_the_kept_connection(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.token = "simtoken-after-reboot"  # the old one is now UNAUTHENTICATED
    assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_calls["Login"] == 2
    assert m.grpc_connections == 1


async def test_a_kept_connection_is_renewed_between_readings_after_its_streams(
    site: SimSite,
) -> None:
    # h2 remembers every closed stream of a connection (up to 2**16, ~200 B each) and
    # offers no setting for it: a kept connection is renewed between readings once it
    # carried STREAMS_PER_CONNECTION streams, so it does not grow with every reading.
    m = sim(site)
    drv = await driver(site)
    readings = 4 * STREAMS_PER_CONNECTION  # one stream each, and three more now and then
    for _ in range(readings):
        assert (await drv.read()).state is DeviceState.MINING  # none lost to a renewal
    streams = m.grpc_calls.total()  # every stream the miner was asked on
    assert streams > 4 * STREAMS_PER_CONNECTION
    # A connection is closed after the reading that took it to the limit (at most 4 more).
    assert streams // (STREAMS_PER_CONNECTION + 4) <= m.grpc_connections - 1
    assert m.grpc_connections - 1 <= streams // STREAMS_PER_CONNECTION
    await asyncio.sleep(0.05)  # let the simulator see the closes
    assert m.grpc_open_connections == 1
    assert m.grpc_calls["Login"] == 1  # the token outlives the connection


# -- readings from replies decoded by ``braiins_wire`` (only the fields a reading needs) --

POWER = bos.Power(watt=3010)
GHS = bos.GigaHashrate(gigahash_per_second=140_000.0)
STATS = bos.GetMinerStatsResponse(
    pool_stats=bos.PoolStats(accepted_shares=7),
    miner_stats=bos.WorkSolverStats(
        real_hashrate=bos.RealHashrate(last_5_s=GHS, last_15_s=GHS, last_1_m=GHS),
        nominal_hashrate=bos.GigaHashrate(gigahash_per_second=141_000.0),
        found_blocks=2,
    ),
    power_stats=bos.MinerPowerStats(
        approximated_consumption=POWER,
        efficiency=bos.PowerEfficiency(joule_per_terahash=21.5),
    ),
)
MODE = bos.PerformanceMode(
    tuner_mode=bos.TunerPerformanceMode(
        power_target=bos.PowerTargetMode(power_target=bos.Power(watt=2500))
    )
)
COOLING = bos.GetCoolingStateResponse(
    fans=[bos.FanState(position=0, rpm=4200)],
    highest_temperature=bos.TemperatureSensor(id=3, temperature=bos.Temperature(degree_c=71.5)),
)
DETAILS = bos.GetMinerDetailsResponse(
    uid="abc", hostname="m1", mac_address="02:00:00:00:00:01", status=bos.MinerStatus.PAUSED
)


def _offline_backend() -> BraiinsBackend:
    known = known_backend("127.7.255.254", "braiins", "S21")
    assert isinstance(known, BraiinsBackend)
    return known


DECODED_AS = {route.reply: route.decoded_as for route in wire.ROUTES}


def _slim_decoded(reply: Any) -> Any:
    """``reply`` (a pyasic message) as ``braiins_wire`` decodes it for a reading."""
    return DECODED_AS[type(reply)].FromString(bytes(reply))


def _replying(backend: BraiinsBackend, **replies: Any) -> None:
    """Make the backend's reading calls answer with ``replies`` (pyasic messages, by
    ``miner_stats``, ``miner_details``, ``performance_mode``, ``cooling_state``)."""
    wire = backend._wire
    r = {
        "miner_stats": STATS,
        "miner_details": DETAILS,
        "performance_mode": MODE,
        "cooling_state": COOLING,
        **replies,
    }

    replied = {"stats": "miner_stats", "details": "miner_details"}
    replied |= {"mode": "performance_mode", "cooling": "cooling_state"}

    async def reads(sources: Sequence[str]) -> dict[str, Any]:
        return {s: _slim_decoded(r[replied[s]]) for s in sources}

    wire.reads = reads  # type: ignore[method-assign]


async def test_a_reading_from_slim_replies() -> None:
    backend = _offline_backend()
    _replying(backend)
    r = await backend.read()
    assert (r.power_w, r.hashrate_ths, r.temperature_c, r.power_target_w) == (
        3010.0,
        140.0,
        71.5,
        2500.0,
    )
    assert r.state is DeviceState.SLEEPING


@pytest.mark.parametrize(
    ("replies", "expect"),
    [
        ({"miner_stats": bos.GetMinerStatsResponse()}, DeviceFaulted),
        (
            {
                "miner_stats": bos.GetMinerStatsResponse(
                    power_stats=bos.MinerPowerStats(approximated_consumption=POWER)
                )
            },
            DeviceFaulted,
        ),
        (
            {"performance_mode": bos.PerformanceMode(manual_mode=bos.ManualPerformanceMode())},
            DeviceFaulted,
        ),
        ({"cooling_state": bos.GetCoolingStateResponse()}, {"temperature_c": None}),
        (
            {"performance_mode": bos.PerformanceMode(tuner_mode=MODE.tuner_mode)},
            {"power_target_w": 2500.0},
        ),
        (
            {
                "performance_mode": bos.PerformanceMode(
                    tuner_mode=bos.TunerPerformanceMode(
                        power_target=bos.PowerTargetMode(power_target=bos.Power(watt=0))
                    )
                )
            },
            {"power_target_w": None},  # a Power sent without its (zero) watt: no target
        ),
        (
            {
                "miner_stats": bos.GetMinerStatsResponse(
                    miner_stats=bos.WorkSolverStats(real_hashrate=bos.RealHashrate(last_15_s=GHS)),
                    power_stats=bos.MinerPowerStats(approximated_consumption=POWER),
                )
            },
            {"hashrate_ths": 0.0},  # sent without a 5 s figure: zero, as pyasic reads it
        ),
        (
            {"miner_details": bos.GetMinerDetailsResponse(uid="x")},
            {"state": DeviceState.UNKNOWN},
        ),
    ],
)
async def test_a_reading_from_replies_with_parts_left_off(
    replies: dict[str, Any], expect: Any
) -> None:
    backend = _offline_backend()
    _replying(backend, **replies)
    if expect is DeviceFaulted:
        with pytest.raises(DeviceFaulted, match="missing or malformed"):
            await backend.read()
        return
    r = await backend.read()
    for k, v in expect.items():
        assert getattr(r, k) == v


# -- a reading's calls: the stats alone, or the slow ones sent together (``send_reads``) --


def _open_streams(drv: AsicDriver) -> int:
    """Streams grpclib still tracks on the driver's kept channel."""
    backend = drv.backend
    assert isinstance(backend, BraiinsBackend)
    kept = backend._wire.client.channel.current
    assert kept is not None
    protocol: Any = kept.channel._protocol  # grpclib's own record of the streams it holds
    assert protocol is not None
    return len(protocol.processor.streams)


SLOW_CALLS = ("GetMinerDetails", "GetActivePerformanceMode", "GetCoolingState")


def _asked(m: SimBraiinsMiner) -> tuple[int, ...]:
    return tuple(m.grpc_calls[c] for c in ("GetMinerStats", *SLOW_CALLS))


def _plus(asked: tuple[int, ...], stats: int, slow: int) -> tuple[int, ...]:
    return (asked[0] + stats, *(n + slow for n in asked[1:]))


def _slow_next(drv: AsicDriver) -> None:
    """Have the driver's next reading ask for the slow fields too (as after a write)."""
    drv.backend.fields.forget()


async def test_a_steady_reading_is_one_call_and_the_slow_ones_are_in_flight_together(
    site: SimSite,
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    asked = _asked(m)
    await drv.read()
    assert _asked(m) == _plus(asked, stats=1, slow=0)
    m.set_fault("slow", delay_s=0.15)  # each call held this long by the miner
    _slow_next(drv)
    asked = _asked(m)
    t0 = time.monotonic()
    await drv.read()
    assert time.monotonic() - t0 < 0.43  # the stats, then the three slow calls at once
    assert _asked(m) == _plus(asked, stats=1, slow=1)
    assert m.grpc_connections == 1


@pytest.mark.parametrize("method", ["GetMinerStats", *SLOW_CALLS])
@pytest.mark.parametrize(
    ("status", "error"),
    [(Status.INTERNAL, DeviceFaulted), (Status.FAILED_PRECONDITION, DeviceRefused)],
)
async def test_a_status_on_any_call_fails_the_reading_and_keeps_the_connection(
    site: SimSite, method: str, status: Status, error: type[Exception]
) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.fail_next_call(method, status)
    slow = method != "GetMinerStats"
    if slow:
        _slow_next(drv)
    asked = _asked(m)
    with pytest.raises(error, match=status.name):
        await drv.read()
    assert _asked(m) == _plus(asked, stats=1, slow=int(slow))  # an answer: not sent again
    assert _open_streams(drv) == 0  # the other calls' streams ended too
    assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_connections == 1


async def test_a_forgotten_token_sends_the_call_again_after_one_login(site: SimSite) -> None:
    m = sim(site)
    drv = await driver(site)
    await drv.read()
    m.token = "simtoken-after-reboot"
    asked = _asked(m)
    assert (await drv.read()).state is DeviceState.MINING
    assert m.grpc_calls["Login"] == 2
    assert _asked(m) == _plus(asked, stats=2, slow=0)
    assert _open_streams(drv) == 0


async def test_only_reads_are_sent_together() -> None:
    # send_reads retries what it sent: a control call must never go through it.
    backend = _offline_backend()
    with pytest.raises(ValueError, match="not a read"):
        await backend._wire.client.send_reads(
            [
                wire.Route(
                    "/braiins.bos.v1.ActionsService/PauseMining",
                    bos.PauseMiningRequest,
                    bos.PauseMiningResponse,
                    bos.PauseMiningResponse,
                )
            ]
        )


async def test_a_driver_let_go_closes_its_channel_without_the_collector(site: SimSite) -> None:
    # A miner the agent stops driving (one that moved) is freed by reference counting
    # alone: nothing of its web API may sit in a reference cycle.
    import gc

    m = sim(site)
    budget = KeepBudget(limit=4)
    drv = await driver(site, budget=budget)
    await drv.read()
    assert budget.held == 1
    gc.disable()
    try:
        del drv
        assert budget.held == 0  # weakref.finalize ran: the channel closed, the slot back
    finally:
        gc.enable()
    await asyncio.sleep(0.05)
    assert m.grpc_open_connections == 0
