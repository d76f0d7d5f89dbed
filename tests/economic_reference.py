"""The economic plan as first written: one Python loop over segments in value order.

Kept as the specification the vectorised ``policies.economic.plan`` must match
setpoint for setpoint (tests/test_economic_fast.py); not used by the agent.
"""

from __future__ import annotations

from itertools import pairwise

from capping_reference import wake_blocked
from site_reference import reference_loads_w as domain_loads_w

from siteagent.domain import DeviceKind, DeviceStatus, Limits, Plan, Setpoint, Snapshot
from siteagent.domain.site import DomainTree
from siteagent.policies.capping import MOVABLE_KINDS, max_level_w, min_level_w, pinned_setpoint
from siteagent.policies.economic import EconomicParams, gpu_demand_frac, miner_revenue_usd_per_h
from siteagent.policies.economic_params import gpu_node
from siteagent.policies.prices import Prices


def reference_plan(
    snapshot: Snapshot,
    limits: Limits,
    prices: Prices,
    params: EconomicParams,
    previous: Plan | None = None,
) -> Plan:
    """Plan setpoints (W) that earn most under every domain's capping target."""
    cp = params.capping
    tree = DomainTree(limits)
    pins = {p.device_id: p for p in limits.pins}
    controllable = [d for d in snapshot.devices if d.kind in MOVABLE_KINDS and d.controllable]
    pinned = [
        pinned_setpoint(d, pins[d.device_id])
        for d in controllable
        if d.device_id in pins and not pins[d.device_id].exclude
    ]
    movable = [d for d in controllable if d.device_id not in pins]
    planned_ids = {d.device_id for d in movable} | {d.device_id for d, _ in pinned}
    fixed = [d for d in snapshot.devices if d.device_id not in planned_ids]
    prev = {sp.device_id: sp for sp in previous.setpoints} if previous is not None else {}
    key = limits.directives_key

    # Domain indices, so the inner loop works on lists of floats.
    names = list(tree.limit_w)
    index = {n: i for i, n in enumerate(names)}
    chain_cache: dict[str, tuple[int, ...]] = {}

    def chain(domain: str) -> tuple[int, ...]:
        c = chain_cache.get(domain)
        if c is None:
            c = chain_cache[domain] = tuple(index[n] for n in tree.chain(domain))
        return c

    # Heading load, as the capping policy counts it, decides the mode.
    fixed_items = [(d, d.budget_w) for d in fixed] + [(d, sp.planned_w) for d, sp in pinned]
    heading = domain_loads_w(
        tree,
        [(d, d.budget_w) for d in fixed]
        + [(d, max(sp.planned_w, d.expected_w)) for d, sp in pinned]
        + [
            (d, max(d.expected_w, prev[d.device_id].planned_w))
            if d.device_id in prev
            else (d, d.expected_w)
            for d in movable
        ],
        limits.overhead_w,
    )
    over = [n for n, lim in tree.limit_w.items() if heading[n] > cp.capping_threshold * lim]

    avail = [cp.capping_target * tree.limit_w[n] for n in names]
    for node, w in domain_loads_w(tree, fixed_items, limits.overhead_w).items():
        avail[index[node]] -= w

    elec = prices.electricity_usd_per_kwh
    q = params.value_quantum_usd_per_kwh
    margin = params.keep_margin_usd_per_kwh
    curve = params.gpu_curve
    now = snapshot.time_s
    n_dev = len(movable)
    chains: list[tuple[int, ...]] = [()] * n_dev
    floor_w = [0.0] * n_dev
    level_w = [0.0] * n_dev
    on = [False] * n_dev
    why: list[str] = [""] * n_dev
    best_value: list[float | None] = [None] * n_dev
    # Segment boundaries (W) per device: level after each segment.
    tops: list[list[float]] = [[] for _ in range(n_dev)]
    segments: list[tuple[float, float, int, int]] = []
    seg_w: dict[tuple[int, int], float] = {}
    wake_seg: set[int] = set()

    order = sorted(range(n_dev), key=lambda i: _merit(movable[i]))

    # Caps win over contract floors: every movable device's own minimum counts first,
    # then each GPU's contract above its minimum is kept, in the fixed order, only as
    # far as every domain above it has room under its limit (cut onto its step).
    hard = [tree.limit_w[n] for n in names]
    for node, w in domain_loads_w(tree, fixed_items, limits.overhead_w).items():
        hard[index[node]] -= w
    own_min = [_own_min_w(d) for d in movable]
    for i, d in enumerate(movable):
        for k_i in chain(d.domain):
            hard[k_i] -= own_min[i]
    contract_floor: dict[int, tuple[float, float]] = {}  # device: (kept W, contract W)
    for i in order:
        d = movable[i]
        if d.kind is DeviceKind.MINER:
            continue
        lo = own_min[i]
        contract = params.contract_floor_w.get(d.device_id, 0.0)
        want = d.capabilities.clamp_power_target_w(max(lo, contract)) if contract > lo else lo
        want = max(want, lo)
        if want <= lo:
            continue
        c = chain(d.domain)
        room = min(hard[n] for n in c)
        kept = (
            want if want - lo <= room else d.capabilities.clamp_power_target_w(lo + max(room, 0.0))
        )
        kept = max(kept, lo)
        for n in c:
            hard[n] -= kept - lo
        contract_floor[i] = (kept, want)
    broken = sorted(
        movable[i].device_id for i, (kept, want) in contract_floor.items() if kept < want - 1e-6
    )

    for pos, i in enumerate(order):
        d = movable[i]
        c = chains[i] = chain(d.domain)
        caps = d.capabilities
        sp_prev = prev.get(d.device_id)
        current_w = sp_prev.planned_w if sp_prev is not None else d.expected_w
        if d.kind is DeviceKind.MINER:
            lo, hi = min_level_w(d), max_level_w(d)
            if caps.can_sleep:
                floor, on_floor = d.sleep_power_w, False
            else:
                floor, on_floor = (lo if caps.power_target else hi), True
                why[i] = "cannot sleep, kept at its minimum"
            bounds: list[tuple[float, float, bool]] = []  # (from W, to W, is wake)
            hp = prices.hashprice_usd_per_th_day
            if limits.mining_off:
                why[i] = "mining is off by override"
            elif caps.can_sleep and (blocked := wake_blocked(d, now, cp)) is not None:
                why[i] = blocked
            else:
                if caps.can_sleep:
                    bounds.append((floor, lo if caps.power_target else hi, True))
                if caps.power_target and hi > lo:
                    k = max(1, params.miner_raise_segments)
                    step = (hi - lo) / k
                    bounds.extend((lo + j * step, lo + (j + 1) * step, False) for j in range(k))
            values = []
            sw = params.switching
            for a, b, wake in bounds:
                rev_a = 0.0 if wake else miner_revenue_usd_per_h(d, a, hp)
                rev_b = miner_revenue_usd_per_h(d, b, hp)
                v = (rev_b - rev_a) / ((b - a) / 1000.0) - elec
                if wake and not sw.free:
                    # A wake pays a cycle (an awake miner keeps it): hysteresis by money.
                    v += sw.wake_adjust_usd_per_kwh(
                        sw.wake_s(d.device_id), rev_b, b - a, d.awake is True
                    )
                values.append(v)
        else:
            tdp = max_level_w(d)
            lo = min_level_w(d)
            floor, contract = contract_floor.get(i, (lo, lo))
            on_floor = True
            bounds = []
            values = []
            if limits.ai_min:
                why[i] = "AI held at its minimum by override"
            if floor < contract - 1e-6:
                why[i] = f"contract floor {contract:.0f} W broken: the limits leave no room for it"
            elif not limits.ai_min:
                demand = gpu_demand_frac(d, prices, params)
                want = min(1.0, demand + params.gpu_headroom_frac)  # a share of peak
                need = min(tdp, max(floor, curve.limit_for_w(want, tdp)))
                cuts = sorted(
                    {floor, need}
                    | {
                        x
                        for x in (curve.cliff_frac * tdp, curve.knee_frac * tdp)
                        if floor < x < need
                    }
                )
                ai = prices.ai_usd_per_gpu_hour
                for a, b in pairwise(cuts):
                    gain = ai * (curve.capacity_frac(b, tdp) - curve.capacity_frac(a, tdp))
                    bounds.append((a, b, False))
                    values.append(gain / ((b - a) / 1000.0) - elec)
                if need < tdp:
                    # Above what demand needs: no revenue and (the draw follows demand) no cost.
                    bounds.append((need, tdp, False))
                    values.append(0.0)
                sw = params.switching
                if bounds and floor <= lo and not sw.drains_free:
                    # Its node drains once all its GPUs are at their minimum.
                    node = gpu_node(d.device_id)
                    n_node = sum(
                        1
                        for e in snapshot.devices
                        if e.kind is DeviceKind.GPU and gpu_node(e.device_id) == node
                    )
                    a0, b0, _ = bounds[0]
                    values[0] += sw.drain_adjust_usd_per_kwh(
                        n_node, b0 - a0, current_w > floor + 1e-6
                    )
        floor_w[i] = floor
        level_w[i] = floor
        on[i] = on_floor
        tops[i] = [b for _, b, _ in bounds]
        for j, ((a, b, wake), v) in enumerate(zip(bounds, values, strict=True)):
            if current_w >= b - 1e-6 and (not wake or d.awake is not False):
                v += margin  # the incumbent keeps its place unless beaten by the margin
            if j == 0:
                best_value[i] = v
            if v < 0:
                break  # loss-making from here up (values fall with the level)
            qv = (v // q) * q if q > 0 else v
            segments.append((-qv, pos, j, i))
            seg_w[(i, j)] = b - a
            if wake:
                wake_seg.add(i)
        for k_i in c:
            avail[k_i] -= floor

    segments.sort()
    next_seg = [0] * n_dev
    for _, _, j, i in segments:
        if next_seg[i] != j:
            continue  # an earlier segment of this device did not fit
        c = chains[i]
        w = seg_w[(i, j)]
        room = min(avail[n] for n in c)
        if j == 0 and i in wake_seg:
            reserve = 0.0 if movable[i].awake else params.wake_reserve_w
            if w + reserve <= room:
                for n in c:
                    avail[n] -= w
                on[i] = True
                level_w[i] = tops[i][0]
                next_seg[i] = 1
            else:
                why[i] = f"asleep: {_bound(names, avail, c)} budget has {max(room, 0):.0f} W left"
            continue
        d = movable[i]
        take = w if w <= room else max(room, 0.0)
        # Aim at the segment's top when it fits whole, so float sums never lose a step.
        new_level = d.capabilities.clamp_power_target_w(
            tops[i][j] if take >= w else level_w[i] + take
        )
        if new_level < level_w[i]:
            new_level = level_w[i]
        used = new_level - level_w[i]
        for n in c:
            avail[n] -= used
        level_w[i] = new_level
        if take < w:
            why[i] = f"bound by {_bound(names, avail, c)} budget"
        else:
            next_seg[i] = j + 1

    mode = "cap" if over else "economic"
    setpoints: list[Setpoint] = [sp for _, sp in pinned]
    planned = limits.overhead_w + sum(w for _, w in fixed_items)
    changed = previous is None or previous.directives_key != key
    for rank, i in enumerate(order, start=1):
        d = movable[i]
        lvl, awake = level_w[i], on[i]
        sp_prev = prev.get(d.device_id)
        if (
            sp_prev is not None
            and sp_prev.awake == awake
            and sp_prev.awake
            and 0.0 < lvl - sp_prev.planned_w < params.min_change_w
            and sp_prev.planned_w >= floor_w[i]
        ):
            lvl = sp_prev.planned_w  # too small an increase to be worth a command
        caps = d.capabilities
        target = lvl if awake and caps.power_target else d.power_target_w
        if d.kind is DeviceKind.MINER:
            doing = f"mining at {lvl:.0f} W" if awake else "asleep"
        else:
            doing = f"serving at a {lvl:.0f} W limit"
        bv = best_value[i]
        worth = "no segment to add" if bv is None else f"best segment {bv:+.3f} $/kWh net"
        if not why[i]:
            if bv is not None and bv < 0:
                why[i] = "loses money at current prices, kept at its minimum"
            elif tops[i] and lvl >= tops[i][-1] - 1e-6:
                why[i] = "at its maximum"
            elif next_seg[i] < len(tops[i]) and tops[i]:
                why[i] = "next segment loses money"
        sp = Setpoint(
            d.device_id,
            awake,
            target,
            lvl,
            f"{mode}: {doing} (rank {rank}/{n_dev}, {worth}; {why[i]})",
        )
        if sp_prev is None or (sp_prev.awake, sp_prev.power_target_w) != (
            sp.awake,
            sp.power_target_w,
        ):
            changed = True
        setpoints.append(sp)
        planned += lvl
    if over:
        worst = max(over, key=lambda n: heading[n] / tree.limit_w[n])
        reason = (
            f"{worst} heading for {heading[worst]:.0f} W, above its capping threshold "
            f"{cp.capping_threshold * tree.limit_w[worst]:.0f} W; {prices.note}"
        )
    else:
        reason = f"merit order by net value per kWh under each domain's target; {prices.note}"
    if not over and not changed:
        mode = "hold"
    return Plan(
        snapshot.time_s,
        mode,
        limits.effective_cap_w,
        planned,
        reason,
        tuple(setpoints),
        key,
        tuple(broken),
    )


def _own_min_w(d: DeviceStatus) -> float:
    # A device's floor before any contract: asleep, else its lowest level.
    caps = d.capabilities
    if d.kind is DeviceKind.MINER:
        if caps.can_sleep:
            return d.sleep_power_w
        return min_level_w(d) if caps.power_target else max_level_w(d)
    return min_level_w(d)


def _merit(d: DeviceStatus) -> tuple[int, float, str]:
    # Fixed tie-break order: GPUs, then miners by nameplate J/TH, then id.
    return (0 if d.kind is DeviceKind.GPU else 1, d.efficiency_j_per_th, d.device_id)


def _bound(names: list[str], avail: list[float], c: tuple[int, ...]) -> str:
    return names[min(c, key=lambda n: avail[n])]
