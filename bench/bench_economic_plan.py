"""Time one economic plan for a large mixed site, against merely sorting the devices by value.

Run: .venv/bin/python bench/bench_economic_plan.py [--miners 45000 --gpus 5000]

Also times a whole control tick's computation as the agent does it (its fleet's
columns into a snapshot, the plan, the safe ordering of the changes), from
devices read once each.
The site has three levels below the site cap: 10 feeders, racks of 40 devices
under them. Prints the median of several runs and the ratio to the baseline of
sorting every device by its net value per kWh (which any merit order must do).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import replace

import numpy as np
from benchlib import median_s, mining_status

from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.agent.control.fleet import Fleet
from siteagent.agent.control.safety import Change, order_changes
from siteagent.domain import (
    DeviceControls,
    DeviceIdentity,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Floor,
    Limits,
    Plan,
    SetpointTable,
    Snapshot,
)
from siteagent.domain.table import DeviceTable
from siteagent.policies import PolicyState
from siteagent.policies.economic import EconomicParams, EconomicPolicy, miner_revenue_usd_per_h
from siteagent.policies.prices import Prices

PRICES = Prices(0.05, 0.06, 2.0)


def site(miners: int, gpus: int, seed: int = 1) -> tuple[Snapshot, Limits]:
    """Miners then GPUs, 40 to a rack, racks round-robin under 10 feeders."""
    rng = random.Random(seed)
    devices = []
    for i in range(miners + gpus):
        rack = f"rack-{i // 40}"
        if i < miners:
            devices.append(mining_status(f"m{i:06d}", rack, rng))
        else:
            caps = DeviceControls(
                power_target=True, power_target_min_w=200.0, power_target_max_w=700.0
            )
            util = rng.uniform(0.2, 1.0)
            devices.append(
                DeviceStatus(
                    device_id=f"g{i:06d}",
                    kind=DeviceKind.GPU,
                    domain=rack,
                    state=DeviceState.RUNNING,
                    nameplate_power_w=700.0,
                    nameplate_hashrate_ths=0.0,
                    sleep_power_w=0.0,
                    capabilities=caps,
                    budget_w=700.0,
                    expected_w=700.0,
                    controllable=True,
                    reading=DeviceReading(
                        f"g{i:06d}", 0.0, 500.0, DeviceState.RUNNING, utilization_frac=util
                    ),
                    reading_age_s=1.0,
                    power_target_w=700.0,
                    awake=True,
                )
            )
    n_racks = (miners + gpus + 39) // 40
    feeders = [DomainLimit(f"feeder-{i}", 1e12) for i in range(10)]
    racks = [
        DomainLimit(f"rack-{i}", 40 * 3300.0, parent=f"feeder-{i % 10}") for i in range(n_racks)
    ]
    full = sum(d.nameplate_power_w for d in devices)
    limits = Limits(full, 0.6 * full, "bench", domains=tuple(feeders + racks))
    return Snapshot(0.0, tuple(devices)), limits


def value_usd_per_kwh(d: DeviceStatus) -> float:
    """Net value per kWh at full power: the baseline's sort key."""
    if d.kind is DeviceKind.GPU:
        return PRICES.ai_usd_per_gpu_hour / 0.7 - PRICES.electricity_usd_per_kwh
    rev = miner_revenue_usd_per_h(d, d.nameplate_power_w, PRICES.hashprice_usd_per_th_day)
    return rev / (d.nameplate_power_w / 1000.0) - PRICES.electricity_usd_per_kwh


def next_tick(snap: Snapshot, p: Plan, rng: random.Random) -> Snapshot:
    """The snapshot a tick later: new objects (as the agent builds each tick), the same
    devices and capability objects, each miner where the plan put it, GPU demand moved."""
    by_id = {sp.device_id: sp for sp in p.setpoints}
    out = []
    for d in snap.devices:
        sp = by_id[d.device_id]
        r = d.reading
        if r is not None and r.utilization_frac is not None:
            r = replace(
                r, utilization_frac=min(1.0, max(0.0, r.utilization_frac + rng.gauss(0, 0.02)))
            )
        out.append(
            replace(
                d,
                expected_w=sp.planned_w,
                budget_w=sp.planned_w,
                awake=sp.awake,
                power_target_w=sp.power_target_w,
                reading=r,
            )
        )
    return Snapshot(snap.time_s + 5.0, tuple(out))


def next_table(snap: Snapshot, p: Plan, rows: list[int], rng: random.Random) -> Snapshot:
    """``next_tick`` as a producer that keeps columns hands it on: the same statics
    object, this tick's columns made from the plan's arrays (no device objects read).

    ``rows[k]`` is the snapshot row of the plan's ``k``-th column.
    """
    tab = snap.table
    assert tab is not None and isinstance(p.setpoints, SetpointTable)
    sps = p.setpoints
    planned = tab.expected_w.copy()
    planned[rows] = np.asarray(sps.planned_w)
    awake = tab.awake.copy()
    awake[rows] = np.asarray(sps.awake, np.int8)
    target = tab.power_target_w.copy()
    target[rows] = np.asarray(sps.power_target_w)
    util = tab.utilization_frac.copy()
    noise = np.array([rng.gauss(0, 0.02) for _ in range(len(util))])
    util = np.where(np.isnan(util), util, np.clip(util + noise, 0.0, 1.0))
    for a in (planned, awake, target, util):
        a.flags.writeable = False
    new = replace(
        tab,
        budget_w=planned,
        expected_w=planned,
        awake=awake,
        power_target_w=target,
        utilization_frac=util,
    )
    return Snapshot(snap.time_s + 5.0, snap.devices, table=new)


class _Driver:
    """A connected driver as far as the fleet asks: its identity."""

    def __init__(self, d: DeviceStatus) -> None:
        self.identity = DeviceIdentity(
            "bench", "bench", "bench", None, None, d.capabilities, d.nameplate_power_w
        )


async def _no_connect() -> DeviceDriver:
    raise AssertionError("bench devices are connected already")


def fleet_for(snap: Snapshot) -> tuple[Fleet, float]:
    """The devices connected and read once, as the agent has them after a sweep; and
    the time (s) the readings took to record, per device."""
    fleet = Fleet()
    readings = []
    for d in snap.devices:
        t = DeviceLink(
            d.device_id,
            address="127.0.0.1",
            domain=d.domain,
            nameplate_power_w=d.nameplate_power_w,
            nameplate_hashrate_ths=d.nameplate_hashrate_ths,
            sleep_power_w=d.sleep_power_w,
            connect=_no_connect,
            kind=d.kind,
        )
        t.driver = _Driver(d)  # type: ignore[assignment]
        fleet.add(t)
        r = d.reading or DeviceReading(d.device_id, 0.0, d.expected_w, d.state)
        readings.append(replace(r, power_target_w=d.power_target_w))
    started = time.perf_counter()
    for row, r in enumerate(readings):
        fleet.record_reading(row, r, snap.time_s, 60.0)
    return fleet, (time.perf_counter() - started) / max(1, len(readings))


class Planner:
    """Plans as the agent does: through the policy's interface, handing its state back."""

    def __init__(self, params: EconomicParams) -> None:
        self.policy = EconomicPolicy(params)
        self.state = PolicyState()

    def plan(
        self, snap: Snapshot, limits: Limits, prices: Prices, prev: Plan | None = None
    ) -> Plan:
        """The next plan; what the policy derived is kept for the next call."""
        p, self.state = self.policy.plan(snap, limits, prices, replace(self.state, previous=prev))
        return p

    def forget(self) -> None:
        """Drop what the policy derived, as after a restart."""
        self.state = PolicyState()


def _params() -> EconomicParams:
    """As the agent plans: with the documented switching costs, where this checkout has them."""
    try:
        from siteagent.policies.economic_params import DEFAULT_SWITCHING
    except ImportError:  # a checkout from before switching costs (a before/after run)
        return EconomicParams()
    return EconomicParams(switching=DEFAULT_SWITCHING)  # type: ignore[call-arg,unused-ignore]


PLANNER = Planner(_params())


def agent_tick(
    fleet: Fleet, limits: Limits, params: EconomicParams, prev: Plan, now_s: float
) -> tuple[Plan, list[Change]]:
    """What a control tick computes before it sends anything: snapshot, plan, safe order."""
    snap = fleet.snapshot(now_s, 30.0)
    p = PLANNER.plan(snap, limits, PRICES, prev)
    return p, list(order_changes(p, snap, limits, max_increase_w=1e6).now)


def applied(fleet: Fleet, changes: list[Change], now_s: float) -> None:
    """The changes sent and taken, and a reading that shows each (outside the timing)."""
    for c in changes:
        row = fleet.row(c.device_id)
        fleet.record_command(row, c.kind, c.old_w, c.new_w, c.set_target_w, now_s)
        state = DeviceState.SLEEPING if c.kind == "sleep" else DeviceState.MINING
        r = DeviceReading(c.device_id, now_s, c.new_w, state, power_target_w=c.set_target_w)
        fleet.record_reading(row, r, now_s, 60.0)


def main() -> None:
    """Print the economic plan's time and its ratio to a sort by value."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", type=int, default=45_000)
    ap.add_argument("--gpus", type=int, default=5_000)
    ap.add_argument("--runs", type=int, default=5)
    # Contract floors on this many GPUs (450 W each), as the agent puts them in the limits.
    ap.add_argument("--floors", type=int, default=0)
    args = ap.parse_args()
    snap, limits = site(args.miners, args.gpus)
    if args.floors:
        gpu_ids = [d.device_id for d in snap.devices if d.kind is DeviceKind.GPU]
        floors = tuple(Floor(g, 450.0, "bench") for g in gpu_ids[: args.floors])
        limits = replace(limits, floors=floors)
    params = PLANNER.policy.params
    rng = random.Random(2)
    base = median_s(
        lambda: sorted(snap.devices, key=lambda d: (-value_usd_per_kwh(d), d.device_id)),
        args.runs,
    )

    def cold() -> Plan:
        PLANNER.forget()  # as after a restart or a change of devices
        return PLANNER.plan(snap, limits, PRICES)

    p = cold()
    t_cold = median_s(cold, args.runs)
    # Steady state: each tick a new snapshot of the same devices, the last plan given.
    ticks = []
    prev = p
    for _ in range(args.runs):
        s = next_tick(snap, prev, rng)
        t = time.perf_counter()
        nxt = PLANNER.plan(s, limits, PRICES, prev)
        ticks.append(time.perf_counter() - t)
        prev = nxt
    t_tick = statistics.median(ticks)
    # The same ticks from a snapshot that carries its columns (as the agent's does).
    col_snap = replace(snap, table=DeviceTable.of(snap.devices))
    prev = PLANNER.plan(col_snap, limits, PRICES)
    assert isinstance(prev.setpoints, SetpointTable)
    row_of = {d.device_id: i for i, d in enumerate(snap.devices)}
    rows = [row_of[i] for i in prev.setpoints.ids]
    col_ticks = []
    for _ in range(args.runs):
        s = next_table(col_snap, prev, rows, rng)
        t = time.perf_counter()
        nxt = PLANNER.plan(s, limits, PRICES, prev)
        col_ticks.append(time.perf_counter() - t)
        prev = nxt
    t_cols = statistics.median(col_ticks)
    # A whole tick as the agent computes it, from its fleet's columns.
    fleet, t_record = fleet_for(snap)
    prev = PLANNER.plan(fleet.snapshot(1.0, 30.0), limits, PRICES)
    agent_ticks, sent = [], []
    for k in range(args.runs + 3):
        t = time.perf_counter()
        prev, changes = agent_tick(fleet, limits, params, prev, 2.0 + k)
        if k >= 3:  # after the cap's first sheds and restores: a steady tick
            agent_ticks.append(time.perf_counter() - t)
            sent.append(len(changes))
        applied(fleet, changes, 2.0 + k)
    t_agent = statistics.median(agent_ticks)
    t_snap = median_s(lambda: fleet.snapshot(2.0, 30.0), args.runs)
    t_words = median_s(lambda: tuple(p.setpoints), max(1, args.runs // 2))
    awake = sum(1 for sp in p.setpoints if sp.awake)
    print(
        f"devices: {len(snap.devices)} ({args.miners} miners, {args.gpus} GPUs), "
        f"plan mode: {p.mode}, awake: {awake}, planned {p.planned_w / 1e6:.2f} MW "
        f"of {limits.effective_cap_w / 1e6:.2f} MW; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"baseline sort by value:     {base * 1000:8.1f} ms")
    print(f"economic plan, first tick:  {t_cold * 1000:8.1f} ms  ({t_cold / base:5.1f}x sort)")
    print(f"economic plan, next ticks:  {t_tick * 1000:8.1f} ms  ({t_tick / base:5.1f}x sort)")
    print(
        f"  the same from columns:    {t_cols * 1000:8.1f} ms  ({t_cols / base:5.1f}x sort)"
        "  (the snapshot carries its DeviceTable, as the agent's does)"
    )
    print(
        f"agent tick (snapshot from its fleet's columns, plan, safe order): "
        f"{t_agent * 1000:8.1f} ms  ({t_agent / base:5.1f}x sort; "
        f"changes sent per tick: {min(sent)}-{max(sent)})"
    )
    print(f"  of which the snapshot of every device: {t_snap * 1000:8.1f} ms")
    print(f"recording one reading, per device: {t_record * 1e6:8.2f} us")
    print(f"every setpoint and reason made (API/explain of all): {t_words * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
