"""The agent's metric families through prometheus-client's own exposition.

Kept as the specification of ``agent.metrics.render_text`` (the one path that
serves scrapes: prometheus-client's ``generate_latest`` took about four times as
long for 10,000 devices, over the 200 ms goal); tests compare the two texts.
Not used by the agent.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import Family, HistogramFamily, families


def _to_client(fam: Family | HistogramFamily) -> Metric:
    if isinstance(fam, HistogramFamily):
        return HistogramMetricFamily(fam.name, fam.help, buckets=fam.buckets, sum_value=fam.sum_s)
    if fam.type == "counter":
        c = CounterMetricFamily(fam.name, fam.help, labels=list(fam.label_names))
        for lv, value in fam.samples:
            c.add_metric(list(lv), value)
        return c
    g = GaugeMetricFamily(fam.name, fam.help, labels=list(fam.label_names))
    for lv, value in fam.samples:
        g.add_metric(list(lv), value)
    return g


class SiteCollector(Collector):
    """The same families as prometheus-client metrics, for its registry and exposition."""

    def __init__(self, agent: Agent, *, version: str = "unknown") -> None:
        self.agent = agent
        self.version = version

    def describe(self) -> Iterable[Metric]:
        # Registering must not collect (nothing to render before the first tick); an
        # empty describe tells the registry to skip its duplicate-name check.
        return ()

    def collect(self) -> Iterable[Metric]:
        """Yield every metric family from immutable state; no IO."""
        for fam in families(self.agent, version=self.version):
            yield _to_client(fam)


def build_registry(agent: Agent, *, version: str = "unknown") -> CollectorRegistry:
    """A private registry holding only the site collector (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(agent, version=version))
    return registry
