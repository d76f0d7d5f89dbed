"""Ordering a plan's changes so the cap is never knowingly exceeded.

Pure functions (no IO, no clock): given the plan and the snapshot's
worst-case budgets, decide which changes go out now and which wait.

- Decreases (lower a target, sleep) always go out at once.
- Shed before restore: while any decrease goes out, no increase does.
- An increase goes out only if every domain's worst-case power, counting the
  increase at its new level and every unconfirmed decrease at its old level,
  stays within that domain's limit (the site's is the effective cap), and
  the increases of this step fit the ramp limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain import DeviceState, DeviceStatus, Limits, Plan, Setpoint, Snapshot, setpoint_rows
from policies.capping import SITE, DomainTree, domain_loads_w

SLEEP, WAKE, LOWER, RAISE = "sleep", "wake", "lower", "raise"
DECREASES = frozenset({SLEEP, LOWER})


@dataclass(frozen=True, slots=True)
class Change:
    """One actuation: what to send to one device, and its power before and after (W)."""

    device_id: str
    kind: str
    setpoint: Setpoint
    old_w: float
    new_w: float
    set_target_w: float | None

    @property
    def is_decrease(self) -> bool:
        """True for changes that lower power."""
        return self.kind in DECREASES


@dataclass(frozen=True, slots=True)
class Ordered:
    """The changes to send now, and those held back with the reason."""

    now: tuple[Change, ...]
    deferred: tuple[tuple[Change, str], ...]


def current_awake(d: DeviceStatus) -> bool:
    """Whether the device is (or was last told to be) mining."""
    if d.awake is not None:
        return d.awake
    return d.state is not DeviceState.SLEEPING


def diff(plan: Plan, snapshot: Snapshot) -> list[Change]:
    """The changes (in plan order) needed to bring controllable devices to the plan.

    Reads the plan's numbers only; a ``Setpoint`` (with its reason) is made for the
    devices that change.
    """
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


def order_changes(
    plan: Plan, snapshot: Snapshot, limits: Limits, *, max_increase_w: float
) -> Ordered:
    """Split the plan's changes into those safe to send now and those that must wait."""
    changes = diff(plan, snapshot)
    decreases = [c for c in changes if c.is_decrease]
    increases = [c for c in changes if not c.is_decrease]
    if decreases:
        return Ordered(
            tuple(decreases),
            tuple((c, "shed before restore: decreases are going out this step") for c in increases),
        )
    tree = DomainTree(limits)
    devices = {d.device_id: d for d in snapshot.devices}
    load = domain_loads_w(tree, [(d, d.budget_w) for d in snapshot.devices], limits.overhead_w)
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
    return Ordered(tuple(now), tuple(deferred))
