"""Switching in money: a sleep/wake cycle is taken only when its spread pays for it.

The miner below (17.5 J/TH, 1,500-3,000 W, 20 W asleep) earns $0.1339/kWh on its
wake segment (20 -> 1,500 W) at $0.05/TH/day. A cycle of $0.10 spread over an
hour of that segment (1.48 kWh) is worth $0.0676/kWh: a sleeping miner wakes only
when the segment nets more than that; an awake one sleeps only when it loses more
than that (plus the keep margin).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from economic_reference import reference_plan
from test_economic import NOW_S, limits, miner

from siteagent.agent.tools.backtest import (
    make_prices,
    run_policy,
    site_switching,
    synthetic_site,
)
from siteagent.domain import Plan, Snapshot
from siteagent.policies.economic import EconomicParams, SwitchingCosts, plan
from siteagent.policies.economic_params import FIRMWARE_WAKE_S
from siteagent.policies.prices import Prices

CYCLE = SwitchingCosts(miner_wear_usd_per_cycle=0.10, horizon_s=3600.0)
FREE = SwitchingCosts()


def awake_after(awake: bool, elec: float, sw: SwitchingCosts, device: str = "m") -> bool:
    """Whether the miner is awake in the plan (fast and plain forms agree on it)."""
    snap = Snapshot(NOW_S, (miner(device, 17.5, awake=awake),))
    params = EconomicParams(switching=sw)
    prices = Prices(0.05, elec, 2.0)
    fast = plan(snap, limits(1e6), prices, params)
    plain = reference_plan(snap, limits(1e6), prices, params)
    return _awake(fast, device) and _awake(plain, device)


def _awake(p: Plan, device: str) -> bool:
    sp = p.setpoint_for(device)
    assert sp is not None
    return sp.awake


def test_a_wake_whose_spread_does_not_pay_for_the_cycle_is_not_taken() -> None:
    # Nets $0.034/kWh: worth waking when switching is free, not against $0.0676/kWh.
    assert awake_after(False, 0.10, FREE)
    assert not awake_after(False, 0.10, CYCLE)


def test_a_wake_whose_spread_pays_for_the_cycle_is_taken() -> None:
    assert awake_after(False, 0.03, CYCLE)  # nets $0.104/kWh
    # The same spread as the refused wake pays over a longer horizon ($0.017/kWh).
    assert awake_after(False, 0.10, replace(CYCLE, horizon_s=4 * 3600.0))


def test_an_awake_miner_sleeps_only_when_the_loss_pays_for_the_next_wake() -> None:
    # Loses $0.026/kWh: asleep when free, kept awake when a cycle costs $0.0676/kWh.
    assert not awake_after(True, 0.16, FREE)
    assert awake_after(True, 0.16, CYCLE)
    # Loses $0.116/kWh: more than the cycle and the keep margin, so it sleeps.
    assert not awake_after(True, 0.25, CYCLE)


def test_a_slow_waking_firmware_loses_more_hashing_so_it_wakes_later() -> None:
    # Wear alone: $0.10 -> wakes at $0.05/kWh (nets $0.084/kWh). Lost hashing for an hour
    # (its revenue at the minimum, $0.198) makes the cycle $0.298 ($0.20/kWh): it stays asleep.
    slow = replace(CYCLE, wake_s_by_device={"slow": 3600.0})
    assert awake_after(False, 0.05, slow, device="fast")
    assert not awake_after(False, 0.05, slow, device="slow")


def test_depreciation_counts_against_running() -> None:
    # Nets $0.104/kWh; $0.20/h of depreciation over the 1.48 kW segment is $0.135/kWh.
    assert awake_after(False, 0.03, FREE)
    assert not awake_after(False, 0.03, SwitchingCosts(miner_depreciation_usd_per_h=0.20))
    assert not awake_after(True, 0.03, SwitchingCosts(miner_depreciation_usd_per_h=0.20))


def test_the_backtest_charges_each_cycle_and_switching_cuts_cycles() -> None:
    from siteagent.agent.tools.backtest import policies

    site = synthetic_site(12, 8)
    series = make_prices(days=2)
    costly = site_switching(site, replace(CYCLE, miner_restart_usd_per_cycle=0.05))
    free = run_policy(site, series, "economic", policies(None, FREE)["economic"], switching=FREE)
    paid = run_policy(
        site, series, "economic", policies(None, costly)["economic"], switching=costly
    )
    assert free.sleep_wake_cycles > 0 and free.switching_usd == 0.0
    assert paid.sleep_wake_cycles < free.sleep_wake_cycles
    assert paid.seconds_over_cap == 0 == free.seconds_over_cap
    # Each cycle: wear + restart + the hashing lost while its firmware wakes (>= 10 s).
    assert paid.switching_usd >= paid.sleep_wake_cycles * 0.15
    assert sum(paid.step_cycles) == paid.sleep_wake_cycles
    assert abs(sum(paid.step_margin_usd) - paid.margin_usd) < 1e-6


def test_every_firmware_of_the_synthetic_site_has_a_wake_time() -> None:
    site = synthetic_site(8, 0)
    sw = site_switching(site, FREE)
    assert {sw.wake_s(m.device_id) for m in site.miners} == {
        FIRMWARE_WAKE_S[m.firmware] for m in site.miners
    }


def test_the_backtest_charges_a_gpu_nodes_drain_and_undrain() -> None:
    from siteagent.agent.tools.backtest import policies
    from siteagent.policies.prices import PricePoint

    # One step where serving loses money at every limit: the node's GPUs go to their
    # minimum (the node drains), then come back (it undrains).
    t0 = 1_717_200_000.0
    series = [
        PricePoint(t0, 0.05, 0.05, 2.0, 0.5),
        PricePoint(t0 + 300.0, 0.05, 3.0, 0.5, 0.5),
        PricePoint(t0 + 600.0, 0.05, 0.05, 2.0, 0.5),
    ]
    sw = SwitchingCosts(gpu_drain_usd=3.0, gpu_undrain_usd=4.0)
    site = synthetic_site(0, 8)
    # Planned as if draining were free, charged what it costs.
    r = run_policy(site, series, "economic", policies(None, FREE)["economic"], switching=sw)
    assert r.gpu_drains == 1
    assert r.switching_usd == 7.0
    # Planned with the cost: a five-minute loss does not pay for a drain and an undrain.
    kept = run_policy(site, series, "economic", policies(None, sw)["economic"], switching=sw)
    assert kept.gpu_drains == 0 and kept.switching_usd == 0.0
    # A drain that pays: the same loss for the whole horizon of a cheap drain.
    cheap = SwitchingCosts(gpu_drain_usd=0.01, gpu_undrain_usd=0.01)
    run = run_policy(site, series, "economic", policies(None, cheap)["economic"], switching=cheap)
    assert run.gpu_drains == 1


def test_the_config_gives_the_policy_its_switching_costs_and_names_a_bad_one() -> None:
    from siteagent.agent.config import ConfigError, parse_config
    from siteagent.agent.control.prices import economic_params
    from siteagent.policies.economic_params import DEFAULT_SWITCHING

    site = {"site": {"cap_w": 500_000}}
    assert economic_params(parse_config(site)).switching == DEFAULT_SWITCHING
    policy = {"name": "economic", "miner_wear_usd_per_cycle": 0.5, "switch_horizon_s": 7200}
    sw = economic_params(parse_config({**site, "policy": policy})).switching
    assert (sw.miner_wear_usd_per_cycle, sw.horizon_s) == (0.5, 7200.0)
    bad = {"miner_wear_usd_per_cycle": -1, "switch_horizon_s": 0}
    with pytest.raises(ConfigError) as info:
        parse_config({**site, "policy": bad})
    paths = {p.path for p in info.value.problems}
    assert paths == {"policy.miner_wear_usd_per_cycle", "policy.switch_horizon_s"}
