"""Backtest: replay a price series against simulated devices under each policy, and a bound.

Each step (the series' 5 minutes) builds a snapshot from the devices' state,
runs the policy, and lets the devices follow their setpoints at once (miners
settle in about 20 s, a GPU limit in about a second: small against a 300 s
step, so each step is accounted at its settled power). Miners use the
simulator's power model (``sim.power``: hashrate ~ power ** 0.85); GPUs draw
``min(limit, idle + (max - idle) x demand)`` and earn the AI price per GPU-hour
x the tokens they serve, ``min(demand, capacity(limit))`` (``sim.gpu``). Each
wake, GPU node drain and undrain is charged (``SwitchingCosts``), and running
hardware depreciates.

The bound (``bound``) is one linear program per UTC day (HiGHS via highspy)
under the backtest's own hard limits, relaxed only in directions that raise it:
a true upper bound on every policy that keeps the limits (docs/economics.md).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import random
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

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
from siteagent.policies.economic_params import (
    DEFAULT_SWITCHING,
    FIRMWARE_WAKE_S,
    EconomicParams,
    SwitchingCosts,
)
from siteagent.policies.prices import PricePoint, Prices
from siteagent.sim.gpu import (
    CAPACITY_AT_CLIFF,
    CLIFF_FRAC,
    H100_SXM,
    KNEE_FRAC,
    capacity_frac,
)
from siteagent.sim.power import HASHRATE_POWER_EXPONENT, SIM_MODELS, PowerTiming, SimModel

STEP_S = 300.0
SEED = 20250105
TIMING = PowerTiming()

# Told before each step: (what runs: a policy or the bound, steps done, steps in all).
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


HELD_OUT_SEED = 7_140_331


def make_prices_held_out(
    days: int = 30,
    step_s: float = STEP_S,
    seed: int = HELD_OUT_SEED,
    start_unix_s: float = 1_736_726_400,
) -> list[PricePoint]:
    """A second series made another way, kept apart from tuning (agent/data/prices_30d_b.csv).

    Winter, from 2025-01-13 UTC. Electricity: an hourly two-state market (calm or
    tight, a Markov chain) on a duck curve (morning and evening peaks, a solar trough
    at midday, cheaper weekends), negative prices on windy nights, and Pareto-sized
    spikes. Hashprice: a geometric random walk with drift. AI: a price per GPU-hour
    set per week by contract; demand with two daily peaks, quieter weekends and
    bursts (a Poisson arrival, decaying).
    """
    rng = random.Random(seed)
    n = int(days * 86400 / step_s)
    log_hp = math.log(0.055)
    tight = False
    wind = 0.0
    burst = 0.0
    weekly_ai = [round(rng.uniform(1.6, 2.6), 2) for _ in range(days // 7 + 1)]
    spike_left, spike_price = 0, 0.0
    out = []
    for i in range(n):
        t = start_unix_s + i * step_s
        hour = (t % 86400) / 3600.0
        weekday = int(t // 86400 + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
        weekend = weekday >= 5
        if i % 12 == 0:  # the market's state and the wind move hourly
            tight = rng.random() > 0.25 if tight else rng.random() < 0.04
            wind = max(0.0, 0.8 * wind + rng.gauss(0.0, 0.5))
        log_hp += rng.gauss(-0.00002, 0.003)
        hashprice = math.exp(log_hp)
        duck = (
            0.045
            + 0.05 * math.exp(-(((hour - 8.0) / 1.5) ** 2))
            + 0.08 * math.exp(-(((hour - 19.0) / 2.0) ** 2))
            - 0.02 * math.exp(-(((hour - 13.0) / 2.5) ** 2))
        )
        if weekend:
            duck *= 0.8
        if tight:
            duck *= 1.9
        night = hour < 6.0 or hour > 22.0
        elec = duck - (0.035 * wind if night else 0.0) + rng.gauss(0.0, 0.004)
        if spike_left == 0 and rng.random() < 0.0015:
            spike_left = rng.randint(1, 6)
            spike_price = min(5.0, 0.3 * rng.paretovariate(1.6))
        if spike_left > 0:
            elec, spike_left = spike_price, spike_left - 1
        if rng.random() < 0.004:
            burst += rng.uniform(0.15, 0.4)
        burst *= 0.93
        demand = (
            (
                0.25
                + 0.35 * math.exp(-(((hour - 10.5) / 2.5) ** 2))
                + 0.3 * math.exp(-(((hour - 20.5) / 2.0) ** 2))
            )
            * (0.6 if weekend else 1.0)
            + burst
            + rng.gauss(0.0, 0.03)
        )
        ai = weekly_ai[int((t - start_unix_s) // (7 * 86400))]
        out.append(PricePoint(t, hashprice, elec, ai, min(1.0, max(0.02, demand))))
    return out


# -- the site ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BtMiner:
    """One simulated miner: which model, in which domain."""

    device_id: str
    domain: str
    model: SimModel
    firmware: str = ""  # a backend's name (FIRMWARE_WAKE_S); "" not known


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


RACK_FIRMWARE = ("braiins", "luxos", "antminer", "vnish")


def synthetic_site(miners: int, gpus: int, cap_frac: float = 0.75) -> BtSite:
    """Miners of three models and 8-GPU nodes, two feeders of racks, cap at ``cap_frac``."""
    models = [SIM_MODELS[k] for k in ("S21", "S19 XP", "S19j Pro")]
    # One firmware to a rack, so its wake time (the hashing a wake loses) differs by rack.
    ms = tuple(
        BtMiner(f"m{i:05d}", f"rack-{i % 4}", models[i % len(models)], RACK_FIRMWARE[i % 4])
        for i in range(miners)
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
    ai_revenue_usd: float = 0.0  # of the revenue, what the GPUs earned
    energy_kwh: float = 0.0
    cost_usd: float = 0.0
    seconds_over_cap: float = 0.0
    sleep_wake_cycles: float = 0.0
    # Switching: the cycles' cost (wear, restarts, hashing lost while waking) and GPU
    # drains/undrains; depreciation of the hardware while it runs ($).
    switching_usd: float = 0.0
    gpu_drains: int = 0
    depreciation_usd: float = 0.0
    step_s: float = STEP_S
    # Per step, for the plot: (miner W, GPU W, overhead W).
    power_w: list[tuple[float, float, float]] = field(default_factory=list)
    # Per step: margin ($) and sleep/wake cycles, for the report per day.
    step_margin_usd: list[float] = field(default_factory=list)
    step_cycles: list[float] = field(default_factory=list)

    @property
    def margin_usd(self) -> float:
        """Revenue minus electricity, switching and depreciation ($)."""
        return self.revenue_usd - self.cost_usd - self.switching_usd - self.depreciation_usd

    def summary(self) -> dict[str, Any]:
        """The totals as a JSON-friendly dict."""
        days = len(self.step_margin_usd) * self.step_s / 86400.0
        return {
            "policy": self.policy,
            "revenue_usd": round(self.revenue_usd, 2),
            "ai_revenue_usd": round(self.ai_revenue_usd, 2),
            "energy_kwh": round(self.energy_kwh, 1),
            "cost_usd": round(self.cost_usd, 2),
            "switching_usd": round(self.switching_usd, 2),
            "depreciation_usd": round(self.depreciation_usd, 2),
            "margin_usd": round(self.margin_usd, 2),
            "seconds_over_cap": self.seconds_over_cap,
            "sleep_wake_cycles": round(self.sleep_wake_cycles, 2),
            "cycles_per_day": round(self.sleep_wake_cycles / days, 2) if days > 0 else None,
            "gpu_drains": self.gpu_drains,
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
    switching: SwitchingCosts | None = None,
) -> PolicyResult:
    """Replay the series under one policy; devices follow each plan's setpoints.

    A wake costs one cycle (``SwitchingCosts.cycle_usd``: the hashing lost at the
    level it wakes to, for its firmware's wake time); running hardware depreciates.
    """
    sw = switching if switching is not None else site_switching(site, SwitchingCosts())
    res = PolicyResult(name, step_s=step_s)
    woke: set[str] = set()
    # A node drains when every GPU of it is at its minimum (agent/control/gpus.py).
    nodes_gpus: dict[str, list[str]] = defaultdict(list)
    for g in site.gpus:
        nodes_gpus[g.device_id.split("/")[0]].append(g.device_id)
    drained = dict.fromkeys(nodes_gpus, False)
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
        woke.clear()
        for sp in p.setpoints:
            i = sp.device_id
            if i in level:
                if sp.awake != awake[i]:
                    since[i] = now
                    if sp.awake:
                        woke.add(i)
                awake[i] = sp.awake
                if sp.power_target_w is not None:
                    level[i] = sp.power_target_w
            elif i in limit and sp.power_target_w is not None:
                limit[i] = sp.power_target_w
        # Account the step at settled power.
        draw_w: list[float] = []
        miner_w = gpu_w = 0.0
        revenue_h = ai_h = 0.0
        switching_usd = 0.0
        n_awake = 0
        for m in site.miners:
            i = m.device_id
            w = level[i] if awake[i] else timing.sleep_power_w
            miner_w += w
            draw_w.append(w)
            if awake[i]:
                n_awake += 1
                ths = miner_hashrate_ths(m.model, w)
                earns_h = point.hashprice_usd_per_th_day / 24.0 * ths
                revenue_h += earns_h
                if i in woke:
                    switching_usd += sw.cycle_usd(sw.wake_s(i), earns_h)
        for g in site.gpus:
            i = g.device_id
            w = gpu_draw_w(limit[i], demand)
            gpu_w += w
            draw_w.append(w)
            served = min(demand, capacity_frac(limit[i], H100_SXM.power_limit_max_w))
            ai_h += point.ai_usd_per_gpu_hour * served
        for node, ids in nodes_gpus.items():
            now_drained = all(limit[i] <= H100_SXM.power_limit_min_w for i in ids)
            if now_drained != drained[node]:
                res.gpu_drains += now_drained
                switching_usd += sw.gpu_drain_usd if now_drained else sw.gpu_undrain_usd
                drained[node] = now_drained
        load = domain_loads_w(tree, names, code, draw_w, site.overhead_w)
        total = miner_w + gpu_w + site.overhead_w
        if any(load[n] > tree.limit_w[n] + 1e-6 for n in tree.limit_w if n != SITE) or (
            total > site.cap_w + 1e-6
        ):
            res.seconds_over_cap += step_s
        depreciation = step_h * (
            n_awake * sw.miner_depreciation_usd_per_h
            + len(site.gpus) * sw.gpu_depreciation_usd_per_h
        )
        cost = total / 1000.0 * step_h * point.electricity_usd_per_kwh
        revenue_h += ai_h
        res.revenue_usd += revenue_h * step_h
        res.ai_revenue_usd += ai_h * step_h
        res.energy_kwh += total / 1000.0 * step_h
        res.cost_usd += cost
        res.switching_usd += switching_usd
        res.depreciation_usd += depreciation
        res.sleep_wake_cycles += len(woke)
        res.step_cycles.append(len(woke))
        res.step_margin_usd.append(revenue_h * step_h - cost - switching_usd - depreciation)
        res.power_w.append((miner_w, gpu_w, site.overhead_w))
        last_demand = demand
    return res


def site_switching(site: BtSite, base: SwitchingCosts) -> SwitchingCosts:
    """``base`` with each miner's wake time from its firmware (FIRMWARE_WAKE_S)."""
    wake = {m.device_id: FIRMWARE_WAKE_S[m.firmware] for m in site.miners if m.firmware}
    return replace(base, wake_s_by_device={**wake, **base.wake_s_by_device})


def policies(
    capping: CappingParams | None = None, switching: SwitchingCosts | None = None
) -> dict[str, Policy]:
    """The policies a backtest compares: every registered one, by name."""
    cp = capping or CappingParams()
    sw = switching if switching is not None else SwitchingCosts()
    params = PolicyParams(cp, EconomicParams(capping=cp, switching=sw))
    return {name: get_policy(name, params) for name in POLICIES}


# -- the bound ------------------------------------------------------------------------


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


# sim.gpu.capacity_frac's slope below the cliff (tests/test_backtest.py checks the hull
# against the function itself).
CLIFF_SLOPE = 2.5
# Tangent lines on each miner class's hashrate curve (an outer approximation: the LP
# can only over-value hashing between them, never under-value it).
TANGENTS = 8


@dataclass(frozen=True, slots=True)
class _MinerClass:
    """Miners of one model, domain and firmware: the LP's unit."""

    model: SimModel
    domain: str
    wake_s: float
    count: int


def _gpu_hull(demand: float, ai_usd_per_h: float) -> tuple[float, float, list[tuple[float, float]]]:
    """One simulated H100's (draw W, revenue $/h) over every limit, as its concave hull.

    Returns the lowest and highest draw and the hull's lines ``(intercept, slope)``:
    revenue <= intercept + slope * draw on every one. The draw is
    ``min(limit, demand's draw)`` and the revenue ``min(demand, capacity(limit))``,
    both linear between the breakpoints taken here, so the hull is exact.
    """
    m = H100_SXM
    tdp, lo = m.power_limit_max_w, m.power_limit_min_w
    p_demand = m.idle_w + (tdp - m.idle_w) * demand
    mid_slope = (1.0 - CAPACITY_AT_CLIFF) / (KNEE_FRAC - CLIFF_FRAC)
    # sim.gpu.capacity_frac's breakpoints, where it meets demand, and demand's own draw.
    cuts = {
        KNEE_FRAC,
        CLIFF_FRAC,
        CLIFF_FRAC - CAPACITY_AT_CLIFF / CLIFF_SLOPE,
        KNEE_FRAC - (1.0 - demand) / mid_slope,
        CLIFF_FRAC - (CAPACITY_AT_CLIFF - demand) / CLIFF_SLOPE,
    }
    cands = {lo, tdp, p_demand, *(r * tdp for r in cuts)}
    pts: dict[float, float] = {}
    for limit in sorted(c for c in cands if lo <= c <= tdp):
        draw = min(limit, p_demand)
        rev = ai_usd_per_h * min(demand, capacity_frac(limit, tdp))
        pts[draw] = max(pts.get(draw, -math.inf), rev)
    xs = sorted(pts)
    hull: list[tuple[float, float]] = []
    for x in xs:  # the upper hull, left to right (monotone chain)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) <= (pts[x] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append((x, pts[x]))
    if len(hull) == 1:
        return xs[0], hull[0][0], [(hull[0][1], 0.0)]
    lines = []
    for (x1, y1), (x2, y2) in itertools.pairwise(hull):
        slope = (y2 - y1) / (x2 - x1)
        lines.append((y1 - slope * x1, slope))
    return xs[0], hull[-1][0], lines


def bound(
    site: BtSite,
    series: Sequence[PricePoint],
    switching: SwitchingCosts | None = None,
    step_s: float = STEP_S,
    timing: PowerTiming = TIMING,
    progress: Progress | None = None,
) -> PolicyResult:
    """A strict upper bound on every policy's margin: one LP (HiGHS) per UTC day.

    The hard limits are the backtest's own (every domain at its full limit, the
    site at its cap: what "over the cap" counts), not a planning target. Devices
    of one class are relaxed to a count awake and a power (a fraction of a miner
    may wake); hashing is bounded by tangents of its concave curve, a GPU class by
    the concave hull of what one GPU can earn at each draw. A cycle costs at least
    wear, restart and the hashing lost at the miner's lowest level, counted per
    increase of a class's count awake; each day starts from a free state (so a
    cycle across midnight is free to the bound). Every relaxation only raises it.
    Depreciation is counted as the policies count it.
    """
    import highspy

    sw = switching if switching is not None else site_switching(site, SwitchingCosts())
    eff = max(0.0, site.cap_w - site.safety_margin_w)
    limits = Limits(site.cap_w, eff, "site", site.overhead_w, site.domains)
    tree = DomainTree(limits)
    nodes = list(tree.limit_w)
    hard = {n: (site.cap_w if n == SITE else tree.limit_w[n]) for n in nodes}
    groups: dict[tuple[str, str, float], list[BtMiner]] = defaultdict(list)
    for m in site.miners:
        groups[(m.model.key, m.domain, sw.wake_s(m.device_id))].append(m)
    mcls = [_MinerClass(ms[0].model, k[1], k[2], len(ms)) for k, ms in groups.items()]
    gcount: dict[str, int] = defaultdict(int)
    for g in site.gpus:
        gcount[g.domain] += 1
    gcls = list(gcount.items())
    chains_m = [[nodes.index(n) for n in tree.chain(c.domain)] for c in mcls]
    chains_g = [[nodes.index(n) for n in tree.chain(d)] for d, _ in gcls]
    # Fixed per node: every miner's sleep draw (a wake adds above it) and the overhead.
    base_w = [0.0] * len(nodes)
    for c, chain in zip(mcls, chains_m, strict=True):
        for n in chain:
            base_w[n] += c.count * timing.sleep_power_w
    base_w[nodes.index(SITE)] += site.overhead_w
    res = PolicyResult("bound", step_s=step_s)
    step_h = step_s / 3600.0
    days: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(series):
        days[_utc_date(p.timestamp_unix_s)].append(k)
    done = 0
    for steps in days.values():
        if progress is not None:
            progress(res.policy, done, len(series))
        done += len(steps)
        _bound_window(
            highspy,
            res,
            [series[k] for k in steps],
            mcls,
            gcls,
            chains_m,
            chains_g,
            [hard[n] - base_w[k] for k, n in enumerate(nodes)],
            sw,
            step_h,
            timing,
            len(site.gpus),
            site.overhead_w + len(site.miners) * timing.sleep_power_w,
        )
    return res


def _bound_window(
    highspy: Any,
    res: PolicyResult,
    pts: Sequence[PricePoint],
    mcls: Sequence[_MinerClass],
    gcls: Sequence[tuple[str, int]],
    chains_m: Sequence[Sequence[int]],
    chains_g: Sequence[Sequence[int]],
    room_w: Sequence[float],
    sw: SwitchingCosts,
    step_h: float,
    timing: PowerTiming,
    n_gpus: int,
    base_w: float,
) -> None:
    """One window's LP, solved; its steps' margins, energy and power appended to ``res``.

    Columns per step: per miner class its count awake ``x``, their power ``P`` (W),
    revenue ``R`` ($/h) and wakes ``u``; per GPU class its draw ``W`` and revenue ``G``.
    """
    inf = highspy.kHighsInf
    nm, ng, n_steps = len(mcls), len(gcls), len(pts)
    per = 4 * nm + 2 * ng
    n_cols = per * n_steps
    cost = [0.0] * n_cols
    lower = [0.0] * n_cols
    upper = [inf] * n_cols
    rows: list[tuple[float, float, list[int], list[float]]] = []  # lo, hi, cols, values
    sleep_w = timing.sleep_power_w
    const = [0.0] * n_steps  # per step ($): what no column decides
    for t, p in enumerate(pts):
        o = per * t
        e_w = p.electricity_usd_per_kwh / 1000.0  # $/h per W
        hp24 = p.hashprice_usd_per_th_day / 24.0
        demand = p.ai_demand_frac if p.ai_demand_frac is not None else 0.6
        const[t] = step_h * (-e_w * base_w - n_gpus * sw.gpu_depreciation_usd_per_h)
        node_cols: list[list[int]] = [[] for _ in room_w]
        node_vals: list[list[float]] = [[] for _ in room_w]
        for j, c in enumerate(mcls):
            x, pw, r, u = o + 4 * j, o + 4 * j + 1, o + 4 * j + 2, o + 4 * j + 3
            lo, hi = c.model.power_target_min_w, c.model.power_target_max_w
            upper[x] = c.count
            cost[x] = step_h * (e_w * sleep_w - sw.miner_depreciation_usd_per_h)
            cost[pw] = -step_h * e_w
            cost[r] = step_h
            lower[r] = -inf
            # Waking costs at least this: the hashing is lost at no less than the lowest level.
            cost[u] = -sw.cycle_usd(c.wake_s, hp24 * miner_hashrate_ths(c.model, lo))
            rows.append((0.0, inf, [pw, x], [1.0, -lo]))
            rows.append((-inf, 0.0, [pw, x], [1.0, -hi]))
            for q in range(TANGENTS):
                at = lo + (hi - lo) * q / (TANGENTS - 1)
                f = hp24 * miner_hashrate_ths(c.model, at)
                df = HASHRATE_POWER_EXPONENT * f / at
                rows.append((-inf, 0.0, [r, x, pw], [1.0, -(f - df * at), -df]))
            if t > 0:
                rows.append((0.0, inf, [u, x, x - per], [1.0, -1.0, 1.0]))
            else:
                upper[u] = 0.0  # a free start: the day may begin in any state
            for n in chains_m[j]:
                node_cols[n] += [pw, x]
                node_vals[n] += [1.0, -sleep_w]
        for j, (_, count) in enumerate(gcls):
            w, g = o + 4 * nm + 2 * j, o + 4 * nm + 2 * j + 1
            lo_w, hi_w, lines = _gpu_hull(demand, p.ai_usd_per_gpu_hour)
            lower[w], upper[w] = count * lo_w, count * hi_w
            cost[w] = -step_h * e_w
            cost[g] = step_h
            lower[g] = -inf
            for a, b in lines:
                rows.append((-inf, count * a, [g, w], [1.0, -b]))
            for n in chains_g[j]:
                node_cols[n].append(w)
                node_vals[n].append(1.0)
        for n, room in enumerate(room_w):
            if node_cols[n]:
                rows.append((-inf, room, node_cols[n], node_vals[n]))
    with _c_stdout_silenced():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.addVars(n_cols, np.array(lower), np.array(upper))
    h.changeColsCost(n_cols, np.arange(n_cols, dtype=np.int32), np.array(cost))
    starts = np.cumsum([0] + [len(r[2]) for r in rows[:-1]]).astype(np.int32)
    index = np.array([i for r in rows for i in r[2]], dtype=np.int32)
    value = np.array([v for r in rows for v in r[3]], dtype=np.float64)
    h.addRows(
        len(rows),
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        len(index),
        starts,
        index,
        value,
    )
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        raise NoBound(
            f"on {_utc_date(pts[0].timestamp_unix_s)} the limits cannot be kept even with "
            "every miner asleep and every GPU at its lowest draw: no policy can stay under them"
        )
    if status != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"the bound's LP: {h.modelStatusToString(status)}")
    sol = np.array(h.getSolution().col_value)
    n_miners = sum(c.count for c in mcls)
    overhead_w = base_w - sleep_w * n_miners
    for t, p in enumerate(pts):
        o = per * t
        awake = sol[o : o + 4 * nm : 4]
        mined_w = sol[o + 1 : o + 4 * nm : 4]
        wakes = sol[o + 3 : o + 4 * nm : 4]
        served_w = sol[o + 4 * nm : o + per : 2]
        res.ai_revenue_usd += step_h * float(sol[o + 4 * nm + 1 : o + per : 2].sum())
        miner_w = float(mined_w.sum() + sleep_w * (n_miners - awake.sum()))
        gpu_w = float(served_w.sum())
        kwh = (miner_w + gpu_w + overhead_w) / 1000.0 * step_h
        margin = const[t] + float(np.dot(cost[o : o + per], sol[o : o + per]))
        switching = -float(np.dot(cost[o + 3 : o + 4 * nm : 4], wakes))
        depreciation = step_h * (
            float(awake.sum()) * sw.miner_depreciation_usd_per_h
            + n_gpus * sw.gpu_depreciation_usd_per_h
        )
        res.energy_kwh += kwh
        res.cost_usd += kwh * p.electricity_usd_per_kwh
        res.switching_usd += switching
        res.depreciation_usd += depreciation
        res.revenue_usd += margin + kwh * p.electricity_usd_per_kwh + switching + depreciation
        res.sleep_wake_cycles += float(wakes.sum())
        res.step_cycles.append(float(wakes.sum()))
        res.step_margin_usd.append(margin)
        res.power_w.append((miner_w, gpu_w, overhead_w))


class NoBound(Exception):
    """The site's limits cannot be kept at all, so nothing bounds a policy that keeps them."""


def _utc_date(unix_s: float) -> str:
    """The UTC date of a moment, as YYYY-MM-DD."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d")


# -- report and plot -----------------------------------------------------------------


def run_backtest(
    site: BtSite,
    series: Sequence[PricePoint],
    capping: CappingParams | None = None,
    progress: Progress | None = None,
    switching: SwitchingCosts | None = None,
) -> dict[str, Any]:
    """Every policy and the bound over the series; JSON-friendly results, per day too.

    ``switching`` (default: the documented defaults, ``DEFAULT_SWITCHING``) is what
    the policies plan with and what every result is charged; each miner's wake time
    comes from its firmware. A ratio to the bound is None when the bound's margin is
    not positive (a site that loses money at its best has no meaningful ratio);
    ``ratio_note`` says so.
    """
    cp = capping or CappingParams()
    sw = site_switching(site, DEFAULT_SWITCHING if switching is None else switching)
    results = [
        run_policy(site, series, name, fn, progress=progress, switching=sw)
        for name, fn in policies(cp, sw).items()
    ]
    best = bound(site, series, sw, progress=progress)
    out: dict[str, Any] = {
        "steps": len(series),
        "miners": len(site.miners),
        "gpus": len(site.gpus),
        "cap_w": site.cap_w,
        "policies": [r.summary() for r in results],
        "bound": best.summary(),
    }
    for r in results:
        ratio = round(r.margin_usd / best.margin_usd, 4) if best.margin_usd > 0 else None
        out[f"{r.policy}_ratio_to_bound"] = ratio
    if best.margin_usd <= 0:
        out["ratio_note"] = (
            f"the bound's margin is ${best.margin_usd:.2f}, not positive: electricity "
            "costs at least what the site earns over this series, so no ratio to it"
        )
    out["days"] = per_day(series, results, best)
    out["_results"] = results
    out["_bound"] = best
    return out


def per_day(
    series: Sequence[PricePoint], results: Sequence[PolicyResult], best: PolicyResult
) -> list[dict[str, Any]]:
    """Per UTC day: the bound's margin, each policy's margin, its share of the bound, cycles."""
    days: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(series):
        days[_utc_date(p.timestamp_unix_s)].append(k)
    out = []
    for date, steps in days.items():
        top = sum(best.step_margin_usd[k] for k in steps)
        row: dict[str, Any] = {"date": date, "bound_margin_usd": round(top, 2)}
        for r in results:
            m = sum(r.step_margin_usd[k] for k in steps)
            row[f"{r.policy}_margin_usd"] = round(m, 2)
            row[f"{r.policy}_ratio_to_bound"] = round(m / top, 4) if top > 0 else None
            row[f"{r.policy}_cycles"] = round(sum(r.step_cycles[k] for k in steps), 2)
        out.append(row)
    return out


def plot(
    site: BtSite,
    series: Sequence[PricePoint],
    results: Sequence[PolicyResult],
    best: PolicyResult,
    path: str | Path,
    shown: str = "economic",
) -> None:
    """PNG, dates along x: $ per day per policy against the bound; ``shown``'s power by
    load against the cap; electricity; hashprice and the AI price (each its own axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    when = [datetime.fromtimestamp(p.timestamp_unix_s, UTC) for p in series]
    daily = per_day(series, results, best)
    noon = [datetime.fromisoformat(d["date"]).replace(hour=12, tzinfo=UTC) for d in daily]
    res = next((r for r in results if r.policy == shown), results[0])
    fig, axes = plt.subplots(
        4, 1, figsize=(13, 11), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2, 2]}
    )
    ax_m, ax_p, ax_e, ax_h = axes
    ax_m.plot(noon, [d["bound_margin_usd"] for d in daily], "k--", lw=1.5, label="bound (LP)")
    for r in results:
        total = sum(d[f"{r.policy}_margin_usd"] for d in daily)
        ratio = f"{r.margin_usd / best.margin_usd:.1%}" if best.margin_usd > 0 else "n/a"
        ax_m.plot(
            noon,
            [d[f"{r.policy}_margin_usd"] for d in daily],
            marker="o",
            ms=3,
            label=f"{r.policy}: ${total:,.0f}, {ratio} of bound",
        )
    ax_m.set_ylabel("margin $ per day")
    ax_m.set_title(
        f"{len(site.miners)} miners, {len(site.gpus)} GPUs, cap {site.cap_w / 1000:.0f} kW: "
        f"margin per day (after switching costs) against the bound"
    )
    # Hourly means: a month of 5-minute steps is too dense to read as a stack.
    per_h = max(1, round(3600.0 / res.step_s))
    power_kw = np.asarray(res.power_w, float).reshape(-1, 3) / 1000.0
    hours = len(power_kw) // per_h
    if hours:
        hourly = power_kw[: hours * per_h].reshape(hours, per_h, 3).mean(axis=1)
        ax_p.stackplot(
            when[: hours * per_h : per_h],
            hourly[:, 0],
            hourly[:, 1],
            hourly[:, 2],
            labels=["mining", "AI (GPUs)", "overhead"],
            colors=["#f2a33a", "#4c72b0", "#999999"],
            step="post",
        )
    ax_p.axhline(site.cap_w / 1000.0, color="red", lw=1.2, label="site cap")
    ax_p.set_ylim(0, 1.1 * site.cap_w / 1000.0)
    ax_p.set_ylabel("power kW (hourly mean)")
    ax_p.set_title(f"{res.policy}: power by load ({res.sleep_wake_cycles:.0f} sleep/wake cycles)")
    ax_e.plot(
        when,
        [p.electricity_usd_per_kwh for p in series],
        lw=0.7,
        color="#c44e52",
        label="electricity",
    )
    # Linear through zero (negative prices show), logarithmic above for the spikes.
    ax_e.set_yscale("symlog", linthresh=0.2)
    top_e = max(p.electricity_usd_per_kwh for p in series)
    low_e = min(p.electricity_usd_per_kwh for p in series)
    ticks = (-0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    ax_e.set_yticks([t for t in ticks if low_e - 0.05 <= t <= max(0.2, top_e)])
    ax_e.yaxis.set_major_formatter("{x:g}")
    ax_e.axhline(0.0, color="k", lw=0.6)
    ax_e.set_ylabel("electricity $/kWh")
    ax_h.plot(
        when,
        [p.hashprice_usd_per_th_day for p in series],
        lw=0.9,
        color="#dd8452",
        label="hashprice",
    )
    ax_h.set_ylabel("hashprice $/TH/day")
    ax_a = ax_h.twinx()
    ax_a.plot(
        when, [p.ai_usd_per_gpu_hour for p in series], lw=0.9, color="#55a868", label="AI price"
    )
    ax_a.set_ylabel("AI $/GPU-hour")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax, extra in ((ax_m, None), (ax_p, None), (ax_e, None), (ax_h, ax_a)):
        handles, labels = ax.get_legend_handles_labels()
        if extra is not None:
            h2, l2 = extra.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8, frameon=False
        )
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax_h.xaxis.set_major_locator(locator)
    concise = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
    ax_h.xaxis.set_major_formatter(concise)
    ax_h.set_xlabel("date (UTC)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """Regenerate the shipped series (the sample and the held-out one): python -m agent.backtest."""
    from siteagent.agent.control.prices import write_csv

    data = Path(__file__).parent.parent / "data"
    for name, series in (
        ("prices_30d.csv", make_prices()),
        ("prices_30d_b.csv", make_prices_held_out()),
    ):
        write_csv(series, data / name)
        print(f"wrote {data / name}")


if __name__ == "__main__":
    main()


class BacktestInputError(Exception):
    """An input of ``siteagent backtest`` that cannot be used; the message names it."""


def check_inputs(
    args: Any,
) -> tuple[BtSite, CappingParams, list[PricePoint], SwitchingCosts]:
    """The site, capping parameters, price series and switching costs the arguments name,
    or BacktestInputError.

    Everything the run needs is checked here, before the replay: the plot folder too.
    """
    from siteagent.agent.config import ConfigError, load_config
    from siteagent.agent.control.prices import PriceFormatError, switching_costs

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
        if not site.miners and not site.gpus:
            raise BacktestInputError(
                f"--config {args.config}: lists no miners (inventory.miners) and no GPU "
                "nodes (gpu_nodes); expected the devices to replay, or leave --config out "
                "for a synthetic site (--miners, --gpus)"
            )
        cp = CappingParams(
            cfg.policy.capping_threshold,
            cfg.policy.capping_target,
            cfg.policy.uncapping_threshold,
            cfg.policy.min_off_s,
        )
        sw = switching_costs(cfg.policy)
    else:
        site, cp, sw = synthetic_site(args.miners, args.gpus), CappingParams(), DEFAULT_SWITCHING
    if getattr(args, "switching", "on") == "off":
        sw = SwitchingCosts()
    if args.prices is None:
        if args.config is None or cfg.prices.source != "sources":
            raise BacktestInputError(
                "--prices: missing; expected a price series (.csv or .json), or a --config "
                "whose prices.source is 'sources' (docs/prices.md)"
            )
        from siteagent.agent.control.price_sources import load_backtest_series

        try:
            series = list(load_backtest_series(cfg, step_s=STEP_S).points)
        except OSError as e:
            raise BacktestInputError(f"--config {args.config}: {e.strerror or e}") from None
        except PriceFormatError as e:
            raise BacktestInputError(f"--config {args.config}: {e}") from None
    else:
        series = _series_file(args.prices)
    if not series:
        raise BacktestInputError(f"--prices {args.prices}: no price rows")
    if args.days is not None:
        series = series[: max(1, int(args.days * 86400 / STEP_S))]
    if args.plot:
        _check_writable(Path(args.plot))
    return site, cp, series, sw


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
    """``siteagent backtest``: per-policy totals, the bound, the ratio to it, per day too."""
    import json

    try:
        site, cp, series, sw = check_inputs(args)
    except BacktestInputError as e:
        print(f"siteagent backtest: {e}", file=sys.stderr)
        return 2
    # Progress only for a person watching: a pipe or a log gets the report alone.
    line = ProgressLine(sys.stderr, len(policies()) + 1) if sys.stderr.isatty() else None
    try:
        out = run_backtest(site, series, cp, progress=line, switching=sw)
    except NoBound as e:
        if line is not None:
            line.clear()
        print(f"siteagent backtest: no bound: {e}", file=sys.stderr)
        return 2
    finally:
        if line is not None:
            line.clear()
    results: list[PolicyResult] = out.pop("_results")
    best: PolicyResult = out.pop("_bound")
    if args.plot:
        plot(site, series, results, best, args.plot)
    if args.report == "json":
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    print(
        f"{out['steps']} steps, {out['miners']} miners, {out['gpus']} GPUs, "
        f"cap {site.cap_w / 1000:.0f} kW"
    )
    print(
        f"{'policy':20} {'revenue $':>11} {'energy kWh':>11} {'cost $':>10} {'switch $':>9} "
        f"{'margin $':>10} {'s over cap':>10} {'cycles':>8} {'/day':>6}"
    )
    for s in [*out["policies"], out["bound"]]:
        per = s["cycles_per_day"]
        print(
            f"{s['policy']:20} {s['revenue_usd']:11.2f} {s['energy_kwh']:11.1f} "
            f"{s['cost_usd']:10.2f} {s['switching_usd']:9.2f} {s['margin_usd']:10.2f} "
            f"{s['seconds_over_cap']:10.0f} {s['sleep_wake_cycles']:8.1f} "
            f"{'n/a' if per is None else f'{per:.1f}':>6}"
        )
    for r in results:
        ratio = out[f"{r.policy}_ratio_to_bound"]
        shown = "n/a" if ratio is None else f"{ratio:.2%}"
        print(f"{r.policy} / bound margin: {shown}")
    if "ratio_note" in out:
        print(f"(n/a: {out['ratio_note']})")
    names = [r.policy for r in results]
    print("per day (margin $, share of the bound, cycles):")
    print(f"{'date':10} {'bound':>9} " + " ".join(f"{n:>34}" for n in names))
    for d in out["days"]:
        cells = []
        for n in names:
            ratio = d[f"{n}_ratio_to_bound"]
            shown = "n/a" if ratio is None else f"{ratio:.1%}"
            cells.append(f"{d[f'{n}_margin_usd']:>12.2f} {shown:>8} {d[f'{n}_cycles']:>11.1f}")
        print(f"{d['date']:10} {d['bound_margin_usd']:9.2f} " + " ".join(f"{c:>34}" for c in cells))
    return 0


def _series_file(path: str) -> list[PricePoint]:
    """A price series file (the project's CSV or JSON), or BacktestInputError."""
    from siteagent.agent.control.prices import PriceFormatError, load_series

    try:
        return list(load_series(path).points)
    except OSError as e:
        raise BacktestInputError(f"--prices {path}: {e.strerror or e}") from None
    except PriceFormatError as e:
        raise BacktestInputError(f"--prices {path}: {e}") from None
    except (ValueError, csv.Error) as e:  # not JSON, not UTF-8, a broken CSV quote
        raise BacktestInputError(f"--prices {path}: cannot be read: {e}") from None
