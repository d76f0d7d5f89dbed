"""Site arithmetic as first written: one device at a time, over objects.

Kept as the specification of ``domain.site.domain_loads_w`` (and the
``node_loads`` it is built on), which sums with arrays (tests/test_site.py);
not used by the agent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from siteagent.domain import DeviceStatus
from siteagent.domain.site import SITE, DomainTree


def reference_loads_w(
    tree: DomainTree, items: Iterable[tuple[DeviceStatus, float]], overhead_w: float
) -> dict[str, float]:
    """Sum per-device power (W) into every domain above each device; overhead goes to the site."""
    load: dict[str, float] = defaultdict(float)
    load[SITE] += overhead_w
    for d, w in items:
        for node in tree.chain(d.domain):
            load[node] += w
    return load


def reference_clamp_w(
    power_w: float, lo_w: float | None, hi_w: float | None, step_w: float
) -> float:
    """A wanted power target (W) clamped into [lo_w, hi_w] (None: no bound), rounded down
    onto lo_w + k * step_w (a step of 0 or less: any value)."""
    lo = power_w if lo_w is None else lo_w
    hi = power_w if hi_w is None else hi_w
    clamped = min(max(power_w, lo), hi)
    if step_w > 0:
        clamped = lo + ((clamped - lo) // step_w) * step_w
    return float(clamped)
