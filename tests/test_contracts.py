"""Contracts on GPU nodes: every policy keeps a contracted node at the power its demand needs,
a cap always wins over a floor (loudly: an alarm and an audit entry naming the contract), and
the config refuses a contract it could not keep, naming the key."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import pytest
from ai_site import Clock, node_config, node_site
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siteagent.agent.api.runtime import alarm_auditor
from siteagent.agent.api.store import Store
from siteagent.agent.config import ConfigError, parse_config
from siteagent.agent.control.ai_demand import Contracts, need_w
from siteagent.agent.control.alarms import CONTRACT_FLOOR_BROKEN, AlarmEvent
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Floor,
    Limits,
    Plan,
    Snapshot,
)
from siteagent.policies import PolicyParams, PolicyState, get_policy
from siteagent.policies.capping import CappingParams, min_level_w
from siteagent.policies.economic import EconomicParams, GpuCurve
from siteagent.policies.prices import Prices
from siteagent.sim.gpu import SimGpuSite

SITE = "site"
GPU_BASE = "127.8.2.1"
PRICES = Prices(0.08, 0.03, 2.0)
POLICIES = ("efficiency-capping", "economic")


def plan_with(name: str, snap: Snapshot, limits: Limits) -> Plan:
    policy = get_policy(name, PolicyParams(CappingParams(), EconomicParams()))
    return policy.plan(snap, limits, PRICES, PolicyState())[0]


def gpu(i: str, *, domain: str = SITE, step_w: float = 1.0) -> DeviceStatus:
    caps = DeviceControls(
        power_target=True,
        power_target_min_w=200.0,
        power_target_max_w=700.0,
        power_target_step_w=step_w,
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
        power_target_w=700.0,
        awake=True,
    )


def miner(i: str, *, domain: str = SITE) -> DeviceStatus:
    caps = DeviceControls(
        power_target=True, power_target_min_w=1500.0, power_target_max_w=3000.0, can_sleep=True
    )
    return DeviceStatus(
        i,
        DeviceKind.MINER,
        domain,
        DeviceState.MINING,
        3000.0,
        150.0,
        20.0,
        caps,
        3000.0,
        3000.0,
        True,
        power_target_w=3000.0,
        awake=True,
    )


def level(p: Plan, device_id: str) -> float:
    sp = p.setpoint_for(device_id)
    assert sp is not None
    return sp.planned_w


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_keeps_a_contracted_node_at_the_power_its_demand_needs(name: str) -> None:
    # Two nodes of one GPU; "a" sorts first and is not contracted, "b" is, and its
    # server's queue says 90 % of peak with the margin: 490 W.
    need = need_w(0.9, 700.0, GpuCurve())
    devices = (gpu("a/gpu0"), gpu("b/gpu0"), miner("m"))
    # Room (at the 0.97 target) for the miner asleep and 900 W of GPUs: without the
    # contract, "a" would take 700 W first and leave "b" at its minimum.
    cap = (20.0 + 900.0) / 0.97
    snap = Snapshot(0.0, devices)
    bare = plan_with(name, snap, Limits(cap, cap, "t"))
    floored = plan_with(name, snap, Limits(cap, cap, "t", floors=(Floor("b/gpu0", need, "b"),)))
    assert level(floored, "b/gpu0") >= need
    assert floored.broken_floors == ()
    assert floored.planned_w <= cap
    # The plan without the floor is what the floor changed (the capping policy's fill
    # gives the GPU that sorts first its maximum).
    if name == "efficiency-capping":
        assert level(bare, "b/gpu0") < need


@pytest.mark.parametrize("name", POLICIES)
def test_a_cap_lower_than_the_floors_wins_and_the_plan_names_the_broken_contract(
    name: str,
) -> None:
    devices = (gpu("a/gpu0"), gpu("b/gpu0"))
    floors = (Floor("a/gpu0", 600.0, "a"), Floor("b/gpu0", 600.0, "b"))
    # Both minimums (400 W) and 580 W of the 800 W the contracts want above them.
    p = plan_with(name, Snapshot(0.0, devices), Limits(980.0, 980.0, "t", floors=floors))
    assert p.planned_w <= 980.0
    assert level(p, "a/gpu0") == 600.0 and level(p, "b/gpu0") == 380.0
    assert p.broken_floors == ("b/gpu0",)
    sp = p.setpoint_for("b/gpu0")
    assert sp is not None and "contract floor 600 W broken" in sp.reason


# -- the property ------------------------------------------------------------------------


def chain(parent: Mapping[str, str], domain: str) -> list[str]:
    out = [domain]
    while out[-1] != SITE:
        out.append(parent[out[-1]])
    return out


def loads_w(parent: Mapping[str, str], items: Iterable[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for domain, w in items:
        for node in chain(parent, domain):
            out[node] += w
    return out


@st.composite
def floored_sites(draw: st.DrawFn) -> tuple[Snapshot, Limits, dict[str, str]]:
    parent: dict[str, str] = {}
    above = [SITE]
    for depth in range(draw(st.integers(0, 2))):
        ids = [f"d{depth}{j}" for j in range(draw(st.integers(1, 3)))]
        for i in ids:
            parent[i] = draw(st.sampled_from(above))
        above = ids
    domains = [SITE, *parent]
    devices: list[DeviceStatus] = []
    for k in range(draw(st.integers(1, 16))):
        dom = draw(st.sampled_from(domains))
        if draw(st.booleans()):
            devices.append(gpu(f"g{k:02d}", domain=dom, step_w=draw(st.sampled_from([1.0, 25.0]))))
        else:
            devices.append(miner(f"m{k:02d}", domain=dom))
    floors = tuple(
        Floor(d.device_id, draw(st.floats(0.0, 800.0)), f"node-{d.device_id}")
        for d in devices
        if d.kind is DeviceKind.GPU and draw(st.booleans())
    )
    nameplate = loads_w(parent, ((d.domain, d.nameplate_power_w) for d in devices))
    lims = tuple(
        DomainLimit(
            n,
            max(300.0, nameplate[n] * draw(st.floats(0.1, 1.3))),
            None if parent[n] == SITE else parent[n],
        )
        for n in parent
    )
    cap = nameplate[SITE] * draw(st.floats(0.05, 1.3)) + 1.0
    return Snapshot(0.0, tuple(devices)), Limits(cap, cap, "t", 0.0, lims, floors=floors), parent


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", POLICIES)
@PROPERTY
@given(case=floored_sites())
def test_no_plan_puts_a_contract_below_what_the_caps_allow_nor_a_floor_over_a_cap(
    name: str, case: tuple[Snapshot, Limits, dict[str, str]]
) -> None:
    snap, limits, parent = case
    p = plan_with(name, snap, limits)
    by_id = {d.device_id: d for d in snap.devices}
    planned = loads_w(parent, ((by_id[s.device_id].domain, s.planned_w) for s in p.setpoints))
    limit = {SITE: limits.effective_cap_w, **{d.domain_id: d.limit_w for d in limits.domains}}
    own_min = loads_w(
        parent,
        (
            (d.domain, d.sleep_power_w if d.kind is DeviceKind.MINER else min_level_w(d))
            for d in snap.devices
        ),
    )
    # A floor never takes a domain over its limit (where the minimums fit under it).
    for node, lw in limit.items():
        if own_min[node] <= lw:
            assert planned[node] <= lw + 1e-3, (node, planned[node], lw)
    below = []
    for f in limits.floors:
        d = by_id[f.device_id]
        want = max(min_level_w(d), d.capabilities.clamp_power_target_w(f.power_w))
        got = level(p, f.device_id)
        if got >= want - 1e-6:
            continue
        below.append(f.device_id)
        # Below its floor only where a domain above it is full to its limit (to its step).
        step = d.capabilities.power_target_step_w
        full = [n for n in chain(parent, d.domain) if planned[n] >= limit[n] - step - 1e-3]
        assert full, (f, got, {n: (planned[n], limit[n]) for n in chain(parent, d.domain)})
    assert sorted(p.broken_floors) == sorted(below)


# -- on the simulated site: alarm and audit ------------------------------------------------


@pytest.fixture
async def site_and_clock() -> AsyncIterator[tuple[SimGpuSite, Clock]]:
    async with node_site(GPU_BASE, seed=11) as pair:
        yield pair


async def test_a_cap_below_the_contract_wins_with_an_alarm_and_an_audit_naming_it(
    site_and_clock: tuple[SimGpuSite, Clock], tmp_path: Path
) -> None:
    site, clock = site_and_clock
    n = site.inventory()[0]
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000, "safety_margin_w": 0},
            "gpu_nodes": [node_config(site, contract_max_queue=16)],
            # The default policy: efficiency capping keeps floors too.
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            "telemetry": {"interval_s": 0.1, "timeout_s": 3.0},
        }
    )
    # The wall clock moves with the simulated one: the alarm's duration is the tick's time.
    agent = Agent(cfg, await build_devices(cfg), clock=clock, wall_clock=clock.wall)
    store = Store(tmp_path / "state.db")
    events: list[AlarmEvent] = []
    agent.alarms.subscribe(events.append)
    agent.alarms.subscribe(alarm_auditor(store))

    async def tick() -> Plan:
        clock.t += 5.0
        await agent.sweep()
        record = await agent.tick()
        return record.plan

    try:
        p = await tick()
        floors = {f.device_id: f.power_w for f in p_limits(agent).floors}
        assert set(floors) == {"gpu-a/gpu0", "gpu-a/gpu1"} and min(floors.values()) > 200.0
        assert p.broken_floors == () and agent.alarms.get(CONTRACT_FLOOR_BROKEN) is None

        # The utility's limit leaves the node 100 W above its GPUs' minimums: the cap wins.
        cap = n["overhead_w"] + 2 * 200.0 + 100.0
        agent.set_cap("utility", cap)
        p = await tick()
        assert p.planned_w <= cap and set(p.broken_floors) == {"gpu-a/gpu0", "gpu-a/gpu1"}
        alarm = agent.alarms.get(CONTRACT_FLOOR_BROKEN)
        assert alarm is not None
        assert "contract floor of gpu-a (" in alarm.reason and "utility" in alarm.reason
        await tick()
        clock.t += 120.0
        agent.set_cap("utility", None)
        p = await tick()
        assert p.broken_floors == () and agent.alarms.get(CONTRACT_FLOOR_BROKEN) is None
        raised = [
            r for r in store.audit(100) if r.action == f"alarm raised: {CONTRACT_FLOOR_BROKEN}"
        ]
        cleared = [
            r for r in store.audit(100) if r.action == f"alarm cleared: {CONTRACT_FLOOR_BROKEN}"
        ]
        assert len(raised) == 1 and "contract floor of gpu-a (" in raised[0].result
        assert len(cleared) == 1 and "contract floor of gpu-a (" in cleared[0].result
        # For how long: from the raise to the clear, on the agent's wall clock.
        (clear,) = [e for e in events if not e.raised]
        assert clear.duration_s >= 125.0
        assert cleared[0].result.startswith(f"cleared after {clear.duration_s:.0f} s")
    finally:
        store.close()
        await close_drivers(agent.fleet.links())


def p_limits(agent: Agent) -> Limits:
    assert agent.last_tick is not None
    return agent.last_tick.limits


# -- the config --------------------------------------------------------------------------


def test_a_service_level_without_an_endpoint_is_refused_naming_the_key() -> None:
    node = {"id": "n", "gpus": 2, "contract_max_queue": 8}
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node]})
    (p,) = info.value.problems
    assert p.path == "gpu_nodes[0].contract_max_queue"
    assert p.found == "8 without gpu_nodes[0].demand_endpoint"
    assert "demand_endpoint" in p.expected


def test_an_endpoint_that_is_no_http_url_is_refused_naming_the_key() -> None:
    node = {"id": "n", "gpus": 2, "demand_endpoint": "10.0.0.5:8000/metrics"}
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node]})
    (p,) = info.value.problems
    assert p.path == "gpu_nodes[0].demand_endpoint" and p.found == "'10.0.0.5:8000/metrics'"


def test_a_floor_under_the_capping_policy_is_kept_not_refused() -> None:
    node = {"id": "n", "gpus": 2, "contract_floor_w": 1000}
    cfg = parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node]})
    assert cfg.policy.name == "efficiency-capping" and cfg.gpu_nodes[0].contracted


def test_vllms_metric_names_are_the_default_and_another_servers_can_be_named() -> None:
    node = {
        "id": "n",
        "gpus": 1,
        "demand_endpoint": "http://10.0.0.5:80/metrics",
        "demand_metrics": {"waiting": ["tgi_queue_size"], "running": ["tgi_batch_current_size"]},
    }
    cfg = parse_config({"site": {"cap_w": 10_000}, "gpu_nodes": [node]})
    m = cfg.gpu_nodes[0].demand_metrics
    assert m.waiting == ["tgi_queue_size"] and m.tokens_per_s == ["vllm:generation_tokens_total"]
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"site": {"cap_w": 10_000}, "gpu_nodes": [{**node, "demand_metrics": {"queue": ["x"]}}]}
        )
    assert [p.path for p in info.value.problems] == ["gpu_nodes[0].demand_metrics.queue"]


def class_config(**node: object) -> dict[str, object]:
    return {
        "site": {"cap_w": 100_000},
        "gpu_nodes": [
            {"id": "gpu-a", "gpus": 2, **node},
            {"id": "gpu-b", "gpus": 2, "demand_endpoint": "http://10.0.0.6/metrics"},
        ],
        "policy": {
            "name": "economic",
            "priority_classes": [
                {
                    "name": "contracted-ai",
                    "devices": ["gpu-a/*"],
                    "contract_floor_w_per_gpu": 300,
                    "contract_max_queue": 8,
                }
            ],
        },
    }


def test_a_priority_class_contracts_every_node_it_holds() -> None:
    cfg = parse_config(class_config(demand_endpoint="http://10.0.0.5/metrics"))
    (c,) = Contracts(cfg).contracts
    assert (c.node_id, c.floor_w, c.max_queue, c.gpu_ids) == (
        "gpu-a",
        600.0,
        8,
        ("gpu-a/gpu0", "gpu-a/gpu1"),
    )


def test_a_class_service_level_over_a_node_without_an_endpoint_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(class_config())
    (p,) = info.value.problems
    assert p.path == "policy.priority_classes[0].contract_max_queue"
    assert p.found == "8 for GPU node(s) gpu-a without a demand_endpoint"
