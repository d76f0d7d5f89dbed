"""The economic policy's parameters, apart from its plan (which compiles with numba).

``agent.prices`` and the configuration build these whatever the policy; only an
agent on the economic policy imports ``policies.economic`` and with it numba and
llvmlite (about 64 MB of RSS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

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


@dataclass(frozen=True, slots=True)
class EconomicParams:
    """Tuning of the economic policy; ``capping`` holds the bands and the minimum off time."""

    capping: CappingParams = field(default_factory=CappingParams)
    gpu_curve: GpuCurve = field(default_factory=GpuCurve)
    default_utilization_frac: float = 0.6
    utilization_fresh_s: float = 60.0
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
