"""The capping plan as first written: one device at a time, over ``DeviceStatus`` objects.

Kept as the specification the columnar ``policies.capping.plan`` must match
setpoint for setpoint, reasons included (tests/test_capping_fast.py); not used
by the agent. The rule (three bands, merit-order fill domain by domain, pins,
wake limits, contract floors) is described in policies/capping.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from siteagent.domain import (
    DeviceKind,
    DeviceStatus,
    Limits,
    Plan,
    PlanMode,
    Setpoint,
    Snapshot,
)
from siteagent.domain.site import SITE, DomainTree, domain_codes, domain_loads_w
from siteagent.policies.capping import (
    KIND_RANK,
    MOVABLE_KINDS,
    CappingParams,
    max_level_w,
    min_level_w,
    pinned_setpoint,
)


def wake_blocked(d: DeviceStatus, now_s: float, params: CappingParams) -> str | None:
    """Why an asleep miner may not be woken now (no flapping), or None if it may."""
    since = d.last_transition_s
    if d.awake is False and since is not None and now_s - since < params.min_off_s:
        return f"kept asleep: minimum off time, {params.min_off_s - (now_s - since):.0f} s left"
    if params.max_wakes_per_hour and d.wakes_last_hour >= params.max_wakes_per_hour:
        return f"kept asleep: woken {d.wakes_last_hour} times in the last hour (the limit)"
    return None


def _loads_w(
    tree: DomainTree, items: Sequence[tuple[DeviceStatus, float]], overhead_w: float
) -> dict[str, float]:
    """Per node: the power (W) of ``items`` below it, the overhead at the site."""
    names, code = domain_codes([d.domain for d, _ in items])
    return domain_loads_w(tree, names, code, [w for _, w in items], overhead_w)


def reference_plan(
    snapshot: Snapshot, limits: Limits, params: CappingParams, previous: Plan | None = None
) -> Plan:
    """Plan setpoints (W) for controllable miners and GPUs, keeping each domain under its cap."""
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
    # Everything not planned (uncontrollable, excluded) counts at its worst case.
    fixed = [d for d in snapshot.devices if d.device_id not in planned_ids]
    prev = {sp.device_id: sp for sp in previous.setpoints} if previous is not None else {}
    key = limits.directives_key
    ctx = _Ctx(snapshot, limits, params, tree, movable, fixed, pinned, key)

    def heading_w(d: DeviceStatus) -> float:
        sp = prev.get(d.device_id)
        return max(d.expected_w, sp.planned_w) if sp is not None else d.expected_w

    load = _loads_w(
        tree,
        [(d, d.budget_w) for d in fixed]
        + [(d, max(sp.planned_w, d.expected_w)) for d, sp in pinned]
        + [(d, heading_w(d)) for d in movable],
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
        return _fill(ctx, PlanMode.CAP, why)
    if previous is not None and previous.directives_key != key:
        return _fill(ctx, PlanMode.OVERRIDE, f"operator directives changed ({key})")
    # A contracted GPU planned below its floor last time (or not at all): plan again.
    wants = _floor_wants(ctx)
    short = [
        d
        for d in sorted(ctx.movable, key=_merit)
        if d.device_id in wants
        and (d.device_id not in prev or prev[d.device_id].planned_w < wants[d.device_id] - 1e-6)
    ]
    if short:
        d = short[0]
        why = (
            f"contract floor of {d.device_id} needs {wants[d.device_id]:.0f} W "
            f"({len(short)} device(s) planned below their floor)"
        )
        return _fill(ctx, PlanMode.RESTORE, why)
    if load[SITE] < params.uncapping_threshold * site_cap:
        why = (
            f"site heading for {load[SITE]:.0f} W, below its uncapping threshold "
            f"{params.uncapping_threshold * site_cap:.0f} W"
        )
        filled = _fill(ctx, PlanMode.RESTORE, why)
        held = _hold(ctx, prev, load[SITE], why)
        if _same_setpoints(filled.setpoints, held.setpoints):
            return Plan(
                held.time_s,
                PlanMode.HOLD,
                held.effective_cap_w,
                held.planned_w,
                why + "; nothing more can be restored",
                held.setpoints,
                key,
            )
        return filled
    why = (
        f"site heading for {load[SITE]:.0f} W, inside the band "
        f"[{params.uncapping_threshold * site_cap:.0f}, "
        f"{params.capping_threshold * site_cap:.0f}] W"
    )
    return _hold(ctx, prev, load[SITE], why)


@dataclass(frozen=True, slots=True)
class _Ctx:
    snapshot: Snapshot
    limits: Limits
    params: CappingParams
    tree: DomainTree
    movable: list[DeviceStatus]
    fixed: list[DeviceStatus]
    pinned: list[tuple[DeviceStatus, Setpoint]]
    key: str


def _same_setpoints(a: Iterable[Setpoint], b: Iterable[Setpoint]) -> bool:
    key = {(s.device_id, s.awake, s.power_target_w) for s in a}
    return key == {(s.device_id, s.awake, s.power_target_w) for s in b}


def _hold(ctx: _Ctx, prev: Mapping[str, Setpoint], heading_w: float, why: str) -> Plan:
    setpoints = [sp for _, sp in ctx.pinned]
    for d in sorted(ctx.movable, key=_merit):
        sp = prev.get(d.device_id)
        if sp is None:
            # Not planned before: leave it where it is.
            awake = d.awake if d.awake is not None else True
            target = d.power_target_w
            level = (target or max_level_w(d)) if awake else d.sleep_power_w
            sp = Setpoint(d.device_id, awake, target, level, "hold: left as found")
        setpoints.append(sp)
    return Plan(
        ctx.snapshot.time_s,
        PlanMode.HOLD,
        ctx.limits.effective_cap_w,
        heading_w,
        why,
        tuple(setpoints),
        ctx.key,
    )


def _floor_wants(ctx: _Ctx) -> dict[str, float]:
    """Per movable GPU with a floor above its minimum: the floor (W), onto its step."""
    floors: dict[str, float] = {}
    for f in ctx.limits.floors:
        floors[f.device_id] = max(floors.get(f.device_id, 0.0), f.power_w)
    out = {}
    for d in ctx.movable:
        w = floors.get(d.device_id, 0.0)
        lo = min_level_w(d)
        if d.kind is DeviceKind.GPU and w > lo:
            want = max(d.capabilities.clamp_power_target_w(w), lo)
            if want > lo:
                out[d.device_id] = want
    return out


def _merit(d: DeviceStatus) -> tuple[int, float, str]:
    # Nameplate J/TH, not measured: measured efficiency moves with the target and
    # with noise, and a ranking that moves would churn miners for nothing.
    return (KIND_RANK.get(d.kind, 2), d.efficiency_j_per_th, d.device_id)


def _fill(ctx: _Ctx, mode: PlanMode, why: str) -> Plan:
    snapshot, limits, params, tree = ctx.snapshot, ctx.limits, ctx.params, ctx.tree
    frac = params.capping_target
    avail = {node: frac * limit for node, limit in tree.limit_w.items()}
    counted = [(d, d.budget_w) for d in ctx.fixed] + [(d, sp.planned_w) for d, sp in ctx.pinned]
    counted_w = _loads_w(tree, counted, limits.overhead_w)
    for node, w in counted_w.items():
        avail[node] -= w
    # Operator modes: no miner wakes or rises with mining off; no GPU rises with AI at minimum.
    held_down = {DeviceKind.MINER} if limits.mining_off else set()
    if limits.ai_min:
        held_down.add(DeviceKind.GPU)

    def take(d: DeviceStatus, w: float) -> None:
        for node in tree.chain(d.domain):
            avail[node] -= w

    def room(d: DeviceStatus) -> tuple[float, str]:
        return min((avail[n], n) for n in tree.chain(d.domain))

    order = sorted(ctx.movable, key=_merit)
    rank = {d.device_id: i + 1 for i, d in enumerate(order)}
    n = len(order)
    awake: dict[str, bool] = {}
    level: dict[str, float] = {}
    reason: dict[str, str] = {}

    # Start from the floor: asleep where possible, else at the minimum level.
    for d in order:
        if d.capabilities.can_sleep:
            awake[d.device_id], level[d.device_id] = False, d.sleep_power_w
        else:
            awake[d.device_id], level[d.device_id] = True, min_level_w(d)
            reason[d.device_id] = "cannot sleep, kept at its minimum"
    # Contract floors above that, in merit order, each only as far as every domain above
    # it has room under its limit (not the target) after every device's own minimum.
    wants = _floor_wants(ctx)
    broken: list[str] = []
    if wants:
        own = {node: 0.0 for node in tree.limit_w}
        for d in order:
            for node in tree.chain(d.domain):
                own[node] += level[d.device_id]
        hard = {node: limit - counted_w[node] - own[node] for node, limit in tree.limit_w.items()}
        for d in order:
            want = wants.get(d.device_id)
            if want is None:
                continue
            lo = level[d.device_id]
            space = min(hard[k] for k in tree.chain(d.domain))
            kept = (
                want
                if want - lo <= space
                else d.capabilities.clamp_power_target_w(lo + max(space, 0.0))
            )
            kept = max(kept, lo)
            for k in tree.chain(d.domain):
                hard[k] -= kept - lo
            level[d.device_id] = kept
            if kept < want - 1e-6:
                broken.append(d.device_id)
    for d in order:
        take(d, level[d.device_id])

    # Kind by kind (GPUs, then miners), wake best-first at the minimum level while
    # every domain above has room, then raise awake devices best-first.
    for kind_rank in sorted({KIND_RANK.get(d.kind, 2) for d in order}):
        group = [d for d in order if KIND_RANK.get(d.kind, 2) == kind_rank]
        # Wake best-first at the minimum level while every domain above has room.
        for d in group:
            if awake[d.device_id]:
                continue
            if d.kind in held_down:
                reason[d.device_id] = "asleep: mining is off by override"
                continue
            blocked = wake_blocked(d, snapshot.time_s, params)
            if blocked is not None:
                reason[d.device_id] = blocked
                continue
            cost = min_level_w(d) - d.sleep_power_w
            free, node = room(d)
            if cost <= free:
                awake[d.device_id], level[d.device_id] = True, min_level_w(d)
                take(d, cost)
            else:
                reason[d.device_id] = f"asleep: {node} budget has {max(free, 0):.0f} W left"

        # Raise awake devices best-first towards their maximum.
        for d in group:
            if not awake[d.device_id]:
                continue
            if not d.capabilities.power_target:
                reason.setdefault(d.device_id, "on/off only")
                continue
            if d.kind in held_down:
                reason[d.device_id] = "held at its minimum by override"
                continue
            # From its floor where it has one (GPUs cannot sleep: its level is its floor).
            lo, hi = level[d.device_id], max_level_w(d)
            free, node = room(d)
            wanted = d.capabilities.clamp_power_target_w(lo + min(max(free, 0.0), hi - lo))
            take(d, wanted - lo)
            level[d.device_id] = wanted
            if wanted >= hi:
                reason[d.device_id] = "at its maximum"
            else:
                reason[d.device_id] = f"bound by {node} budget"

    for device_id in broken:
        floor = wants[device_id]
        reason[device_id] = f"contract floor {floor:.0f} W broken: the limits leave no room for it"
    setpoints = []
    for d in order:
        on = awake[d.device_id]
        target = level[d.device_id] if on and d.capabilities.power_target else d.power_target_w
        verb = "mining" if d.kind is DeviceKind.MINER else "serving"
        doing = f"{verb} at {level[d.device_id]:.0f} W" if on else "asleep"
        merit = (
            f"{d.efficiency_j_per_th:.1f} J/TH"
            if d.kind is DeviceKind.MINER
            else "AI inference, shed after mining"
        )
        setpoints.append(
            Setpoint(
                d.device_id,
                on,
                target,
                level[d.device_id],
                f"{mode}: {doing} (rank {rank[d.device_id]}/{n}, {merit}; "
                f"{reason.get(d.device_id, '')})",
            )
        )
    planned = limits.overhead_w + sum(w for _, w in counted) + sum(level.values())
    return Plan(
        snapshot.time_s,
        mode,
        limits.effective_cap_w,
        planned,
        why,
        tuple(sp for _, sp in ctx.pinned) + tuple(setpoints),
        ctx.key,
        tuple(sorted(broken)),
    )
