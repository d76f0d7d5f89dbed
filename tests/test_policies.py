"""The policy registry: chosen by name, one interface, state handed back (no globals)."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from test_economic import NOW_S, gpu, limits, miner

from siteagent.agent.config import PolicyConfig, parse_config
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import PLAN_MODES, families, render_text
from siteagent.domain import Limits, PlanMode, Snapshot
from siteagent.policies import POLICIES, POLICY_NAMES, PolicyParams, PolicyState, get_policy
from siteagent.policies.capping import CappingParams
from siteagent.policies.economic import EconomicParams
from siteagent.policies.prices import Prices

PRICES = Prices(0.05, 0.05, 2.0)


def params() -> PolicyParams:
    return PolicyParams(CappingParams(), EconomicParams())


def test_every_configurable_name_is_registered_and_no_other() -> None:
    field = PolicyConfig.model_fields["name"].annotation
    assert set(get_args(field)) == set(POLICIES) == set(POLICY_NAMES)
    with pytest.raises(KeyError, match="unknown policy 'greedy'; expected one of"):
        get_policy("greedy", params())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_answers_the_one_interface(name: str) -> None:
    policy = get_policy(name, params())
    assert policy.name == name
    snap = Snapshot(NOW_S, (miner("m1", 17.5), miner("m2", 29.5), gpu("g1")))
    lim = limits(4000.0)
    first, state = policy.plan(snap, lim, PRICES, PolicyState())
    assert state.previous is first
    assert first.mode in PLAN_MODES
    assert {sp.device_id for sp in first.setpoints} == {"m1", "m2", "g1"}
    assert all(sp.reason for sp in first.setpoints)
    again, _ = policy.plan(snap, lim, PRICES, state)
    assert again.mode in PLAN_MODES


def test_the_economic_policy_keeps_what_it_derived_in_its_state_not_a_global() -> None:
    policy = get_policy("economic", params())
    a = Snapshot(NOW_S, (miner("a1", 17.5), miner("a2", 29.5)))
    b = Snapshot(NOW_S, (miner("b1", 21.5),))
    _, state_a = policy.plan(a, limits(6000.0), PRICES, PolicyState())
    _, state_b = policy.plan(b, limits(6000.0), PRICES, PolicyState())
    # Planning another site in between leaves the first site's state as it was.
    assert state_a.derived is not None and state_a.derived is not state_b.derived
    _, again = policy.plan(a, limits(6000.0), PRICES, PolicyState(None, state_a.derived))
    assert again.derived is not state_b.derived


async def test_the_agent_hands_the_policy_its_state_back() -> None:
    cfg = parse_config({"site": {"cap_w": 10_000.0}, "policy": {"name": "economic"}})
    agent = Agent(cfg, [])
    first = agent.plan(Snapshot(NOW_S, (miner("m", 17.5),)), limits(10_000.0))
    assert agent.policy_state.previous is first
    derived = agent.policy_state.derived
    assert derived is not None
    await agent.tick()
    second = agent.last_plan
    assert second is not None and agent.policy_state.previous is second


async def test_every_plan_mode_has_a_series_from_the_first_scrape() -> None:
    agent = Agent(parse_config({"site": {"cap_w": 10_000.0}}), [])
    await agent.tick()
    text = render_text(families(agent)).decode()
    for mode in PlanMode:
        assert f'siteagent_plan_mode{{mode="{mode.value}"}}' in text, mode


def test_plan_modes_name_every_mode_a_policy_plans_in() -> None:
    assert set(PLAN_MODES) == {m.value for m in PlanMode}
    seen: set[str] = set()
    snap = Snapshot(NOW_S, (miner("m1", 17.5), miner("m2", 29.5), miner("m3", 20.0, awake=False)))
    for name in POLICIES:
        policy = get_policy(name, params())
        for cap_w in (500.0, 4000.0, 50_000.0):
            state = PolicyState()
            # Plan, plan again unchanged (a hold), then with the operator's mining off.
            for mining_off in (False, False, True):
                lim = Limits(cap_w, cap_w, "t", mining_off=mining_off)
                p, state = policy.plan(snap, lim, PRICES, state)
                seen.add(p.mode)
    assert seen <= set(PLAN_MODES)
    assert {"cap", "restore", "hold", "override", "economic"} <= seen


def test_an_agent_on_the_capping_policy_chooses_it_without_numba() -> None:
    code = (
        "import sys\n"
        "from siteagent.agent.config import parse_config\n"
        "from siteagent.agent.control.loop import Agent\n"
        "agent = Agent(parse_config({'site': {'cap_w': 1000.0}}), [])\n"
        "assert agent.policy.name == 'efficiency-capping'\n"
        "assert 'numba' not in sys.modules, 'numba imported by choosing the capping policy'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
