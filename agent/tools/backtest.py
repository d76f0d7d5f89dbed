"""Backtest: replay a price series against simulated devices under each policy, and an LP optimum.

Each step (the series' 5 minutes) builds a snapshot from the devices' state,
runs the policy, and lets the devices follow their setpoints at once (miners
settle in about 20 s, a GPU limit in about a second: small against a 300 s
step, so each step is accounted at its settled power). Miners use the
simulator's power model (``sim.power``: hashrate ~ power ** 0.85); GPUs draw
``min(limit, idle + (max - idle) x demand)`` and earn the AI price per GPU-hour
x the tokens they serve, ``min(demand, capacity(limit))`` (``sim.gpu``).

The optimum is a linear program per step (HiGHS via highspy) over device
classes (one miner model in one rack; one rack's GPUs), with the same per-domain
planning targets but the miners' on/off choice relaxed to a fraction, each
miner's hashrate curve cut into 8 linear pieces, no dwell times and perfect
knowledge of demand: an upper bound no real policy reaches.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from siteagent.agent.config import Config, default_id, gpu_device_id
from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Limits,
    Snapshot,
)
from siteagent.domain.site import SITE, DomainTree, domain_codes, domain_loads_w
from siteagent.policies import POLICIES, Policy, PolicyParams, PolicyState, get_policy
from siteagent.policies.capping import CappingParams
from siteagent.policies.economic_params import EconomicParams
from siteagent.policies.prices import PricePoint, Prices
from siteagent.sim.gpu import H100_SXM, capacity_frac
from siteagent.sim.power import HASHRATE_POWER_EXPONENT, SIM_MODELS, PowerTiming, SimModel

STEP_S = 300.0
SEED = 20250105
TIMING = PowerTiming()

# Told before each step: (what runs: a policy or the optimum, steps done, steps in all).
Progress = Callable[[str, int, int], None]


# -- the sample price series ------------------------------------------------------


def make_prices(
    days: int = 30, step_s: float = STEP_S, seed: int = SEED, start_unix_s: float = 1_717_200_000
) -> list[PricePoint]:
    """A synthetic but realistic series (fixed seed); see docs/economics.md for its shape.

    Hashprice: a bounded random walk in $0.04-0.06/TH/day. Electricity: a real-time
    price with a night trough, an afternoon peak and a few spikes (ERCOT-like).
    AI: a contract-ish price per GPU-hour with a small daily swing; demand (the
    fraction of peak load offered) follows office hours with noise.
    """
    rng = random.Random(seed)
    n = int(days * 86400 / step_s)
    hashprice = 0.05
    spikes = {rng.randrange(n): rng.uniform(0.4, 2.5) for _ in range(6)}
    spike_left, spike_price = 0, 0.0
    noise = 0.0
    out = []
    for i in range(n):
        t = start_unix_s + i * step_s
        hour = (t % 86400) / 3600.0
        hashprice += rng.gauss(0.0, 0.0004) + 0.002 * (0.05 - hashprice)
        hashprice = min(0.06, max(0.04, hashprice))
        # Night trough ~$0.03, afternoon peak ~$0.12 (hours 15-19), mean-reverting noise.
        daily = 0.035 + 0.085 * math.exp(-(((hour - 17.0) / 2.2) ** 2))
        noise = 0.9 * noise + rng.gauss(0.0, 0.006)
        elec = max(0.005, daily + noise)
        if i in spikes:
            spike_left, spike_price = rng.randint(2, 9), spikes[i]
        if spike_left > 0:
            elec, spike_left = spike_price, spike_left - 1
        demand = 0.35 + 0.45 * math.exp(-(((hour - 14.0) / 5.0) ** 2)) + rng.gauss(0.0, 0.04)
        ai = 2.1 + 0.2 * math.sin(2 * math.pi * (hour - 8.0) / 24.0)
        out.append(PricePoint(t, hashprice, elec, ai, min(1.0, max(0.05, demand))))
    return out


# -- the site ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BtMiner:
    """One simulated miner: which model, in which domain."""

    device_id: str
    domain: str
    model: SimModel


@dataclass(frozen=True, slots=True)
class BtGpu:
    """One simulated H100 in a leaf domain, with an optional contract floor (W)."""

    device_id: str
    domain: str
    contract_floor_w: float = 0.0


@dataclass(frozen=True, slots=True)
class BtSite:
    """What the backtest replays against: devices, domains and the site cap (W)."""

    miners: tuple[BtMiner, ...]
    gpus: tuple[BtGpu, ...]
    domains: tuple[DomainLimit, ...]
    cap_w: float
    overhead_w: float = 0.0
    safety_margin_w: float = 0.0


def synthetic_site(miners: int, gpus: int, cap_frac: float = 0.75) -> BtSite:
    """Miners of three models and 8-GPU nodes, two feeders of racks, cap at ``cap_frac``."""
    models = [SIM_MODELS[k] for k in ("S21", "S19 XP", "S19j Pro")]
    ms = tuple(
        BtMiner(f"m{i:05d}", f"rack-{i % 4}", models[i % len(models)]) for i in range(miners)
    )
    gs = tuple(BtGpu(f"node{i // 8}/gpu{i % 8}", f"rack-{4 + (i // 8) % 2}") for i in range(gpus))
    full: dict[str, float] = defaultdict(float)
    for m in ms:
        full[m.domain] += m.model.nameplate_power_w
    for _ in gs:
        pass
    for g in gs:
        full[g.domain] += H100_SXM.power_limit_max_w
    racks = [
        DomainLimit(f"rack-{i}", max(1.0, 0.9 * full[f"rack-{i}"]), "feeder-a") for i in (0, 1)
    ]
    racks += [DomainLimit(f"rack-{i}", max(1.0, full[f"rack-{i}"]), "feeder-b") for i in (2, 3)]
    racks += [DomainLimit(f"rack-{i}", max(1.0, full[f"rack-{i}"]), "feeder-b") for i in (4, 5)]
    feeder_a = full["rack-0"] + full["rack-1"]
    feeder_b = sum(full[f"rack-{i}"] for i in (2, 3, 4, 5))
    domains = (
        DomainLimit("feeder-a", max(1.0, 0.85 * feeder_a)),
        DomainLimit("feeder-b", max(1.0, feeder_b)),
        *racks,
    )
    return BtSite(ms, gs, domains, cap_frac * sum(full.values()))


def site_from_config(cfg: Config) -> BtSite:
    """The configured miners (nameplate picks the nearest simulator model) and GPU nodes."""
    ms = []
    for m in cfg.inventory.miners:
        power = m.nameplate_power_w or cfg.inventory.default_nameplate_power_w
        model = min(SIM_MODELS.values(), key=lambda s: abs(s.nameplate_power_w - power))
        ms.append(BtMiner(m.id or default_id(m.address), m.domain or SITE, model))
    gs = [
        BtGpu(gpu_device_id(n.id, j), n.domain or SITE, n.contract_floor_w / n.gpus)
        for n in cfg.gpu_nodes
        for j in range(n.gpus)
    ]
    domains = tuple(DomainLimit(d.id, d.limit_w, d.parent) for d in cfg.domains)
    overhead = cfg.site.overhead_w + sum(n.overhead_w for n in cfg.gpu_nodes)
    return BtSite(tuple(ms), tuple(gs), domains, cfg.site.cap_w, overhead, cfg.site.safety_margin_w)


# -- replay -----------------------------------------------------------------------


@dataclass
class PolicyResult:
    """Totals of one policy over the series."""

    policy: str
    revenue_usd: float = 0.0
    energy_kwh: float = 0.0
    cost_usd: float = 0.0
    seconds_over_cap: float = 0.0
    sleep_wake_cycles: int = 0
    # Per step, for the plot: (miner W, GPU W, overhead W).
    power_w: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def margin_usd(self) -> float:
        """Revenue minus electricity ($)."""
        return self.revenue_usd - self.cost_usd

    def summary(self) -> dict[str, Any]:
        """The totals as a JSON-friendly dict."""
        return {
            "policy": self.policy,
            "revenue_usd": round(self.revenue_usd, 2),
            "energy_kwh": round(self.energy_kwh, 1),
            "cost_usd": round(self.cost_usd, 2),
            "margin_usd": round(self.margin_usd, 2),
            "seconds_over_cap": self.seconds_over_cap,
            "sleep_wake_cycles": self.sleep_wake_cycles,
        }


def _miner_caps(m: SimModel) -> DeviceControls:
    return DeviceControls(
        power_target=True,
        power_target_min_w=m.power_target_min_w,
        power_target_max_w=m.power_target_max_w,
        power_target_default_w=m.power_target_default_w,
        power_target_step_w=1.0,
        can_sleep=True,
    )


GPU_CAPS = DeviceControls(
    power_target=True,
    power_target_min_w=H100_SXM.power_limit_min_w,
    power_target_max_w=H100_SXM.power_limit_max_w,
    power_target_default_w=H100_SXM.power_limit_default_w,
)


def gpu_draw_w(limit_w: float, demand: float) -> float:
    """A simulated H100's draw (W) under a limit at a demand (fraction of peak)."""
    m = H100_SXM
    return min(limit_w, m.idle_w + (m.power_limit_max_w - m.idle_w) * demand)


def miner_hashrate_ths(m: SimModel, power_w: float) -> float:
    """Hashrate (TH/s) of a simulated miner at a settled power (W)."""
    ratio = power_w / m.nameplate_power_w
    h: float = m.nameplate_hashrate_ths * ratio**HASHRATE_POWER_EXPONENT
    return h


def run_policy(
    site: BtSite,
    series: Sequence[PricePoint],
    name: str,
    policy: Policy,
    step_s: float = STEP_S,
    timing: PowerTiming = TIMING,
    progress: Progress | None = None,
) -> PolicyResult:
    """Replay the series under one policy; devices follow each plan's setpoints."""
    res = PolicyResult(name)
    mcaps = {m.device_id: _miner_caps(m.model) for m in site.miners}
    level = {m.device_id: m.model.power_target_default_w for m in site.miners}
    awake = {m.device_id: True for m in site.miners}
    since: dict[str, float | None] = {m.device_id: None for m in site.miners}
    limit = {g.device_id: H100_SXM.power_limit_max_w for g in site.gpus}
    eff = max(0.0, site.cap_w - site.safety_margin_w)
    limits = Limits(site.cap_w, eff, "site", site.overhead_w, site.domains)
    tree = DomainTree(limits)
    # Each step's draw per device, miners then GPUs, summed per domain by the one rule.
    names, code = domain_codes([m.domain for m in site.miners] + [g.domain for g in site.gpus])
    state = PolicyState()
    step_h = step_s / 3600.0
    t0 = series[0].timestamp_unix_s if series else 0.0
    last_demand = series[0].ai_demand_frac if series else None
    for k, point in enumerate(series):
        if progress is not None:
            progress(name, k, len(series))
        now = point.timestamp_unix_s - t0
        demand = point.ai_demand_frac if point.ai_demand_frac is not None else 0.6
        devices = []
        for m in site.miners:
            i = m.device_id
            w = level[i] if awake[i] else timing.sleep_power_w
            devices.append(
                DeviceStatus(
                    i,
                    DeviceKind.MINER,
                    m.domain,
                    DeviceState.MINING if awake[i] else DeviceState.SLEEPING,
                    m.model.nameplate_power_w,
                    m.model.nameplate_hashrate_ths,
                    timing.sleep_power_w,
                    mcaps[i],
                    w,
                    w,
                    True,
                    power_target_w=level[i],
                    awake=awake[i],
                    last_transition_s=since[i],
                )
            )
        seen = last_demand if last_demand is not None else demand
        for g in site.gpus:
            i = g.device_id
            cap = capacity_frac(limit[i], H100_SXM.power_limit_max_w)
            util = 1.0 if cap <= 0 else min(1.0, seen / cap)
            reading = DeviceReading(
                i, now, gpu_draw_w(limit[i], seen), DeviceState.RUNNING, utilization_frac=util
            )
            devices.append(
                DeviceStatus(
                    i,
                    DeviceKind.GPU,
                    g.domain,
                    DeviceState.RUNNING,
                    H100_SXM.power_limit_max_w,
                    0.0,
                    0.0,
                    GPU_CAPS,
                    limit[i],
                    limit[i],
                    True,
                    reading=reading,
                    reading_age_s=5.0,
                    power_target_w=limit[i],
                    awake=True,
                )
            )
        prices = Prices(
            point.hashprice_usd_per_th_day,
            point.electricity_usd_per_kwh,
            point.ai_usd_per_gpu_hour,
            None,
        )
        p, state = policy.plan(Snapshot(now, tuple(devices)), limits, prices, state)
        for sp in p.setpoints:
            i = sp.device_id
            if i in level:
                if sp.awake != awake[i]:
                    since[i] = now
                    if sp.awake:
                        res.sleep_wake_cycles += 1
                awake[i] = sp.awake
                if sp.power_target_w is not None:
                    level[i] = sp.power_target_w
            elif i in limit and sp.power_target_w is not None:
                limit[i] = sp.power_target_w
        # Account the step at settled power.
        draw_w: list[float] = []
        miner_w = gpu_w = 0.0
        revenue_h = 0.0
        for m in site.miners:
            i = m.device_id
            w = level[i] if awake[i] else timing.sleep_power_w
            miner_w += w
            draw_w.append(w)
            if awake[i]:
                ths = miner_hashrate_ths(m.model, w)
                revenue_h += point.hashprice_usd_per_th_day / 24.0 * ths
        for g in site.gpus:
            i = g.device_id
            w = gpu_draw_w(limit[i], demand)
            gpu_w += w
            draw_w.append(w)
            served = min(demand, capacity_frac(limit[i], H100_SXM.power_limit_max_w))
            revenue_h += point.ai_usd_per_gpu_hour * served
        load = domain_loads_w(tree, names, code, draw_w, site.overhead_w)
        total = miner_w + gpu_w + site.overhead_w
        if any(load[n] > tree.limit_w[n] + 1e-6 for n in tree.limit_w if n != SITE) or (
            total > site.cap_w + 1e-6
        ):
            res.seconds_over_cap += step_s
        res.revenue_usd += revenue_h * step_h
        res.energy_kwh += total / 1000.0 * step_h
        res.cost_usd += total / 1000.0 * step_h * point.electricity_usd_per_kwh
        res.power_w.append((miner_w, gpu_w, site.overhead_w))
        last_demand = demand
    return res


def policies(capping: CappingParams | None = None) -> dict[str, Policy]:
    """The policies a backtest compares: every registered one, by name."""
    cp = capping or CappingParams()
    params = PolicyParams(cp, EconomicParams(capping=cp))
    return {name: get_policy(name, params) for name in POLICIES}


# -- the offline optimum -------------------------------------------------------------


@contextlib.contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Send what C code writes to file descriptor 1 to /dev/null for the block."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 1  # stdout replaced by a Python object (a test's capture): C still writes to 1
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


LP_PIECES = 8


def optimum(
    site: BtSite,
    series: Sequence[PricePoint],
    capping_target: float = 0.97,
    step_s: float = STEP_S,
    timing: PowerTiming = TIMING,
    progress: Progress | None = None,
) -> PolicyResult:
    """Upper bound on margin: one small LP per step (HiGHS), classes relaxed to fractions."""
    import highspy
    import numpy as np

    eff = max(0.0, site.cap_w - site.safety_margin_w)
    limits = Limits(site.cap_w, eff, "site", site.overhead_w, site.domains)
    tree = DomainTree(limits)
    nodes = list(tree.limit_w)
    row_of = {n: k for k, n in enumerate(nodes)}
    mclasses: dict[tuple[str, str], list[BtMiner]] = defaultdict(list)
    for m in site.miners:
        mclasses[(m.model.key, m.domain)].append(m)
    gclasses: dict[str, int] = defaultdict(int)
    for g in site.gpus:
        gclasses[g.domain] += 1
    tdp = H100_SXM.power_limit_max_w
    gcuts = [H100_SXM.power_limit_min_w, 0.5 * tdp, 0.8 * tdp, tdp]

    # Columns: per miner class a wake fraction count x, then LP_PIECES raise chunks (W);
    # per GPU class 3 chunks of draw (W) above the floor.
    # HiGHS prints its banner from C++ as the object is built, before any option can
    # be set: silence the process's stdout around that one call (a JSON report must
    # be nothing but JSON).
    with _c_stdout_silenced():
        h = highspy.Highs()  # type: ignore[no-untyped-call]
    h.setOptionValue("output_flag", False)
    col = 0
    cols: list[tuple[str, Any, int]] = []  # (kind, class key, piece)
    a_rows: list[int] = []
    a_cols: list[int] = []
    a_vals: list[float] = []
    link_rows: list[tuple[int, int, float]] = []  # (x col, y col, chunk W)
    for key, ms in mclasses.items():
        model = ms[0].model
        lo, hi = model.power_target_min_w, model.power_target_max_w
        xc = col
        cols.append(("wake", key, 0))
        for n in tree.chain(key[1]):
            a_rows.append(row_of[n])
            a_cols.append(xc)
            a_vals.append(lo - timing.sleep_power_w)
        col += 1
        for k in range(LP_PIECES):
            cols.append(("raise", key, k))
            for n in tree.chain(key[1]):
                a_rows.append(row_of[n])
                a_cols.append(col)
                a_vals.append(1.0)
            link_rows.append((xc, col, (hi - lo) / LP_PIECES))
            col += 1
    for gkey in gclasses:
        for k in range(3):
            cols.append(("gpu", gkey, k))
            for n in tree.chain(gkey):
                a_rows.append(row_of[n])
                a_cols.append(col)
                a_vals.append(1.0)
            col += 1
    n_cols = col
    inf = highspy.kHighsInf
    h.addVars(n_cols, np.zeros(n_cols), np.zeros(n_cols))
    # Domain rows: sum of power above floors <= target - floors.
    floor: dict[str, float] = defaultdict(float)
    for m in site.miners:
        for n in tree.chain(m.domain):
            floor[n] += timing.sleep_power_w
    floor[SITE] += site.overhead_w
    n_dom = len(nodes)
    order = np.lexsort((np.array(a_cols), np.array(a_rows)))
    ar, ac, av = np.array(a_rows)[order], np.array(a_cols)[order], np.array(a_vals)[order]
    starts = np.searchsorted(ar, np.arange(n_dom)).astype(np.int32)
    h.addRows(
        n_dom,
        np.full(n_dom, -inf),
        np.zeros(n_dom),
        len(ac),
        starts,
        ac.astype(np.int32),
        av.astype(np.float64),
    )
    for xc, yc, chunk in link_rows:
        h.addRow(-inf, 0.0, 2, np.array([yc, xc], dtype=np.int32), np.array([1.0, -chunk]))
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    idx = np.arange(n_cols, dtype=np.int32)
    dom_idx = np.arange(n_dom, dtype=np.int32)

    res = PolicyResult("lp-optimum")
    step_h = step_s / 3600.0
    for k, point in enumerate(series):
        if progress is not None:
            progress(res.policy, k, len(series))
        elec_w = point.electricity_usd_per_kwh / 1000.0  # $/h per W
        hp = point.hashprice_usd_per_th_day / 24.0
        demand = point.ai_demand_frac if point.ai_demand_frac is not None else 0.6
        p_demand = H100_SXM.idle_w + (tdp - H100_SXM.idle_w) * demand
        cost = np.zeros(n_cols)
        upper = np.zeros(n_cols)
        const_h = -elec_w * (floor[SITE])
        gfloor: dict[str, float] = {}
        for c, (kind, key, k) in enumerate(cols):
            if kind == "wake":
                model = mclasses[key][0].model
                lo = model.power_target_min_w
                n_m = len(mclasses[key])
                cost[c] = hp * miner_hashrate_ths(model, lo) - elec_w * (lo - timing.sleep_power_w)
                upper[c] = n_m
            elif kind == "raise":
                model = mclasses[key][0].model
                lo, hi = model.power_target_min_w, model.power_target_max_w
                a = lo + k * (hi - lo) / LP_PIECES
                b = a + (hi - lo) / LP_PIECES
                slope = hp * (miner_hashrate_ths(model, b) - miner_hashrate_ths(model, a)) / (b - a)
                cost[c] = slope - elec_w
                upper[c] = len(mclasses[key]) * (b - a)
            else:
                n_g = gclasses[key]
                f_draw = min(gcuts[0], p_demand)
                gfloor[key] = n_g * f_draw
                a, b = gcuts[k], gcuts[k + 1]
                top = min(b, p_demand)
                width = max(0.0, top - a)
                if width > 0:
                    gain = min(demand, capacity_frac(top, tdp)) - min(demand, capacity_frac(a, tdp))
                    cost[c] = point.ai_usd_per_gpu_hour * gain / width - elec_w
                upper[c] = n_g * width
        for gkey, w in gfloor.items():
            served = min(demand, capacity_frac(gcuts[0], tdp))
            const_h += gclasses[gkey] * point.ai_usd_per_gpu_hour * served - elec_w * w
        rhs = np.array([capping_target * tree.limit_w[n] - floor[n] for n in nodes])
        for gkey, w in gfloor.items():
            for n in tree.chain(gkey):
                rhs[row_of[n]] -= w
        h.changeColsCost(n_cols, idx, cost)
        h.changeColsBounds(n_cols, idx, np.zeros(n_cols), upper)
        h.changeRowsBounds(  # type: ignore[attr-defined]
            n_dom, dom_idx, np.full(n_dom, -inf), np.maximum(rhs, 0.0)
        )
        h.run()
        sol = np.array(h.getSolution().col_value)
        obj = float(np.dot(cost, sol)) + const_h
        # Split into revenue and energy for the report.
        power_w = floor[SITE] + sum(gfloor.values())
        for c, (kind, key, _) in enumerate(cols):
            if kind == "wake":
                power_w += sol[c] * (
                    mclasses[key][0].model.power_target_min_w - timing.sleep_power_w
                )
            else:
                power_w += sol[c]
        kwh = power_w / 1000.0 * step_h
        res.energy_kwh += kwh
        res.cost_usd += kwh * point.electricity_usd_per_kwh
        res.revenue_usd += (obj + elec_w * power_w) * step_h
        res.power_w.append((0.0, 0.0, power_w))
    return res


# -- report and plot -----------------------------------------------------------------


def run_backtest(
    site: BtSite,
    series: Sequence[PricePoint],
    capping: CappingParams | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every policy and the optimum over the series; JSON-friendly results.

    A ratio to the optimum is None when the optimum's margin is not positive (a
    site that loses money at its best has no meaningful ratio); ``ratio_note`` says so.
    """
    cp = capping or CappingParams()
    results = [
        run_policy(site, series, name, fn, progress=progress) for name, fn in policies(cp).items()
    ]
    best = optimum(site, series, cp.capping_target, progress=progress)
    out: dict[str, Any] = {
        "steps": len(series),
        "miners": len(site.miners),
        "gpus": len(site.gpus),
        "cap_w": site.cap_w,
        "policies": [r.summary() for r in results],
        "optimum": best.summary(),
    }
    for r in results:
        ratio = round(r.margin_usd / best.margin_usd, 4) if best.margin_usd > 0 else None
        out[f"{r.policy}_ratio_to_optimum"] = ratio
    if best.margin_usd <= 0:
        out["ratio_note"] = (
            f"the optimum's margin is ${best.margin_usd:.2f}, not positive: electricity "
            "costs at least what the site earns over this series, so no ratio to it"
        )
    out["_results"] = results
    return out


def plot(
    site: BtSite, series: Sequence[PricePoint], result: PolicyResult, path: str | Path
) -> None:
    """PNG: power by load type against the cap (top) and prices (bottom) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [(p.timestamp_unix_s - series[0].timestamp_unix_s) / 86400.0 for p in series]
    miner = [m / 1000.0 for m, _, _ in result.power_w]
    gpu = [g / 1000.0 for _, g, _ in result.power_w]
    over = [o / 1000.0 for _, _, o in result.power_w]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ax1.stackplot(days, over, gpu, miner, labels=["overhead", "AI (GPUs)", "mining"])
    ax1.axhline(site.cap_w / 1000.0, color="red", lw=1, label="site cap")
    ax1.set_ylabel("power (kW)")
    ax1.set_title(f"{result.policy}: power by load type")
    ax1.legend(loc="lower left", fontsize=8)
    ax2.plot(days, [p.electricity_usd_per_kwh for p in series], lw=0.7, label="electricity $/kWh")
    ax2.plot(days, [p.hashprice_usd_per_th_day for p in series], lw=0.7, label="hashprice $/TH/d")
    ax2.set_ylabel("price")
    ax2.set_yscale("log")
    ax3 = ax2.twinx()
    ax3.plot(days, [p.ai_usd_per_gpu_hour for p in series], lw=0.7, color="k", label="AI $/GPU-h")
    ax3.set_ylabel("AI $/GPU-h")
    ax2.set_xlabel("day")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """Regenerate the shipped sample series: python -m agent.backtest."""
    from siteagent.agent.control.prices import write_csv

    out = Path(__file__).parent.parent / "data" / "prices_30d.csv"
    write_csv(make_prices(), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


class BacktestInputError(Exception):
    """An input of ``siteagent backtest`` that cannot be used; the message names it."""


def check_inputs(args: Any) -> tuple[BtSite, CappingParams, list[PricePoint]]:
    """The site, capping parameters and price series the arguments name, or BacktestInputError.

    Everything the run needs is checked here, before the replay: the plot folder too.
    """
    from siteagent.agent.config import ConfigError, load_config
    from siteagent.agent.control.prices import PriceFormatError, load_series

    if args.days is not None and not args.days > 0:
        raise BacktestInputError(f"--days {args.days:g}: expected a number of days above 0")
    if args.config is not None:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise BacktestInputError(str(e)) from None
        except OSError as e:
            raise BacktestInputError(f"--config {args.config}: {e.strerror or e}") from None
        site = site_from_config(cfg)
        cp = CappingParams(
            cfg.policy.capping_threshold,
            cfg.policy.capping_target,
            cfg.policy.uncapping_threshold,
            cfg.policy.min_off_s,
        )
    else:
        site, cp = synthetic_site(args.miners, args.gpus), CappingParams()
    try:
        series = list(load_series(args.prices).points)
    except OSError as e:
        raise BacktestInputError(f"--prices {args.prices}: {e.strerror or e}") from None
    except PriceFormatError as e:
        raise BacktestInputError(f"--prices {args.prices}: {e}") from None
    except (ValueError, csv.Error) as e:  # not JSON, not UTF-8, a broken CSV quote
        raise BacktestInputError(f"--prices {args.prices}: cannot be read: {e}") from None
    if not series:
        raise BacktestInputError(f"--prices {args.prices}: no price rows")
    if args.days is not None:
        series = series[: max(1, int(args.days * 86400 / STEP_S))]
    if args.plot:
        _check_writable(Path(args.plot))
    return site, cp, series


def _check_writable(target: Path) -> None:
    """BacktestInputError unless a file can be written at ``target``."""
    if target.is_dir():
        raise BacktestInputError(
            f"--plot {target}: is a folder; name the file, e.g. {target / 'backtest.png'}"
        )
    folder = target.parent
    if not folder.is_dir():
        raise BacktestInputError(f"--plot {target}: folder {folder} does not exist")
    try:
        # A real write, not os.access: root passes access checks on a read-only mount.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise BacktestInputError(
            f"--plot {target}: cannot write in {folder}: {e.strerror or e}"
        ) from None


class ProgressLine:
    """'backtest: economic, day 3 of 30 (42% of the run)' on a terminal, rewritten in place."""

    def __init__(self, out: TextIO, passes: int, step_s: float = STEP_S) -> None:
        self.out = out
        self.passes = passes
        self.step_s = step_s
        self._names: list[str] = []
        self._shown_pct = -1
        self._width = 0

    def __call__(self, what: str, done: int, total: int) -> None:
        """Take one step's news; redraw every 2% of the whole run or on a new pass."""
        if what not in self._names:
            self._names.append(what)
        k = self._names.index(what)
        pct = int(100 * (k * total + done) / max(1, self.passes * total))
        if pct - self._shown_pct < 2 and done != 0:
            return
        self._shown_pct = pct
        days = total * self.step_s / 86400.0
        day = min(int(done * self.step_s / 86400.0) + 1, max(1, math.ceil(days)))
        line = (
            f"backtest: {what} ({k + 1} of {self.passes}), day {day} of {math.ceil(days)} "
            f"({pct}% of the run)"
        )
        self.out.write("\r" + line.ljust(self._width))
        self.out.flush()
        self._width = len(line)

    def clear(self) -> None:
        """Erase the line before the report."""
        if self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()


def cmd_backtest(args: Any) -> int:
    """``siteagent backtest``: print per-policy totals, the optimum, and the ratio to it."""
    import json

    try:
        site, cp, series = check_inputs(args)
    except BacktestInputError as e:
        print(f"siteagent backtest: {e}", file=sys.stderr)
        return 2
    # Progress only for a person watching: a pipe or a log gets the report alone.
    line = ProgressLine(sys.stderr, len(policies()) + 1) if sys.stderr.isatty() else None
    try:
        out = run_backtest(site, series, cp, progress=line)
    finally:
        if line is not None:
            line.clear()
    results: list[PolicyResult] = out.pop("_results")
    if args.plot:
        econ = next(r for r in results if r.policy == "economic")
        plot(site, series, econ, args.plot)
    if args.report == "json":
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{out['steps']} steps, {out['miners']} miners, {out['gpus']} GPUs, "
        f"cap {site.cap_w / 1000:.0f} kW"
    )
    print(
        f"{'policy':20} {'revenue $':>11} {'energy kWh':>11} {'cost $':>10} {'margin $':>10} "
        f"{'s over cap':>10} {'cycles':>7}"
    )
    for s in [*out["policies"], out["optimum"]]:
        print(
            f"{s['policy']:20} {s['revenue_usd']:11.2f} {s['energy_kwh']:11.1f} "
            f"{s['cost_usd']:10.2f} {s['margin_usd']:10.2f} {s['seconds_over_cap']:10.0f} "
            f"{s['sleep_wake_cycles']:7d}"
        )
    for r in results:
        ratio = out[f"{r.policy}_ratio_to_optimum"]
        shown = "n/a" if ratio is None else f"{ratio:.2%}"
        print(f"{r.policy} / optimum margin: {shown}")
    if "ratio_note" in out:
        print(f"(n/a: {out['ratio_note']})")
    return 0
