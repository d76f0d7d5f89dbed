"""Time one capping plan and its safe ordering for a large site, against sorting alone.

Run: .venv/bin/python bench/bench_plan.py [--miners 45000]
Prints the median of several runs of each, and the ratio to the baseline of
merely sorting the devices by merit (which any plan must at least do).

The snapshot carries its columns (``DeviceTable``), as the agent's does. Each
plan goes through the policy's interface, as the agent calls it: "first" with
no state (as after a restart), "next" with the state the last plan handed
back. The ordering is timed on a cap plan (decreases: shed at once) and on a
restore plan (increases, each checked against every domain's worst case).
It runs against any checkout on PYTHONPATH (older ones read the same
snapshot's objects), so a before/after comparison uses this one script.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace

import numpy as np
from benchlib import median_s, mining_status

from siteagent.agent.control.safety import order_changes
from siteagent.domain import (
    DeviceState,
    DomainLimit,
    Limits,
    Plan,
    Snapshot,
)
from siteagent.domain.table import STATE_CODE, DeviceTable
from siteagent.policies import PolicyState
from siteagent.policies.capping import CappingParams, CappingPolicy


def site(n: int, seed: int = 1) -> tuple[Snapshot, Limits]:
    """A site of n miners under feeders (10) and racks (40 miners each)."""
    rng = random.Random(seed)
    feeders = [DomainLimit(f"feeder-{i}", 1e12) for i in range(10)]
    racks = [
        DomainLimit(f"rack-{i}", 40 * 3300.0, parent=f"feeder-{i % 10}")
        for i in range((n + 39) // 40)
    ]
    devices = [mining_status(f"m{i:06d}", f"rack-{i // 40}", rng) for i in range(n)]
    full = sum(d.nameplate_power_w for d in devices)
    limits = Limits(full, 0.6 * full, "bench", domains=tuple(feeders + racks))
    return Snapshot(0.0, tuple(devices), table=DeviceTable.of(devices)), limits


def main() -> None:
    """Print plan and ordering times and their ratios to a sort."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", type=int, default=45_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    snap, limits = site(args.miners)
    policy = CappingPolicy(CappingParams())
    base = median_s(
        lambda: sorted(snap.devices, key=lambda d: (d.efficiency_j_per_th, d.device_id)), args.runs
    )
    p, state = policy.plan(snap, limits, None, PolicyState())

    def first() -> Plan:
        return policy.plan(snap, limits, None, PolicyState())[0]

    def following() -> Plan:
        return policy.plan(snap, limits, None, state)[0]

    t_first = median_s(first, args.runs)
    t_next = median_s(following, args.runs)
    # The cap lifted: every miner may rise again (a restore plan of wakes and raises).
    lifted = replace(limits, effective_cap_w=limits.site_cap_w)
    asleep = asleep_site(snap)
    r, _ = policy.plan(asleep, lifted, None, state)
    t_restore = median_s(lambda: policy.plan(asleep, lifted, None, state), args.runs)
    t_order = median_s(lambda: order_changes(p, snap, limits, max_increase_w=1e9), args.runs)
    t_order_up = median_s(lambda: order_changes(r, asleep, lifted, max_increase_w=1e9), args.runs)
    # As the loop reads them: every change it sends made (with its setpoint's words).
    t_sent = median_s(
        lambda: tuple(order_changes(p, snap, limits, max_increase_w=1e9).now), args.runs
    )
    # What the loop sends since (issue 20): each change's fields from the columns, no
    # Change or setpoint words made (an older checkout has no ``sends``: not timed).
    try:
        from siteagent.agent.control.safety import sends
    except ImportError:
        t_sends = None
    else:
        t_sends = median_s(
            lambda: sends(order_changes(p, snap, limits, max_increase_w=1e9).now), args.runs
        )
    cut = order_changes(p, snap, limits, max_increase_w=1e9)
    up = order_changes(r, asleep, lifted, max_increase_w=1e9)
    print(
        f"miners: {args.miners}, plan mode: {p.mode}, changes: {len(cut.now)}; "
        f"restore plan mode: {r.mode}, changes sent: {len(up.now)}, deferred: {len(up.deferred)}"
    )
    print(f"baseline sort by merit:      {base * 1000:8.1f} ms")
    print(f"capping plan, first:         {t_first * 1000:8.1f} ms  ({t_first / base:5.2f}x sort)")
    print(f"capping plan, next:          {t_next * 1000:8.1f} ms  ({t_next / base:5.2f}x sort)")
    print(
        f"capping plan, restore:       {t_restore * 1000:8.1f} ms  ({t_restore / base:5.2f}x sort)"
    )
    print(f"safe ordering, cap plan:     {t_order * 1000:8.1f} ms  ({t_order / base:5.2f}x sort)")
    print(f"  and the changes sent made: {t_sent * 1000:8.1f} ms  ({t_sent / base:5.2f}x sort)")
    if t_sends is not None:
        print(
            f"  and what is sent, columns: {t_sends * 1000:8.1f} ms  ({t_sends / base:5.2f}x sort,"
            f" {t_sent / t_sends:.1f}x less than the changes made)"
        )
    print(
        f"safe ordering, restore plan: {t_order_up * 1000:8.1f} ms"
        f"  ({t_order_up / base:5.2f}x sort)"
    )


def asleep_site(snap: Snapshot) -> Snapshot:
    """The same devices (the same statics), every one asleep and read so."""
    tab = snap.table
    assert tab is not None
    sleep_w = tab.statics.sleep_power_w
    asleep = np.zeros(len(tab), np.int8)
    sleeping = np.full(len(tab), STATE_CODE[DeviceState.SLEEPING], np.int8)
    new = replace(tab, state=sleeping, budget_w=sleep_w, expected_w=sleep_w, awake=asleep)
    devices = tuple(
        replace(d, state=DeviceState.SLEEPING, budget_w=d.sleep_power_w,
                expected_w=d.sleep_power_w, awake=False)
        for d in snap.devices
    )  # fmt: skip
    return Snapshot(snap.time_s, devices, table=new)


if __name__ == "__main__":
    main()
