"""The object-at-a-time ``diff`` that agent.safety's column version replaced, kept as its spec."""

from __future__ import annotations

from siteagent.agent.control.safety import LOWER, RAISE, SLEEP, WAKE, Change, current_awake
from siteagent.domain import Plan, Snapshot, setpoint_rows


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
