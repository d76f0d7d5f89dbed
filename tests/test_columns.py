"""The trackers' columns (agent/columns.py) against DeviceTracker.status, field for field."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_devices import CAPS, StubDriver, _never_connect

from agent.columns import TrackerColumns, Trackers
from agent.devices import DeviceTracker
from domain import (
    DeviceFaulted,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceState,
    DeviceUnreachable,
    MinerCapabilities,
    MinerIdentity,
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


def new_tracker(i: int, kind: DeviceKind = DeviceKind.MINER) -> DeviceTracker:
    return DeviceTracker(
        f"d{i}",
        address=f"127.1.0.{i + 1}",
        domain=f"rack-{i % 2}",
        nameplate_power_w=3500.0,
        nameplate_hashrate_ths=200.0,
        sleep_power_w=25.0,
        connect=_never_connect,
        kind=kind,
    )


# One step of a tracker's history: (time advance s, what happens to which tracker).
Event = Callable[[DeviceTracker, float], None]


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
                MinerCapabilities(power_target=False),
                MinerCapabilities(power_target=False, can_sleep=True),
            ]
        )
    )

    def event(t: DeviceTracker, now: float) -> None:
        if what <= 2:
            r = DeviceReading(
                t.device_id, now, power, state, power_target_w=target, utilization_frac=util
            )
            t.record_reading(r, now, CONFIRM_S)
        elif what == 3:
            err: Exception = (
                DeviceFaulted("garbage") if power is None else DeviceUnreachable("silent")
            )
            if power == 60.0:
                err = DevicePermissionError("login refused")  # read-only from now on
            t.record_failure(err, now, 5.0, 60.0)
        elif what == 4:
            t.record_command(kind, old, new, target, now)
        elif what == 5:
            ident = MinerIdentity("Bitmain", "S19", "fw", None, None, caps, 3600.0, 210.0)
            t.attach(StubDriver(ident))
        elif what == 6:
            t.driver = None  # a move to a new address drops the driver
        else:
            t.nameplate_power_w = 3000.0 if t.nameplate_power_w > 3000.0 else 3600.0

    return dt, who, event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), max_size=25), st.booleans())
def test_a_snapshot_from_columns_is_every_trackers_status(
    history: list[tuple[float, int, Event]], bind_late: bool
) -> None:
    trackers = [new_tracker(i, DeviceKind.GPU if i == 3 else DeviceKind.MINER) for i in range(4)]
    cols = None if bind_late else TrackerColumns(trackers)
    now = 1000.0
    for k, (dt, who, event) in enumerate(history):
        now += dt
        event(trackers[who], now)
        if cols is None and k == len(history) // 2:
            cols = TrackerColumns(trackers)  # bound mid-history: it reads what is there
        if cols is not None:
            check(cols, trackers, now + dt / 2)
    cols = cols or TrackerColumns(trackers)
    check(cols, trackers, now)
    check(cols, trackers, now + STALE_S + 1.0)


def check(cols: TrackerColumns, trackers: list[DeviceTracker], now: float) -> None:
    snap = cols.snapshot(now, STALE_S)
    want = [t.status(now, STALE_S) for t in trackers]
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


def test_statics_stay_the_same_object_until_one_of_them_changes() -> None:
    trackers = [new_tracker(i) for i in range(3)]
    cols = TrackerColumns(trackers)
    first = cols.table(0.0, STALE_S).statics
    trackers[0].record_reading(DeviceReading("d0", 0.0, 3000.0, DeviceState.MINING), 0.0, CONFIRM_S)
    assert cols.table(1.0, STALE_S).statics is first  # a reading changes no static
    trackers[1].attach(
        StubDriver(MinerIdentity("Bitmain", "S19", "fw", None, None, CAPS, 3600.0, 210.0))
    )
    second = cols.table(2.0, STALE_S).statics
    assert second is not first and second.capabilities[1] is CAPS
    assert second.nameplate_power_w[1] == 3600.0


def test_columns_are_rebuilt_when_the_trackers_change_or_a_tracker_is_bound_elsewhere() -> None:
    trackers = Trackers((t.device_id, t) for t in (new_tracker(i) for i in range(2)))
    v = trackers.version
    trackers["d9"] = new_tracker(9)
    assert trackers.version > v
    v = trackers.version
    trackers.pop("d9")
    assert trackers.version > v
    cols = TrackerColumns(trackers.values())
    assert cols.valid
    other = TrackerColumns([trackers["d0"]])  # another agent takes one of them
    assert not cols.valid and other.valid
