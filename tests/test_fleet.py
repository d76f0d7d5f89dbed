"""The fleet's columns (agent/control/fleet.py, domain/worst_case.py) against the rule written per
device (tests/device_reference.py), field for field, over random histories."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from device_reference import ReferenceDevice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_devices import CAPS, StubDriver, _never_connect

from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.fleet import DuplicateDeviceError, Fleet
from siteagent.domain import (
    DeviceControls,
    DeviceFaulted,
    DeviceIdentity,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceState,
    DeviceUnreachable,
    Snapshot,
)

STALE_S = 30.0
CONFIRM_S = 60.0
STATES = [
    DeviceState.MINING,
    DeviceState.RUNNING,
    DeviceState.SLEEPING,
    DeviceState.UNKNOWN,
]


def new_link(i: int, kind: DeviceKind = DeviceKind.MINER) -> DeviceLink:
    return DeviceLink(
        f"d{i}",
        address=f"127.1.0.{i + 1}",
        domain=f"rack-{i % 2}",
        nameplate_power_w=3500.0,
        nameplate_hashrate_ths=200.0,
        sleep_power_w=25.0,
        connect=_never_connect,
        kind=kind,
        nameplate_is_default=(i == 1, i == 2),
    )


def reference(link: DeviceLink) -> ReferenceDevice:
    s = link.spec
    return ReferenceDevice(
        link.device_id,
        s.domain,
        s.nameplate_power_w,
        s.nameplate_hashrate_ths,
        s.sleep_power_w,
        s.kind,
        s.nameplate_power_is_default,
        s.nameplate_hashrate_is_default,
    )


# One step of a device's history, told to the fleet (its row) and to the reference alike.
Event = Callable[[Fleet, int, ReferenceDevice, float], None]


@st.composite
def events(draw: st.DrawFn) -> tuple[float, int, Event]:
    dt = draw(st.sampled_from([0.0, 1.0, 5.0, 29.0, 31.0, 200.0, 4000.0]))
    who = draw(st.integers(0, 3))
    what = draw(st.integers(0, 7))
    power = draw(st.one_of(st.none(), st.sampled_from([0.0, 20.0, 60.0, 1500.0, 3000.0, 3900.0])))
    state = draw(st.sampled_from(STATES))
    target = draw(st.one_of(st.none(), st.sampled_from([1500.0, 2500.0, 3600.0])))
    util = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    kind = draw(st.sampled_from(["sleep", "wake", "lower", "raise"]))
    old, new = draw(st.sampled_from([(3000.0, 25.0), (25.0, 1500.0), (3000.0, 2000.0)]))
    caps = draw(
        st.sampled_from(
            [
                CAPS,
                DeviceControls(power_target=False),
                DeviceControls(power_target=False, can_sleep=True),
            ]
        )
    )
    nameplate = draw(st.sampled_from([0.0, 3000.0, 3600.0]))

    def event(fleet: Fleet, row: int, ref: ReferenceDevice, now: float) -> None:
        if what <= 2:
            r = DeviceReading(
                ref.device_id, now, power, state, power_target_w=target, utilization_frac=util
            )
            fleet.record_reading(row, r, now, CONFIRM_S)
            ref.record_reading(r, now, CONFIRM_S)
        elif what == 3:
            err: Exception = (
                DeviceFaulted("garbage") if power is None else DeviceUnreachable("silent")
            )
            if power == 60.0:
                err = DevicePermissionError("login refused")  # read-only from now on
            fleet.record_failure(row, err, now, 5.0, 60.0)
            ref.record_failure(err)
        elif what == 4:
            fleet.record_command(row, kind, old, new, target, now)
            ref.record_command(kind, old, new, target, now)
        elif what == 5:
            ident = DeviceIdentity("Bitmain", "S19", "fw", None, None, caps, nameplate, 210.0)
            fleet.attach(row, StubDriver(ident))
            ref.attach(StubDriver(ident))
        elif what == 6:
            # A move to a new address drops the driver.
            fleet.move(row, new_link(row))
            ref.driver = None
        else:
            err = DevicePermissionError("command refused: bad password")
            fleet.mark_read_only(row, err)
            ref.mark_read_only(err)

    return dt, who, event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), max_size=25), st.booleans())
def test_a_snapshot_from_the_fleet_is_every_devices_status_by_the_reference(
    history: list[tuple[float, int, Event]], join_late: bool
) -> None:
    links = [new_link(i, DeviceKind.GPU if i == 3 else DeviceKind.MINER) for i in range(4)]
    refs = [reference(link) for link in links]
    # A device that joins mid-history (a scan found it) starts where the others did.
    fleet = Fleet(links[:3] if join_late else links)
    now = 1000.0
    for k, (dt, who, event) in enumerate(history):
        now += dt
        if who < len(fleet):
            event(fleet, who, refs[who], now)
        if len(fleet) < 4 and k == len(history) // 2:
            fleet.add(links[3])
        check(fleet, refs[: len(fleet)], now + dt / 2)
    check(fleet, refs[: len(fleet)], now)
    check(fleet, refs[: len(fleet)], now + STALE_S + 1.0)


def check(fleet: Fleet, refs: list[ReferenceDevice], now: float) -> None:
    snap = fleet.snapshot(now, STALE_S)
    want = [r.status(now, STALE_S) for r in refs]
    assert snap.table is not None
    assert list(snap.devices) == want
    assert snap.devices == want and len(snap.devices) == len(want)
    # Rows read alone, out of order, are the same objects' equals.
    assert snap.devices[-1] == want[-1] and snap.devices[0] == want[0]
    assert np.array_equal(snap.table.budget_w, [d.budget_w for d in want])
    power = [
        np.nan if d.reading is None or d.reading.power_w is None else d.reading.power_w
        for d in want
    ]
    assert np.array_equal(snap.table.power_w, power, equal_nan=True)
    assert snap.budget_w == sum(d.budget_w for d in want)
    assert snap.measured_w == Snapshot(now, tuple(want)).measured_w
    for row, r in enumerate(refs):
        assert fleet.budget_w(row, now, STALE_S) == r.budget_w(now, STALE_S)
        rec = fleet.record(row)
        assert (rec.pending, rec.failures, rec.read_only, rec.last_error) == (
            r.pending,
            r.failures,
            r.read_only,
            r.last_error,
        )


def test_statics_stay_the_same_object_until_one_of_them_changes() -> None:
    fleet = Fleet([new_link(i) for i in range(3)])
    first = fleet.table(0.0, STALE_S).statics
    fleet.record_reading(0, DeviceReading("d0", 0.0, 3000.0, DeviceState.MINING), 0.0, CONFIRM_S)
    assert fleet.table(1.0, STALE_S).statics is first  # a reading changes no static
    fleet.attach(
        1, StubDriver(DeviceIdentity("Bitmain", "S19", "fw", None, None, CAPS, 3600.0, 210.0))
    )
    second = fleet.table(2.0, STALE_S).statics
    assert second is not first and second.capabilities[1] is CAPS
    assert second.nameplate_power_w[1] == 3600.0
    fleet.add(new_link(7))
    third = fleet.table(3.0, STALE_S).statics
    assert third is not second and third.ids[-1] == "d7"


def test_a_device_never_replaces_another_under_its_id() -> None:
    fleet = Fleet([new_link(0), new_link(1)])
    other = new_link(0, DeviceKind.GPU)
    with pytest.raises(DuplicateDeviceError, match="'d0' is taken twice"):
        fleet.add(other)
    assert fleet.add(fleet.link(0)) == 0  # the same device again is no clash
    assert len(fleet) == 2 and fleet.link(0).kind is DeviceKind.MINER


def test_many_devices_grow_the_columns_and_keep_every_row() -> None:
    fleet = Fleet(new_link(i) for i in range(40))
    for row in range(40):
        r = DeviceReading(f"d{row}", 1.0, 100.0 + row, DeviceState.MINING)
        fleet.record_reading(row, r, 1.0, CONFIRM_S)
    snap = fleet.snapshot(2.0, STALE_S)
    assert [d.device_id for d in snap.devices] == [f"d{i}" for i in range(40)]
    assert snap.table is not None
    assert snap.table.power_w.tolist() == [100.0 + i for i in range(40)]
