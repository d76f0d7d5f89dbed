"""Economic dispatch: table tests for each feature, and hypothesis properties over random sites."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Limits,
    Pin,
    Plan,
    Snapshot,
)
from siteagent.policies.capping import CappingParams, max_level_w, min_level_w
from siteagent.policies.economic import (
    EconomicParams,
    GpuCurve,
    PriorityClass,
    PriorityClasses,
    SwitchingCosts,
    plan,
)
from siteagent.policies.prices import Prices

SITE = "site"
NOW_S = 10_000.0
CHEAP = Prices(0.05, 0.03, 2.0)
PARAMS = EconomicParams()


def miner(
    i: str, j_per_th: float, *, domain: str = SITE, awake: bool = True, since: float | None = None
) -> DeviceStatus:
    caps = DeviceControls(
        power_target=True, power_target_min_w=1500.0, power_target_max_w=3000.0, can_sleep=True
    )
    w = 3000.0 if awake else 20.0
    return DeviceStatus(
        i,
        DeviceKind.MINER,
        domain,
        DeviceState.MINING if awake else DeviceState.SLEEPING,
        3000.0,
        3000.0 / j_per_th,
        20.0,
        caps,
        w,
        w,
        True,
        power_target_w=3000.0,
        awake=awake,
        last_transition_s=since,
    )


def gpu(i: str, util: float | None = 0.5, *, domain: str = SITE) -> DeviceStatus:
    caps = DeviceControls(power_target=True, power_target_min_w=200.0, power_target_max_w=700.0)
    reading = (
        None
        if util is None
        else DeviceReading(i, NOW_S, 400.0, DeviceState.RUNNING, utilization_frac=util)
    )
    return DeviceStatus(
        i,
        DeviceKind.GPU,
        domain,
        DeviceState.RUNNING,
        700.0,
        0.0,
        0.0,
        caps,
        700.0,
        700.0,
        True,
        reading=reading,
        reading_age_s=1.0,
        power_target_w=700.0,
        awake=True,
    )


def limits(cap_w: float, **kw: object) -> Limits:
    return Limits(cap_w, cap_w, "test", **kw)  # type: ignore[arg-type]


def run(
    devices: Iterable[DeviceStatus],
    lim: Limits,
    prices: Prices = CHEAP,
    params: EconomicParams = PARAMS,
    previous: Plan | None = None,
) -> Plan:
    return plan(Snapshot(NOW_S, tuple(devices)), lim, prices, params, previous)


def level(p: Plan, i: str) -> float:
    sp = p.setpoint_for(i)
    assert sp is not None
    return sp.planned_w if sp.awake else 0.0


# -- table tests -------------------------------------------------------------------


def test_unconstrained_profitable_miners_run_at_full_power() -> None:
    p = run([miner("a", 17.5), miner("b", 29.5)], limits(1e6))
    assert level(p, "a") == level(p, "b") == 3000.0
    assert "at its maximum" in (p.setpoint_for("a") or p.setpoints[0]).reason


def test_loss_making_miner_sleeps_profitable_one_runs() -> None:
    # Break-even at $0.05/TH/day: 17.5 J/TH -> $0.119/kWh; 29.5 J/TH -> $0.071/kWh.
    p = run([miner("eff", 17.5), miner("old", 29.5)], limits(1e6), Prices(0.05, 0.09, 2.0))
    assert level(p, "eff") > 0 and level(p, "old") == 0.0
    assert "loses money" in (p.setpoint_for("old") or p.setpoints[0]).reason


def test_cap_fills_by_value_gpus_first_then_efficient_miners() -> None:
    devices = [gpu("g", util=0.9), miner("eff", 17.5), miner("old", 29.5)]
    p = run(devices, limits(4000.0 / 0.97))
    assert level(p, "g") >= GpuCurve().limit_for_w(0.9, 700.0)
    assert level(p, "eff") > 0 and level(p, "old") == 0.0


def test_gpu_limit_follows_demand_and_leaves_the_rest_to_mining() -> None:
    # A GPU at 30% demand needs far less than 700 W: the room goes to the miner.
    devices = [gpu("g", util=0.3), miner("m", 17.5)]
    cap = (GpuCurve().limit_for_w(0.3 + PARAMS.gpu_headroom_frac, 700.0) + 3000.0) / 0.97 + 1.0
    p = run(devices, limits(cap))
    assert level(p, "m") == 3000.0
    assert level(p, "g") < 700.0


def test_low_demand_gpu_is_sized_for_a_burst_before_the_next_plan() -> None:
    # A GPU reading 10 % of peak, and more profitable mining than room: the headroom is a
    # share of peak (0.15), not of demand (which left 1.5 % of peak), so a burst of 12 %
    # of peak before the next plan is served, worth ~$3/kWh against the miner's cents.
    devices = [gpu("g", util=0.1), miner("a", 17.5), miner("b", 17.5)]
    p = run(devices, limits(5000.0 / 0.97))
    assert GpuCurve().capacity_frac(level(p, "g"), 700.0) >= 0.1 + 0.12
    assert level(p, "g") < 700.0  # and no more than that: the rest goes to mining


def test_stale_utilization_uses_the_default() -> None:
    d = gpu("g", util=None)
    p = run([d], limits(1e6))
    assert level(p, "g") == 700.0  # zero-value headroom is filled when there is room


def test_hierarchy_binds_each_domain() -> None:
    lim = limits(1e6, domains=(DomainLimit("rack", 4000.0),))
    p = run([miner("a", 17.5, domain="rack"), miner("b", 18.0, domain="rack")], lim)
    assert level(p, "a") + level(p, "b") <= 0.97 * 4000.0 + 1e-6
    assert "rack" in (p.setpoint_for("b") or p.setpoints[0]).reason


def test_min_off_time_keeps_a_miner_asleep() -> None:
    p = run([miner("m", 17.5, awake=False, since=NOW_S - 10.0)], limits(1e6))
    sp = p.setpoint_for("m")
    assert sp is not None and not sp.awake and "minimum off time" in sp.reason


def test_pins_modes_and_contract_floors() -> None:
    devices = [gpu("g", util=0.05), miner("m", 17.5), miner("n", 17.5)]
    lim = limits(1e6, pins=(Pin("n", 0.0, source="op"),), mining_off=True, ai_min=True)
    params = EconomicParams(contract_floor_w={"g": 450.0})
    p = run(devices, lim, params=params)
    assert level(p, "m") == 0.0 and level(p, "n") == 0.0
    assert level(p, "g") == 450.0  # ai_min holds the GPU at its contract floor, not below


def test_noise_does_not_churn_and_incumbents_keep_their_place() -> None:
    devices = [miner("a", 20.0), miner("b", 20.01, awake=False)]
    first = run(devices, limits(2500.0 / 0.97))
    assert level(first, "a") > 0 and level(first, "b") == 0.0
    # A price wobble smaller than the keep margin moves nothing.
    second = run(devices, limits(2500.0 / 0.97), Prices(0.0501, 0.0302, 2.0), previous=first)
    assert [(s.awake, s.power_target_w) for s in second.setpoints] == [
        (s.awake, s.power_target_w) for s in first.setpoints
    ]
    # Near break-even, an awake miner stays until it loses more than the margin.
    near = Prices(0.05, 0.05 / (0.024 * 20.0) + 0.005, 2.0)
    assert level(run([miner("a", 20.0)], limits(1e6), near, previous=first), "a") > 0


def test_over_a_threshold_is_a_cap_replan() -> None:
    p = run([miner("a", 17.5), miner("b", 17.5)], limits(4000.0))
    assert p.mode == "cap" and p.planned_w <= 0.97 * 4000.0 + 1e-6


# -- properties ----------------------------------------------------------------------


def ancestors(parent: Mapping[str, str], domain: str) -> list[str]:
    out = [domain]
    while out[-1] != SITE:
        out.append(parent[out[-1]])
    return out


def loads_w(parent: Mapping[str, str], items: Iterable[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for domain, w in items:
        for node in ancestors(parent, domain):
            out[node] += w
    return out


@st.composite
def sites(draw: st.DrawFn) -> tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]]:
    parent: dict[str, str] = {}
    level_ids = [SITE]
    for depth in range(draw(st.integers(0, 3))):
        ids = [f"d{depth}{j}" for j in range(draw(st.integers(1, 3)))]
        for i in ids:
            parent[i] = draw(st.sampled_from(level_ids))
        level_ids = ids
    domains = [SITE, *parent]
    min_off = draw(st.sampled_from([0.0, 300.0]))
    devices = []
    for k in range(draw(st.integers(1, 30))):
        dom = draw(st.sampled_from(domains))
        if draw(st.booleans()):
            util = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
            devices.append(gpu(f"n{k % 3}/g{k}", util, domain=dom))  # nodes of GPUs
        else:
            awake = draw(st.booleans())
            since = draw(st.one_of(st.none(), st.floats(0.0, 2 * min_off + 1)))
            j = draw(st.sampled_from([15.0, 17.5, 21.5, 29.5, 38.0]))
            devices.append(
                miner(
                    f"m{k}",
                    j,
                    domain=dom,
                    awake=awake,
                    since=None if since is None else NOW_S - since,
                )
            )
    nameplate = loads_w(parent, ((d.domain, d.nameplate_power_w) for d in devices))
    lims = tuple(
        DomainLimit(
            n,
            max(500.0, nameplate[n] * draw(st.floats(0.1, 1.4))),
            None if parent[n] == SITE else parent[n],
        )
        for n in parent
    )
    cap = nameplate[SITE] * draw(st.floats(0.05, 1.4)) + 1.0
    prices = Prices(draw(st.floats(0.03, 0.07)), draw(st.floats(0.0, 0.5)), draw(st.floats(0, 3)))
    # Some GPUs under contract: floors from below their minimum to their maximum.
    floors = {
        d.device_id: draw(st.floats(0.0, 800.0))
        for d in devices
        if d.kind is DeviceKind.GPU and draw(st.booleans())
    }
    params = EconomicParams(
        capping=CappingParams(min_off_s=min_off),
        contract_floor_w=floors,
        switching=draw(switching(devices)),
    )
    return Snapshot(NOW_S, tuple(devices)), Limits(cap, cap, "t", 0.0, lims), prices, params, parent


@st.composite
def switching(draw: st.DrawFn, devices: list[DeviceStatus]) -> SwitchingCosts:
    """Free switching, or costs of a cycle, wake times (some per device) and depreciation."""
    if draw(st.booleans()):
        return SwitchingCosts()
    return SwitchingCosts(
        miner_wear_usd_per_cycle=draw(st.floats(0.0, 2.0)),
        miner_restart_usd_per_cycle=draw(st.floats(0.0, 0.5)),
        miner_wake_s=draw(st.sampled_from([0.0, 10.0, 30.0, 120.0])),
        wake_s_by_device={
            d.device_id: draw(st.sampled_from([10.0, 60.0, 600.0]))
            for d in devices
            if d.kind is DeviceKind.MINER and draw(st.booleans())
        },
        miner_depreciation_usd_per_h=draw(st.sampled_from([0.0, 0.01, 0.2])),
        gpu_drain_usd=draw(st.sampled_from([0.0, 1.0, 50.0])),
        gpu_undrain_usd=draw(st.sampled_from([0.0, 2.0])),
        horizon_s=draw(st.sampled_from([300.0, 3600.0, 14_400.0])),
    )


FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(sites())
def test_plan_never_exceeds_a_feasible_domain_target(
    case: tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]],
) -> None:
    snap, lim, prices, params, parent = case
    p = plan(snap, lim, prices, params)
    by_id = {d.device_id: d for d in snap.devices}
    planned = loads_w(parent, ((by_id[s.device_id].domain, s.planned_w) for s in p.setpoints))
    floor = loads_w(
        parent,
        (
            (d.domain, d.sleep_power_w if d.kind is DeviceKind.MINER else contract_w(d, params))
            for d in snap.devices
        ),
    )
    limit = {SITE: lim.effective_cap_w, **{d.domain_id: d.limit_w for d in lim.domains}}
    for node, lw in limit.items():
        target = params.capping.capping_target * lw
        if floor[node] <= target:
            assert planned[node] <= target + 1e-3, (node, planned[node], target)
    for sp in p.setpoints:
        d = by_id[sp.device_id]
        if sp.awake:
            assert min_level_w(d) - 1e-6 <= sp.planned_w <= max_level_w(d) + 1e-6


def contract_w(d: DeviceStatus, params: EconomicParams) -> float:
    """A GPU's floor with its contract: the contract onto its range, at least its minimum."""
    contract = params.contract_floor_w.get(d.device_id, 0.0)
    return max(min_level_w(d), d.capabilities.clamp_power_target_w(contract))


@FAST
@given(sites())
def test_caps_win_over_contract_floors_and_the_plan_names_the_floors_it_broke(
    case: tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]],
) -> None:
    snap, lim, prices, params, parent = case
    p = plan(snap, lim, prices, params)
    by_id = {d.device_id: d for d in snap.devices}
    planned = loads_w(parent, ((by_id[s.device_id].domain, s.planned_w) for s in p.setpoints))
    # What no plan can go below: miners asleep, GPUs at their lowest limit (no contract).
    own_min = loads_w(
        parent,
        (
            (d.domain, d.sleep_power_w if d.kind is DeviceKind.MINER else min_level_w(d))
            for d in snap.devices
        ),
    )
    limit = {SITE: lim.effective_cap_w, **{d.domain_id: d.limit_w for d in lim.domains}}
    for node, lw in limit.items():
        if own_min[node] <= lw:
            assert planned[node] <= lw + 1e-3, (node, planned[node], lw)
    gpus = [sp for sp in p.setpoints if by_id[sp.device_id].kind is DeviceKind.GPU]
    below = sorted(
        sp.device_id for sp in gpus if sp.planned_w < contract_w(by_id[sp.device_id], params) - 1e-6
    )
    assert list(p.broken_floors) == below
    for sp in gpus:
        if sp.device_id in p.broken_floors:
            assert "contract floor" in sp.reason and "broken" in sp.reason


def test_a_cap_below_a_contract_floor_breaks_the_floor_and_says_so() -> None:
    params = EconomicParams(contract_floor_w={"g": 600.0, "h": 600.0})
    devices = [gpu("g", util=0.05), gpu("h", util=0.05), miner("m", 17.5)]
    roomy = run(devices, limits(1e6), params=params)
    assert level(roomy, "g") >= 600.0 and level(roomy, "h") >= 600.0
    assert roomy.broken_floors == ()
    # 1000 W: both GPUs at their 200 W minimum take 400 W, the miner asleep 20 W; the
    # 580 W left keep g's contract whole (by id) and what remains of h's.
    p = run(devices, limits(1000.0), params=params)
    assert level(p, "g") == 600.0 and level(p, "h") == 380.0 and level(p, "m") == 0.0
    assert p.broken_floors == ("h",) and p.planned_w <= 1000.0
    sp = p.setpoint_for("h")
    assert sp is not None and "contract floor 600 W broken" in sp.reason


@FAST
@given(sites())
def test_never_wakes_a_miner_inside_min_off(
    case: tuple[Snapshot, Limits, Prices, EconomicParams, dict[str, str]],
) -> None:
    snap, lim, prices, params, _ = case
    p = plan(snap, lim, prices, params)
    for d in snap.devices:
        t = d.last_transition_s
        if d.awake is False and t is not None and NOW_S - t < params.capping.min_off_s:
            sp = p.setpoint_for(d.device_id)
            assert sp is not None and not sp.awake


def test_agent_dispatches_to_the_economic_policy_by_config() -> None:
    from siteagent.agent.config import parse_config
    from siteagent.agent.control.loop import Agent

    cfg = parse_config({"site": {"cap_w": 10_000.0}, "policy": {"name": "economic"}})
    agent = Agent(cfg, [])
    p = agent.plan(Snapshot(NOW_S, (miner("m", 17.5),)), limits(10_000.0))
    assert p.reason.startswith("merit order") and "hashprice $0.0500" in p.reason


# -- priority classes ----------------------------------------------------------------


def test_a_priority_class_is_served_before_better_value_in_the_merit_order() -> None:
    devices = [miner("new", 15.0), miner("old", 38.0)]
    lim = limits(3500.0)  # room for one miner at full power and a little more
    merit = run(devices, lim)
    assert level(merit, "new") > level(merit, "old")
    classes = PriorityClasses([PriorityClass("contracted", device_patterns=("ol*",))])
    p = run(devices, lim, params=EconomicParams(priority=classes))
    assert level(p, "old") > level(p, "new")
    assert level(p, "old") == 3000.0
    sp_old, sp_new = p.setpoint_for("old"), p.setpoint_for("new")
    assert sp_old is not None and "priority contracted" in sp_old.reason
    assert sp_new is not None and "priority merit order" in sp_new.reason
    assert p.planned_w <= 0.97 * 3500.0 + 1e-6


def test_priority_classes_follow_their_order_and_can_name_domains() -> None:
    parent = DomainLimit("rack-b", 10_000.0)
    devices = [miner("a", 15.0), miner("b", 38.0, domain="rack-b"), miner("c", 25.0)]
    classes = PriorityClasses(
        [PriorityClass("rack b", domains=("rack-b",)), PriorityClass("then c", ("c",))]
    )
    p = run(devices, limits(6500.0, domains=(parent,)), params=EconomicParams(priority=classes))
    assert level(p, "b") == 3000.0 and level(p, "c") == 3000.0
    assert level(p, "a") == 0.0
    assert classes.class_of("a", SITE) == 2 and classes.name(2) == "merit order"


def test_a_priority_class_does_not_take_a_loss() -> None:
    classes = PriorityClasses([PriorityClass("contracted", ("old",))])
    dear = Prices(0.05, 0.5, 2.0)  # electricity well above every miner's break-even
    p = run([miner("old", 38.0)], limits(10_000.0), dear, EconomicParams(priority=classes))
    sp = p.setpoint_for("old")
    assert sp is not None and not sp.awake and "loses money" in sp.reason


def test_priority_classes_from_the_config() -> None:
    import pytest

    from siteagent.agent.config import ConfigError, parse_config
    from siteagent.agent.control.prices import economic_params

    cfg = parse_config(
        {
            "site": {"cap_w": 10_000.0},
            "policy": {
                "name": "economic",
                "priority_classes": [{"name": "contracted", "devices": ["node-a/*"]}],
            },
        }
    )
    pr = economic_params(cfg).priority
    assert pr is not None and pr.class_of("node-a/gpu3", SITE) == 0
    assert pr.class_of("node-b/gpu0", SITE) == 1
    with pytest.raises(ConfigError) as e:
        parse_config({"site": {"cap_w": 1.0}, "policy": {"priority_classes": [{"name": "x"}]}})
    assert "priority_classes" in str(e.value) and "devices = [" in str(e.value)
    twice = [{"name": "x", "devices": ["a"]}, {"name": "x", "domains": ["r"]}]
    with pytest.raises(ConfigError) as e:
        parse_config({"site": {"cap_w": 1.0}, "policy": {"priority_classes": twice}})
    assert "more than once" in str(e.value)
