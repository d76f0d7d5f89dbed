"""The columnar capping plan against the one-device-at-a-time plan it replaced.

Random sites: miners and GPUs (asleep, unreachable, read-only, recently slept,
woken often), domain trees up to three levels deep, pins (a level, sleep, the
maximum, excluded), the operator's modes, an overhead, and caps that put the
site above its capping threshold, inside the band or below the uncapping
threshold, with or without a previous plan (the reference's or the columnar
one's, under the same directives or others). The two plans must be the same
field for field: mode, reason, planned power, and every setpoint with its words.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
from capping_reference import reference_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import NOW_S, SITE, domain_trees, loads_w, miners

from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Floor,
    Limits,
    Pin,
    Plan,
    SetpointTable,
    Snapshot,
)
from siteagent.domain.site import DomainTree, by_depth
from siteagent.domain.table import DeviceTable
from siteagent.domain.types import clamp_power_w, clamp_power_w_array
from siteagent.policies import PolicyState
from siteagent.policies.capping import CappingParams, CappingPolicy, _Ledger, plan

Case = tuple[Snapshot, Limits, CappingParams, Plan | None, Plan | None]


@st.composite
def gpus(draw: st.DrawFn, index: int, domains: list[str]) -> DeviceStatus:
    lo = float(draw(st.sampled_from([100, 200, 250])))
    hi = float(draw(st.sampled_from([300, 450, 700])))
    caps = DeviceControls(
        power_target=True,
        power_target_min_w=lo,
        power_target_max_w=hi,
        power_target_step_w=draw(st.sampled_from([1.0, 5.0, 25.0])),
    )
    limit = float(draw(st.integers(int(lo), int(hi))))
    state = draw(
        st.sampled_from([DeviceState.RUNNING, DeviceState.RUNNING, DeviceState.UNREACHABLE])
    )
    up = state is DeviceState.RUNNING
    return DeviceStatus(
        device_id=f"g{index:02d}",
        kind=DeviceKind.GPU,
        domain=draw(st.sampled_from(domains)),
        state=state,
        nameplate_power_w=hi,
        nameplate_hashrate_ths=0.0,
        sleep_power_w=0.0,
        capabilities=caps,
        budget_w=limit if up else hi,
        expected_w=limit if up else hi,
        controllable=up and draw(st.integers(0, 9)) != 0,
        power_target_w=limit,
        awake=True,
    )


def aux(index: int, domain: str, power_w: float) -> DeviceStatus:
    """A fixed load (a GPU node's CPUs and fans): counted, never planned."""
    return DeviceStatus(
        f"x{index:02d}",
        DeviceKind.AUX,
        domain,
        DeviceState.RUNNING,
        power_w,
        0.0,
        0.0,
        DeviceControls(power_target=False),
        power_w,
        power_w,
        False,
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    parent = draw(domain_trees())
    domains = [SITE, *parent]
    params = CappingParams(
        capping_threshold=draw(st.sampled_from([1.0, 0.99])),
        capping_target=draw(st.sampled_from([0.97, 0.95, 0.9])),
        uncapping_threshold=draw(st.sampled_from([0.92, 0.9, 0.85])),
        min_off_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
        max_wakes_per_hour=draw(st.sampled_from([0, 2, 4])),
    )
    n_miners = draw(st.integers(0, 30))
    n_gpus = draw(st.integers(0, 6))
    devices = [draw(miners(i, domains, params.min_off_s)) for i in range(n_miners)]
    devices += [draw(gpus(i, domains)) for i in range(n_gpus)]
    if draw(st.booleans()):
        devices.append(aux(0, draw(st.sampled_from(domains)), float(draw(st.integers(0, 800)))))
    devices = draw(st.permutations(devices))
    overhead = float(draw(st.sampled_from([0, 0, 1000, 2500])))
    nameplate_under = loads_w(parent, ((d.domain, d.nameplate_power_w) for d in devices), 0.0)
    budget_under = loads_w(parent, ((d.domain, d.budget_w) for d in devices), overhead)
    # The cap around where the site heads, so all three bands come up.
    factor = draw(
        st.one_of(st.sampled_from([0.5, 0.9, 0.95, 1.0, 1.05, 1.1, 1.3]), st.floats(0.05, 2.0))
    )
    cap = max(100.0, budget_under[SITE] * factor + draw(st.sampled_from([0.0, 0.5, 1.0])))
    # Some domains have room to spare, so the site's own band decides; some share the
    # site's limit, so two nodes have the same room and the name decides which binds.
    limit_of = st.one_of(
        st.floats(0.1, 1.5).map(
            lambda f: lambda node: max(300.0, round(nameplate_under[node] * f))
        ),
        st.just(lambda node: max(300.0, round(nameplate_under[node] * 10.0))),
        st.just(lambda node: cap),
    )
    domain_limits = tuple(
        DomainLimit(node, draw(limit_of)(node), None if parent[node] == SITE else parent[node])
        for node in parent
    )
    pins: list[Pin] = []
    for d in devices:
        if draw(st.integers(0, 7)) == 0:
            level = draw(st.sampled_from([None, 0.0, 1.0, 250.0, 2500.0, 2999.0, 1e6]))
            pins.append(Pin(d.device_id, level, exclude=draw(st.integers(0, 3)) == 0, source="op"))
    if draw(st.booleans()) and len(pins) > 0:
        pins.append(Pin("not-on-this-site", 1000.0, source="op"))
    # Contract floors on some GPUs: below their minimum, between, at and above their maximum.
    floors = tuple(
        Floor(d.device_id, draw(st.sampled_from([0.0, 150.0, 333.3, 450.0, 700.0, 900.0])), "c")
        for d in devices
        if d.kind is DeviceKind.GPU and draw(st.integers(0, 2)) == 0
    )
    limits = Limits(
        cap,
        cap,
        "test",
        overhead,
        domain_limits,
        tuple(pins),
        mining_off=draw(st.integers(0, 5)) == 0,
        ai_min=draw(st.integers(0, 5)) == 0,
        floors=floors,
    )
    snap = Snapshot(NOW_S, tuple(devices))
    previous: tuple[Plan | None, Plan | None] = (None, None)
    how = draw(st.sampled_from(["none", "same", "same", "other directives"]))
    if how != "none":
        earlier_limits = replace(limits, effective_cap_w=cap * draw(st.floats(0.5, 1.5)))
        if how == "other directives":
            earlier_limits = replace(earlier_limits, pins=(), mining_off=not limits.mining_off)
        earlier = replace(snap, time_s=NOW_S - 5.0)
        previous = (
            reference_plan(earlier, earlier_limits, params),
            plan(earlier, earlier_limits, params),
        )
    return snap, limits, params, *previous


def assert_same_plan(got: Plan, want: Plan) -> None:
    assert got.mode == want.mode
    assert got.reason == want.reason
    assert got.planned_w == want.planned_w
    assert (got.time_s, got.effective_cap_w, got.directives_key) == (
        want.time_s,
        want.effective_cap_w,
        want.directives_key,
    )
    assert list(got.setpoints) == list(want.setpoints)  # reasons included
    assert got.broken_floors == want.broken_floors


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cases(), st.booleans())
def test_the_columnar_plan_is_the_plain_plan(case: Case, columns: bool) -> None:
    snap, limits, params, ref_previous, fast_previous = case
    want = reference_plan(snap, limits, params, ref_previous)
    given_snap = replace(snap, table=DeviceTable.of(snap.devices)) if columns else snap
    assert_same_plan(plan(given_snap, limits, params, ref_previous), want)
    # Against its own previous plan (columns that line up) as well as the reference's.
    assert_same_plan(plan(given_snap, limits, params, fast_previous), want)
    # And a tick later, each against its own plan: the band holds or fills again.
    later = replace(snap, time_s=NOW_S + 5.0)
    again = reference_plan(later, limits, params, want)
    got = plan(
        replace(given_snap, time_s=NOW_S + 5.0),
        limits,
        params,
        plan(given_snap, limits, params, fast_previous),
    )
    assert_same_plan(got, again)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_what_the_policy_keeps_between_ticks_gives_the_plan_a_cold_start_gives(case: Case) -> None:
    snap, limits, params, ref_previous, _ = case
    snap = replace(snap, table=DeviceTable.of(snap.devices))
    policy = CappingPolicy(params)
    first, kept = policy.plan(snap, limits, None, PolicyState(ref_previous))
    assert kept.derived is not None
    # The next tick: the same statics object, other readings.
    tab = snap.table
    assert tab is not None
    later_tab = replace(tab, expected_w=tab.budget_w, awake=tab.awake.clip(0, 1))
    later = Snapshot(NOW_S + 5.0, snap.devices, table=later_tab)
    warm, _ = policy.plan(later, limits, None, PolicyState(first, kept.derived))
    cold, _ = policy.plan(later, limits, None, PolicyState(first))
    assert_same_plan(warm, cold)


def test_the_plan_is_columns_that_read_as_the_setpoints() -> None:
    caps = DeviceControls(
        power_target=True, power_target_min_w=1000.0, power_target_max_w=3000.0, can_sleep=True
    )
    devices = tuple(
        DeviceStatus(
            f"m{i}",
            DeviceKind.MINER,
            SITE,
            DeviceState.MINING,
            3000.0,
            100.0 + i,
            20.0,
            caps,
            3000.0,
            3000.0,
            True,
            power_target_w=3000.0,
            awake=True,
        )
        for i in range(4)
    )
    limits = Limits(7000.0, 7000.0, "t", pins=(Pin("m3", 1500.0, source="t"),))
    p = plan(Snapshot(NOW_S, devices), limits, CappingParams())
    table = p.setpoints
    assert isinstance(table, SetpointTable)
    assert [sp.device_id for sp in table.head] == ["m3"]
    assert list(table.ids) == ["m2", "m1", "m0"]  # best J/TH first
    assert p.setpoint_for("m0") == table[3] and p.setpoint_for("nope") is None


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_every_room_is_the_float_of_one_subtraction_after_another(data: st.DataObject) -> None:
    """The ledger's rooms are the plain rule's ``avail[node] -= w``, bit for bit (a sum in
    another order could differ in the last bit and flip a tie or a threshold)."""
    parent = data.draw(domain_trees())
    limits = Limits(1e4, 1e4, "t", domains=tuple(DomainLimit(k, 1.0, p) for k, p in parent.items()))
    tree = DomainTree(limits)
    n = data.draw(st.integers(0, 60))
    domains = [data.draw(st.sampled_from([SITE, *parent])) for _ in range(n)]
    takes = [data.draw(st.floats(-1e4, 1e4)) for _ in range(n)]
    start = [data.draw(st.floats(-1e5, 1e5)) for _ in tree.names]
    nodes = by_depth(tree.chains(domains), len(tree.names))
    _, before, end = _Ledger(nodes, len(tree.names)).run(
        np.array([*start, np.inf]), np.array(takes)
    )
    before = before.T
    avail = dict(zip(tree.names, start, strict=True))
    for i, (dom, w) in enumerate(zip(domains, takes, strict=True)):
        rooms = {k: avail[k] for k in tree.chain(dom)}
        assert sorted(before[i][np.isfinite(before[i])].tolist()) == sorted(rooms.values())
        for k in tree.chain(dom):
            avail[k] -= w
    assert end[: len(tree.names)].tolist() == [avail[k] for k in tree.names]


def racked_site(n: int, seed: int) -> tuple[Snapshot, Snapshot, Limits]:
    """n miners at full power, and the same asleep: 40 to a rack, racks under 10 feeders,
    four models (bench/bench_plan.py's site); the limits cap the site at 60%."""
    rng = random.Random(seed)
    awake, asleep = [], []
    for i in range(n):
        nameplate = rng.choice((3010.0, 3068.0, 3500.0, 3510.0))
        caps = DeviceControls(
            power_target=True,
            power_target_min_w=nameplate * 0.5,
            power_target_max_w=nameplate,
            can_sleep=True,
        )
        d = DeviceStatus(
            f"m{i:06d}",
            DeviceKind.MINER,
            f"rack-{i // 40}",
            DeviceState.MINING,
            nameplate,
            rng.choice((104.0, 140.0, 200.0, 234.0)),
            25.0,
            caps,
            nameplate,
            nameplate,
            True,
            power_target_w=nameplate,
            awake=True,
        )
        awake.append(d)
        asleep.append(
            replace(d, state=DeviceState.SLEEPING, budget_w=25.0, expected_w=25.0, awake=False)
        )
    feeders = [DomainLimit(f"feeder-{i}", 1e12) for i in range(10)]
    racks = [
        DomainLimit(f"rack-{i}", 40 * 3300.0, parent=f"feeder-{i % 10}")
        for i in range((n + 39) // 40)
    ]
    full = sum(d.nameplate_power_w for d in awake)
    limits = Limits(full, 0.6 * full, "t", domains=tuple(feeders + racks))
    return Snapshot(NOW_S, tuple(awake)), Snapshot(NOW_S, tuple(asleep)), limits


def test_a_site_whose_racks_share_out_the_last_of_the_site_budget() -> None:
    """Racks nearly full when the site's room runs out: each miner's room hangs on the one
    before it, the stretch the plan walks one miner at a time (bench/bench_plan.py's site)."""
    for n, seed in ((400, 1), (1000, 2), (2000, 3)):
        snap, asleep, limits = racked_site(n, seed)
        lifted = replace(limits, effective_cap_w=limits.site_cap_w)
        want = reference_plan(asleep, lifted, CappingParams())
        assert want.mode == "restore"
        assert_same_plan(plan(asleep, lifted, CappingParams()), want)
        capped = reference_plan(snap, limits, CappingParams())
        assert_same_plan(plan(snap, limits, CappingParams()), capped)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-1e4, 1e4),
            st.one_of(st.just(math.nan), st.floats(0, 5000)),
            st.one_of(st.just(math.nan), st.floats(0, 5000)),
            st.sampled_from([0.0, -1.0, 0.1, 1.0, 7.0, 50.0, 100.0]),
        ),
        max_size=20,
    )
)
def test_the_clamp_over_arrays_is_the_one_clamping_rule(
    cases: list[tuple[float, float, float, float]],
) -> None:
    p, lo, hi, step = (
        (np.array(c, float) for c in zip(*cases, strict=True)) if cases else [np.zeros(0)] * 4
    )
    got = clamp_power_w_array(p, lo, hi, step).tolist()
    assert got == [clamp_power_w(*c) for c in cases]


def test_words_held_for_thousands_of_ticks_are_still_the_words_of_the_plan_that_made_them() -> None:
    snap, _, limits = racked_site(80, 4)
    full = limits.site_cap_w
    # Racks with room to spare; the site heads for 95% of its cap: inside the band.
    lim = Limits(full / 0.95, full / 0.95, "t")
    pin = replace(lim, pins=(Pin("m000000", 2000.0, source="op"),))
    first = plan(snap, pin, CappingParams(), plan(snap, lim, CappingParams()))
    assert first.mode == "override"
    p = first
    for _ in range(3000):  # a day and more of ticks
        p = plan(replace(snap, time_s=p.time_s + 30.0), pin, CappingParams(), p)
        assert p.mode == "hold"
    assert list(p.setpoints) == list(first.setpoints)


def test_a_hold_after_a_hold_of_nothing_to_move() -> None:
    miner = racked_site(1, 5)[0].devices[0]
    lim = Limits(miner.budget_w / 0.95, miner.budget_w / 0.95, "t")  # inside the band
    lost = Snapshot(NOW_S, (replace(miner, controllable=False),))
    back = Snapshot(NOW_S + 5.0, (miner,))
    p = plan(lost, lim, CappingParams(), plan(lost, lim, CappingParams()))
    assert p.mode == "hold" and list(p.setpoints) == []
    p = plan(back, lim, CappingParams(), p)  # it answers again: left as found
    assert p.mode == "hold" and [sp.reason for sp in p.setpoints] == ["hold: left as found"]
