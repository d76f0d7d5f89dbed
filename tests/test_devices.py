"""One device in the fleet: worst-case accounting, confirmation of changes, failure logging
and backoff."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest

from siteagent.agent.control.devices import UNASKED_CANCEL, DeviceDriver, DeviceLink, within
from siteagent.agent.control.fleet import Fleet
from siteagent.domain import (
    DeviceControls,
    DeviceFaulted,
    DeviceIdentity,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DeviceUnreachable,
)

NAMEPLATE_W = 3500.0
SLEEP_W = 25.0
STALE_S = 30.0
CONFIRM_S = 120.0
CAPS = DeviceControls(
    power_target=True,
    power_target_min_w=1500.0,
    power_target_max_w=3600.0,
    power_target_step_w=50.0,
    can_sleep=True,
)


class StubDriver:
    """A connected driver that the tracker only asks for its identity."""

    def __init__(self, identity: DeviceIdentity | None) -> None:
        self._identity = identity

    @property
    def identity(self) -> DeviceIdentity | None:
        return self._identity

    async def read(self) -> DeviceReading:
        raise AssertionError("the tracker never reads by itself")

    async def set_power_target(self, power_w: float) -> float:
        raise AssertionError("the tracker never commands by itself")

    async def sleep(self) -> None:
        raise AssertionError("the tracker never commands by itself")

    async def wake(self) -> None:
        raise AssertionError("the tracker never commands by itself")


async def _never_connect() -> DeviceDriver:
    raise AssertionError("not used")


class One:
    """One device in a fleet of its own, told what happens and asked as the loop does;
    its state is read from the fleet's record of it (``fleet[device_id]``)."""

    def __init__(self, link: DeviceLink) -> None:
        self.link = link
        self.fleet = Fleet([link])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fleet[self.link.device_id], name)

    def attach(self, driver: DeviceDriver) -> None:
        self.fleet.attach(0, driver)

    def record_reading(self, r: DeviceReading, now_s: float, confirm_timeout_s: float) -> None:
        self.fleet.record_reading(0, r, now_s, confirm_timeout_s)

    def record_failure(
        self, e: Exception, now_s: float, interval_s: float, max_backoff_s: float
    ) -> None:
        self.fleet.record_failure(0, e, now_s, interval_s, max_backoff_s)

    def record_command(
        self, kind: str, old_w: float, new_w: float, target_w: float | None, now_s: float
    ) -> None:
        self.fleet.record_command(0, kind, old_w, new_w, target_w, now_s)

    def mark_read_only(self, e: Exception) -> None:
        self.fleet.mark_read_only(0, e)

    def status(self, now_s: float, stale_after_s: float) -> DeviceStatus:
        return self.fleet.snapshot(now_s, stale_after_s).devices[0]

    def budget_w(self, now_s: float, stale_after_s: float) -> float:
        return self.status(now_s, stale_after_s).budget_w

    def expected_w(self, now_s: float, stale_after_s: float) -> float:
        return self.status(now_s, stale_after_s).expected_w

    def wakes_in_last_hour(self, now_s: float) -> int:
        return self.fleet.wakes_in_last_hour(0, now_s)


def tracker(*, attach: bool = True) -> One:
    t = One(
        DeviceLink(
            "m1",
            address="10.0.0.1",
            domain="rack",
            nameplate_power_w=NAMEPLATE_W,
            nameplate_hashrate_ths=200.0,
            sleep_power_w=SLEEP_W,
            connect=_never_connect,
        )
    )
    if attach:
        ident = DeviceIdentity("Bitmain", "S19", "braiins", None, None, CAPS, NAMEPLATE_W, 200.0)
        t.attach(StubDriver(ident))
    return t


def mining(now_s: float, power_w: float, target_w: float | None = None) -> DeviceReading:
    return DeviceReading("m1", now_s, power_w, DeviceState.MINING, power_target_w=target_w)


def sleeping(now_s: float) -> DeviceReading:
    return DeviceReading("m1", now_s, 20.0, DeviceState.SLEEPING)


def test_attach_adopts_identity_capabilities() -> None:
    t = tracker(attach=False)
    assert t.capabilities.power_target is False
    ident = DeviceIdentity("B", "S21", "fw", None, None, CAPS, 3600.0, 234.0)
    t.attach(StubDriver(ident))
    assert t.capabilities == CAPS
    # Nameplate only ever grows: the worst case must not shrink on a vendor's say-so.
    assert t.nameplate_power_w == 3600.0
    t2 = tracker(attach=False)
    t2.attach(StubDriver(DeviceIdentity("B", "S9", "fw", None, None, CAPS, 1400.0, 14.0)))
    assert t2.nameplate_power_w == NAMEPLATE_W


def test_never_read_counts_at_nameplate_and_is_not_controllable() -> None:
    t = tracker()
    s = t.status(0.0, STALE_S)
    assert s.state is DeviceState.UNKNOWN
    assert s.budget_w == NAMEPLATE_W
    assert s.expected_w == NAMEPLATE_W
    assert not s.controllable


def test_lowered_device_counts_at_old_level_until_a_reading_confirms() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    assert t.budget_w(0.0, STALE_S) == 3000.0
    t.record_command("lower", 3000.0, 2000.0, 2000.0, 1.0)
    assert t.power_target_w == 2000.0
    assert t.budget_w(1.0, STALE_S) == 3000.0
    assert t.expected_w(1.0, STALE_S) == 2000.0
    # Still drawing well above the new level: not confirmed, still the old level.
    t.record_reading(mining(2.0, 2600.0, 2000.0), 2.0, CONFIRM_S)
    assert t.pending is not None
    assert t.budget_w(2.0, STALE_S) == 3000.0
    # Within the slack of the new level: confirmed.
    t.record_reading(mining(3.0, 2030.0, 2000.0), 3.0, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(3.0, STALE_S) == 2030.0
    assert t.status(3.0, STALE_S).budget_w == 2030.0


def test_sleep_counts_at_old_level_until_the_device_reads_asleep() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3100.0, 3100.0), 0.0, CONFIRM_S)
    t.record_command("sleep", 3100.0, SLEEP_W, None, 5.0)
    assert t.awake is False
    assert t.last_transition_s == 5.0
    assert t.budget_w(5.0, STALE_S) == 3100.0
    assert t.expected_w(5.0, STALE_S) == SLEEP_W
    t.record_reading(mining(6.0, 3050.0, 3100.0), 6.0, CONFIRM_S)
    assert t.budget_w(6.0, STALE_S) == 3100.0
    t.record_reading(sleeping(7.0), 7.0, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(7.0, STALE_S) == SLEEP_W


def test_unconfirmed_change_expires_and_readings_rule_again() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("lower", 3000.0, 2000.0, 2000.0, 0.0)
    # The device ignored us; once the change expires its own word is taken again.
    t.record_reading(mining(CONFIRM_S + 1, 2990.0, 3000.0), CONFIRM_S + 1, CONFIRM_S)
    assert t.pending is None
    assert t.power_target_w == 3000.0
    assert t.budget_w(CONFIRM_S + 1, STALE_S) == 3000.0


def test_raise_counts_at_new_level_at_once() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 2000.0, 2000.0), 0.0, CONFIRM_S)
    t.record_command("raise", 2000.0, 3000.0, 3000.0, 1.0)
    assert t.budget_w(1.0, STALE_S) == 3000.0
    # Reading still shows the old target: not confirmed, stays counted at the new level.
    t.record_reading(mining(2.0, 2100.0, 2000.0), 2.0, CONFIRM_S)
    assert t.pending is not None
    assert t.power_target_w == 3000.0
    assert t.budget_w(2.0, STALE_S) == 3000.0
    t.record_reading(mining(3.0, 2400.0, 3000.0), 3.0, CONFIRM_S)
    assert t.pending is None


def test_wake_counts_at_new_level_and_confirms_on_mining() -> None:
    t = tracker()
    t.record_reading(sleeping(0.0), 0.0, CONFIRM_S)
    assert t.budget_w(0.0, STALE_S) == SLEEP_W
    t.record_command("wake", SLEEP_W, 1500.0, 1500.0, 4.0)
    assert t.awake is True
    assert t.last_transition_s == 4.0
    assert t.budget_w(4.0, STALE_S) == 1500.0
    t.record_reading(sleeping(5.0), 5.0, CONFIRM_S)
    assert t.pending is not None
    assert t.awake is True
    assert t.budget_w(5.0, STALE_S) == 1500.0
    t.record_reading(mining(6.0, 900.0, 1500.0), 6.0, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(6.0, STALE_S) == 1500.0


def test_unreachable_counts_at_nameplate() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 2000.0, 2000.0), 0.0, CONFIRM_S)
    t.record_failure(DeviceUnreachable("timeout"), 1.0, 5.0, 60.0)
    s = t.status(1.0, STALE_S)
    assert s.state is DeviceState.UNREACHABLE
    assert s.budget_w == NAMEPLATE_W
    assert s.expected_w == NAMEPLATE_W
    assert not s.controllable


def test_unreachable_counts_above_nameplate_if_it_was_seen_above() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3700.0, None), 0.0, CONFIRM_S)
    t.record_failure(DeviceUnreachable("timeout"), 1.0, 5.0, 60.0)
    assert t.budget_w(1.0, STALE_S) == 3700.0


def test_unreachable_but_known_asleep_counts_at_sleep_power() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("sleep", 3000.0, SLEEP_W, None, 1.0)
    t.record_reading(sleeping(2.0), 2.0, CONFIRM_S)
    t.record_failure(DeviceUnreachable("timeout"), 3.0, 5.0, 60.0)
    assert t.budget_w(3.0, STALE_S) == SLEEP_W


def test_unreachable_with_sleep_unconfirmed_counts_at_nameplate() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("sleep", 3000.0, SLEEP_W, None, 1.0)
    t.record_failure(DeviceUnreachable("timeout"), 2.0, 5.0, 60.0)
    assert t.budget_w(2.0, STALE_S) == NAMEPLATE_W


def test_stale_reading_makes_the_device_unreachable() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 2000.0, 2000.0), 0.0, CONFIRM_S)
    fresh = t.status(STALE_S, STALE_S)
    assert fresh.state is DeviceState.MINING
    assert fresh.controllable
    assert fresh.budget_w == 2000.0
    stale = t.status(STALE_S + 0.5, STALE_S)
    assert stale.state is DeviceState.UNREACHABLE
    assert not stale.controllable
    assert stale.budget_w == NAMEPLATE_W
    assert stale.reading_age_s == pytest.approx(STALE_S + 0.5)


def test_fresh_reading_without_driver_is_not_controllable() -> None:
    t = tracker(attach=False)
    t.record_reading(mining(0.0, 2000.0, 2000.0), 0.0, CONFIRM_S)
    assert not t.status(0.0, STALE_S).controllable


def test_reading_without_pending_change_adopts_device_state_and_target() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("raise", 3000.0, 3400.0, 3400.0, 1.0)
    t.record_reading(mining(2.0, 3350.0, 3400.0), 2.0, CONFIRM_S)
    assert t.pending is None
    # Someone put it to sleep behind our back, with a different target.
    t.record_reading(
        DeviceReading("m1", 10.0, 22.0, DeviceState.SLEEPING, power_target_w=2500.0),
        10.0,
        CONFIRM_S,
    )
    assert t.awake is False
    assert t.power_target_w == 2500.0
    assert t.budget_w(10.0, STALE_S) == SLEEP_W
    # And woke it again.
    t.record_reading(mining(11.0, 2450.0, 2500.0), 11.0, CONFIRM_S)
    assert t.awake is True
    assert t.budget_w(11.0, STALE_S) == 2500.0


def test_reading_with_pending_change_keeps_what_was_commanded() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("sleep", 3000.0, SLEEP_W, None, 1.0)
    t.record_reading(mining(2.0, 3000.0, 3000.0), 2.0, CONFIRM_S)
    assert t.awake is False


def test_disobeying_device_is_expected_at_its_measured_draw() -> None:
    t = tracker()
    t.record_reading(mining(0.0, 3400.0, 2000.0), 0.0, CONFIRM_S)
    assert t.expected_w(0.0, STALE_S) == 3400.0
    assert t.budget_w(0.0, STALE_S) == 3400.0
    t.record_reading(mining(1.0, 2040.0, 2000.0), 1.0, CONFIRM_S)
    assert t.expected_w(1.0, STALE_S) == 2000.0


def test_failure_logs_once_and_recovery_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    t = tracker()
    t.record_reading(mining(0.0, 2000.0, 2000.0), 0.0, CONFIRM_S)
    caplog.set_level(logging.DEBUG, logger="siteagent.devices")
    for i in range(5):
        t.record_failure(DeviceUnreachable("connection refused"), 1.0 + i, 5.0, 60.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "m1" in warnings[0].getMessage()
    assert "unreachable" in warnings[0].getMessage()
    assert "connection refused" in warnings[0].getMessage()
    assert t.failures == 5
    assert t.last_error == "DeviceUnreachable: connection refused"
    caplog.clear()
    t.record_reading(mining(10.0, 2000.0, 2000.0), 10.0, CONFIRM_S)
    t.record_reading(mining(11.0, 2000.0, 2000.0), 11.0, CONFIRM_S)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "recovered" in caplog.records[0].getMessage()
    assert "5 failed" in caplog.records[0].getMessage()
    assert t.failures == 0
    assert t.last_error is None
    assert t.status(11.0, STALE_S).state is DeviceState.MINING


def test_change_of_failure_kind_logs_again(caplog: pytest.LogCaptureFixture) -> None:
    t = tracker()
    caplog.set_level(logging.WARNING, logger="siteagent.devices")
    t.record_failure(DeviceUnreachable("timeout"), 0.0, 5.0, 60.0)
    t.record_failure(DeviceFaulted("garbage"), 1.0, 5.0, 60.0)
    t.record_failure(DeviceFaulted("garbage"), 2.0, 5.0, 60.0)
    t.record_failure(RuntimeError("driver bug"), 3.0, 5.0, 60.0)
    assert len(caplog.records) == 2
    assert t.state is DeviceState.FAULTED


def test_backoff_doubles_and_is_capped() -> None:
    t = tracker()
    interval_s, max_backoff_s = 5.0, 60.0
    delays = []
    for i in range(8):
        now = 100.0 * i
        t.record_failure(DeviceUnreachable("timeout"), now, interval_s, max_backoff_s)
        delays.append(t.next_read_s - now)
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]
    t.record_reading(mining(1000.0, 2000.0, 2000.0), 1000.0, CONFIRM_S)
    t.record_failure(DeviceUnreachable("timeout"), 1001.0, interval_s, max_backoff_s)
    assert t.next_read_s == 1001.0 + interval_s


def test_says_sleeping_but_still_draws_is_not_known_asleep() -> None:
    # Regression: once an unconfirmed sleep expired, a miner reading "sleeping" at
    # 1500 W counted at its sleep power as soon as it went unreachable.
    t = tracker()
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("sleep", 3000.0, SLEEP_W, None, 1.0)
    half_asleep = DeviceReading("m1", 0.0, 1500.0, DeviceState.SLEEPING)
    t.record_reading(half_asleep, 2.0, CONFIRM_S)
    assert t.pending is not None
    t.record_reading(half_asleep, CONFIRM_S + 5, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(CONFIRM_S + 5, STALE_S) == 1500.0
    t.record_failure(DeviceUnreachable("timeout"), CONFIRM_S + 6, 5.0, 60.0)
    assert t.budget_w(CONFIRM_S + 6, STALE_S) == NAMEPLATE_W


def test_raise_over_an_unconfirmed_lower_keeps_the_old_level() -> None:
    # Regression: a new target sent before a lower was confirmed dropped the lower's
    # old level from the budget, so a miner that had ignored both counted at 1004 W.
    blind = replace(CAPS, reports_power=False)
    t = tracker(attach=False)
    t.attach(StubDriver(DeviceIdentity("B", "S19", "fw", None, None, blind, NAMEPLATE_W, 200.0)))
    t.record_reading(
        DeviceReading("m1", 0.0, None, DeviceState.MINING, power_target_w=2000.0), 0.0, CONFIRM_S
    )
    assert t.budget_w(0.0, STALE_S) == 2000.0
    t.record_command("lower", 2000.0, 1000.0, 1000.0, 1.0)
    ignored = DeviceReading("m1", 0.0, None, DeviceState.MINING, power_target_w=2000.0)
    t.record_reading(ignored, 2.0, CONFIRM_S)
    assert t.budget_w(2.0, STALE_S) == 2000.0
    t.record_command("raise", 2000.0, 1004.0, 1004.0, 3.0)
    t.record_reading(ignored, 4.0, CONFIRM_S)
    assert t.budget_w(4.0, STALE_S) == 2000.0
    # Once the device reads back the new target, the change is confirmed.
    took = DeviceReading("m1", 0.0, None, DeviceState.MINING, power_target_w=1004.0)
    t.record_reading(took, 5.0, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(5.0, STALE_S) == 1004.0


def test_lower_is_not_confirmed_by_a_miner_still_asleep_from_before() -> None:
    # Regression: wake, then a lower before the wake took effect; a reading of the
    # still-sleeping miner (0 W) "confirmed" the lower and the budget fell to sleep
    # power just before the miner woke up.
    t = tracker()
    t.record_reading(sleeping(0.0), 0.0, CONFIRM_S)
    t.record_command("wake", SLEEP_W, 2000.0, 2000.0, 1.0)
    t.record_command("lower", 2000.0, 1500.0, 1500.0, 2.0)
    t.record_reading(
        DeviceReading("m1", 0.0, 0.0, DeviceState.SLEEPING, power_target_w=2000.0), 3.0, CONFIRM_S
    )
    assert t.pending is not None
    assert t.awake is True
    assert t.budget_w(3.0, STALE_S) == 2000.0
    t.record_reading(mining(4.0, 1490.0, 1500.0), 4.0, CONFIRM_S)
    assert t.pending is None
    assert t.budget_w(4.0, STALE_S) == 1500.0


def test_lower_is_not_confirmed_before_the_miner_reads_back_its_target() -> None:
    # A raise still queued ahead of the lower: low draw, but the old target.
    t = tracker()
    t.record_reading(mining(0.0, 1000.0, 1000.0), 0.0, CONFIRM_S)
    t.record_command("raise", 1000.0, 3000.0, 3000.0, 1.0)
    t.record_command("lower", 3000.0, 1500.0, 1500.0, 2.0)
    t.record_reading(mining(3.0, 1000.0, 1000.0), 3.0, CONFIRM_S)
    assert t.pending is not None
    assert t.budget_w(3.0, STALE_S) == 3000.0
    t.record_reading(mining(4.0, 1500.0, 1500.0), 4.0, CONFIRM_S)
    assert t.pending is None


def test_wakes_are_counted_over_the_last_hour() -> None:
    t = tracker()
    for when in (0.0, 100.0, 200.0):
        t.record_command("wake", 25.0, 3000.0, None, when)
    assert t.wakes_in_last_hour(300.0) == 3
    assert t.wakes_in_last_hour(3650.0) == 2  # the first has aged out
    assert t.status(3650.0, 30.0).wakes_last_hour == 2
    assert t.wakes_in_last_hour(3750.0) == 1
    assert t.wakes_in_last_hour(3801.0) == 0


def test_a_link_has_slots_not_an_instance_dict() -> None:
    """10,000 links at a site: each instance dict would be ~0.5 kB more; a misspelt
    attribute is an error, not a silent new field."""
    link = tracker().link
    assert not hasattr(link, "__dict__")
    with pytest.raises(AttributeError):
        link.next_read = 1000.0  # type: ignore[attr-defined]


class SlowFirmwareDriver(StubDriver):
    """A driver whose firmware takes 300 s to show a lowered target (restart + settle)."""

    def settle_s(self, kind: str) -> float:
        return 300.0 if kind in ("lower", "raise") else 60.0


def test_a_change_counts_at_its_worst_case_for_as_long_as_the_firmware_takes() -> None:
    t = tracker(attach=False)
    t.attach(SlowFirmwareDriver(DeviceIdentity("m", "S19", "fw", None, None, CAPS, NAMEPLATE_W)))
    t.record_reading(mining(0.0, 3000.0, 3000.0), 0.0, CONFIRM_S)
    t.record_command("lower", 3000.0, 2000.0, 2000.0, 0.0)
    # Past the configured 120 s but inside the firmware's 300 s: still pending, still
    # counted at the old level, even though the reading does not show the target yet.
    t.record_reading(mining(CONFIRM_S + 1, 2990.0, 3000.0), CONFIRM_S + 1, CONFIRM_S)
    assert t.pending is not None
    assert t.budget_w(CONFIRM_S + 1, STALE_S) == 3000.0
    t.record_reading(mining(301.0, 2990.0, 3000.0), 301.0, CONFIRM_S)
    assert t.pending is None


def test_asic_driver_settle_times_follow_the_firmware() -> None:
    from siteagent.drivers.asic import AsicDriver
    from siteagent.drivers.backends.base import Behaviour

    class Fw:
        name = "fw"
        behaviour = Behaviour(
            target_change_restarts=True, restart_s=5.0, settle_s=20.0, wake_s=40.0
        )

    drv = AsicDriver("m", "127.0.0.1", Fw())  # type: ignore[arg-type]
    assert drv.settle_s("wake") == 40.0
    assert drv.settle_s("lower") == 25.0 and drv.settle_s("raise") == 25.0
    assert drv.settle_s("sleep") == 20.0


def test_a_nodes_gpus_failing_with_the_nodes_error_warn_once_and_recover_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    links = [
        DeviceLink(
            f"n1/gpu{i}",
            address="10.0.0.9",
            domain="rack",
            nameplate_power_w=700.0,
            nameplate_hashrate_ths=0.0,
            sleep_power_w=0.0,
            connect=_never_connect,
            node="n1",
        )
        for i in range(3)
    ]
    fleet = Fleet(links)
    caplog.set_level(logging.DEBUG, logger="siteagent.devices")
    fleet.record_failure(0, DeviceUnreachable("gpu 0 fell off the bus"), 1.0, 5.0, 60.0)
    for row in range(3):
        fleet.record_failure(row, DeviceUnreachable("n1: connect refused"), 2.0, 5.0, 60.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The GPU that failed alone says so; the node's failure is one line for the node.
    assert warnings == [
        "n1 (10.0.0.9): n1/gpu0 unreachable (DeviceUnreachable: gpu 0 fell off the bus)",
        "n1 (10.0.0.9): n1/gpu1 unreachable (DeviceUnreachable: n1: connect refused)",
    ]
    caplog.clear()
    for row in range(3):
        r = DeviceReading(f"n1/gpu{row}", 3.0, 300.0, DeviceState.RUNNING)
        fleet.record_reading(row, r, 3.0, CONFIRM_S)
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    # One line as each failure's last device is back.
    assert infos == ["n1 (10.0.0.9): recovered, running"] * 2


# -- a call under its deadline (``within``) -------------------------------------------


async def test_within_gives_the_calls_outcome() -> None:
    async def answer() -> int:
        return 7

    assert await within(1.0, answer) == 7


async def test_within_a_call_past_its_deadline_is_unreachable() -> None:
    async def silent() -> None:
        await asyncio.sleep(5)

    with pytest.raises(DeviceUnreachable, match=r"no answer within 0\.1 s"):
        await within(0.1, silent)


async def test_within_a_cancel_nobody_asked_for_is_a_failed_call() -> None:
    # A library that cancels the task waiting on it (grpclib, when a connection goes
    # away) can leave a CancelledError nobody asked for: a reading ended so had no
    # outcome at all, and its miner was never asked again.
    async def cancelled_inside() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError()

    with pytest.raises(DeviceUnreachable, match=UNASKED_CANCEL):
        await within(1.0, cancelled_inside)


async def test_within_a_cancel_asked_of_the_task_is_raised_as_it_came() -> None:
    started = asyncio.Event()

    async def long_call() -> None:
        started.set()
        await asyncio.sleep(5)

    task = asyncio.create_task(within(10.0, long_call))
    await started.wait()
    task.cancel()  # the agent stopping
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
