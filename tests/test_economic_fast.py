"""The vectorised economic plan against the one-segment-at-a-time plan it replaced."""

from __future__ import annotations

import math
from dataclasses import replace

from economic_reference import reference_plan
from hypothesis import HealthCheck, given, settings
from test_economic import sites

from siteagent.domain import Limits, Pin, Plan, SetpointTable, Snapshot, setpoint_rows
from siteagent.policies import PolicyState
from siteagent.policies.economic import EconomicParams, EconomicPolicy, plan
from siteagent.policies.prices import Prices

Case = tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]]


def same_setpoints(got: Plan, want: Plan) -> None:
    assert [sp.device_id for sp in got.setpoints] == [sp.device_id for sp in want.setpoints]
    for g, w in zip(got.setpoints, want.setpoints, strict=True):
        assert g.awake == w.awake, (g, w)
        assert math.isclose(g.planned_w, w.planned_w, abs_tol=1e-6), (g, w)
        if w.power_target_w is None:
            assert g.power_target_w is None, (g, w)
        else:
            assert g.power_target_w is not None
            assert math.isclose(g.power_target_w, w.power_target_w, abs_tol=1e-6), (g, w)
    assert got.mode == want.mode
    assert math.isclose(got.planned_w, want.planned_w, rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites())
def test_vectorised_plan_matches_the_sequential_plan(case: Case) -> None:
    snap, lim, prices, params, _ = case
    first = plan(snap, lim, prices, params)
    same_setpoints(first, reference_plan(snap, lim, prices, params))
    # And again with that plan as the previous one (incumbent margins, small changes, hold).
    same_setpoints(
        plan(snap, lim, prices, params, first), reference_plan(snap, lim, prices, params, first)
    )


def moved(snap: Snapshot, **change: object) -> Snapshot:
    """The same devices (the same capability objects) a tick later, with some fields changed."""
    return Snapshot(snap.time_s + 5.0, tuple(replace(d, **change) for d in snap.devices))  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites())
def test_columns_kept_between_ticks_give_the_plan_a_cold_start_gives(case: Case) -> None:
    snap, lim, prices, params, _ = case
    policy = EconomicPolicy(params)
    _, kept = policy.plan(snap, lim, prices, PolicyState())  # this site's columns, kept
    assert kept.derived is not None
    later = moved(snap, expected_w=1234.0, awake=True)
    warm, _ = policy.plan(later, lim, prices, PolicyState(None, kept.derived))
    cold, _ = policy.plan(later, lim, prices, PolicyState())
    assert list(warm.setpoints) == list(cold.setpoints)  # reasons included
    # A nameplate that changed under the same capability object is read again.
    bigger = moved(snap, nameplate_power_w=5000.0)
    same_setpoints(plan(bigger, lim, prices, params), reference_plan(bigger, lim, prices, params))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites())
def test_the_columns_read_as_the_setpoints_they_stand_for(case: Case) -> None:
    snap, lim, prices, params, _ = case
    lim = replace(lim, pins=(Pin(snap.devices[0].device_id, 1000.0, source="t"),))
    p = plan(snap, lim, prices, params)
    table = p.setpoints
    assert isinstance(table, SetpointTable)
    made = tuple(table)
    assert list(setpoint_rows(table)) == list(setpoint_rows(made))
    assert table == made and len(table) == len(made)
    assert table[-1] == made[-1] and list(table[1:3]) == list(made[1:3])
    for sp in made:
        assert p.setpoint_for(sp.device_id) == sp
    assert p.setpoint_for("no-such-device") is None
