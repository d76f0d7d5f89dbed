"""Named alarms: conditions an operator must hear about once, not once per tick.

An alarm is raised with a reason and cleared when its condition ends. Raising
logs one WARNING line, clearing one INFO line; raising an alarm already raised
only updates its reason (no log). The set of names is fixed (``ALARM_NAMES``),
so the metric that exports them has a bounded label. Listeners (the API layer's
audit writer) hear every raise and clear; the loop never imports the API.

The checks that decide the control loop's alarms from a tick (a broken
contract floor, a cap no plan can meet) live here too, so the loop calls one
function per tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from siteagent.domain import (
    DeviceKind,
    DeviceStatus,
    Limits,
    Plan,
    Setpoint,
    SetpointTable,
    Snapshot,
)
from siteagent.domain.site import SITE, DomainTree, domain_loads_w
from siteagent.domain.table import DeviceTable
from siteagent.policies.capping import MOVABLE_KINDS, max_level_w, min_level_w

log = logging.getLogger("siteagent.alarms")

CONTRACT_FLOOR_BROKEN = "contract-floor-broken"
CAP_UNMEETABLE = "cap-unmeetable"
PRICES_STALE = "prices-stale"
# The last reload (SIGHUP) was refused: the file on disk is not the config in force.
CONFIG_RELOAD_FAILED = "config-reload-failed"
VTN_UNREACHABLE = "vtn-unreachable"  # the OpenADR VTN has not answered well for a while
METER_FAULT = "meter-fault"  # a meter stale, frozen or answering garbage: the fallback counts
UNDER_FREQUENCY = "under-frequency"  # the armed block is shed and held
# A GPU node's inference endpoint said nothing fresh: its demand comes from busy %.
AI_DEMAND_FALLBACK = "ai-demand-fallback"
ALARM_NAMES = (
    AI_DEMAND_FALLBACK,
    CAP_UNMEETABLE,
    CONTRACT_FLOOR_BROKEN,
    PRICES_STALE,
    CONFIG_RELOAD_FAILED,
    VTN_UNREACHABLE,
    METER_FAULT,
    UNDER_FREQUENCY,
)
# A plan this far (W) above the cap is one no plan could avoid, not a rounding.
UNMEETABLE_TOLERANCE_W = 1.0


@dataclass(frozen=True, slots=True)
class Alarm:
    """One raised alarm: its name, why, and since when (Unix s)."""

    name: str
    reason: str
    since_unix_s: float


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """An alarm raised or cleared at ``time_unix_s``; a clear's ``reason`` is the last one."""

    alarm: Alarm
    raised: bool
    time_unix_s: float

    @property
    def duration_s(self) -> float:
        """How long (s) the alarm had been raised (0 for a raise)."""
        return 0.0 if self.raised else max(0.0, self.time_unix_s - self.alarm.since_unix_s)


class Alarms:
    """The alarms raised now; raise and clear log once each and tell the listeners."""

    def __init__(self, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.wall_clock = wall_clock
        self._raised: dict[str, Alarm] = {}
        self._listeners: list[Callable[[AlarmEvent], None]] = []

    def subscribe(self, listener: Callable[[AlarmEvent], None]) -> None:
        """Call ``listener`` on every raise and clear (from the loop; it must not block)."""
        self._listeners.append(listener)

    def raise_alarm(self, name: str, reason: str) -> None:
        """Raise ``name`` (or, if raised, update its reason quietly)."""
        if name not in ALARM_NAMES:
            raise ValueError(f"unknown alarm {name!r}; expected one of {ALARM_NAMES}")
        old = self._raised.get(name)
        if old is not None:
            if old.reason != reason:
                # Replaced whole: a scrape on another thread reads either one.
                self._raised = {**self._raised, name: Alarm(name, reason, old.since_unix_s)}
            return
        now = self.wall_clock()
        alarm = Alarm(name, reason, now)
        self._raised = {**self._raised, name: alarm}
        log.warning("alarm %s: %s", name, reason)
        self._tell(AlarmEvent(alarm, True, now))

    def clear(self, name: str) -> None:
        """Clear ``name`` if it is raised."""
        old = self._raised.get(name)
        if old is None:
            return
        self._raised = {k: v for k, v in self._raised.items() if k != name}
        event = AlarmEvent(old, False, self.wall_clock())
        log.info("alarm %s cleared after %.0f s (was: %s)", name, event.duration_s, old.reason)
        self._tell(event)

    def update(self, name: str, reason: str | None) -> None:
        """Raise ``name`` with ``reason``, or clear it when ``reason`` is None."""
        if reason is None:
            self.clear(name)
        else:
            self.raise_alarm(name, reason)

    def active(self) -> tuple[Alarm, ...]:
        """The alarms raised now, by name."""
        raised = self._raised
        return tuple(raised[k] for k in sorted(raised))

    def get(self, name: str) -> Alarm | None:
        """The alarm ``name`` if raised."""
        return self._raised.get(name)

    def _tell(self, event: AlarmEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an alarm listener failed on %s", event.alarm.name)


def _cap_text(limits: Limits) -> str:
    return f"cap {limits.effective_cap_w:.0f} W from {limits.cap_source}"


def _limit_text(tree: DomainTree, limits: Limits, node: str) -> str:
    """The limit of ``node``, in words: the site's cap and its source, or a domain's limit."""
    if node == SITE:
        return _cap_text(limits)
    return f"domain {node} limit {tree.limit_w[node]:.0f} W"


def _domain_loads_w(
    snap: Snapshot, limits: Limits, plan: Plan, tree: DomainTree
) -> dict[str, float]:
    """What the plan leaves in every domain and the site (W): each planned device at its
    planned level, every other at its worst case, the overhead in the site."""
    table = snap.table if snap.table is not None else DeviceTable.of(snap.devices)
    level_w = np.array(table.budget_w, dtype=float)
    rows = table.statics.rows
    setpoints = plan.setpoints
    if isinstance(setpoints, SetpointTable) and setpoints.rows is not None:
        head: Sequence[Setpoint] = setpoints.head
        level_w[np.asarray(setpoints.rows, dtype=np.intp)] = np.asarray(setpoints.planned_w)
    else:
        head = setpoints
    for sp in head:
        i = rows.get(sp.device_id)
        if i is not None:
            level_w[i] = sp.planned_w
    names, code = table.statics.domain_codes
    return domain_loads_w(tree, names, code, level_w, limits.overhead_w)


def floor_alarm_reason(
    snap: Snapshot,
    plan: Plan,
    limits: Limits,
    node_floors_w: Mapping[str, tuple[float, tuple[str, ...]]],
) -> str | None:
    """Why contract floors are broken (None if none is): the nodes, their floors, and the
    limit that took the power (the site's cap, or the domain nearest its limit).

    ``node_floors_w`` maps each GPU node id to its contract floor (W) and its GPUs' ids.
    """
    broken = set(plan.broken_floors)
    if not broken:
        return None
    tree = DomainTree(limits)
    load = _domain_loads_w(snap, limits, plan, tree) if limits.domains else {}
    domain_of = {d.device_id: d.domain for d in snap.devices if d.device_id in broken}

    def binding(gpu: str) -> str:
        chain = tree.chain(domain_of.get(gpu, SITE))
        if not load:
            return SITE
        return max(chain, key=lambda n: (load[n] / tree.limit_w[n], n == SITE))

    parts: dict[str, list[str]] = {}
    for node, (floor_w, gpus) in sorted(node_floors_w.items()):
        ids = broken.intersection(gpus)
        if ids:
            kept = sum(sp.planned_w for g in gpus if (sp := plan.setpoint_for(g)) is not None)
            by = binding(min(ids))
            parts.setdefault(by, []).append(f"{node} ({floor_w:.0f} W, {kept:.0f} W kept)")
    if not parts:
        parts[SITE] = sorted(broken)
    return "; ".join(
        f"contract floor of {', '.join(nodes)} broken: {_limit_text(tree, limits, by)}"
        for by, nodes in sorted(parts.items(), key=lambda kv: (kv[0] != SITE, kv[0]))
    )


@dataclass(frozen=True, slots=True)
class Unshed:
    """What no plan can shed, in parts (W): devices unreachable or unconfirmed (at their
    worst case), fixed loads, pinned or excluded devices, the rest at their minimum."""

    blind_w: float
    fixed_w: float
    held_w: float
    least_w: float
    blind: Mapping[str, int]  # unreachable or unconfirmed devices by kind

    @property
    def total_w(self) -> float:
        """The least (W) these devices can draw under any plan."""
        return self.blind_w + self.fixed_w + self.held_w + self.least_w


def unshed(devices: Iterable[DeviceStatus], limits: Limits, plan: Plan | None) -> Unshed:
    """What ``devices`` draw at the least under any plan (pins at ``plan``'s level)."""
    pinned = {p.device_id for p in limits.pins if not p.exclude}
    excluded = {p.device_id for p in limits.pins if p.exclude}
    blind: dict[str, int] = {}
    blind_w = fixed_w = held_w = least_w = 0.0
    for d in devices:
        if d.kind not in MOVABLE_KINDS:
            fixed_w += d.budget_w  # node overheads, auxiliaries: nothing to command
        elif not d.controllable:
            blind_w += d.budget_w
            blind[d.kind.value] = blind.get(d.kind.value, 0) + 1
        elif d.device_id in excluded:
            held_w += d.budget_w
        elif d.device_id in pinned:
            sp = None if plan is None else plan.setpoint_for(d.device_id)
            held_w += d.budget_w if sp is None else sp.planned_w
        elif d.kind is DeviceKind.MINER:
            caps = d.capabilities
            if caps.can_sleep:
                least_w += d.sleep_power_w
            else:
                least_w += min_level_w(d) if caps.power_target else max_level_w(d)
        else:
            least_w += min_level_w(d)
    return Unshed(blind_w, fixed_w, held_w, least_w, blind)


def _worst_case_text(
    devices: Iterable[DeviceStatus],
    limits: Limits,
    plan: Plan,
    overhead_w: float,
    at_least_w: float = 0.0,
) -> str:
    """What holds ``devices`` (and ``overhead_w``) up, worked out device by device (W);
    the worst case shown is at least ``at_least_w``."""
    u = unshed(devices, limits, plan)
    blind_w, fixed_w, held_w, least_w = u.blind_w, u.fixed_w, u.held_w, u.least_w
    worst_w = u.total_w + overhead_w
    what = " and ".join(f"{n} {k}(s)" for k, n in sorted(u.blind.items())) or "no device"
    return (
        f"worst case {max(worst_w, at_least_w):.0f} W of which {blind_w:.0f} W is {what} "
        f"unreachable or unconfirmed, counted at their worst case (nameplate); "
        f"{fixed_w + overhead_w:.0f} W fixed loads and overhead, {held_w:.0f} W pinned "
        f"or excluded, {least_w:.0f} W the rest at their minimum"
    )


def unmeetable_reason(snap: Snapshot, limits: Limits, plan: Plan) -> str | None:
    """Why no plan can bring the site under its effective cap, or a domain under its
    limit (None if one can): each limit broken, named, and what holds it there.

    The plan already counts what it cannot shed at its worst case (devices not
    controllable at their budget, pins at the pin, movable devices at their own
    minimum, contract floors aside); only when it is over a limit is that worked out
    device by device, to say what holds it there.
    """
    parts = []
    cap = limits.effective_cap_w
    if plan.planned_w > cap + UNMEETABLE_TOLERANCE_W:
        text = _worst_case_text(snap.devices, limits, plan, limits.overhead_w, plan.planned_w)
        parts.append(f"{text}; {_cap_text(limits)}")
    if limits.domains:
        tree = DomainTree(limits)
        load = _domain_loads_w(snap, limits, plan, tree)
        for dom in sorted(limits.domains, key=lambda d: d.domain_id):
            if load[dom.domain_id] <= dom.limit_w + UNMEETABLE_TOLERANCE_W:
                continue
            members = [d for d in snap.devices if dom.domain_id in tree.chain(d.domain)]
            text = _worst_case_text(members, limits, plan, 0.0)
            parts.append(f"{text}; {_limit_text(tree, limits, dom.domain_id)}")
    return "; and ".join(parts) or None


def check_tick(
    alarms: Alarms,
    snap: Snapshot,
    limits: Limits,
    plan: Plan,
    node_floors_w: Mapping[str, tuple[float, tuple[str, ...]]],
) -> None:
    """Raise or clear the alarms a control tick decides: broken floors, an unmeetable cap."""
    alarms.update(CONTRACT_FLOOR_BROKEN, floor_alarm_reason(snap, plan, limits, node_floors_w))
    alarms.update(CAP_UNMEETABLE, unmeetable_reason(snap, limits, plan))
