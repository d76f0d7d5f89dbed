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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from siteagent.domain import (
    DeviceState,
    DeviceStatus,
    Limits,
    Plan,
    Setpoint,
    SetpointTable,
    Snapshot,
    setpoint_rows,
)
from siteagent.domain.site import SITE, DomainTree, domain_loads_w
from siteagent.domain.table import STATE_CODE, DeviceTable

SLEEP, WAKE, LOWER, RAISE = "sleep", "wake", "lower", "raise"
_SLEEPING = STATE_CODE[DeviceState.SLEEPING]
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


def table_of(snapshot: Snapshot) -> DeviceTable:
    """The snapshot's devices as columns (made from its devices if it carries none)."""
    return snapshot.table if snapshot.table is not None else DeviceTable.of(snapshot.devices)


def diff(plan: Plan, snapshot: Snapshot) -> list[Change]:
    """The changes (in plan order) needed to bring controllable devices to the plan.

    Works on the plan's and the snapshot's columns; a ``Setpoint`` (with its reason)
    and a ``Change`` are made only for the devices that change.
    """
    tab = table_of(snapshot)
    sps = plan.setpoints
    # pick[k]: the setpoint (index into ``sps``) that row k of the columns below is.
    pick: Sequence[int]
    if isinstance(sps, SetpointTable) and not sps.head and sps.rows is not None:
        rows = np.asarray(sps.rows, np.intp)
        pick = range(len(sps))
        ids: Sequence[str] = sps.ids
        want_awake = np.asarray(sps.awake, bool)
        want_target = np.asarray(sps.power_target_w, float)
        planned = np.asarray(sps.planned_w, float)
    else:
        index = tab.statics.rows
        entries = [(i, r) for i, r in enumerate(setpoint_rows(sps)) if r[1] in index]
        pick = [i for i, _ in entries]
        ids = [r[1] for _, r in entries]
        rows = np.fromiter((index[d] for d in ids), np.intp, len(ids))
        want_awake = np.fromiter((r[2] for _, r in entries), bool, len(ids))
        want_target = np.array([np.nan if r[3] is None else r[3] for _, r in entries], float)
        planned = np.fromiter((r[4] for _, r in entries), float, len(ids))
    code = tab.awake[rows]
    awake = np.where(code >= 0, code == 1, tab.state[rows] != _SLEEPING)
    target_now = tab.power_target_w[rows]
    with np.errstate(invalid="ignore"):
        set_target = (
            want_awake
            & ~np.isnan(want_target)
            & tab.statics.power_target[rows]
            & (np.isnan(target_now) | (np.abs(want_target - target_now) >= 1.0))
        )
    ctl = tab.controllable[rows]
    sleep = ctl & awake & ~want_awake
    wake = ctl & ~awake & want_awake
    adjust = ctl & awake & set_target
    current = np.where(np.isnan(target_now), tab.expected_w[rows], target_now)
    lower = adjust & (want_target < current)
    out: list[Change] = []
    for k in np.flatnonzero(sleep | wake | adjust).tolist():
        target = float(want_target[k]) if set_target[k] else None
        if sleep[k]:
            kind, target = SLEEP, None
        elif wake[k]:
            kind = WAKE
        else:
            kind = LOWER if lower[k] else RAISE
        budget = float(tab.budget_w[rows[k]])
        out.append(Change(ids[k], kind, sps[pick[k]], budget, float(planned[k]), target))
    return out


def worst_case_loads_w(tree: DomainTree, snapshot: Snapshot, overhead_w: float) -> dict[str, float]:
    """Every domain's worst-case power (W): the devices' budgets below it, overhead at the site."""
    tab = table_of(snapshot)
    names, code = tab.statics.domain_codes
    return domain_loads_w(tree, names, code, tab.budget_w, overhead_w)


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
    tab = table_of(snapshot)
    load = worst_case_loads_w(tree, snapshot, limits.overhead_w)
    now: list[Change] = []
    deferred: list[tuple[Change, str]] = []
    ramp_left = max_increase_w
    for c in increases:
        row = tab.statics.rows[c.device_id]
        domain = tab.statics.domains[row]
        delta = max(0.0, c.new_w - float(tab.budget_w[row]))
        if delta > ramp_left:
            deferred.append((c, f"ramp limit: {ramp_left:.0f} W of increase left this step"))
            continue
        blocked = [
            node for node in tree.chain(domain) if load[node] + delta > tree.limit_w[node] + 1e-6
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
        for node in tree.chain(domain):
            load[node] += delta
        ramp_left -= delta
        now.append(c)
    return Ordered(tuple(now), tuple(deferred))
