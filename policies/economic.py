"""Economic dispatch: fill each domain's capping target with the loads that earn most per kW.

A pure function of (snapshot, limits, prices, params, previous plan). Every
movable device is cut into *segments* of power above its floor, each with a net
value per kWh (revenue per kWh of that segment minus the electricity price):

- a miner that can sleep has a *wake* segment (sleep -> its minimum target),
  valued at its average revenue per kWh there, then ``miner_raise_segments``
  *raise* segments up to its maximum, valued at their chord slope. Hashrate
  grows as power ** 0.85 (a miner tuned down is more efficient), so the wake
  segment is worth more per kWh than any raise segment above it;
- a GPU sits at its floor (its minimum power limit, or a contract floor), then
  has segments along the throughput-vs-power curve up to the limit that covers
  its expected demand plus a headroom (a share of peak), valued at AI revenue per
  GPU-hour x the capacity each watt adds; the rest up to its maximum is zero-value headroom.

Segments with a negative net value are never taken, so a load that loses money
stays at its minimum (miners asleep, GPUs at their floor). The rest are taken
best-first while every domain above the device has room under its capping
target (Dynamo's target fraction of each limit, as in the capping policy).

Churn on noise is damped three ways: values are quantized to
``value_quantum_usd_per_kwh`` with ties broken by nameplate efficiency and id
(a fixed order); a segment the device already occupies gets
``keep_margin_usd_per_kwh`` added, so a rival must beat it by that much and a
loss-making incumbent is only shed once it loses more than the margin; and an
increase smaller than ``min_change_w`` is not made (decreases always are).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter

import numpy as np
import numpy.typing as npt

from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceState,
    DeviceStatus,
    Limits,
    Plan,
    PlanMode,
    Setpoint,
    SetpointTable,
    Snapshot,
)
from siteagent.domain.site import DomainTree, by_depth, node_loads
from siteagent.domain.table import DeviceStatics, DeviceTable
from siteagent.policies import PolicyState
from siteagent.policies.capping import (
    MOVABLE_KINDS,
    max_level_w,
    pinned_setpoint,
)

# Re-exported: the parameters live apart so that reading them imports no numba.
from siteagent.policies.economic_params import EconomicParams as EconomicParams
from siteagent.policies.economic_params import GpuCurve as GpuCurve
from siteagent.policies.economic_params import PriorityClass as PriorityClass
from siteagent.policies.economic_params import PriorityClasses as PriorityClasses
from siteagent.policies.economic_params import SwitchingCosts as SwitchingCosts
from siteagent.policies.economic_params import gpu_node
from siteagent.policies.fill import (
    CUT,
    SKIPPED,
    WHOLE,
    BoolArr,
    Clamp,
    FloatArr,
    IntArr,
    Segments,
    clamp_w,
    fill,
    jit,
)
from siteagent.policies.floors import floor_map_w, floors_within, wanted_floor_w
from siteagent.policies.prices import Prices

# Hashrate ~ power ** 0.85 (the simulator's model and field reports of tuned-down miners).
HASHRATE_POWER_EXPONENT = 0.85
# A reading at or above this busy fraction only says demand >= capacity.
SATURATED_UTILIZATION = 0.98
HOURS_PER_DAY = 24.0


def miner_revenue_usd_per_h(d: DeviceStatus, level_w: float, hashprice: float) -> float:
    """Revenue ($/h) of a miner mining at ``level_w`` (W), from its nameplate efficiency."""
    if level_w <= 0 or d.nameplate_power_w <= 0:
        return 0.0
    ratio = level_w / d.nameplate_power_w
    ths: float = d.nameplate_hashrate_ths * ratio**HASHRATE_POWER_EXPONENT
    return hashprice / HOURS_PER_DAY * ths


def gpu_demand_frac(d: DeviceStatus, prices: Prices, params: EconomicParams) -> float:
    """Expected GPU demand (fraction of peak): the inference server's, else a fresh
    utilization reading, else the price feed's, else the default."""
    r = d.reading
    if (
        r is not None
        and r.demand_frac is not None
        and d.reading_age_s is not None
        and d.reading_age_s <= params.utilization_fresh_s
    ):
        return r.demand_frac
    if (
        r is not None
        and r.utilization_frac is not None
        and d.reading_age_s is not None
        and d.reading_age_s <= params.utilization_fresh_s
    ):
        limit = d.power_target_w if d.power_target_w is not None else max_level_w(d)
        capacity = params.gpu_curve.capacity_frac(limit, max_level_w(d))
        if r.utilization_frac >= SATURATED_UTILIZATION:
            # Demand is at least what the limit allows: probe upwards by a step, not to the
            # top, so one busy reading does not take the whole room from mining.
            return min(1.0, capacity * params.gpu_probe_factor)
        return r.utilization_frac * capacity
    if prices.ai_demand_frac is not None:
        return prices.ai_demand_frac
    return params.default_utilization_frac


@dataclass(frozen=True, slots=True)
class EconomicPolicy:
    """The economic policy behind the registry's interface.

    Between ticks it keeps what it derived from the devices that rarely change
    (``_Whole``: chains, static columns, the merit order) in the state's
    ``derived``, reused while snapshots bring the very same statics object.
    """

    params: EconomicParams
    name: str = "economic"
    reads_prices: bool = True

    def plan(
        self, snapshot: Snapshot, limits: Limits, prices: Prices | None, state: PolicyState
    ) -> tuple[Plan, PolicyState]:
        """``plan`` against the state's previous plan, reusing what it derived last."""
        if prices is None:
            raise ValueError("the economic policy plans with prices; none were given")
        last = state.derived if isinstance(state.derived, _Whole) else None
        p, whole = _plan(snapshot, limits, prices, self.params, state.previous, last)
        return p, PolicyState(p, whole)


def plan(
    snapshot: Snapshot,
    limits: Limits,
    prices: Prices,
    params: EconomicParams,
    previous: Plan | None = None,
) -> Plan:
    """Plan setpoints (W) that earn most under every domain's capping target."""
    return _plan(snapshot, limits, prices, params, previous, None)[0]


def _plan(
    snapshot: Snapshot,
    limits: Limits,
    prices: Prices,
    params: EconomicParams,
    previous: Plan | None,
    last: _Whole | None,
) -> tuple[Plan, _Whole]:
    """``plan``, reusing ``last`` (what the previous plan derived) where it still holds."""
    cp = params.capping
    tree = DomainTree(limits)
    names = list(tree.names)
    key = limits.directives_key
    pins = {p.device_id: p for p in limits.pins}
    tab = snapshot.table
    if tab is None:
        tab = DeviceTable.of(snapshot.devices, None if last is None else last.statics)
    whole = _whole(tab.statics, limits, tree, names, last)
    movable = tab.controllable & whole.movable_kind
    fixed = ~movable
    pinned: list[tuple[DeviceStatus, Setpoint]] = []
    pinned_rows: list[int] = []
    for i in whole.rows_of(pins):
        d = snapshot.devices[i]
        if movable[i] and not pins[d.device_id].exclude:
            pinned.append(pinned_setpoint(d, pins[d.device_id]))
            pinned_rows.append(i)
            fixed[i] = False
        movable[i] = False
    pinned_nodes = whole.nodes[np.array(pinned_rows, np.intp)]
    st = whole.subset(movable)
    cols = _Columns(tab, st, len(names))
    n = len(st.rows)
    prev = _Previous(previous, cols)
    # What the plan does not move counts at its worst case (pinned: at the pin).
    fixed_w = np.where(fixed, tab.budget_w, 0.0)
    fixed_load = node_loads(whole.nodes, fixed_w, len(names))
    fixed_load[0] += limits.overhead_w  # names[0] is the site
    pinned_w = np.array([sp.planned_w for _, sp in pinned], float)
    fixed_load += node_loads(pinned_nodes, pinned_w, len(names))
    fixed_total_w = float(fixed_w.sum()) + sum(sp.planned_w for _, sp in pinned)
    limit = np.array([tree.limit_w[k] for k in names])

    # Heading load, as the capping policy counts it, decides the mode.
    heading_w = np.where(prev.known, np.maximum(cols.expected_w, prev.planned_w), cols.expected_w)
    heading = cols.node_loads(heading_w) + fixed_load
    # Pins count at the higher of plan and expectation here.
    pinned_up_w = np.array([max(sp.planned_w, d.expected_w) for d, sp in pinned], float) - pinned_w
    heading += node_loads(pinned_nodes, pinned_up_w, len(names))
    over = np.flatnonzero(heading > cp.capping_threshold * limit)

    # Contract floors are kept only within each domain's limit: caps win over floors.
    room_w = limit - fixed_load
    segs = _segments(cols, prev, limits, prices, params, snapshot.time_s, room_w)
    avail = cp.capping_target * limit - fixed_load
    avail -= cols.node_loads(segs.floor_w)
    klass = st.classes(params.priority)
    order = _merit_order(segs, cols.pos, klass, params.value_quantum_usd_per_kwh)
    filled = fill(_stored(segs), cols.chains, avail, segs.floor_w, cols.clamp, cols.nodes, order)
    on = segs.on_floor.copy()
    wake_taken = segs.wake & (filled.status == WHOLE)
    on[segs.device[wake_taken]] = True
    level = filled.level_w

    # Why each device is where it is (made into words only when asked).
    why = segs.why.copy()
    why_node = np.full(n, -1, np.intp)
    why_room = np.zeros(n)
    skipped_wake = segs.wake & (filled.status == SKIPPED)
    cut = filled.status == CUT
    for mask, code in ((skipped_wake, _ASLEEP_BUDGET), (cut, _BOUND)):
        dev = segs.device[mask]
        why[dev] = code
        why_node[dev] = filled.bound_node[dev]
        why_room[dev] = filled.bound_room_w[dev]
    taken_whole = np.bincount(
        segs.device, weights=(filled.status == WHOLE).astype(float), minlength=n
    )
    at_top = (segs.top_w > 0) & (level >= segs.top_w - 1e-6)
    unset = why == _NONE
    best = segs.best_value
    why[unset & ~np.isnan(best) & (best < 0)] = _LOSES
    unset = why == _NONE
    why[unset & at_top] = _AT_MAX
    unset = why == _NONE
    why[unset & (segs.n_bounds > 0) & (taken_whole < segs.n_bounds)] = _NEXT_LOSES

    # An increase smaller than min_change_w is not worth a command.
    small = (
        prev.known
        & prev.awake
        & on
        & (level - prev.planned_w > 0.0)
        & (level - prev.planned_w < params.min_change_w)
        & (prev.planned_w >= segs.floor_w)
    )
    level = np.where(small, prev.planned_w, level)
    target = np.where(on & cols.power_target, level, cols.target_now_w)
    planned = limits.overhead_w + fixed_total_w + float(level.sum())
    changed = (
        previous is None
        or previous.directives_key != key
        or not bool(prev.known.all())
        or bool((prev.awake != on).any())
        or not np.array_equal(prev.target_w, target, equal_nan=True)
    )
    mode = PlanMode.CAP if over.size else PlanMode.ECONOMIC
    if over.size:
        worst = int(over[np.argmax(heading[over] / limit[over])])
        reason = (
            f"{names[worst]} heading for {heading[worst]:.0f} W, above its capping threshold "
            f"{cp.capping_threshold * limit[worst]:.0f} W; {prices.note}"
        )
    else:
        reason = f"merit order by net value per kWh under each domain's target; {prices.note}"
    if not over.size and not changed:
        mode = PlanMode.HOLD
    rank = cols.pos + 1
    texts = _Reasons(
        mode, n, cols, on, level, rank, best, why, why_node, why_room, names, segs.why_aux
    )
    if params.priority is not None and params.priority.classes:
        texts.klass, texts.classes = klass, params.priority
    table = SetpointTable(
        [sp for _, sp in pinned],
        cols.ranked_ids,
        on[cols.order],
        target[cols.order],
        level[cols.order],
        lambda i: texts(int(cols.order[i])),
        st.rows[cols.order],
    )
    broken = tuple(sorted(cols.ids[i] for i in segs.broken.tolist()))
    result = Plan(
        snapshot.time_s, mode, limits.effective_cap_w, planned, reason, table, key, broken
    )
    return result, whole


# Why a device is where it is, as a code per device; words are made on demand.
(
    _NONE,
    _CANNOT_SLEEP,
    _MINING_OFF,
    _MIN_OFF,
    _WAKES,
    _AI_MIN,
    _ASLEEP_BUDGET,
    _BOUND,
    _LOSES,
    _AT_MAX,
    _NEXT_LOSES,
    _FLOOR_BROKEN,
) = range(12)


class _Whole:
    """What a plan derives from a snapshot's ``DeviceStatics`` (every device) under one
    domain tree, and the movable subset of it it last planned (see ``_Static``).

    Building it means reading every device; from one tick to the next nothing in
    it moves, so the last one is kept while snapshots bring the very same statics
    object under the same tree.
    """

    def __init__(
        self, statics: DeviceStatics, key: tuple[object, ...], tree: DomainTree, names: list[str]
    ) -> None:
        n = len(statics)
        self.statics, self.key = statics, key
        domains, dom_idx = statics.domain_codes
        table = tree.chains(domains)
        self.chains = table[dom_idx] if n else np.zeros((0, table.shape[1]), np.intp)
        self.nodes = by_depth(self.chains, len(names))
        kinds, caps = statics.kinds, statics.capabilities
        self.is_gpu = np.fromiter((k is DeviceKind.GPU for k in kinds), bool, n)
        self.movable_kind = np.fromiter((k in MOVABLE_KINDS for k in kinds), bool, n)
        self.power_target = np.fromiter(map(_POWER_TARGET, caps), bool, n)
        self.cap_min = _floats(map(_CAP_MIN, caps), n)
        self.cap_max = _floats(map(_CAP_MAX, caps), n)
        self.cap_step = _floats(map(_CAP_STEP, caps), n)
        self.can_sleep = np.fromiter(map(_CAN_SLEEP, caps), bool, n)
        self.nameplate_w = statics.nameplate_power_w
        self.hashrate_ths = statics.nameplate_hashrate_ths
        self.sleep_w = statics.sleep_power_w
        # Levels as capping.min_level_w / max_level_w define them.
        self.lo_w = np.where(
            self.power_target & ~np.isnan(self.cap_min), self.cap_min, self.nameplate_w
        )
        self.hi_w = np.where(
            self.power_target & ~np.isnan(self.cap_max), self.cap_max, self.nameplate_w
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            self.eff = np.where(self.hashrate_ths > 0, self.nameplate_w / self.hashrate_ths, np.inf)
        self.by_id = np.empty(n, np.intp)
        self.by_id[sorted(range(n), key=statics.ids.__getitem__)] = np.arange(n)
        # Per GPU: how many GPUs its node has (a drain is the node's); 0 for the rest.
        nodes = [gpu_node(d) if g else "" for d, g in zip(statics.ids, self.is_gpu, strict=True)]
        counts = Counter(nodes)
        self.node_gpus = np.array([counts[k] if k else 0 for k in nodes], float).reshape(n)
        self._subset: _Static | None = None

    def rows_of(self, ids: Iterable[str]) -> list[int]:
        """The rows of those of ``ids`` present, in row order."""
        rows = self.statics.rows
        return sorted(rows[d] for d in ids if d in rows)

    def subset(self, movable: BoolArr) -> _Static:
        """The movable devices' static columns; the last ones while ``movable`` is the same."""
        last = self._subset
        if last is not None and np.array_equal(last.mask, movable):
            return last
        self._subset = built = _Static(self, movable)
        return built


def _whole(
    statics: DeviceStatics,
    limits: Limits,
    tree: DomainTree,
    names: list[str],
    last: _Whole | None,
) -> _Whole:
    """``last`` while it was derived from the very same statics under the same tree."""
    key = (tuple(names), tuple((d.domain_id, d.parent) for d in limits.domains))
    if last is not None and last.statics is statics and last.key == key:
        return last
    return _Whole(statics, key, tree, names)


class _Static:
    """The movable devices' columns that do not move from tick to tick, and their merit
    order: a fixed tie-break, GPUs first, then miners by nameplate J/TH, then id."""

    def __init__(self, whole: _Whole, movable: BoolArr) -> None:
        self.mask = movable.copy()
        r = self.rows = np.flatnonzero(movable)
        n = len(r)
        statics = whole.statics
        self.ids = _pick(statics.ids, r)
        self._domains: list[str] | None = None
        self._statics = statics
        self.chains, self.nodes = whole.chains[r], whole.nodes[r]
        self.is_gpu, self.power_target = whole.is_gpu[r], whole.power_target[r]
        self.cap_min, self.cap_max = whole.cap_min[r], whole.cap_max[r]
        self.can_sleep = whole.can_sleep[r]
        self.clamp = Clamp(self.cap_min, self.cap_max, whole.cap_step[r])
        self.nameplate_w, self.hashrate_ths = whole.nameplate_w[r], whole.hashrate_ths[r]
        self.sleep_w, self.lo_w, self.hi_w = whole.sleep_w[r], whole.lo_w[r], whole.hi_w[r]
        self.node_gpus = whole.node_gpus[r]
        self.order = np.lexsort((whole.by_id[r], whole.eff[r], ~self.is_gpu))
        self.gpus_ranked = self.order[self.is_gpu[self.order]]
        self.pos = np.empty(n, np.intp)
        self.pos[self.order] = np.arange(n)
        self.ranked_ids = _pick(self.ids, self.order)
        self._layouts: dict[int, _MinerLayout] = {}
        self._classes: tuple[PriorityClasses, IntArr] | None = None
        self._wake_s: tuple[SwitchingCosts, FloatArr] | None = None

    def wake_s(self, sw: SwitchingCosts) -> FloatArr:
        """Each device's wake time (s) under ``sw``; worked out once per ``sw``."""
        kept = self._wake_s
        if kept is not None and kept[0] is sw:
            return kept[1]
        if sw.wake_s_by_device:
            wake = np.fromiter(map(sw.wake_s, self.ids), float, len(self.ids))
        else:
            wake = np.full(len(self.ids), sw.miner_wake_s)
        self._wake_s = (sw, wake)
        return wake

    def miner_layout(self, k: int) -> _MinerLayout:
        """The miners' segment bounds with ``k`` raises each (see ``_MinerLayout``)."""
        lay = self._layouts.get(k)
        if lay is None:
            lay = self._layouts[k] = _MinerLayout(self, k)
        return lay

    def classes(self, priority: PriorityClasses | None) -> IntArr:
        """Each device's priority class (0 first); all 0 when no classes are configured."""
        n = len(self.ids)
        if priority is None or not priority.classes:
            return np.zeros(n, np.intp)
        kept = self._classes
        if kept is not None and kept[0] is priority:
            return kept[1]
        if self._domains is None:
            self._domains = _pick(self._statics.domains, self.rows)
        klass = np.fromiter(map(priority.class_of, self.ids, self._domains), np.intp, n)
        self._classes = (priority, klass)
        return klass


def _pick(values: Sequence[str], rows: IntArr) -> list[str]:
    """``values`` at ``rows``, as a list."""
    if len(rows) > 1:
        return list(itemgetter(*rows.tolist())(values))
    return [values[k] for k in rows.tolist()]


_POWER_TARGET = attrgetter("power_target")
_CAP_MIN = attrgetter("power_target_min_w")
_CAP_MAX = attrgetter("power_target_max_w")
_CAP_STEP = attrgetter("power_target_step_w")
_CAN_SLEEP = attrgetter("can_sleep")


def _floats(values: Iterable[float | None], n: int) -> FloatArr:
    """A float column; None becomes NaN."""
    return np.array(list(values), float).reshape(n)


class _MinerLayout:
    """Every miner's segments as bounds that do not move from tick to tick (rows: miners).

    A miner that sleeps has a wake (sleep -> its minimum), one with a power target
    and a range ``k`` equal raises after it; a miner that cannot wake has its raises
    first, so each row's bounds are leftmost (NaN after). The hashrate at each bound
    (``ths_a``, ``ths_b``; nothing below a wake) is kept too: revenue is the
    hashprice times it, so a tick only scales it.
    """

    def __init__(self, st: _Static, k: int) -> None:
        m = self.rows = st.order[~st.is_gpu[st.order]]  # in merit order
        sleeps = st.can_sleep[m]
        lo, hi, pt = st.lo_w[m], st.hi_w[m], st.power_target[m]
        self.a_w = np.full((len(m), 1 + k), np.nan)
        self.b_w = np.full((len(m), 1 + k), np.nan)
        self.wake = np.zeros((len(m), 1 + k), bool)
        w_rows = np.flatnonzero(sleeps)
        self.a_w[w_rows, 0] = st.sleep_w[m][w_rows]
        self.b_w[w_rows, 0] = np.where(pt, lo, hi)[w_rows]
        self.wake[w_rows, 0] = True
        rows = np.flatnonzero(pt & (hi > lo))
        step = (hi[rows] - lo[rows]) / k
        first = np.where(sleeps[rows], 1, 0)
        for j in range(k):
            self.a_w[rows, first + j] = lo[rows] + j * step
            self.b_w[rows, first + j] = lo[rows] + (j + 1) * step
        nameplate, hashrate = st.nameplate_w[m], st.hashrate_ths[m]
        self.ths_b = _hashrate_at(nameplate, hashrate, self.b_w)
        self.ths_a = np.where(self.wake, 0.0, _hashrate_at(nameplate, hashrate, self.a_w))
        self.lo_w, self.hi_w, self.step_w = st.clamp.lo_w[m], st.clamp.hi_w[m], st.clamp.step_w[m]
        self._values: tuple[float, float, FloatArr] | None = None

    def values(self, hashprice_usd_per_th_day: float, elec_usd_per_kwh: float) -> FloatArr:
        """Net value ($/kWh) of every segment at these prices; kept while they hold."""
        kept = self._values
        if kept is not None and kept[:2] == (hashprice_usd_per_th_day, elec_usd_per_kwh):
            return kept[2]
        hp24 = hashprice_usd_per_th_day / HOURS_PER_DAY
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = hp24 * self.ths_b - hp24 * self.ths_a
            v: FloatArr = gain / ((self.b_w - self.a_w) / 1000.0) - elec_usd_per_kwh
        self._values = (hashprice_usd_per_th_day, elec_usd_per_kwh, v)
        return v


class _Columns:
    """The movable devices as arrays: the static part (see ``_Static``) and this tick's."""

    def __init__(self, tab: DeviceTable, st: _Static, n_nodes: int) -> None:
        self.static = st
        self.n_nodes = n_nodes
        self.ids = st.ids
        self.chains, self.nodes = st.chains, st.nodes
        self.is_gpu, self.power_target = st.is_gpu, st.power_target
        self.cap_min, self.cap_max, self.can_sleep = st.cap_min, st.cap_max, st.can_sleep
        self.clamp, self.nameplate_w, self.hashrate_ths = st.clamp, st.nameplate_w, st.hashrate_ths
        self.sleep_w, self.lo_w, self.hi_w = st.sleep_w, st.lo_w, st.hi_w
        self.order, self.pos, self.ranked_ids = st.order, st.pos, st.ranked_ids
        self.gpus_ranked = st.gpus_ranked
        r = st.rows
        self.expected_w = tab.expected_w[r]
        awake = tab.awake[r]
        self.awake_true, self.awake_false = awake == 1, awake == 0
        self.since_s = tab.last_transition_s[r]
        self.wakes = tab.wakes_last_hour[r]
        self.target_now_w = tab.power_target_w[r]
        # A GPU's utilization counts only with the age of the reading it came with.
        util, age = tab.utilization_frac[r], tab.reading_age_s[r]
        both = st.is_gpu & ~np.isnan(util) & ~np.isnan(age)
        self.util = np.where(both, util, np.nan)
        self.age_s = np.where(both, age, np.nan)
        # What the inference server asks for, where its endpoint was read (NaN: not).
        served = np.full(len(r), np.nan) if tab.demand_frac is None else tab.demand_frac[r]
        self.demand = np.where(st.is_gpu & ~np.isnan(age), served, np.nan)
        self.demand_age_s = np.where(np.isnan(self.demand), np.nan, age)

    def node_loads(self, w: FloatArr) -> FloatArr:
        """Per node: the sum of ``w`` (per device) over the devices below it."""
        return node_loads(self.nodes, w, self.n_nodes)


class _Previous:
    """The previous plan's setpoint per movable device, as arrays (NaN where unknown)."""

    def __init__(self, previous: Plan | None, cols: _Columns) -> None:
        n = len(cols.ids)
        self.known = np.zeros(n, bool)
        self.awake = np.zeros(n, bool)
        self.target_w = np.full(n, np.nan)
        self.planned_w = np.full(n, np.nan)
        if previous is None:
            return
        sps = previous.setpoints
        if isinstance(sps, SetpointTable) and not sps.head and list(sps.ids) == cols.ranked_ids:
            # The same devices in the same order as last time: the columns line up.
            self.known[:] = True
            self.awake[:] = np.asarray(sps.awake, bool)[cols.pos]
            self.target_w[:] = np.asarray(sps.power_target_w, float)[cols.pos]
            self.planned_w[:] = np.asarray(sps.planned_w, float)[cols.pos]
            return
        by_id = {sp.device_id: sp for sp in sps}
        for i, d in enumerate(cols.ids):
            sp = by_id.get(d)
            if sp is not None:
                self.known[i] = True
                self.awake[i] = sp.awake
                self.target_w[i] = np.nan if sp.power_target_w is None else sp.power_target_w
                self.planned_w[i] = sp.planned_w


def _merit_order(segs: _Segs, pos: IntArr, klass: IntArr, quantum: float) -> IntArr:
    """Segments in the order offered: by priority class, value (best first), the device's
    place in the fixed order, then the device's own order.

    Segments are built in the fixed order, each device's in its own order, so the
    last two keys are the order of building and a stable sort by the first two
    (whole quanta of value, a small integer) gives the rest: a radix sort where
    they fit 16 bits, about a millisecond at 150,000 segments. A four-key
    ``lexsort`` stays for values that are not whole quanta.
    """
    dev, j = segs.device, segs.j
    if quantum > 0 and len(dev) and np.isfinite(segs.value_q).all():
        steps = np.rint(-segs.value_q / quantum).astype(np.int64)
        steps -= steps.min()
        key = klass[dev].astype(np.int64) * (int(steps.max()) + 1) + steps
        if int(key.max()) < 2**16:
            return np.argsort(key.astype(np.uint16), kind="stable")
        return np.argsort(key, kind="stable")
    return np.lexsort((j, pos[dev], -segs.value_q, klass[dev]))


class _Segs:
    """Every device's segments (one row each), and per device its floor and first value."""

    def __init__(self, n: int) -> None:
        self.floor_w = np.zeros(n)
        self.on_floor = np.zeros(n, bool)
        self.why = np.full(n, _NONE, np.int8)
        self.why_aux = np.zeros(n)
        self.best_value = np.full(n, np.nan)
        self.top_w = np.zeros(n)
        self.n_bounds = np.zeros(n, np.intp)
        self.device = np.zeros(0, np.intp)
        self.j = np.zeros(0, np.intp)
        self.a_w = np.zeros(0)
        self.b_w = np.zeros(0)
        self.wake = np.zeros(0, bool)
        self.value_q = np.zeros(0)
        self.level_w = np.zeros(0)
        self.reserve_w = np.zeros(0)
        self.broken = np.zeros(0, np.intp)  # devices whose contract floor did not fit


def _stored(s: _Segs) -> Segments:
    """The segments as ``fill`` takes them, in build order (a device's in a row)."""
    # The previous segment of the same device is the row before.
    has = s.j > 0
    pred = np.where(has, np.arange(len(s.device)) - 1, -1)
    level_before = np.where(has, s.level_w[np.maximum(pred, 0)], s.floor_w[s.device])
    return Segments(
        device=s.device,
        width_w=s.b_w - s.a_w,
        level_w=s.level_w,
        added_w=s.level_w - level_before,
        reserve_w=s.reserve_w,
        all_or_nothing=s.wake,
        pred=pred,
    )


def _segments(
    cols: _Columns,
    prev: _Previous,
    limits: Limits,
    prices: Prices,
    params: EconomicParams,
    now_s: float,
    room_w: FloatArr,
) -> _Segs:
    """Cut every device's power above its floor into valued segments (see the module doc)."""
    n = len(cols.ids)
    cp = params.capping
    s = _Segs(n)
    elec = prices.electricity_usd_per_kwh
    miner = ~cols.is_gpu
    lo, hi = cols.lo_w, cols.hi_w

    # Miners: asleep (or at the minimum when they cannot sleep), a wake, k raises.
    sleeps = miner & cols.can_sleep
    s.floor_w = np.where(sleeps, cols.sleep_w, np.where(cols.power_target, lo, hi))
    s.on_floor = ~sleeps
    s.why[miner & ~cols.can_sleep] = _CANNOT_SLEEP
    left_s = cp.min_off_s - (now_s - cols.since_s)
    min_off = (
        sleeps & cols.awake_false & ~np.isnan(cols.since_s) & (now_s - cols.since_s < cp.min_off_s)
    )
    too_many = (
        sleeps & ~min_off & (cp.max_wakes_per_hour > 0) & (cols.wakes >= cp.max_wakes_per_hour)
    )
    s.why[min_off], s.why_aux[min_off] = _MIN_OFF, left_s[min_off]
    s.why[too_many], s.why_aux[too_many] = _WAKES, cols.wakes[too_many]
    if limits.mining_off:
        s.why[miner] = _MINING_OFF
        active = np.zeros(n, bool)
    else:
        active = miner & ~min_off & ~too_many
    k = max(1, params.miner_raise_segments)
    lay = cols.static.miner_layout(k)
    m = lay.rows
    v = lay.values(prices.hashprice_usd_per_th_day, elec)
    if not params.switching.free:
        v = _with_switching(cols, lay, v, params.switching, prices.hashprice_usd_per_th_day)

    # GPUs: at the floor, segments along the curve up to what demand needs, headroom above.
    # Built in the fixed merit order (GPUs, then miners, each in that order), a device's
    # segments in a row: the tie-break of the offer order is the order of building.
    g = cols.gpus_ranked
    out = _SegBuffers(4 * len(g) + lay.a_w.size)
    end = 0
    if g.size:
        ga, gb, gv = _gpu_segments(cols, s, g, limits, prices, params, room_w, prev)
        c = cols.clamp
        gpus = _Rows(g, ga, gb, gv, np.zeros(ga.shape, bool), c.lo_w[g], c.hi_w[g], c.step_w[g])
        end = _block(s, cols, prev, params, gpus, np.ones(len(g), bool), out, end)
    miners = _Rows(m, lay.a_w, lay.b_w, v, lay.wake, lay.lo_w, lay.hi_w, lay.step_w)
    end = _block(s, cols, prev, params, miners, active[m], out, end)
    s.device, s.j, s.a_w, s.b_w = out.device[:end], out.j[:end], out.a_w[:end], out.b_w[:end]
    s.wake, s.value_q, s.level_w = out.wake[:end], out.value_q[:end], out.level_w[:end]
    s.reserve_w = np.where(cols.awake_true[s.device], 0.0, params.wake_reserve_w)
    return s


def _with_switching(
    cols: _Columns, lay: _MinerLayout, v: FloatArr, sw: SwitchingCosts, hashprice: float
) -> FloatArr:
    """The miners' segment values with switching costs on their wakes (a copy; rows: miners)."""
    m = lay.rows
    wake = lay.wake[:, 0]
    rev_lo = hashprice / HOURS_PER_DAY * lay.ths_b[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        adjust = sw.wake_adjust_usd_per_kwh(
            cols.static.wake_s(sw)[m], rev_lo, lay.b_w[:, 0] - lay.a_w[:, 0], cols.awake_true[m]
        )
    out = v.copy()
    out[wake, 0] += adjust[wake]
    return out


@dataclass(frozen=True, slots=True)
class _Rows:
    """One kind's devices and their segment bounds (a row each, NaN after the last)."""

    dev: IntArr
    a_w: FloatArr
    b_w: FloatArr
    value: FloatArr
    wake: BoolArr
    lo_w: FloatArr  # where a device's power target may land: range and step
    hi_w: FloatArr
    step_w: FloatArr


class _SegBuffers:
    """Room for every segment offered, filled block after block."""

    def __init__(self, n: int) -> None:
        self.device = np.empty(n, np.intp)
        self.j = np.empty(n, np.intp)
        self.a_w = np.empty(n)
        self.b_w = np.empty(n)
        self.wake = np.empty(n, np.bool_)
        self.value_q = np.empty(n)
        self.level_w = np.empty(n)


def _block(
    s: _Segs,
    cols: _Columns,
    prev: _Previous,
    params: EconomicParams,
    rows: _Rows,
    active: BoolArr,
    out: _SegBuffers,
    start: int,
) -> int:
    """Offer the segments of ``rows`` (those ``active``) into ``out`` from ``start``; per
    device its first value, top and count into ``s``. Returns where the next block starts."""
    dev = rows.dev
    # The incumbent keeps its place unless beaten by the margin.
    current = np.where(prev.known[dev], prev.planned_w[dev], cols.expected_w[dev])
    m = len(dev)
    n_bounds = np.zeros(m, np.intp)
    best, top = np.full(m, np.nan), np.zeros(m)
    end = _block_loop(
        dev,
        np.ascontiguousarray(rows.a_w),
        np.ascontiguousarray(rows.b_w),
        np.ascontiguousarray(rows.value),
        np.ascontiguousarray(rows.wake),
        active,
        current,
        cols.awake_false[dev],
        s.floor_w[dev],
        rows.lo_w,
        rows.hi_w,
        rows.step_w,
        params.keep_margin_usd_per_kwh,
        params.value_quantum_usd_per_kwh,
        n_bounds,
        best,
        top,
        start,
        out.device,
        out.j,
        out.a_w,
        out.b_w,
        out.wake,
        out.value_q,
        out.level_w,
    )
    s.n_bounds[dev], s.best_value[dev], s.top_w[dev] = n_bounds, best, top
    return int(end)


def _block_rows(
    dev: IntArr,
    a: FloatArr,
    b: FloatArr,
    v: FloatArr,
    wake: BoolArr,
    active: BoolArr,
    current: FloatArr,
    awake_false: BoolArr,
    floor_w: FloatArr,
    lo_w: FloatArr,
    hi_w: FloatArr,
    step_w: FloatArr,
    keep_margin: float,
    quantum: float,
    n_bounds: IntArr,
    best: FloatArr,
    top: FloatArr,
    start: int,
    o_dev: IntArr,
    o_j: IntArr,
    o_a: FloatArr,
    o_b: FloatArr,
    o_wake: BoolArr,
    o_q: FloatArr,
    o_level: FloatArr,
) -> int:
    """``_block``'s loop, one device (row) at a time; returns where its segments end.

    Per row, bounds run left to right (NaN after the last); an inactive row has none.
    A bound the device already holds gets the keep margin; the segments offered are
    those before the first loss-making one, each landing on its top (a wake) or on
    the device's step.
    """
    count = start
    for i in range(a.shape[0]):
        if not active[i]:
            continue  # no bounds: count 0, no value, top 0 (as set by the caller)
        before = floor_w[i]
        offering = True
        nb = 0
        for j in range(a.shape[1]):
            if np.isnan(a[i, j]):
                offering = False
                continue
            nb += 1
            val = v[i, j]
            if current[i] >= b[i, j] - 1e-6 and (not wake[i, j] or not awake_false[i]):
                val += keep_margin
            if j == 0:
                best[i] = val
            if not offering or val < 0:
                offering = False
                continue
            if wake[i, j]:
                lvl = b[i, j]
            else:
                lvl = max(clamp_w(b[i, j], lo_w[i], hi_w[i], step_w[i]), before)
            before = lvl
            o_dev[count], o_j[count] = dev[i], j
            o_a[count], o_b[count] = a[i, j], b[i, j]
            o_q[count] = (val // quantum) * quantum if quantum > 0 else val
            o_level[count] = lvl
            o_wake[count] = wake[i, j]
            count += 1
        n_bounds[i] = nb
        top[i] = b[i, nb - 1] if nb > 0 else 0.0
    return count


_block_loop = jit(_block_rows)


def _hashrate_at(nameplate_w: FloatArr, hashrate_ths: FloatArr, level_w: FloatArr) -> FloatArr:
    """A miner's hashrate (TH/s) at each level, as ``miner_revenue_usd_per_h`` counts it
    (rows: devices); 0 at no power."""
    nameplate = nameplate_w[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ths = hashrate_ths[:, None] * (level_w / nameplate) ** HASHRATE_POWER_EXPONENT
    return np.where((level_w > 0) & (nameplate > 0), ths, 0.0)


def _gpu_segments(
    cols: _Columns,
    s: _Segs,
    g: IntArr,
    limits: Limits,
    prices: Prices,
    params: EconomicParams,
    room_w: FloatArr,
    prev: _Previous,
) -> tuple[FloatArr, FloatArr, FloatArr]:
    """The GPUs' floors (into ``s``), and their segments' bounds and values (rows: ``g``).

    ``room_w`` is each node's limit less what the plan does not move (W).
    """
    curve = params.gpu_curve
    a = np.full((len(g), 4), np.nan)
    b = np.full((len(g), 4), np.nan)
    v = np.full((len(g), 4), np.nan)
    tdp, lo = cols.hi_w[g], cols.lo_w[g]
    floor = lo.copy()
    broken = np.zeros(len(g), bool)
    floors_w = floor_map_w(limits, params.contract_floor_w)
    if floors_w:
        c = cols.clamp
        clamp = (c.lo_w, c.hi_w, c.step_w)
        contract_w = wanted_floor_w(cols.ids, g, cols.lo_w, clamp, floors_w)
        # Caps win over floors: every movable device's own minimum is counted first.
        avail = room_w - cols.node_loads(s.floor_w)
        floor, broken = floors_within(g, lo, contract_w, clamp, cols.nodes, avail)
        s.why_aux[g[broken]] = contract_w[broken]
    s.floor_w[g] = floor
    s.on_floor[g] = True
    s.broken = g[broken]
    if limits.ai_min:
        s.why[g] = _AI_MIN
    s.why[g[broken]] = _FLOOR_BROKEN
    if limits.ai_min:
        return a, b, v
    demand = _gpu_demand(cols, g, prices, params)
    # Headroom in fractions of peak, not of demand: see EconomicParams.gpu_headroom_frac.
    want = np.minimum(1.0, demand + params.gpu_headroom_frac)
    need = np.minimum(tdp, np.maximum(floor, _limit_for(curve, want, tdp)))
    cliff, knee = curve.cliff_frac * tdp, curve.knee_frac * tdp
    pts = np.stack(
        [
            floor,
            np.where((floor < cliff) & (cliff < need), cliff, np.nan),
            np.where((floor < knee) & (knee < need), knee, np.nan),
            np.where(need > floor, need, np.nan),
        ],
        axis=1,
    )
    pts = np.sort(pts, axis=1)  # NaN last: the cut points in order
    ai, elec = prices.ai_usd_per_gpu_hour, prices.electricity_usd_per_kwh
    for j in range(3):
        x, y = pts[:, j], pts[:, j + 1]
        ok = ~np.isnan(y)
        gain = ai * (_capacity(curve, y, tdp) - _capacity(curve, x, tdp))
        with np.errstate(divide="ignore", invalid="ignore"):
            val = gain / ((y - x) / 1000.0) - elec
        a[ok, j], b[ok, j], v[ok, j] = x[ok], y[ok], val[ok]
    # Above what demand needs: no revenue and (the draw follows demand) no cost.
    n_cuts = (~np.isnan(pts)).sum(axis=1) - 1
    head = np.flatnonzero(need < tdp)
    at = n_cuts[head]
    a[head, at], b[head, at], v[head, at] = need[head], tdp[head], 0.0
    sw = params.switching
    if not sw.drains_free:
        # A GPU at its own minimum (no contract above it) may leave its node drained.
        current = np.where(prev.known[g], prev.planned_w[g], cols.expected_w[g])
        own = floor <= lo
        with np.errstate(divide="ignore", invalid="ignore"):
            adjust = sw.drain_adjust_usd_per_kwh(
                cols.static.node_gpus[g], b[:, 0] - a[:, 0], current > floor + 1e-6
            )
        v[own, 0] += adjust[own]
    # A GPU whose floor was cut has no room above it: nothing to offer.
    a[broken], b[broken], v[broken] = np.nan, np.nan, np.nan
    return a, b, v


def _capacity(curve: GpuCurve, limit_w: FloatArr, tdp_w: FloatArr) -> FloatArr:
    """``GpuCurve.capacity_frac``, vectorised."""
    r = limit_w / tdp_w
    slope = (1.0 - curve.capacity_at_cliff) / (curve.knee_frac - curve.cliff_frac)
    mid = 1.0 - (curve.knee_frac - r) * slope
    low = np.maximum(0.0, curve.capacity_at_cliff - (curve.cliff_frac - r) * curve.cliff_slope)
    return np.where(r >= curve.knee_frac, 1.0, np.where(r >= curve.cliff_frac, mid, low))


def _limit_for(curve: GpuCurve, capacity: FloatArr, tdp_w: FloatArr) -> FloatArr:
    """``GpuCurve.limit_for_w``, vectorised."""
    slope = (1.0 - curve.capacity_at_cliff) / (curve.knee_frac - curve.cliff_frac)
    mid = (curve.knee_frac - (1.0 - capacity) / slope) * tdp_w
    r = curve.cliff_frac - (curve.capacity_at_cliff - capacity) / curve.cliff_slope
    low = np.maximum(0.0, r) * tdp_w
    top = curve.knee_frac * tdp_w
    return np.where(capacity >= 1.0, top, np.where(capacity >= curve.capacity_at_cliff, mid, low))


def _gpu_demand(cols: _Columns, g: IntArr, prices: Prices, params: EconomicParams) -> FloatArr:
    """``gpu_demand_frac`` for the GPUs ``g``, vectorised."""
    util, age, served = cols.util[g], cols.age_s[g], cols.demand[g]
    fresh = ~np.isnan(util) & ~np.isnan(age) & (age <= params.utilization_fresh_s)
    tdp = cols.hi_w[g]
    limit = np.where(np.isnan(cols.target_now_w[g]), tdp, cols.target_now_w[g])
    capacity = _capacity(params.gpu_curve, limit, tdp)
    measured = np.where(
        util >= SATURATED_UTILIZATION,
        np.minimum(1.0, capacity * params.gpu_probe_factor),
        util * capacity,
    )
    if prices.ai_demand_frac is not None:
        default = prices.ai_demand_frac
    else:
        default = params.default_utilization_frac
    busy = np.where(fresh, measured, default)
    # The inference server's own demand, where freshly read, before busy % (its fallback).
    served_age = cols.demand_age_s[g]
    use = ~np.isnan(served) & (served_age <= params.utilization_fresh_s)
    return np.where(use, served, busy)


class _Reasons:
    """Words for one device's setpoint, made from the plan's columns when asked for."""

    klass: IntArr | None = None
    classes: PriorityClasses | None = None

    def __init__(
        self,
        mode: str,
        n: int,
        cols: _Columns,
        on: BoolArr,
        level: FloatArr,
        rank: IntArr,
        best: FloatArr,
        why: npt.NDArray[np.int8],
        why_node: IntArr,
        why_room: FloatArr,
        names: list[str],
        why_aux: FloatArr,
    ) -> None:
        self.mode, self.n, self.cols, self.on, self.level = mode, n, cols, on, level
        self.rank, self.best, self.why, self.why_node = rank, best, why, why_node
        self.why_room, self.names, self.why_aux = why_room, names, why_aux

    def __call__(self, i: int) -> str:
        lvl = float(self.level[i])
        if self.cols.is_gpu[i]:
            doing = f"serving at a {lvl:.0f} W limit"
        else:
            doing = f"mining at {lvl:.0f} W" if self.on[i] else "asleep"
        bv = float(self.best[i])
        worth = "no segment to add" if bv != bv else f"best segment {bv:+.3f} $/kWh net"
        if self.klass is not None and self.classes is not None:
            worth = f"priority {self.classes.name(int(self.klass[i]))}, {worth}"
        return f"{self.mode}: {doing} (rank {int(self.rank[i])}/{self.n}, {worth}; {self._why(i)})"

    def _why(self, i: int) -> str:
        code = int(self.why[i])
        node = self.names[int(self.why_node[i])] if self.why_node[i] >= 0 else "site"
        aux, room = float(self.why_aux[i]), float(self.why_room[i])
        return {
            _NONE: "",
            _CANNOT_SLEEP: "cannot sleep, kept at its minimum",
            _MINING_OFF: "mining is off by override",
            _MIN_OFF: f"kept asleep: minimum off time, {aux:.0f} s left",
            _WAKES: f"kept asleep: woken {aux:.0f} times in the last hour (the limit)",
            _AI_MIN: "AI held at its minimum by override",
            _ASLEEP_BUDGET: f"asleep: {node} budget has {max(room, 0):.0f} W left",
            _BOUND: f"bound by {node} budget",
            _LOSES: "loses money at current prices, kept at its minimum",
            _AT_MAX: "at its maximum",
            _NEXT_LOSES: "next segment loses money",
            _FLOOR_BROKEN: f"contract floor {aux:.0f} W broken: the limits leave no room for it",
        }[code]


def warm_up() -> None:
    """Compile the plan's kernels now (about 2 s uncached), not in the first tick."""
    caps = DeviceControls(
        power_target=True, power_target_min_w=1000.0, power_target_max_w=3000.0, can_sleep=True
    )
    d = DeviceStatus(
        "warm-up",
        DeviceKind.MINER,
        "site",
        DeviceState.MINING,
        3000.0,
        100.0,
        20.0,
        caps,
        3000.0,
        3000.0,
        True,
        power_target_w=3000.0,
        awake=True,
    )
    g = DeviceStatus(
        "warm-up-gpu",
        DeviceKind.GPU,
        "site",
        DeviceState.RUNNING,
        700.0,
        0.0,
        0.0,
        DeviceControls(power_target=True, power_target_min_w=200.0, power_target_max_w=700.0),
        700.0,
        700.0,
        True,
        power_target_w=700.0,
        awake=True,
    )
    limits = Limits(3000.0, 2000.0, "warm-up")
    plan(Snapshot(0.0, (d, g)), limits, Prices(0.05, 0.05, 2.0), EconomicParams())
