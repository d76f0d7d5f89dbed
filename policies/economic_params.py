"""The economic policy's parameters, apart from its plan (which compiles with numba).

``agent.prices`` and the configuration build these whatever the policy; only an
agent on the economic policy imports ``policies.economic`` and with it numba and
llvmlite (about 64 MB of RSS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from siteagent.policies.capping import CappingParams


@dataclass(frozen=True, slots=True)
class GpuCurve:
    """Inference capacity (fraction of peak) against the power limit, as fractions of TDP.

    Flat down to ``knee_frac``; roughly proportional to the cut down to
    ``cliff_frac`` (``capacity_at_cliff`` there); a steeper cliff below
    (DOMAIN_FACTS.md, "Inference throughput vs power cap").
    """

    knee_frac: float = 0.8
    cliff_frac: float = 0.5
    capacity_at_cliff: float = 0.7
    cliff_slope: float = 2.5

    def capacity_frac(self, limit_w: float, tdp_w: float) -> float:
        """Capacity (fraction of peak) under ``limit_w`` (W) on a GPU of ``tdp_w`` (W)."""
        r = limit_w / tdp_w
        if r >= self.knee_frac:
            return 1.0
        if r >= self.cliff_frac:
            slope = (1.0 - self.capacity_at_cliff) / (self.knee_frac - self.cliff_frac)
            return 1.0 - (self.knee_frac - r) * slope
        return max(0.0, self.capacity_at_cliff - (self.cliff_frac - r) * self.cliff_slope)

    def limit_for_w(self, capacity: float, tdp_w: float) -> float:
        """Lowest limit (W) giving ``capacity`` (fraction of peak): the curve's inverse."""
        if capacity >= 1.0:
            return self.knee_frac * tdp_w
        if capacity >= self.capacity_at_cliff:
            slope = (1.0 - self.capacity_at_cliff) / (self.knee_frac - self.cliff_frac)
            return (self.knee_frac - (1.0 - capacity) / slope) * tdp_w
        r = self.cliff_frac - (self.capacity_at_cliff - capacity) / self.cliff_slope
        return max(0.0, r) * tdp_w


# Seconds from a wake command to hashing again, by firmware (the backend's name in
# ``drivers/backends``), for the hashing a wake loses. Sources, longest figure taken:
# - luxos: "full power back in under 10 s" (LuxOS documentation, DOMAIN_FACTS.md);
# - braiins: 10 s to a sleep's end in its Behaviour, but a target change ramps over
#   minutes (user reports, DOMAIN_FACTS.md): 120 s counts part of that ramp;
# - antminer (stock): 30 s (drivers/backends/antminer.py Behaviour.wake_s);
# - vnish: 60 s (drivers/backends/vnish.py Behaviour.wake_s);
# - whatsminer: a power change restarts the mining service, "about a minute or more,
#   unverified" (DOMAIN_FACTS.md): 60 s.
FIRMWARE_WAKE_S: Mapping[str, float] = {
    "luxos": 10.0,
    "braiins": 120.0,
    "antminer": 30.0,
    "vnish": 60.0,
    "whatsminer": 60.0,
}
HOURS_PER_S = 1.0 / 3600.0


def gpu_node(device_id: str) -> str:
    """The node a GPU's device id names (``node/gpuN``, as ``agent.config.gpu_device_id``)."""
    return device_id.rsplit("/", 1)[0]


@dataclass(frozen=True, slots=True)
class SwitchingCosts:
    """What moving hardware between states costs ($), and what running it wears ($/h).

    A miner's sleep/wake cycle costs ``miner_wear_usd_per_cycle`` (thermal cycling:
    no published figure, DOMAIN_FACTS.md, so a configured one) plus
    ``miner_restart_usd_per_cycle`` (a firmware restart: the share of restarts
    that need a hand) plus the hashing lost while it wakes (its firmware's wake
    time at the revenue of its minimum level). A GPU node's drain and undrain
    each cost their figure. Depreciation is counted per hour a device runs
    (a miner awake, a GPU serving). The economic policy takes a cycle only when
    the spread pays for it over ``horizon_s``.
    """

    miner_wear_usd_per_cycle: float = 0.0
    miner_restart_usd_per_cycle: float = 0.0
    # Wake time (s) of a miner whose firmware is not in ``wake_s_by_device``.
    miner_wake_s: float = 0.0
    wake_s_by_device: Mapping[str, float] = field(default_factory=dict)
    gpu_drain_usd: float = 0.0
    gpu_undrain_usd: float = 0.0
    miner_depreciation_usd_per_h: float = 0.0
    gpu_depreciation_usd_per_h: float = 0.0
    horizon_s: float = 3600.0

    def wake_s(self, device_id: str) -> float:
        """The device's wake time (s): its own, else the default."""
        return self.wake_s_by_device.get(device_id, self.miner_wake_s)

    def cycle_usd(self, wake_s: float, revenue_usd_per_h: float) -> float:
        """One sleep/wake cycle ($): a miner waking in ``wake_s`` to earn ``revenue_usd_per_h``."""
        fixed = self.miner_wear_usd_per_cycle + self.miner_restart_usd_per_cycle
        return fixed + wake_s * HOURS_PER_S * revenue_usd_per_h

    def wake_adjust_usd_per_kwh(
        self, wake_s: Any, revenue_usd_per_h: Any, width_w: Any, awake: Any
    ) -> Any:
        """What switching adds to a wake segment's net value ($/kWh); floats or arrays.

        Hysteresis by money: a sleeping miner's wake pays a cycle, spread over the
        horizon's kWh of the segment; an awake miner keeps that much, since sleeping
        it means paying the cycle to wake it again. Depreciation is a cost of running.
        """
        width_kw = width_w / 1000.0
        cycle = self.cycle_usd(wake_s, revenue_usd_per_h)
        spread = cycle / (width_kw * (self.horizon_s * HOURS_PER_S))
        return (2.0 * awake - 1.0) * spread - self.miner_depreciation_usd_per_h / width_kw

    def drain_adjust_usd_per_kwh(self, node_gpus: Any, width_w: Any, serving: Any) -> Any:
        """What a node's drain and undrain add to a GPU's first segment ($/kWh); floats
        or arrays.

        A node drains when all its GPUs are at their minimum; each of its
        ``node_gpus`` GPUs carries its share of a drain and undrain, spread over the
        horizon's kWh of the segment: kept by a GPU above its minimum (``serving``),
        paid by one at it.
        """
        share = (self.gpu_drain_usd + self.gpu_undrain_usd) / node_gpus
        spread = share / (width_w / 1000.0 * (self.horizon_s * HOURS_PER_S))
        return (2.0 * serving - 1.0) * spread

    @property
    def drains_free(self) -> bool:
        """Whether draining and undraining a GPU node cost nothing."""
        return self.gpu_drain_usd == 0.0 and self.gpu_undrain_usd == 0.0

    @property
    def free(self) -> bool:
        """Whether no switching cost or depreciation is configured for miners."""
        return (
            self.miner_wear_usd_per_cycle == 0.0
            and self.miner_restart_usd_per_cycle == 0.0
            and self.miner_wake_s == 0.0
            and not any(self.wake_s_by_device.values())
            and self.miner_depreciation_usd_per_h == 0.0
        )


# The documented defaults (examples/site.toml [policy]); ``SwitchingCosts()`` is free.
DEFAULT_SWITCHING = SwitchingCosts(
    miner_wear_usd_per_cycle=0.10,
    miner_restart_usd_per_cycle=0.02,
    miner_wake_s=30.0,
    gpu_drain_usd=1.0,
    gpu_undrain_usd=1.0,
    miner_depreciation_usd_per_h=0.0,
    gpu_depreciation_usd_per_h=0.0,
    # Tuned on the shipped sample series only (docs/economics.md): 1 h kept miners
    # awake through whole afternoon peaks; 4 h lets a peak's spread pay for the cycle.
    horizon_s=14_400.0,
)


@dataclass(frozen=True, slots=True)
class EconomicParams:
    """Tuning of the economic policy; ``capping`` holds the bands and the minimum off time."""

    capping: CappingParams = field(default_factory=CappingParams)
    gpu_curve: GpuCurve = field(default_factory=GpuCurve)
    default_utilization_frac: float = 0.6
    utilization_fresh_s: float = 60.0
    # Demand a GPU is sized for beyond its last reading, as a share of its PEAK (added,
    # not a multiple of demand): what a reading misses (noise, a burst before the next
    # plan) does not shrink with demand, and an unserved request loses the AI price
    # (about $3 a kWh) while an unused watt of limit costs only the marginal miner's
    # few cents of cap room for one plan. 0.15 is the former default, now of peak.
    gpu_headroom_frac: float = 0.15
    gpu_probe_factor: float = 1.5
    value_quantum_usd_per_kwh: float = 0.002
    keep_margin_usd_per_kwh: float = 0.01
    min_change_w: float = 50.0
    # A sleeping miner wakes only with this much room to spare (W), so small swings in
    # what the GPUs need do not cycle the marginal miner; an awake one needs none.
    wake_reserve_w: float = 500.0
    miner_raise_segments: int = 2
    # Per GPU device id: power (W) that must be kept for a customer.
    contract_floor_w: Mapping[str, float] = field(default_factory=dict)
    # Classes served in order before the merit order (the devices no class names).
    priority: PriorityClasses | None = None
    switching: SwitchingCosts = field(default_factory=SwitchingCosts)


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """Devices served before later classes and the merit order, whatever they earn per kW.

    A device belongs to the first class with a pattern (``fnmatch``) matching its id
    or a domain naming its own domain. Within a class the merit order holds; a
    loss-making segment is still never taken (a floor is what keeps power for a
    customer, see ``contract_floor_w``).
    """

    name: str
    device_patterns: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


class PriorityClasses:
    """Ordered priority classes; each device's class is worked out once and remembered."""

    def __init__(self, classes: Iterable[PriorityClass]) -> None:
        self.classes = tuple(classes)
        self._memo: dict[tuple[str, str], int] = {}

    def class_of(self, device_id: str, domain: str) -> int:
        """Index of the device's class; ``len(classes)`` for the merit order."""
        key = (device_id, domain)
        k = self._memo.get(key)
        if k is None:
            k = len(self.classes)
            for i, c in enumerate(self.classes):
                if domain in c.domains or any(fnmatchcase(device_id, p) for p in c.device_patterns):
                    k = i
                    break
            self._memo[key] = k
        return k

    def name(self, k: int) -> str:
        """The class's name; "merit order" past the last class."""
        return self.classes[k].name if k < len(self.classes) else "merit order"
