"""The object-at-a-time ``diff`` and ``order_changes`` that agent.safety's column versions
replaced, kept as their specification."""

from __future__ import annotations

from siteagent.agent.control.safety import (
    LOWER,
    RAISE,
    SLEEP,
    WAKE,
    Change,
    current_awake,
    worst_case_loads_w,
)
from siteagent.domain import Limits, Plan, Snapshot, setpoint_rows
from siteagent.domain.site import SITE, DomainTree


def reference_diff(plan: Plan, snapshot: Snapshot) -> list[Change]:
    """The changes (in plan order) needed to bring controllable devices to the plan."""
    devices = {d.device_id: d for d in snapshot.devices}
    out: list[Change] = []
    for i, dev_id, sp_awake, sp_target, sp_planned in setpoint_rows(plan.setpoints):
        d = devices.get(dev_id)
        if d is None or not d.controllable:
            continue
        awake = current_awake(d)
        set_target: float | None = None
        if (
            sp_awake
            and sp_target is not None
            and d.capabilities.power_target
            and (d.power_target_w is None or abs(sp_target - d.power_target_w) >= 1.0)
        ):
            set_target = sp_target
        if awake and not sp_awake:
            kind, target = SLEEP, None
        elif not awake and sp_awake:
            kind, target = WAKE, set_target
        elif awake and set_target is not None:
            current = d.power_target_w if d.power_target_w is not None else d.expected_w
            kind, target = (LOWER if set_target < current else RAISE), set_target
        else:
            continue
        out.append(Change(dev_id, kind, plan.setpoints[i], d.budget_w, sp_planned, target))
    return out


def reference_order_changes(
    plan: Plan, snapshot: Snapshot, limits: Limits, *, max_increase_w: float
) -> tuple[list[Change], list[tuple[Change, str]]]:
    """The changes safe to send now, and those that wait with the reason, one change at a time."""
    changes = reference_diff(plan, snapshot)
    decreases = [c for c in changes if c.is_decrease]
    increases = [c for c in changes if not c.is_decrease]
    if decreases:
        return decreases, [
            (c, "shed before restore: decreases are going out this step") for c in increases
        ]
    tree = DomainTree(limits)
    devices = {d.device_id: d for d in snapshot.devices}
    load = worst_case_loads_w(tree, snapshot, limits.overhead_w)
    now: list[Change] = []
    deferred: list[tuple[Change, str]] = []
    ramp_left = max_increase_w
    for c in increases:
        d = devices[c.device_id]
        delta = max(0.0, c.new_w - d.budget_w)
        if delta > ramp_left:
            deferred.append((c, f"ramp limit: {ramp_left:.0f} W of increase left this step"))
            continue
        blocked = [
            node for node in tree.chain(d.domain) if load[node] + delta > tree.limit_w[node] + 1e-6
        ]
        if blocked:
            node = blocked[-1] if SITE in blocked else blocked[0]
            deferred.append(
                (
                    c,
                    f"worst case: {node} would reach {load[node] + delta:.0f} W "
                    f"over its limit {tree.limit_w[node]:.0f} W",
                )
            )
            continue
        for node in tree.chain(d.domain):
            load[node] += delta
        ramp_left -= delta
        now.append(c)
    return now, deferred
