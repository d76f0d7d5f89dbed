"""The snapshot's devices as columns (domain.table) and the economic plan read from them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_economic import gpu, miner, sites
from test_economic_fast import same_setpoints

from siteagent.domain import DeviceState, Limits, Pin, Snapshot
from siteagent.domain.table import AWAKE_CODE, STATES, DeviceStatics, DeviceTable
from siteagent.policies.economic import EconomicParams, plan
from siteagent.policies.prices import Prices

Case = tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]]


def test_each_column_reads_as_the_field_it_stands_for() -> None:
    devices = (
        miner("m0", 21.5, awake=False, since=100.0),
        replace(gpu("g0", 0.4), reading_age_s=3.0, wakes_last_hour=2, controllable=False),
        replace(miner("m1", 29.5), power_target_w=None, awake=None, state=DeviceState.UNKNOWN),
        gpu("g1", None),
    )
    tab = DeviceTable.of(devices)
    assert len(tab) == 4 and tab.statics.ids == ("m0", "g0", "m1", "g1")
    for i, d in enumerate(devices):
        assert tab.statics.kinds[i] is d.kind and tab.statics.domains[i] == d.domain
        assert tab.statics.capabilities[i] is d.capabilities
        assert tab.statics.nameplate_power_w[i] == d.nameplate_power_w
        assert tab.statics.nameplate_hashrate_ths[i] == d.nameplate_hashrate_ths
        assert tab.statics.sleep_power_w[i] == d.sleep_power_w
        assert STATES[tab.state[i]] is d.state
        assert tab.budget_w[i] == d.budget_w and tab.expected_w[i] == d.expected_w
        assert bool(tab.controllable[i]) is d.controllable
        assert tab.awake[i] == AWAKE_CODE[d.awake]
        assert tab.wakes_last_hour[i] == d.wakes_last_hour
        for col, value in (
            (tab.power_target_w, d.power_target_w),
            (tab.last_transition_s, d.last_transition_s),
            (tab.reading_age_s, d.reading_age_s),
            (tab.utilization_frac, None if d.reading is None else d.reading.utilization_frac),
            (tab.power_w, None if d.reading is None else d.reading.power_w),
        ):
            assert math.isnan(col[i]) if value is None else col[i] == value
    with pytest.raises(ValueError, match="read-only"):
        tab.budget_w[0] = 1.0


def test_statics_are_handed_on_while_nothing_in_them_changes() -> None:
    devices = (miner("m0", 21.5), gpu("g0"))
    first = DeviceStatics.of(devices)
    # New objects with the same values and the same capability objects: the same statics.
    again = tuple(replace(d, expected_w=1.0, awake=False) for d in devices)
    assert DeviceStatics.of(again, first) is first
    # Anything that is part of them changes: a new statics object.
    for change in (
        {"nameplate_power_w": 5000.0},
        {"sleep_power_w": 1.0},
        {"nameplate_hashrate_ths": 1.0},
        {"domain": "rack-9"},
        {"capabilities": replace(devices[0].capabilities)},  # equal, but not the same object
    ):
        moved = (replace(devices[0], **change), devices[1])
        assert DeviceStatics.of(moved, first) is not first, change
    assert DeviceStatics.of(devices[::-1], first) is not first


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites(), st.data())
def test_a_plan_from_columns_is_the_plan_from_objects(case: Case, data: st.DataObject) -> None:
    snap, lim, prices, params, _ = case
    n = len(snap.devices)
    # Some devices out of reach, some pinned or excluded: the plan's fixed loads.
    off = data.draw(st.sets(st.integers(0, n - 1)))
    devices = tuple(
        replace(d, controllable=False, budget_w=d.nameplate_power_w) if i in off else d
        for i, d in enumerate(snap.devices)
    )
    pinned = data.draw(st.sets(st.integers(0, n - 1), max_size=3))
    pins = tuple(
        Pin(devices[i].device_id, None if k % 2 else 1000.0, exclude=bool(k % 2), source="t")
        for k, i in enumerate(sorted(pinned))
    )
    lim = replace(lim, pins=pins)
    objects = Snapshot(snap.time_s, devices)
    want = plan(objects, lim, prices, params)
    columns = replace(objects, table=DeviceTable.of(devices))
    got = plan(columns, lim, prices, params)
    same_setpoints(got, want)
    assert list(got.setpoints) == list(want.setpoints)  # reasons included
    # A tick later from columns with the same statics, the plan as the previous one.
    later = replace(columns, time_s=snap.time_s + 5.0)
    same_setpoints(plan(later, lim, prices, params, got), plan(objects, lim, prices, params, want))


def test_a_device_leaving_the_movable_set_is_planned_without_it() -> None:
    devices = (miner("m0", 21.5), miner("m1", 29.5), gpu("g0"))
    tab = DeviceTable.of(devices)
    lim = Limits(9000.0, 9000.0, "t")
    prices = Prices(0.05, 0.03, 2.0)
    first = plan(Snapshot(0.0, devices, table=tab), lim, prices, EconomicParams())
    assert {sp.device_id for sp in first.setpoints} == {"m0", "m1", "g0"}
    # m1 stops answering: the same statics, one device no longer controllable.
    gone = np.array(tab.controllable)
    gone[1] = False
    worst = np.array(tab.budget_w)
    worst[1] = 3000.0
    tab2 = replace(tab, controllable=gone, budget_w=worst)
    devices2 = (devices[0], replace(devices[1], controllable=False), devices[2])
    second = plan(Snapshot(5.0, devices2, table=tab2), lim, prices, EconomicParams(), first)
    assert {sp.device_id for sp in second.setpoints} == {"m0", "g0"}
    same_setpoints(second, plan(Snapshot(5.0, devices2), lim, prices, EconomicParams(), first))
