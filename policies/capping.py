"""Efficiency capping: keep the site under its cap, shedding the least efficient miners first.

A pure function of (snapshot, limits, params, previous plan). Dynamo-style three
bands on every domain, as fractions of its limit:

- above the *capping threshold* anywhere: re-plan down to the *capping target*;
- below the *uncapping threshold* at the site: re-plan up to the capping target;
- in between: hold the previous plan, so noise never moves a miner.

A re-plan fills the budget in merit order. Contract floors (``Limits.floors``)
come first, kept within every domain's limit by the rule every policy shares
(``policies/floors.py``): the caps win, and a floor cut short is named in
``Plan.broken_floors``. A plan that would hold a contracted GPU below its floor
is made again. Every miner that may sleep starts asleep; miners are woken at
their minimum power target best-first (lowest J/TH) while every domain above
them has room; then awake devices are raised towards their maximum best-first
(a floored GPU from its floor). So a shrinking budget first lowers the targets
of the least efficient miners, then sleeps them; a growing one wakes the most
efficient first. Devices the agent cannot control count at their worst case.

The plan works on the snapshot's columns (``snapshot.table``) with numpy alone:
an agent on this policy never loads numba. The fill is sequential (each device
takes from the room the ones before it left), so it is found in rounds: every
device's room is bounded from below (those before it take all they might) and
from above (they take only what they surely take), and a device whose take is
the same at both bounds is settled; each round settles at least the first
device still open, and in practice a round or two settle them all. Every room is
the very float the plain rule gives: per domain, the takes are subtracted one
after another in merit order (``_Ledger``). tests/capping_reference.py is the
plain rule over ``DeviceStatus`` objects, its specification, and
tests/test_capping_fast.py compares the two plan for plan, reasons included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from siteagent.domain import (
    DeviceKind,
    DeviceStatus,
    Limits,
    Pin,
    Plan,
    PlanMode,
    Setpoint,
    SetpointTable,
    Snapshot,
    setpoint_rows,
)
from siteagent.domain.site import SITE, DomainTree, by_depth, domain_loads_w
from siteagent.domain.table import KIND_CODE, DeviceStatics, DeviceTable
from siteagent.domain.types import clamp_power_w, clamp_power_w_array
from siteagent.policies import PolicyState
from siteagent.policies.floors import floor_map_w, floors_within, wanted_floor_w
from siteagent.policies.prices import Prices

FloatArr = npt.NDArray[np.float64]
IntArr = npt.NDArray[np.intp]
BoolArr = npt.NDArray[np.bool_]

MOVABLE_KINDS = frozenset({DeviceKind.MINER, DeviceKind.GPU})
# Shedding order between kinds: the lower the rank, the later its power is taken.
# A kilowatt of inference earns an order of magnitude more than one of hashing
# (DOMAIN_FACTS.md: about $1.6/kWh against about $0.1/kWh), so mining goes first.
KIND_RANK = {DeviceKind.GPU: 0, DeviceKind.MINER: 1}


@dataclass(frozen=True, slots=True)
class CappingParams:
    """Band fractions of each limit, and the minimum time a slept miner stays asleep (s)."""

    capping_threshold: float = 1.0
    capping_target: float = 0.97
    uncapping_threshold: float = 0.92
    min_off_s: float = 300.0
    max_wakes_per_hour: int = 0  # 0: no limit beyond min_off_s


def min_level_w(d: DeviceStatus) -> float:
    """Lowest power (W) the miner can mine at."""
    caps = d.capabilities
    if caps.power_target and caps.power_target_min_w is not None:
        return caps.power_target_min_w
    return d.nameplate_power_w


def max_level_w(d: DeviceStatus) -> float:
    """Highest power (W) the miner may be set to."""
    caps = d.capabilities
    if caps.power_target and caps.power_target_max_w is not None:
        return caps.power_target_max_w
    return d.nameplate_power_w


def pinned_setpoint(d: DeviceStatus, pin: Pin) -> tuple[DeviceStatus, Setpoint]:
    """The setpoint an operator's pin asks for, clamped to what the device can do."""
    w = pin.power_w if pin.power_w is not None else max_level_w(d)
    why = f"pinned by {pin.source or 'an override'} at {w:.0f} W"
    if w <= 0 and d.capabilities.can_sleep:
        return d, Setpoint(d.device_id, False, d.power_target_w, d.sleep_power_w, why)
    level = (
        d.capabilities.clamp_power_target_w(max(w, min_level_w(d)))
        if d.capabilities.power_target
        else max_level_w(d)
    )
    target = level if d.capabilities.power_target else d.power_target_w
    return d, Setpoint(d.device_id, True, target, level, why)


@dataclass(frozen=True, slots=True)
class CappingPolicy:
    """The capping policy behind the registry's interface.

    What it derives from the devices that rarely change (``_Layout``: the merit
    order, the domain chains) it keeps in the state's ``derived``, reused while
    snapshots bring the very same statics under the same domains.
    """

    params: CappingParams
    name: str = "efficiency-capping"
    reads_prices: bool = False

    def plan(
        self, snapshot: Snapshot, limits: Limits, prices: Prices | None, state: PolicyState
    ) -> tuple[Plan, PolicyState]:
        """``plan`` against the state's previous plan; prices play no part."""
        last = state.derived if isinstance(state.derived, _Layout) else None
        p, layout = _plan(snapshot, limits, self.params, state.previous, last)
        return p, PolicyState(p, layout)


def plan(
    snapshot: Snapshot, limits: Limits, params: CappingParams, previous: Plan | None = None
) -> Plan:
    """Plan setpoints (W) for controllable miners and GPUs, keeping each domain under its cap."""
    return _plan(snapshot, limits, params, previous, None)[0]


# Why a device is where it is, as a code per device; words are made on demand.
(
    _NONE,
    _CANNOT_SLEEP,
    _MINING_OFF,
    _MIN_OFF,
    _WAKES,
    _ASLEEP_BUDGET,
    _ON_OFF,
    _HELD_MIN,
    _AT_MAX,
    _BOUND,
    _FLOOR_BROKEN,
) = range(11)

_MINER = KIND_CODE[DeviceKind.MINER]
_GPU = KIND_CODE[DeviceKind.GPU]


def _plan(
    snapshot: Snapshot,
    limits: Limits,
    params: CappingParams,
    previous: Plan | None,
    last: _Layout | None,
) -> tuple[Plan, _Layout]:
    tab = snapshot.table if snapshot.table is not None else DeviceTable.of(snapshot.devices)
    st = tab.statics
    tree = DomainTree(limits)
    key = limits.directives_key
    kinds = st.kind_codes
    controllable = tab.controllable & ((kinds == _MINER) | (kinds == _GPU))
    pins = {p.device_id: p for p in limits.pins}
    rows_of = st.rows
    pin_rows = sorted(rows_of[i] for i in pins if i in rows_of)
    movable = controllable.copy()
    movable[pin_rows] = False
    pinned: list[tuple[DeviceStatus, Setpoint]] = []
    pinned_rows: list[int] = []
    for r in pin_rows:
        if controllable[r] and not pins[st.ids[r]].exclude:
            d = snapshot.devices[r]
            pinned.append(pinned_setpoint(d, pins[d.device_id]))
            pinned_rows.append(r)
    # Everything not planned (uncontrollable, excluded) counts at its worst case.
    fixed = ~movable
    fixed[pinned_rows] = False
    layout = _layout(st, limits, tree, movable, last)
    m = layout.rows
    prev = _Previous(previous, layout)
    ctx = _Ctx(snapshot, tab, limits, params, tree, layout, pinned, pinned_rows, fixed, prev, key)

    expected = tab.expected_w[m]
    heading_w = np.where(prev.known, np.maximum(expected, prev.planned_w), expected)
    fixed_rows = np.flatnonzero(fixed)
    load = _loads_w(
        st,
        tree,
        [fixed_rows, np.array(pinned_rows, np.intp), np.sort(m)],
        [
            tab.budget_w[fixed_rows],
            np.array([max(sp.planned_w, d.expected_w) for d, sp in pinned], float),
            heading_w[layout.by_row],
        ],
        limits.overhead_w,
    )
    over = [
        node
        for node, limit in tree.limit_w.items()
        if load[node] > params.capping_threshold * limit
    ]
    site_cap = limits.effective_cap_w
    if over:
        worst = max(over, key=lambda n: load[n] / tree.limit_w[n])
        why = (
            f"{worst} heading for {load[worst]:.0f} W, above its capping threshold "
            f"{params.capping_threshold * tree.limit_w[worst]:.0f} W"
        )
        return _fill(ctx, PlanMode.CAP, why), layout
    if previous is not None and previous.directives_key != key:
        return _fill(ctx, PlanMode.OVERRIDE, f"operator directives changed ({key})"), layout
    short = _floor_short(ctx)
    if short is not None:
        return _fill(ctx, PlanMode.RESTORE, short), layout
    if load[SITE] < params.uncapping_threshold * site_cap:
        why = (
            f"site heading for {load[SITE]:.0f} W, below its uncapping threshold "
            f"{params.uncapping_threshold * site_cap:.0f} W"
        )
        filled = _fill(ctx, PlanMode.RESTORE, why)
        held = _hold(ctx, load[SITE], why)
        if _same_setpoints(filled.setpoints, held.setpoints):
            return Plan(
                held.time_s,
                PlanMode.HOLD,
                held.effective_cap_w,
                held.planned_w,
                why + "; nothing more can be restored",
                held.setpoints,
                key,
            ), layout
        return filled, layout
    why = (
        f"site heading for {load[SITE]:.0f} W, inside the band "
        f"[{params.uncapping_threshold * site_cap:.0f}, "
        f"{params.capping_threshold * site_cap:.0f}] W"
    )
    return _hold(ctx, load[SITE], why), layout


def _loads_w(
    st: DeviceStatics,
    tree: DomainTree,
    rows: Sequence[IntArr],
    w: Sequence[FloatArr],
    overhead_w: float,
) -> dict[str, float]:
    """Per node: the power (W) of the devices in ``rows`` below it (the parts in turn, each
    in row order), the overhead at the site.

    Summed in that order, domains numbered as first seen: the very floats the plain
    rule gets from its list of (device, watts).
    """
    names, code = st.domain_codes
    r = np.concatenate(rows) if rows else np.zeros(0, np.intp)
    c = code[r]
    seen, first = np.unique(c, return_index=True)
    in_order = seen[np.argsort(first)]
    renumber = np.zeros(len(names), np.intp)
    renumber[in_order] = np.arange(len(in_order))
    return domain_loads_w(
        tree, [names[k] for k in in_order.tolist()], renumber[c], np.concatenate(w), overhead_w
    )


class _Layout:
    """What a plan derives from a snapshot's statics, the domain tree and which devices it
    moves: the movable devices in merit order and their columns that do not move.

    Merit order: GPUs, then miners; by nameplate J/TH (measured efficiency moves with
    the target and with noise, and a ranking that moves would churn miners for
    nothing); then by id.
    """

    def __init__(
        self, statics: DeviceStatics, key: tuple[object, ...], tree: DomainTree, movable: BoolArr
    ) -> None:
        self.statics, self.key, self.mask = statics, key, movable.copy()
        r = np.flatnonzero(movable)
        kinds = statics.kind_codes[r]
        rank = np.where(kinds == _GPU, KIND_RANK[DeviceKind.GPU], KIND_RANK[DeviceKind.MINER])
        nameplate, hashrate = statics.nameplate_power_w[r], statics.nameplate_hashrate_ths[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            eff = np.where(hashrate > 0, nameplate / hashrate, np.inf)
        order = np.lexsort((statics.id_rank[r], eff, rank))
        m = self.rows = r[order]  # snapshot rows, in merit order
        # by_row[j]: the place in merit order of the j-th movable device in row order.
        self.by_row = np.argsort(m, kind="stable")
        n = len(m)
        self.n = n
        self.ids: list[str] = statics.id_array[m].tolist()
        self.kind_rank, self.eff = rank[order], eff[order]
        self.is_miner = kinds[order] == _MINER
        c = statics.controls
        self.power_target, self.can_sleep = c.power_target[m], c.can_sleep[m]
        self.cap_min, self.cap_max = c.power_target_min_w[m], c.power_target_max_w[m]
        self.cap_step = c.power_target_step_w[m]
        self.nameplate_w, self.sleep_w = nameplate[order], statics.sleep_power_w[m]
        # Levels as min_level_w / max_level_w define them.
        self.lo_w = np.where(
            self.power_target & ~np.isnan(self.cap_min), self.cap_min, nameplate[order]
        )
        self.hi_w = np.where(
            self.power_target & ~np.isnan(self.cap_max), self.cap_max, nameplate[order]
        )
        names = tree.names
        self.names = names
        domains, dom_idx = statics.domain_codes
        chains = tree.chains(domains)[dom_idx[m]] if n else np.zeros((0, 1), np.intp)
        self.nodes = by_depth(chains, len(names))
        self.ledger = _Ledger(self.nodes, len(names))
        # Ties between nodes' rooms go to the name that sorts first, as ``min`` of
        # (room, name) pairs does.
        order_names = sorted(range(len(names)), key=names.__getitem__)
        self.name_rank = np.empty(len(names) + 1, np.intp)
        self.name_rank[order_names] = np.arange(len(names))
        self.name_rank[-1] = len(names)


def _layout(
    statics: DeviceStatics,
    limits: Limits,
    tree: DomainTree,
    movable: BoolArr,
    last: _Layout | None,
) -> _Layout:
    """``last`` while it was derived from the very same statics, tree and movable devices."""
    key = (tree.names, tuple((d.domain_id, d.parent) for d in limits.domains))
    if (
        last is not None
        and last.statics is statics
        and last.key == key
        and np.array_equal(last.mask, movable)
    ):
        return last
    return _Layout(statics, key, tree, movable)


class _Ledger:
    """Each node's room as devices take power from it one after another, in merit order.

    ``run`` subtracts, per node, the takes of the devices below it in turn (a
    ``subtract.accumulate`` per node), so every room is the float the plain rule's
    ``avail[node] -= w`` gives. Nodes at one depth below the site are disjoint, so a
    depth's nodes run side by side, one column each, grouped by how many devices
    they hold (columns padded to the group's longest).
    """

    def __init__(self, nodes: IntArr, n_nodes: int) -> None:
        self.n, self.depth = nodes.shape
        self.nodes, self.n_nodes = nodes, n_nodes
        # (depth, devices, their cells, the cells before them, the columns' nodes, turns)
        self.parts: list[tuple[int, IntArr, IntArr, IntArr, IntArr, int]] = []
        for k in range(self.depth):
            col = nodes[:, k]
            order = np.argsort(col, kind="stable")
            every = np.bincount(col, minlength=n_nodes + 1)  # the last: chains ended
            starts = np.concatenate(([0], np.cumsum(every)[:-1]))
            counts = every[:n_nodes]
            place = np.empty(self.n, np.intp)
            place[order] = np.arange(self.n) - starts[col[order]]
            size_class = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.intp)
            for c in np.unique(size_class[counts > 0]).tolist():
                group = np.flatnonzero((counts > 0) & (size_class == c))
                column = np.full(n_nodes + 1, -1, np.intp)
                column[group] = np.arange(len(group))
                dev = np.flatnonzero(column[col] >= 0)
                cell = place[dev] * len(group) + column[col[dev]]
                turns = int(counts[group].max())
                self.parts.append((k, dev, cell + len(group), cell, group, turns))

    def run(self, start_w: FloatArr, take_w: FloatArr) -> tuple[FloatArr, FloatArr, FloatArr]:
        """Per device (merit order) the least room of its nodes just before its turn, each
        node's room then (depth x n, +inf where its chain is shorter), and each node's
        room after every turn."""
        before = np.full((self.depth, self.n), np.inf)
        end = np.array(start_w, float)
        for k, dev, cell, cell_before, group, turns in self.parts:
            g = len(group)
            ledger = np.zeros((turns + 1) * g)
            ledger[:g] = start_w[group]
            ledger[cell] = take_w[dev]
            room = np.subtract.accumulate(ledger.reshape(turns + 1, g), axis=0).ravel()
            before[k, dev] = room[cell_before]
            end[group] = room[turns * g :]
        least = before[0].copy()
        for k in range(1, self.depth):
            np.minimum(least, before[k], out=least)
        return least, before, end


@dataclass(frozen=True, slots=True)
class _Phase:
    """One pass of the fill: who may take, and each one's take given its room (W)."""

    may: BoolArr
    take: Callable[[FloatArr, IntArr], FloatArr]  # take(room, which): for the devices ``which``
    least_w: FloatArr  # the take at no room
    most_w: FloatArr  # the take at unbounded room
    monotone: BoolArr  # the take never falls as the room grows
    take_one: Callable[[float, int], float]  # take(room, i): for device ``i``, in Python floats


def _settle(
    ledger: _Ledger, start_w: FloatArr, ph: _Phase
) -> tuple[FloatArr, FloatArr, FloatArr, FloatArr]:
    """Every device's take (W) in one pass, the room at its turn (W), its nodes' rooms
    then (depth x n), and each node's room after the pass.

    Rooms only shrink as takes grow, so with every open device taking its most the
    rooms are lower bounds, with its least upper bounds; a device whose take is the
    same anywhere between is settled. The first open device's room is exact, so
    each round settles at least one. Where devices in turn share out what little is
    left (each one's room depends on the one before), rounds settle few; once a
    round fails to halve the open devices, the stretch from the first open one to
    the last is walked one device at a time.
    """
    lo_t = np.where(ph.may, ph.least_w, 0.0)
    hi_t = np.where(ph.may, ph.most_w, 0.0)
    last_open = 2 * ledger.n + 1  # no round yet
    while True:
        room_lo, before, end = ledger.run(start_w, hi_t)
        open_ = lo_t != hi_t
        n_open = int(np.count_nonzero(open_))
        if not n_open:
            return hi_t, room_lo, before, end
        if 2 * n_open > last_open:
            took = _walk(ledger, ph, lo_t, open_, before)
            return (took, *ledger.run(start_w, took))
        last_open = n_open
        idx = np.flatnonzero(open_ & ph.monotone)
        lo_t[idx] = np.maximum(lo_t[idx], ph.take(room_lo[idx], idx))
        room_hi, before, end = ledger.run(start_w, lo_t)
        idx = np.flatnonzero(lo_t != hi_t)
        t = ph.take(room_hi[idx], idx)
        mono = ph.monotone[idx]
        exact = room_lo[idx] == room_hi[idx]
        hi_t[idx] = np.where(mono, np.minimum(hi_t[idx], t), np.where(exact, t, hi_t[idx]))
        # A take that does not grow with the room is known only where the room is.
        moved = ~mono & exact & (lo_t[idx] != t)
        lo_t[idx[moved]] = t[moved]
        if not moved.any() and not (lo_t != hi_t).any():
            return lo_t, room_hi, before, end


def _walk(
    ledger: _Ledger, ph: _Phase, took: FloatArr, open_: BoolArr, before: FloatArr
) -> FloatArr:
    """The takes (W) with the open devices settled one after another, as the plain rule
    does; ``before`` is a run's rooms in which every device before the first open one
    is settled (so each node's room is exact at the first device below it from there)."""
    took = took.copy()
    where = np.flatnonzero(open_)
    first, last = int(where[0]), int(where[-1]) + 1
    dummy = ledger.n_nodes
    rows = ledger.nodes[first:last].tolist()
    is_open = open_[first:last].tolist()
    known = took[first:last].tolist()
    rooms = before[:, first:last].T.tolist()
    avail: dict[int, float] = {}
    for j, (chain, opened, t, room_at) in enumerate(zip(rows, is_open, known, rooms, strict=True)):
        room = math.inf
        for k, node in enumerate(chain):
            if node == dummy:
                continue
            r = avail.setdefault(node, room_at[k])
            if r < room:
                room = r
        if opened:
            t = ph.take_one(room, first + j)
            took[first + j] = t
        for node in chain:
            if node != dummy:
                avail[node] -= t
    return took


@dataclass(frozen=True, slots=True)
class _Ctx:
    snapshot: Snapshot
    table: DeviceTable
    limits: Limits
    params: CappingParams
    tree: DomainTree
    layout: _Layout
    pinned: list[tuple[DeviceStatus, Setpoint]]
    pinned_rows: list[int]
    fixed: BoolArr
    prev: _Previous
    key: str


class _Previous:
    """The previous plan's setpoint per movable device (merit order), as arrays."""

    def __init__(self, previous: Plan | None, lay: _Layout) -> None:
        n = lay.n
        self.known = np.zeros(n, bool)
        self.awake = np.zeros(n, bool)
        self.target_w = np.full(n, np.nan)
        self.planned_w = np.full(n, np.nan)
        self.at = np.full(n, -1, np.intp)  # its place in the previous plan's setpoints
        self.setpoints: Sequence[Setpoint] = ()
        if previous is None:
            return
        sps = self.setpoints = previous.setpoints
        if isinstance(sps, SetpointTable) and (sps.ids is lay.ids or list(sps.ids) == lay.ids):
            # The same devices in the same order as last time: the columns line up (a
            # device also in the head is found in the columns, which come later).
            self.known[:] = True
            self.awake[:] = np.asarray(sps.awake, bool)
            self.target_w[:] = np.asarray(sps.power_target_w, float)
            self.planned_w[:] = np.asarray(sps.planned_w, float)
            self.at[:] = len(sps.head) + np.arange(n)
            return
        place = {d: i for i, d in enumerate(lay.ids)}
        for i, dev, awake, target, planned in setpoint_rows(sps):
            k = place.get(dev)
            if k is not None:
                self.known[k] = True
                self.awake[k] = awake
                self.target_w[k] = np.nan if target is None else target
                self.planned_w[k] = planned
                self.at[k] = i


def _same_setpoints(a: Sequence[Setpoint], b: Sequence[Setpoint]) -> bool:
    """Whether two plans over the same devices set each one awake or not, at the same target."""
    if isinstance(a, SetpointTable) and isinstance(b, SetpointTable) and a.head == b.head:
        return (
            list(a.ids) == list(b.ids)
            and np.array_equal(np.asarray(a.awake, bool), np.asarray(b.awake, bool))
            and np.array_equal(
                np.asarray(a.power_target_w, float),
                np.asarray(b.power_target_w, float),
                equal_nan=True,
            )
        )
    key = {(s.device_id, s.awake, s.power_target_w) for s in a}
    return key == {(s.device_id, s.awake, s.power_target_w) for s in b}


def _hold(ctx: _Ctx, heading_w: float, why: str) -> Plan:
    """The previous setpoints; a device not planned before is left where it is."""
    lay, tab, prev = ctx.layout, ctx.table, ctx.prev
    m = lay.rows
    code = tab.awake[m]
    found_awake = code != 0  # unknown counts as awake
    target_now = tab.power_target_w[m]
    found_level = np.where(
        found_awake,
        np.where(np.isnan(target_now) | (target_now == 0), lay.hi_w, target_now),
        lay.sleep_w,
    )
    awake = np.where(prev.known, prev.awake, found_awake)
    target = np.where(prev.known, prev.target_w, target_now)
    level = np.where(prev.known, prev.planned_w, found_level)
    table = SetpointTable(
        [sp for _, sp in ctx.pinned], lay.ids, awake, target, level, _Held.of(prev), m
    )
    return Plan(
        ctx.snapshot.time_s,
        PlanMode.HOLD,
        ctx.limits.effective_cap_w,
        heading_w,
        why,
        table,
        ctx.key,
    )


class _Held:
    """The words of a held plan's setpoints: the previous plan's, where it had one.

    Each device's words are found at their source (the plan that made them, and
    its column), never through a chain of the holds between: a site that holds for
    days keeps one level of indirection, and no plan alive but those that made words.
    """

    def __init__(self, sources: list[Callable[[int], str]], source: IntArr, col: IntArr) -> None:
        self.sources, self.source, self.col = sources, source, col

    @classmethod
    def of(cls, prev: _Previous) -> _Held:
        """The words of the previous plan's setpoints at ``prev.at`` (-1: left as found)."""
        sps, at = prev.setpoints, prev.at
        known = at >= 0
        if isinstance(sps, SetpointTable):
            h = len(sps.head)
            in_head = known & (at < h)
            in_cols = known & ~in_head
            col = np.where(in_cols, at - h, -1)
            reasons = sps.reasons
            sources: list[Callable[[int], str]]
            if isinstance(reasons, _Held):
                rows = np.flatnonzero(in_cols)
                inner = col[rows]
                source = np.full(len(at), -1, np.intp)
                source[rows] = reasons.source[inner]
                col = np.full(len(at), -1, np.intp)
                col[rows] = reasons.col[inner]
                sources = list(reasons.sources)
            else:
                source = np.where(in_cols, 0, -1)
                sources = [reasons]
            if in_head.any():
                head = sps.head
                sources.append(lambda k: head[k].reason)
                source = np.where(in_head, len(sources) - 1, source)
                col = np.where(in_head, at, col)
            return cls(sources, source, col)
        whole = tuple(sps)
        return cls([lambda k: whole[k].reason], np.where(known, 0, -1), at)

    def __call__(self, i: int) -> str:
        s = int(self.source[i])
        return self.sources[s](int(self.col[i])) if s >= 0 else "hold: left as found"


def _fill(ctx: _Ctx, mode: PlanMode, why: str) -> Plan:
    snapshot, tab, limits, params, tree = ctx.snapshot, ctx.table, ctx.limits, ctx.params, ctx.tree
    lay = ctx.layout
    n, m = lay.n, lay.rows
    names = lay.names
    frac = params.capping_target
    limit = np.array([tree.limit_w[k] for k in names])
    fixed_rows = np.flatnonzero(ctx.fixed)
    fixed_w = tab.budget_w[fixed_rows]
    pinned_w = np.array([sp.planned_w for _, sp in ctx.pinned], float)
    counted = _loads_w(
        tab.statics,
        tree,
        [fixed_rows, np.array(ctx.pinned_rows, np.intp)],
        [fixed_w, pinned_w],
        limits.overhead_w,
    )
    avail = np.append(frac * limit - np.array([counted[k] for k in names]), np.inf)
    # Operator modes: no miner wakes or rises with mining off; no GPU rises with AI at minimum.
    held_down = np.zeros(n, bool)
    if limits.mining_off:
        held_down |= lay.is_miner
    if limits.ai_min:
        held_down |= ~lay.is_miner
    lo, hi, sleep_w = lay.lo_w, lay.hi_w, lay.sleep_w
    can_sleep, power_target = lay.can_sleep, lay.power_target
    why_code = np.full(n, _NONE, np.int8)
    room_at = np.zeros(n)  # the room left at a device's turn, where its reason names it
    node_at = np.full(n, -1, np.intp)

    # Start from the floor: asleep where possible, else at the minimum level.
    awake = ~can_sleep
    level = np.where(can_sleep, sleep_w, lo)
    why_code[~can_sleep] = _CANNOT_SLEEP
    # Contract floors above that, within every domain's limit: caps win over floors.
    floor_rows, kept, broken, floor_want = _floors(ctx, limit, counted, level)
    level[floor_rows] = kept
    _, _, avail = lay.ledger.run(avail, level)

    # Wake limits (no flapping): the minimum time off, and the wakes an hour.
    now_s = snapshot.time_s
    since = tab.last_transition_s[m]
    wakes = tab.wakes_last_hour[m]
    with np.errstate(invalid="ignore"):
        min_off = (tab.awake[m] == 0) & ~np.isnan(since) & (now_s - since < params.min_off_s)
    too_many = ~min_off & bool(params.max_wakes_per_hour) & (wakes >= params.max_wakes_per_hour)
    cost = lo - sleep_w
    raise_lo = level.copy() if floor_rows.size else lo.copy()
    raise_lo[can_sleep] = lo[can_sleep]
    span = hi - raise_lo
    clamp_args = (lay.cap_min, lay.cap_max, lay.cap_step)

    def wake_take(room: FloatArr, idx: IntArr) -> FloatArr:
        return np.where(cost[idx] <= room, cost[idx], 0.0)

    def raise_take(room: FloatArr, idx: IntArr) -> FloatArr:
        return _raised_w(room, idx, raise_lo, span, clamp_args) - raise_lo[idx]

    def wake_one(room: float, i: int) -> float:
        c = float(cost[i])
        return c if c <= room else 0.0

    def raise_one(room: float, i: int) -> float:
        lo_i = float(raise_lo[i])
        wanted = clamp_power_w(
            lo_i + min(max(room, 0.0), float(span[i])),
            float(lay.cap_min[i]),
            float(lay.cap_max[i]),
            float(lay.cap_step[i]),
        )
        return wanted - lo_i

    # Kind by kind (GPUs, then miners), wake best-first at the minimum level while
    # every domain above has room, then raise awake devices best-first.
    for rank in np.unique(lay.kind_rank).tolist():
        group = lay.kind_rank == rank
        asleep = group & ~awake
        held = asleep & held_down
        why_code[held] = _MINING_OFF
        blocked_min = asleep & ~held & min_off
        blocked_wakes = asleep & ~held & too_many
        why_code[blocked_min] = _MIN_OFF
        why_code[blocked_wakes] = _WAKES
        may = asleep & ~held & ~min_off & ~too_many
        if may.any():
            wake = _Phase(
                may,
                wake_take,
                np.where(may, np.minimum(cost, 0.0), 0.0),
                np.where(may, np.maximum(cost, 0.0), 0.0),
                cost >= 0,
                wake_one,
            )
            _, room, before, avail = _settle(lay.ledger, avail, wake)
            woken = may & (cost <= room)
            awake = awake | woken
            level = np.where(woken, lo, level)
            failed = may & ~woken
            why_code[failed] = _ASLEEP_BUDGET
            room_at[failed], node_at[failed] = room[failed], _node(lay, room, before, failed)

        # Raise awake devices best-first towards their maximum.
        up = group & awake
        why_code[up & ~power_target & (why_code == _NONE)] = _ON_OFF
        why_code[up & power_target & held_down] = _HELD_MIN
        may = up & power_target & ~held_down
        if may.any():
            idx = np.flatnonzero(may)
            rise = _Phase(
                may,
                raise_take,
                _fill_at(n, idx, raise_take(np.full(len(idx), -np.inf), idx)),
                _fill_at(n, idx, raise_take(np.full(len(idx), np.inf), idx)),
                np.ones(n, bool),
                raise_one,
            )
            _, room, before, avail = _settle(lay.ledger, avail, rise)
            wanted = _raised_w(room[idx], idx, raise_lo, span, clamp_args)
            level[idx] = wanted
            top = wanted >= hi[idx]
            why_code[idx[top]] = _AT_MAX
            bound = idx[~top]
            why_code[bound] = _BOUND
            mask = np.zeros(n, bool)
            mask[bound] = True
            node_at[bound] = _node(lay, room, before, mask)

    broken_rows = floor_rows[broken]
    why_code[broken_rows] = _FLOOR_BROKEN
    target = np.where(awake & power_target, level, tab.power_target_w[m])
    planned = limits.overhead_w + sum(fixed_w.tolist() + pinned_w.tolist()) + sum(level.tolist())
    texts = _Reasons(
        mode, lay, awake, level, why_code, room_at, node_at, since, wakes, params, now_s
    )
    texts.floor_w = floor_want
    table = SetpointTable([sp for _, sp in ctx.pinned], lay.ids, awake, target, level, texts, m)
    gone = tuple(sorted(lay.ids[i] for i in broken_rows.tolist()))
    return Plan(snapshot.time_s, mode, limits.effective_cap_w, planned, why, table, ctx.key, gone)


def _floor_want(ctx: _Ctx) -> tuple[IntArr, FloatArr]:
    """The GPUs with a floor above their minimum (merit order), and per device its floor
    (W; its minimum where it has none), clamped onto its range and step."""
    lay = ctx.layout
    floors = floor_map_w(ctx.limits)
    if not floors or not lay.n:
        return np.zeros(0, np.intp), lay.lo_w
    gpus = np.flatnonzero(~lay.is_miner)
    clamp = (lay.cap_min, lay.cap_max, lay.cap_step)
    want = lay.lo_w.copy()
    want[gpus] = wanted_floor_w(lay.ids, gpus, lay.lo_w, clamp, floors)
    rows = gpus[want[gpus] > lay.lo_w[gpus]]
    return rows, want


def _floors(
    ctx: _Ctx, limit: FloatArr, counted: dict[str, float], level: FloatArr
) -> tuple[IntArr, FloatArr, BoolArr, FloatArr]:
    """The floored GPUs (merit order), their floors kept within every domain's limit (W)
    after every movable device's own minimum (``level``), which were cut, and every
    device's floor (``_floor_want``)."""
    rows, want = _floor_want(ctx)
    if not rows.size:
        return rows, np.zeros(0), np.zeros(0, bool), want
    lay = ctx.layout
    room = limit - np.array([counted[k] for k in lay.names]) - _node_sums(lay, level)
    clamp = (lay.cap_min, lay.cap_max, lay.cap_step)
    kept, broken = floors_within(rows, lay.lo_w[rows], want[rows], clamp, lay.nodes, room)
    return rows, kept, broken, want


def _node_sums(lay: _Layout, w: FloatArr) -> FloatArr:
    """Per node: the sum of ``w`` (W, merit order) over the movable devices below it."""
    out = np.zeros(len(lay.names) + 1)
    for k in range(lay.nodes.shape[1]):
        out += np.bincount(lay.nodes[:, k], weights=w, minlength=len(lay.names) + 1)
    return out[: len(lay.names)]


def _floor_short(ctx: _Ctx) -> str | None:
    """Why the previous plan must not be held: a floored GPU planned below its floor
    (None when every one was planned at or above it)."""
    rows, want = _floor_want(ctx)
    prev = ctx.prev
    short = rows[~prev.known[rows] | (prev.planned_w[rows] < want[rows] - 1e-6)]
    if not short.size:
        return None
    i = int(short[0])
    return (
        f"contract floor of {ctx.layout.ids[i]} needs {float(want[i]):.0f} W "
        f"({short.size} device(s) planned below their floor)"
    )


def _fill_at(n: int, idx: IntArr, values: FloatArr) -> FloatArr:
    out = np.zeros(n)
    out[idx] = values
    return out


def _raised_w(
    room: FloatArr,
    idx: IntArr,
    lo: FloatArr,
    span: FloatArr,
    clamp: tuple[FloatArr, FloatArr, FloatArr],
) -> FloatArr:
    """The level (W) each of ``idx`` rises to with ``room`` left: up by the room, at most
    to its maximum, clamped onto its power-target range and step."""
    want = lo[idx] + np.minimum(np.maximum(room, 0.0), span[idx])
    return clamp_power_w_array(want, clamp[0][idx], clamp[1][idx], clamp[2][idx])


def _node(lay: _Layout, room: FloatArr, before: FloatArr, which: BoolArr) -> IntArr:
    """For the devices ``which``: the node whose room is theirs at their turn (of equal
    rooms, the one whose name sorts first, as ``min`` over (room, name) pairs picks)."""
    vals = before[:, which]
    nodes: IntArr = lay.nodes[which].T
    ranked = np.where(vals == room[which], lay.name_rank[nodes], len(lay.names) + 1)
    picked: IntArr = nodes[np.argmin(ranked, axis=0), np.arange(nodes.shape[1])]
    return picked


class _Reasons:
    """Words for one device's setpoint, made from the plan's columns when asked for."""

    def __init__(
        self,
        mode: PlanMode,
        lay: _Layout,
        awake: BoolArr,
        level: FloatArr,
        why: npt.NDArray[np.int8],
        room: FloatArr,
        node: IntArr,
        since: FloatArr,
        wakes: FloatArr,
        params: CappingParams,
        now_s: float,
    ) -> None:
        self.mode, self.lay, self.awake, self.level, self.why = mode, lay, awake, level, why
        self.room, self.node, self.since, self.wakes = room, node, since, wakes
        self.params, self.now_s = params, now_s
        self.floor_w: FloatArr = np.zeros(0)  # per device: its contract floor (W), if any

    def __call__(self, i: int) -> str:
        lay = self.lay
        on = bool(self.awake[i])
        miner = bool(lay.is_miner[i])
        verb = "mining" if miner else "serving"
        doing = f"{verb} at {float(self.level[i]):.0f} W" if on else "asleep"
        merit = f"{float(lay.eff[i]):.1f} J/TH" if miner else "AI inference, shed after mining"
        return f"{self.mode}: {doing} (rank {i + 1}/{lay.n}, {merit}; {self._why(i)})"

    def _why(self, i: int) -> str:
        code = int(self.why[i])
        if code == _NONE:
            return ""
        if code == _CANNOT_SLEEP:
            return "cannot sleep, kept at its minimum"
        if code == _MINING_OFF:
            return "asleep: mining is off by override"
        if code == _MIN_OFF:
            left = self.params.min_off_s - (self.now_s - float(self.since[i]))
            return f"kept asleep: minimum off time, {left:.0f} s left"
        if code == _WAKES:
            return f"kept asleep: woken {int(self.wakes[i])} times in the last hour (the limit)"
        if code == _ASLEEP_BUDGET:
            node = self.lay.names[int(self.node[i])]
            return f"asleep: {node} budget has {max(float(self.room[i]), 0):.0f} W left"
        if code == _ON_OFF:
            return "on/off only"
        if code == _HELD_MIN:
            return "held at its minimum by override"
        if code == _AT_MAX:
            return "at its maximum"
        if code == _FLOOR_BROKEN:
            w = float(self.floor_w[i])
            return f"contract floor {w:.0f} W broken: the limits leave no room for it"
        return f"bound by {self.lay.names[int(self.node[i])]} budget"
