"""The capping policy as a table: snapshots and limits in, the plans they must produce out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import pytest

from siteagent.agent.control.safety import LOWER, RAISE, SLEEP, WAKE, order_changes
from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Limits,
    Plan,
    Snapshot,
)
from siteagent.policies.capping import CappingParams, plan

NOW_S = 10_000.0
SLEEP_W = 25.0
PARAMS = CappingParams(
    capping_threshold=1.0, capping_target=0.97, uncapping_threshold=0.92, min_off_s=300.0
)


def caps(
    lo_w: float = 2000.0, hi_w: float = 3000.0, *, step_w: float = 50.0, sleep: bool = True
) -> DeviceControls:
    return DeviceControls(
        power_target=True,
        power_target_min_w=lo_w,
        power_target_max_w=hi_w,
        power_target_step_w=step_w,
        can_sleep=sleep,
    )


def miner(
    device_id: str,
    j_per_th: float,
    *,
    level_w: float | None = 3000.0,
    capabilities: DeviceControls | None = None,
    nameplate_w: float = 3000.0,
    domain: str = "site",
    controllable: bool = True,
    state: DeviceState | None = None,
    budget_w: float | None = None,
    slept_s_ago: float | None = None,
) -> DeviceStatus:
    """A miner at ``level_w`` (None: asleep), its nameplate efficiency ``j_per_th``."""
    awake = level_w is not None
    power_w = level_w if level_w is not None else SLEEP_W
    c = capabilities if capabilities is not None else caps()
    if state is None:
        state = DeviceState.MINING if awake else DeviceState.SLEEPING
    return DeviceStatus(
        device_id=device_id,
        kind=DeviceKind.MINER,
        domain=domain,
        state=state,
        nameplate_power_w=nameplate_w,
        nameplate_hashrate_ths=nameplate_w / j_per_th,
        sleep_power_w=SLEEP_W,
        capabilities=c,
        budget_w=budget_w if budget_w is not None else power_w,
        expected_w=budget_w if budget_w is not None else power_w,
        controllable=controllable,
        power_target_w=level_w if c.power_target else None,
        awake=awake,
        last_transition_s=None if slept_s_ago is None else NOW_S - slept_s_ago,
    )


def limits(cap_w: float, *domains: DomainLimit, overhead_w: float = 0.0) -> Limits:
    return Limits(cap_w, cap_w, "test", overhead_w, tuple(domains))


def snap(*devices: DeviceStatus) -> Snapshot:
    return Snapshot(NOW_S, devices)


def cap_for_target(target_w: float) -> float:
    """The effective cap (W) whose capping target is ``target_w``."""
    return target_w / PARAMS.capping_target


@dataclass(frozen=True)
class Row:
    """What the plan does to one device: awake and at which level (W)."""

    awake: bool
    level_w: float


def rows(p: Plan) -> dict[str, Row]:
    return {sp.device_id: Row(sp.awake, sp.planned_w) for sp in p.setpoints}


ON = Row  # readability in the tables below


def OFF() -> Row:
    return Row(False, SLEEP_W)


# Three miners from best (a, 20 J/TH) to worst (c, 30 J/TH), each 2000-3000 W, all at 3000 W.
THREE = (miner("a", 20.0), miner("b", 25.0), miner("c", 30.0))


@pytest.mark.parametrize(
    ("target_w", "expected"),
    [
        # Room for everything but 1000 W: the worst miner's target comes down first.
        (8000.0, {"a": ON(True, 3000.0), "b": ON(True, 3000.0), "c": ON(True, 2000.0)}),
        # Then the next-worst's target, while the worst sits at its minimum.
        (7000.0, {"a": ON(True, 3000.0), "b": ON(True, 2000.0), "c": ON(True, 2000.0)}),
        # Not enough for three at minimum: the worst is slept, the freed room goes best-first.
        (5000.0, {"a": ON(True, 2950.0), "b": ON(True, 2000.0), "c": OFF()}),
        (4100.0, {"a": ON(True, 2050.0), "b": ON(True, 2000.0), "c": OFF()}),
        (3000.0, {"a": ON(True, 2950.0), "b": OFF(), "c": OFF()}),
        (1000.0, {"a": OFF(), "b": OFF(), "c": OFF()}),
    ],
)
def test_over_cap_lowers_then_sleeps_least_efficient_first(
    target_w: float, expected: dict[str, Row]
) -> None:
    p = plan(snap(*THREE), limits(cap_for_target(target_w)), PARAMS)
    assert p.mode == "cap"
    assert rows(p) == expected
    assert p.planned_w == pytest.approx(sum(r.level_w for r in expected.values()))
    assert p.planned_w <= target_w + 1e-6
    assert "above its capping threshold" in p.reason


def test_plan_lists_devices_in_merit_order_whatever_the_snapshot_order() -> None:
    p = plan(snap(*reversed(THREE)), limits(cap_for_target(7000.0)), PARAMS)
    assert [sp.device_id for sp in p.setpoints] == ["a", "b", "c"]


def test_reasons_name_rank_and_efficiency() -> None:
    p = plan(snap(*THREE), limits(cap_for_target(5000.0)), PARAMS)
    reasons = {sp.device_id: sp.reason for sp in p.setpoints}
    assert "rank 1/3, 20.0 J/TH" in reasons["a"]
    assert "rank 2/3, 25.0 J/TH" in reasons["b"]
    assert "rank 3/3, 30.0 J/TH" in reasons["c"]
    assert reasons["a"].startswith("cap: mining at 2950 W")
    assert reasons["c"].startswith("cap: asleep")
    assert "site budget" in reasons["c"]


def test_under_cap_restores_most_efficient_first() -> None:
    asleep = tuple(miner(d.device_id, d.efficiency_j_per_th, level_w=None) for d in THREE)
    # Room for one miner at its minimum plus a little.
    p = plan(snap(*asleep), limits(cap_for_target(2500.0)), PARAMS)
    assert p.mode == "restore"
    assert rows(p) == {"a": ON(True, 2450.0), "b": OFF(), "c": OFF()}
    assert "below its uncapping threshold" in p.reason
    # Room for two.
    p = plan(snap(*asleep), limits(cap_for_target(4500.0)), PARAMS)
    assert rows(p) == {"a": ON(True, 2450.0), "b": ON(True, 2000.0), "c": OFF()}


def test_under_cap_raises_targets_best_first() -> None:
    low = tuple(miner(d.device_id, d.efficiency_j_per_th, level_w=2000.0) for d in THREE)
    p = plan(snap(*low), limits(cap_for_target(7500.0)), PARAMS)
    assert p.mode == "restore"
    assert rows(p) == {"a": ON(True, 3000.0), "b": ON(True, 2500.0), "c": ON(True, 2000.0)}
    reasons = {sp.device_id: sp.reason for sp in p.setpoints}
    assert "at its maximum" in reasons["a"]
    assert "bound by site budget" in reasons["b"]


def test_under_cap_with_everything_at_maximum_holds() -> None:
    p = plan(snap(*THREE), limits(cap_for_target(20_000.0)), PARAMS)
    assert p.mode == "hold"
    assert "nothing more can be restored" in p.reason
    assert rows(p) == {d.device_id: ON(True, 3000.0) for d in THREE}


def test_ties_broken_by_device_id() -> None:
    twins = (miner("m2", 25.0, level_w=None), miner("m1", 25.0, level_w=None))
    p = plan(snap(*twins), limits(cap_for_target(2500.0)), PARAMS)
    assert rows(p) == {"m1": ON(True, 2450.0), "m2": OFF()}
    # Same answer whichever order the snapshot lists them in.
    again = plan(snap(*reversed(twins)), limits(cap_for_target(2500.0)), PARAMS)
    assert again.setpoints == p.setpoints


@pytest.mark.parametrize("heading_fraction", [0.921, 0.95, 0.99, 1.0])
def test_inside_the_band_holds_the_previous_plan(heading_fraction: float) -> None:
    cap_w = 9000.0 / heading_fraction
    previous = plan(snap(*THREE), limits(cap_for_target(7000.0)), PARAMS)
    assert previous.mode == "cap"
    # The site now heads for 9000 W, inside [uncapping, capping threshold] of the new cap.
    p = plan(snap(*THREE), limits(cap_w), PARAMS, previous)
    assert p.mode == "hold"
    assert p.setpoints == previous.setpoints
    assert "inside the band" in p.reason


def test_band_edges_replan() -> None:
    previous = plan(snap(*THREE), limits(cap_for_target(7000.0)), PARAMS)
    above = plan(snap(*THREE), limits(9000.0 / 1.001), PARAMS, previous)
    assert above.mode == "cap"
    below = plan(snap(*THREE), limits(9000.0 / 0.919), PARAMS, previous)
    assert below.mode == "restore"


def test_hold_without_previous_plan_leaves_devices_as_found() -> None:
    devices = (miner("a", 20.0, level_w=2500.0), miner("b", 30.0, level_w=None))
    p = plan(snap(*devices), limits(2525.0 / 0.95), PARAMS)
    assert p.mode == "hold"
    assert rows(p) == {"a": ON(True, 2500.0), "b": OFF()}
    assert all("left as found" in sp.reason for sp in p.setpoints)


def test_hold_keeps_planned_levels_even_while_devices_are_still_moving() -> None:
    previous = plan(snap(*THREE), limits(cap_for_target(7000.0)), PARAMS)
    # Next tick: b and c were lowered but their reads have not confirmed yet; the
    # policy judges by where they are heading, so it does not re-plan.
    moving = (
        miner("a", 20.0),
        replace(miner("b", 25.0, level_w=2000.0, budget_w=3000.0), expected_w=2000.0),
        replace(miner("c", 30.0, level_w=2000.0, budget_w=3000.0), expected_w=2000.0),
    )
    assert snap(*moving).budget_w > cap_for_target(7000.0)
    p = plan(snap(*moving), limits(cap_for_target(7000.0)), PARAMS, previous)
    assert p.mode == "hold"
    assert p.setpoints == previous.setpoints


def test_min_off_keeps_a_recently_slept_miner_asleep() -> None:
    devices = (
        miner("a", 20.0, level_w=None, slept_s_ago=10.0),
        miner("b", 30.0, level_w=None, slept_s_ago=1000.0),
    )
    p = plan(snap(*devices), limits(cap_for_target(20_000.0)), PARAMS)
    assert p.mode == "restore"
    assert rows(p) == {"a": OFF(), "b": ON(True, 3000.0)}
    reason_a = p.setpoints[0].reason
    assert "minimum off time, 290 s left" in reason_a
    # Once the window has passed it wakes, best first.
    later = (
        miner("a", 20.0, level_w=None, slept_s_ago=300.0),
        miner("b", 30.0, level_w=None, slept_s_ago=1000.0),
    )
    p = plan(snap(*later), limits(cap_for_target(3500.0)), PARAMS)
    assert rows(p) == {"a": ON(True, 3000.0), "b": OFF()}


def test_a_miner_woken_too_often_this_hour_stays_asleep() -> None:
    tired = dataclasses.replace(miner("a", 20.0, level_w=None), wakes_last_hour=4)
    fresh = dataclasses.replace(miner("b", 30.0, level_w=None), wakes_last_hour=3)
    params = dataclasses.replace(PARAMS, max_wakes_per_hour=4)
    p = plan(snap(tired, fresh), limits(cap_for_target(20_000.0)), params)
    assert rows(p) == {"a": OFF(), "b": ON(True, 3000.0)}
    assert "woken 4 times in the last hour" in p.setpoints[0].reason
    # 0 means no such limit.
    p = plan(snap(tired, fresh), limits(cap_for_target(20_000.0)), PARAMS)
    assert rows(p)["a"] == ON(True, 3000.0)


def test_min_off_does_not_keep_an_awake_miner_awake() -> None:
    # A miner that last transitioned recently but is awake may still be shed.
    devices = (miner("a", 20.0, slept_s_ago=5.0), miner("b", 30.0, slept_s_ago=5.0))
    p = plan(snap(*devices), limits(cap_for_target(3000.0)), PARAMS)
    assert rows(p) == {"a": ON(True, 2950.0), "b": OFF()}


def test_domain_limit_binds_while_the_site_has_room() -> None:
    rack = DomainLimit("rack", cap_for_target(4000.0), parent="feeder")
    feeder = DomainLimit("feeder", 1_000_000.0)
    devices = (
        miner("r1", 20.0, domain="rack"),
        miner("r2", 22.0, domain="rack"),
        miner("s1", 40.0, domain="site"),
    )
    p = plan(snap(*devices), limits(1_000_000.0, feeder, rack), PARAMS)
    assert p.mode == "cap"
    assert "rack heading for 6000 W" in p.reason
    # The rack's target (4000 W) fits its two miners at their minimum and no more;
    # the worst miner, outside the rack, keeps its full 3000 W.
    assert rows(p) == {
        "r1": ON(True, 2000.0),
        "r2": ON(True, 2000.0),
        "s1": ON(True, 3000.0),
    }
    p2 = plan(
        snap(*devices), limits(1_000_000.0, feeder, DomainLimit("rack", 3500.0, "feeder")), PARAMS
    )
    assert rows(p2)["r2"] == OFF()
    assert "rack budget" in p2.setpoints[1].reason
    assert rows(p2)["s1"] == ON(True, 3000.0)


def test_parent_domain_limit_binds_its_children() -> None:
    feeder = DomainLimit("feeder", cap_for_target(5000.0))
    racks = (DomainLimit("r-a", 100_000.0, "feeder"), DomainLimit("r-b", 100_000.0, "feeder"))
    devices = (
        miner("a1", 20.0, domain="r-a"),
        miner("b1", 21.0, domain="r-b"),
        miner("a2", 22.0, domain="r-a"),
    )
    p = plan(snap(*devices), limits(1_000_000.0, feeder, *racks), PARAMS)
    assert rows(p) == {"a1": ON(True, 2950.0), "b1": ON(True, 2000.0), "a2": OFF()}


def test_unreachable_miner_counts_at_nameplate_and_others_shed() -> None:
    lost = miner(
        "lost",
        15.0,
        level_w=None,
        nameplate_w=3500.0,
        controllable=False,
        state=DeviceState.UNREACHABLE,
        budget_w=3500.0,
    )
    ok = (miner("a", 20.0), miner("b", 30.0))
    # 6000 W of reachable miners fit a 6400 W target; counting the unreachable one
    # at its nameplate (as the tracker does) they no longer do.
    p = plan(snap(*ok), limits(cap_for_target(6400.0)), PARAMS)
    assert p.mode != "cap"
    p = plan(snap(lost, *ok), limits(cap_for_target(6400.0)), PARAMS)
    assert p.mode == "cap"
    assert p.setpoint_for("lost") is None
    assert rows(p) == {"a": ON(True, 2850.0), "b": OFF()}
    assert p.planned_w == pytest.approx(3500.0 + 2850.0 + SLEEP_W)


def test_unseen_site_sheds_every_miner_it_can_degrade_to_safe() -> None:
    # Most of the site is unreachable: at nameplate it alone exceeds the target, so
    # every controllable miner that can sleep is slept, and one that cannot is at minimum.
    lost = tuple(
        miner(
            f"lost{i}",
            20.0,
            nameplate_w=3500.0,
            controllable=False,
            state=DeviceState.UNREACHABLE,
            budget_w=3500.0,
        )
        for i in range(3)
    )
    ok = (
        miner("a", 15.0),
        miner("b", 16.0),
        miner("stuck", 40.0, capabilities=caps(sleep=False)),
    )
    p = plan(snap(*lost, *ok), limits(cap_for_target(10_000.0)), PARAMS)
    assert p.mode == "cap"
    assert rows(p) == {"a": OFF(), "b": OFF(), "stuck": ON(True, 2000.0)}
    assert p.planned_w == pytest.approx(3 * 3500.0 + 2 * SLEEP_W + 2000.0)


def gpu(device_id: str, *, controllable: bool = True) -> DeviceStatus:
    caps = DeviceControls(power_target=True, power_target_min_w=200.0, power_target_max_w=700.0)
    return DeviceStatus(
        device_id,
        DeviceKind.GPU,
        "site",
        DeviceState.RUNNING,
        700.0,
        0.0,
        0.0,
        caps,
        700.0,
        700.0,
        controllable,
    )


def test_gpus_are_shed_after_every_miner() -> None:
    # Room for both GPUs at full power plus one miner at its minimum: the miner
    # is lowered and the other one sleeps before any GPU loses a watt.
    devices = (gpu("g1"), gpu("g2"), miner("a", 20.0), miner("b", 25.0))
    p = plan(snap(*devices), limits(cap_for_target(1400.0 + 2000.0 + SLEEP_W)), PARAMS)
    r = rows(p)
    assert r["g1"] == ON(True, 700.0) and r["g2"] == ON(True, 700.0)
    assert r["a"].awake and not r["b"].awake
    assert "serving at 700 W" in p.setpoint_for("g1").reason  # type: ignore[union-attr]
    # Below even that, the GPUs go down only once every miner is asleep.
    p = plan(snap(*devices), limits(cap_for_target(1000.0 + 2 * SLEEP_W)), PARAMS)
    r = rows(p)
    assert not r["a"].awake and not r["b"].awake
    assert r["g1"].level_w + r["g2"].level_w == pytest.approx(1000.0)
    assert min(r["g1"].level_w, r["g2"].level_w) >= 200.0


def test_uncontrollable_devices_are_never_planned() -> None:
    p = plan(
        snap(gpu("g0", controllable=False), miner("a", 20.0)),
        limits(cap_for_target(3000.0)),
        PARAMS,
    )
    assert p.setpoint_for("g0") is None
    assert rows(p) == {"a": ON(True, 2300.0)}


def test_on_off_miner_without_power_target() -> None:
    onoff = DeviceControls(power_target=False, can_sleep=True)
    devices = (
        miner("a", 20.0, capabilities=onoff, nameplate_w=3000.0),
        miner("b", 25.0, capabilities=onoff, nameplate_w=3000.0),
    )
    p = plan(snap(*devices), limits(cap_for_target(4000.0)), PARAMS)
    assert rows(p) == {"a": ON(True, 3000.0), "b": OFF()}
    assert p.setpoints[0].power_target_w is None
    assert "on/off only" in p.setpoints[0].reason


def test_overhead_counts_against_the_site() -> None:
    p = plan(snap(*THREE), limits(cap_for_target(8000.0), overhead_w=1000.0), PARAMS)
    assert rows(p) == {"a": ON(True, 3000.0), "b": ON(True, 2000.0), "c": ON(True, 2000.0)}
    assert p.planned_w == pytest.approx(8000.0)


# -- safe ordering of the plan's changes, on the same tables --------------------


def test_ordering_sends_decreases_alone_then_admits_increases() -> None:
    # c is to be slept and a raised in one plan: c goes first, a waits.
    devices = (miner("a", 20.0, level_w=2000.0), miner("c", 30.0))
    p = plan(snap(*devices), limits(cap_for_target(3000.0)), PARAMS)
    assert rows(p) == {"a": ON(True, 2950.0), "c": OFF()}
    o = order_changes(p, snap(*devices), limits(cap_for_target(3000.0)), max_increase_w=1e9)
    assert [(c.device_id, c.kind) for c in o.now] == [("c", SLEEP)]
    assert [(c.device_id, c.kind) for c, _ in o.deferred] == [("a", RAISE)]
    assert "shed before restore" in o.deferred[0][1]
    # Next step: c's sleep is sent but unconfirmed, so it still counts at 3000 W; a must wait.
    c_sent = replace(devices[1], awake=False, expected_w=SLEEP_W)
    o = order_changes(
        p, snap(devices[0], c_sent), limits(cap_for_target(3000.0)), max_increase_w=1e9
    )
    assert o.now == ()
    assert "worst case: site would reach 5950 W" in o.deferred[0][1]
    # Once c reads asleep, a may rise.
    c_done = replace(c_sent, budget_w=SLEEP_W, state=DeviceState.SLEEPING)
    o = order_changes(
        p, snap(devices[0], c_done), limits(cap_for_target(3000.0)), max_increase_w=1e9
    )
    assert [(c.device_id, c.kind, c.set_target_w) for c in o.now] == [("a", RAISE, 2950.0)]


def test_ordering_ramp_limit_defers_increases_beyond_it() -> None:
    asleep = tuple(miner(d.device_id, d.efficiency_j_per_th, level_w=None) for d in THREE)
    p = plan(snap(*asleep), limits(100_000.0), PARAMS)
    o = order_changes(p, snap(*asleep), limits(100_000.0), max_increase_w=6000.0)
    assert [(c.device_id, c.kind) for c in o.now] == [("a", WAKE), ("b", WAKE)]
    assert [c.device_id for c, _ in o.deferred] == ["c"]
    assert "ramp limit" in o.deferred[0][1]
    assert sum(c.new_w - SLEEP_W for c in o.now) <= 6000.0


def test_ordering_lower_is_a_decrease() -> None:
    p = plan(snap(*THREE), limits(cap_for_target(8000.0)), PARAMS)
    o = order_changes(p, snap(*THREE), limits(cap_for_target(8000.0)), max_increase_w=0.0)
    assert [(c.device_id, c.kind, c.set_target_w) for c in o.now] == [("c", LOWER, 2000.0)]
    assert o.deferred == ()
