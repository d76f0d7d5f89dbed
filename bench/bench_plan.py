"""Time one capping plan and its safe ordering for a large site, against sorting alone.

Run: .venv/bin/python bench/bench_plan.py [--miners 45000]
Prints the median of several runs of each, and the ratio to the baseline of
merely sorting the devices by merit (which any plan must at least do).
"""

from __future__ import annotations

import argparse
import random

from benchlib import median_s, mining_status

from siteagent.agent.control.safety import order_changes
from siteagent.domain import (
    DomainLimit,
    Limits,
    Snapshot,
)
from siteagent.policies.capping import CappingParams, plan


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
    return Snapshot(0.0, tuple(devices)), limits


def main() -> None:
    """Print plan time, ordering time and their ratios to a sort."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", type=int, default=45_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    snap, limits = site(args.miners)
    params = CappingParams()
    base = median_s(
        lambda: sorted(snap.devices, key=lambda d: (d.efficiency_j_per_th, d.device_id)), args.runs
    )
    p = plan(snap, limits, params)
    t_plan = median_s(lambda: plan(snap, limits, params), args.runs)
    t_order = median_s(lambda: order_changes(p, snap, limits, max_increase_w=1e9), args.runs)
    n_changes = len(order_changes(p, snap, limits, max_increase_w=1e9).now)
    print(f"miners: {args.miners}, plan mode: {p.mode}, changes: {n_changes}")
    print(f"baseline sort by merit: {base * 1000:8.1f} ms")
    print(f"capping plan:           {t_plan * 1000:8.1f} ms  ({t_plan / base:5.1f}x sort)")
    print(f"safe ordering:          {t_order * 1000:8.1f} ms  ({t_order / base:5.1f}x sort)")


if __name__ == "__main__":
    main()
