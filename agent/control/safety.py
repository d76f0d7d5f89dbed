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

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

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
from siteagent.domain.site import SITE, DomainTree, FloatArr, IntArr, by_depth, domain_loads_w
from siteagent.domain.table import STATE_CODE, DeviceTable
from siteagent.domain.types import RowsOnDemand

SLEEP, WAKE, LOWER, RAISE = "sleep", "wake", "lower", "raise"
KINDS = (SLEEP, WAKE, LOWER, RAISE)
_SLEEP, _WAKE, _LOWER, _RAISE = range(4)
T = TypeVar("T")
_SLEEPING = STATE_CODE[DeviceState.SLEEPING]
DECREASES = frozenset({SLEEP, LOWER})


def lowers(kind: str) -> bool:
    """Whether a change of ``kind`` lowers power: a sleep or a lowered target."""
    return kind in DECREASES


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
        return lowers(self.kind)


@dataclass(frozen=True, slots=True)
class Ordered:
    """The changes to send now, and those held back with the reason.

    Either may be rows made on demand (``ChangeRows``, ``DeferredRows``): a plan for
    50,000 devices orders its changes as columns, and a ``Change`` (with its
    setpoint's words) or a reason is made only when read.
    """

    now: Sequence[Change]
    deferred: Sequence[tuple[Change, str]]

    def holding(self, now: Sequence[Change], held: Sequence[tuple[Change, str]]) -> Ordered:
        """These changes now; ``held`` deferred ahead of what was deferred already."""
        return Ordered(now, Joined(held, self.deferred))

    def hold_all(self, why: str) -> Ordered:
        """Nothing now: every change that would have gone out waits, for one reason."""
        return self.holding((), WithReason(self.now, why))


class Send(NamedTuple):
    """What one change sends: a ``Change`` without its setpoint, whose words cost most
    of making one (41,000 of them at a cap drop of 50,000 miners: 280-380 ms). A named
    tuple, not a frozen dataclass, as 41,000 are made at once (89 -> 70 ms of it here)."""

    @property
    def is_decrease(self) -> bool:
        """True for a sleep or a lowered target (``lowers``)."""
        return lowers(self.kind)

    device_id: str
    kind: str
    old_w: float
    new_w: float
    set_target_w: float | None


def sends(now: Sequence[Change]) -> list[Send]:
    """What each change of ``now`` sends, in its order: from the columns where ``now``
    is made on demand (no ``Change`` or ``Setpoint`` made), else from each change."""
    if isinstance(now, ChangeRows):
        return now.sends()
    return [Send(c.device_id, c.kind, c.old_w, c.new_w, c.set_target_w) for c in now]


class Picked(RowsOnDemand[T]):
    """The items of ``rows`` at ``which`` (in that order), none made until read."""

    __slots__ = ("_rows", "_which")

    def __init__(self, rows: Sequence[T], which: Sequence[int]) -> None:
        self._rows, self._which = rows, which

    def __len__(self) -> int:
        return len(self._which)

    def _at(self, i: int) -> T:
        return self._rows[self._which[i]]


class Joined(RowsOnDemand[T]):
    """Two sequences one after the other, neither copied."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: Sequence[T], b: Sequence[T]) -> None:
        self._a, self._b = a, b

    def __len__(self) -> int:
        return len(self._a) + len(self._b)

    def _at(self, i: int) -> T:
        n = len(self._a)
        return self._a[i] if i < n else self._b[i - n]


class WithReason(RowsOnDemand[tuple[Change, str]]):
    """Each change with the same reason."""

    __slots__ = ("_changes", "_why")

    def __init__(self, changes: Sequence[Change], why: str) -> None:
        self._changes, self._why = changes, why

    def __len__(self) -> int:
        return len(self._changes)

    def _at(self, i: int) -> tuple[Change, str]:
        return self._changes[i], self._why


def current_awake(d: DeviceStatus) -> bool:
    """Whether the device is (or was last told to be) mining."""
    if d.awake is not None:
        return d.awake
    return d.state is not DeviceState.SLEEPING


def table_of(snapshot: Snapshot) -> DeviceTable:
    """The snapshot's devices as columns (made from its devices if it carries none)."""
    return snapshot.table if snapshot.table is not None else DeviceTable.of(snapshot.devices)


@dataclass(frozen=True, slots=True)
class ChangeColumns:
    """A plan's changes as columns, in plan order: change ``k`` is device ``ids[at[k]]``,
    its setpoint ``setpoints[pick[k]]``, its snapshot row ``rows[k]``."""

    setpoints: Sequence[Setpoint]
    ids: Sequence[str]
    at: IntArr
    pick: IntArr
    rows: IntArr
    kind: npt.NDArray[np.int8]  # an index into KINDS
    old_w: FloatArr
    new_w: FloatArr
    set_target_w: FloatArr  # NaN: none

    def change(self, k: int) -> Change:
        """Change ``k``, made (with its setpoint and the setpoint's words)."""
        target = float(self.set_target_w[k])
        return Change(
            self.ids[int(self.at[k])],
            KINDS[int(self.kind[k])],
            self.setpoints[int(self.pick[k])],
            float(self.old_w[k]),
            float(self.new_w[k]),
            None if target != target else target,
        )


class ChangeRows(RowsOnDemand[Change]):
    """Some of a plan's changes (``which``, in order), each made when read."""

    __slots__ = ("_cols", "_which")

    def __init__(self, cols: ChangeColumns, which: IntArr) -> None:
        self._cols, self._which = cols, which

    def __len__(self) -> int:
        return len(self._which)

    def _at(self, i: int) -> Change:
        return self._cols.change(int(self._which[i]))

    def sends(self) -> list[Send]:
        """What each of these changes sends, in order, from the columns."""
        cols, which = self._cols, self._which
        ids = cols.ids
        device_ids = [ids[i] for i in cols.at[which].tolist()]
        kinds = [KINDS[k] for k in cols.kind[which].tolist()]
        targets = [None if t != t else t for t in cols.set_target_w[which].tolist()]
        return list(
            map(
                Send,
                device_ids,
                kinds,
                cols.old_w[which].tolist(),
                cols.new_w[which].tolist(),
                targets,
            )
        )


class DeferredRows(RowsOnDemand[tuple[Change, str]]):
    """Changes held back (``which``, in order), each with its reason made when read."""

    __slots__ = ("_cols", "_reason", "_which")

    def __init__(self, cols: ChangeColumns, which: IntArr, reason: Callable[[int], str]) -> None:
        self._cols, self._which, self._reason = cols, which, reason

    def __len__(self) -> int:
        return len(self._which)

    def _at(self, i: int) -> tuple[Change, str]:
        return self._cols.change(int(self._which[i])), self._reason(i)


def change_columns(plan: Plan, snapshot: Snapshot) -> ChangeColumns:
    """The changes (in plan order) needed to bring controllable devices to the plan.

    Works on the plan's and the snapshot's columns; no ``Setpoint`` (with its reason)
    and no ``Change`` is made.
    """
    tab = table_of(snapshot)
    sps = plan.setpoints
    # pick[k]: the setpoint (index into ``sps``) that row k of the columns below is.
    pick: IntArr
    if isinstance(sps, SetpointTable) and not sps.head and sps.rows is not None:
        rows = np.asarray(sps.rows, np.intp)
        pick = np.arange(len(sps), dtype=np.intp)
        ids: Sequence[str] = sps.ids
        want_awake = np.asarray(sps.awake, bool)
        want_target = np.asarray(sps.power_target_w, float)
        planned = np.asarray(sps.planned_w, float)
    else:
        index = tab.statics.rows
        entries = [(i, r) for i, r in enumerate(setpoint_rows(sps)) if r[1] in index]
        pick = np.fromiter((i for i, _ in entries), np.intp, len(entries))
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
    at = np.flatnonzero(sleep | wake | adjust)
    kind = np.where(sleep, _SLEEP, np.where(wake, _WAKE, np.where(lower, _LOWER, _RAISE)))
    return ChangeColumns(
        setpoints=sps,
        ids=ids,
        at=at,
        pick=pick[at],
        rows=rows[at],
        kind=kind[at].astype(np.int8),
        old_w=tab.budget_w[rows[at]].astype(np.float64),
        new_w=planned[at].astype(np.float64),
        set_target_w=np.where(set_target & ~sleep, want_target, np.nan)[at],
    )


def diff(plan: Plan, snapshot: Snapshot) -> Sequence[Change]:
    """The changes (in plan order) needed to bring controllable devices to the plan,
    each made when read."""
    cols = change_columns(plan, snapshot)
    return ChangeRows(cols, np.arange(len(cols.at), dtype=np.intp))


def worst_case_loads_w(tree: DomainTree, snapshot: Snapshot, overhead_w: float) -> dict[str, float]:
    """Every domain's worst-case power (W): the devices' budgets below it, overhead at the site."""
    tab = table_of(snapshot)
    names, code = tab.statics.domain_codes
    return domain_loads_w(tree, names, code, tab.budget_w, overhead_w)


SHED_FIRST = "shed before restore: decreases are going out this step"


def order_changes(
    plan: Plan, snapshot: Snapshot, limits: Limits, *, max_increase_w: float
) -> Ordered:
    """Split the plan's changes into those safe to send now and those that must wait."""
    cols = change_columns(plan, snapshot)
    is_decrease = (cols.kind == _SLEEP) | (cols.kind == _LOWER)
    increases = np.flatnonzero(~is_decrease)
    if is_decrease.any():
        return Ordered(
            ChangeRows(cols, np.flatnonzero(is_decrease)),
            DeferredRows(cols, increases, lambda _: SHED_FIRST),
        )
    tab = table_of(snapshot)
    tree = DomainTree(limits)
    names, code = tab.statics.domain_codes
    load = domain_loads_w(tree, names, code, tab.budget_w, limits.overhead_w)
    rows = cols.rows[increases]
    rise = cols.new_w[increases] - tab.budget_w[rows]
    # max(0.0, rise) as Python has it (NaN counts as no rise).
    delta_w: FloatArr = np.where(rise > 0.0, rise, 0.0)
    n_nodes = len(tree.names)
    nodes = by_depth(tree.chains(names), n_nodes)[code[rows]]
    admit = _Admission(tree, load, nodes, delta_w, max_increase_w)
    taken = admit.run()
    reasons = _Reasons(admit, taken, rows, tab.statics.domains)
    return Ordered(
        ChangeRows(cols, increases[taken]),
        DeferredRows(cols, increases[~taken], reasons.at(np.flatnonzero(~taken))),
    )


class _Admission:
    """Which increases go out, in order: each one if it fits the ramp left and every node
    above it stays within its limit, counting the increases already let through.

    The same floats as the rule one change at a time (tests/safety_reference.py): each
    node's load and the ramp left are summed in the same order. Loads only rise and
    the ramp only shrinks, so an increase that does not fit now never will: each
    round drops those, lets through the increases up to the first that does not fit
    (their running loads summed per node), and holds that one back.
    """

    ROUNDS = 8  # then one change at a time: many rounds cost more than the plain loop

    def __init__(
        self,
        tree: DomainTree,
        load: dict[str, float],
        nodes: IntArr,
        delta_w: FloatArr,
        ramp_w: float,
    ) -> None:
        self.tree = tree
        self.load0 = [load[k] for k in tree.names]
        self.top_w = np.array([tree.limit_w[k] + 1e-6 for k in tree.names] + [np.inf])
        self.nodes = nodes  # per increase, its nodes by depth; len(tree.names) past its chain
        self.delta_w = delta_w
        self.ramp_w = ramp_w

    def run(self) -> npt.NDArray[np.bool_]:
        """Per increase, whether it goes out now."""
        sentinel = len(self.tree.names)
        load = np.array([*self.load0, 0.0])
        ramp = self.ramp_w
        taken = np.zeros(len(self.delta_w), bool)
        left = np.arange(len(self.delta_w), dtype=np.intp)
        for _ in range(self.ROUNDS):
            if not left.size:
                return taken
            d, nodes = self.delta_w[left], self.nodes[left]
            # Written as the plain rule's test (a NaN load blocks nothing there either).
            fits = ~(d > ramp) & ~(load[nodes] + d[:, None] > self.top_w[nodes]).any(axis=1)
            left, d, nodes = left[fits], d[fits], nodes[fits]
            if not left.size:
                return taken
            ramp_before = np.subtract.accumulate(np.concatenate(([ramp], d)))
            fail = d > ramp_before[:-1]
            before = [_running(load, nodes[:, k], d, sentinel) for k in range(nodes.shape[1])]
            for k, b in enumerate(before):
                fail |= b + d > self.top_w[nodes[:, k]]
            first = int(np.argmax(fail)) if fail.any() else len(left)
            taken[left[:first]] = True
            ramp = float(ramp_before[first])
            for k, b in enumerate(before):
                done, last = np.unique(nodes[:first, k][::-1], return_index=True)
                at = first - 1 - last
                load[done] = b[at] + d[at]
            left = left[first + 1 :]
        # Many held back one by one: the plain loop over what is left.
        loads: list[float] = load.tolist()
        chains: list[list[int]] = self.nodes[left].tolist()
        top: list[float] = self.top_w.tolist()
        for i, d_w, chain in zip(left.tolist(), self.delta_w[left].tolist(), chains, strict=True):
            if d_w > ramp or any(loads[n] + d_w > top[n] for n in chain):
                continue
            for n in chain:
                if n != sentinel:
                    loads[n] += d_w
            ramp -= d_w
            taken[i] = True
        return taken


def _running(load: FloatArr, nodes: IntArr, w: FloatArr, sentinel: int) -> FloatArr:
    """Per row, its node's load before the row: ``load`` plus the rows before it under
    that node, added one at a time in row order (the floats of a running sum)."""
    order = np.argsort(nodes, kind="stable")
    grouped = nodes[order]
    cut = (np.flatnonzero(grouped[1:] != grouped[:-1]) + 1).tolist()
    ws: list[float] = w[order].tolist()
    start: list[float] = load.tolist()
    out: list[float] = []
    for a, b, node in zip([0, *cut], [*cut, len(ws)], grouped[[0, *cut]].tolist(), strict=True):
        if node == sentinel:
            out.extend([0.0] * (b - a))
        else:
            out.extend(accumulate(ws[a : b - 1], initial=start[node]))
    before = np.empty(len(ws))
    before[order] = out
    return before


class _Reasons:
    """Why each held-back increase waits, worked out when first asked: the ramp left and
    the loads as they stood when its turn came (after the increases let through before it)."""

    def __init__(
        self,
        admit: _Admission,
        taken: npt.NDArray[np.bool_],
        rows: IntArr,
        domains: Sequence[str],
    ) -> None:
        self._admit, self._taken = admit, taken
        self._rows, self._domains = rows, domains
        self._ready = False
        self._passed: list[int] = []
        self._ramp: list[float] = []
        self._node_at: dict[str, list[int]] = {}
        self._node_w: dict[str, list[float]] = {}

    def at(self, which: IntArr) -> Callable[[int], str]:
        """The reason of the ``i``-th of ``which`` (indices into the increases)."""
        return lambda i: self.reason(int(which[i]))

    def _prepare(self) -> None:
        admit = self._admit
        self._passed = np.flatnonzero(self._taken).tolist()
        deltas: list[float] = admit.delta_w.tolist()
        ramp = admit.ramp_w
        self._ramp = [ramp]
        load = dict(zip(admit.tree.names, admit.load0, strict=True))
        self._node_w = {k: [w] for k, w in load.items()}
        self._node_at = {k: [] for k in load}
        for i in self._passed:
            ramp -= deltas[i]
            self._ramp.append(ramp)
            for node in admit.tree.chain(self._domain(i)):
                load[node] += deltas[i]
                self._node_w[node].append(load[node])
                self._node_at[node].append(i)
        self._ready = True

    def _domain(self, i: int) -> str:
        return self._domains[int(self._rows[i])]

    def reason(self, j: int) -> str:
        """Why increase ``j`` waits."""
        if not self._ready:
            self._prepare()
        delta = float(self._admit.delta_w[j])
        ramp_left = self._ramp[bisect_left(self._passed, j)]
        if delta > ramp_left:
            return f"ramp limit: {ramp_left:.0f} W of increase left this step"
        limit_w = self._admit.tree.limit_w
        chain = self._admit.tree.chain(self._domain(j))
        load = {k: self._node_w[k][bisect_left(self._node_at[k], j)] for k in chain}
        blocked = [k for k in chain if load[k] + delta > limit_w[k] + 1e-6]
        node = blocked[-1] if SITE in blocked else blocked[0]
        return (
            f"worst case: {node} would reach {load[node] + delta:.0f} W "
            f"over its limit {limit_w[node]:.0f} W"
        )
