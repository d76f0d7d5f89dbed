"""AI demand from the inference servers, and the contract floors it sets each tick.

Each GPU node may name its inference server's Prometheus endpoint
(``gpu_nodes[].demand_endpoint``; vLLM's metric names by default). The node reads
it with every GPU read (``drivers/inference.py``), and the demand becomes the
fraction of the node's peak capacity its GPUs must offer (``DeviceReading.demand_frac``),
which the economic policy plans with before busy %.

The model, and why:

- *demand* = max((running + waiting) / capacity, KV cache in use), where
  ``capacity`` is the concurrent requests the node runs at full power
  (``demand_capacity_requests``, vLLM's ``max_num_seqs``). Requests in the system
  are what the server is asked to serve now; a queue counts in full, so a backlog
  asks for more than the arrivals alone and drains. The KV cache fills before the
  batch does on long contexts, so its use is a floor on the load. Tokens per
  second is read (a rate of its counter) but does not set demand: served tokens are
  capped by the power limit itself and cannot show demand above it; the queue can.
- *need* = min(1, demand / (1 - latency_margin)): the capacity kept spare so that
  a burst waits no longer than the margin allows; the node's full capacity while
  more requests wait than its contract's service level allows (drain, then settle).
- the power that serves it is the lowest GPU power limit whose capacity reaches the
  need, on the same throughput-vs-limit curve the economic policy plans with
  (``GpuCurve.limit_for_w``). Not idle + (max - idle) x load: that is what a GPU
  *draws* at a load, while what the agent sets is the *limit*, and capacity is flat
  above the knee (80 % of TDP) and falls steeply below half.

A contracted node (a ``contract_floor_w`` or a ``contract_max_queue``) is kept each
tick at max(its contracted watts, the power its demand needs), split evenly over its
GPUs (``Limits.floors``); every policy keeps floors within the caps
(``policies/floors.py``). Where the endpoint is missing, stale or garbage, busy %
is the demand's fallback (the economic policy's rule), an alarm says so once, and
a contracted node's floor is its full power: without a queue to read, the contract
is kept at its worst case (the caps still win).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from siteagent.agent.config import Config, GpuNodeConfig, gpu_device_id
from siteagent.domain import DeviceError, DeviceFaulted, Floor, Limits, Snapshot
from siteagent.domain.site import SITE
from siteagent.drivers.inference import MetricsEndpoint, MetricsSample
from siteagent.policies.economic_params import GpuCurve, PriorityClass, PriorityClasses

# The one line a GPU reading carries when its node's demand came from busy % instead.
FALLBACK_PREFIX = "inference endpoint: "


@dataclass(frozen=True, slots=True)
class NodeDemand:
    """One read of a node's inference server, in its meaning."""

    timestamp_s: float
    waiting: float
    running: float
    kv_cache_frac: float | None
    tokens_per_s: float | None
    demand_frac: float  # of the node's peak capacity; above 1 with a backlog
    need_frac: float  # with the latency margin, at most 1


def demand_frac(
    waiting: float, running: float, kv_cache_frac: float | None, capacity_requests: int
) -> float:
    """Demand as a fraction of the node's full-power capacity (see the module doc)."""
    load = (max(running, 0.0) + max(waiting, 0.0)) / capacity_requests
    return max(load, 0.0 if kv_cache_frac is None else min(max(kv_cache_frac, 0.0), 1.0))


def need_frac(demand: float, latency_margin: float) -> float:
    """The capacity (fraction of peak) that serves ``demand`` with the latency margin kept."""
    return min(1.0, demand / (1.0 - latency_margin))


def need_w(need: float, tdp_w: float, curve: GpuCurve) -> float:
    """The lowest power limit (W) of a GPU of ``tdp_w`` whose capacity reaches ``need``, up
    to whole watts: limits are set in whole watts, and a floor rounded down would serve a
    little less than the need."""
    return float(min(tdp_w, math.ceil(curve.limit_for_w(need, tdp_w) - 1e-6)))


class NodeDemandReader:
    """A node's endpoint, read with each GPU read: the demand, and the tokens counter's rate."""

    def __init__(
        self, node: GpuNodeConfig, endpoint: MetricsEndpoint, max_queue: int | None = None
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        # The contract's service level: a longer queue asks for the node's full capacity.
        self.max_queue = max_queue
        m = node.demand_metrics
        self._roles = {
            "waiting": tuple(m.waiting),
            "running": tuple(m.running),
            "kv_cache_frac": tuple(m.kv_cache_frac),
            "tokens_per_s": tuple(m.tokens_per_s),
        }
        self.names = frozenset(n for names in self._roles.values() for n in names)
        self._tokens: tuple[float, float] | None = None  # (time s, counter) last read
        self.last: NodeDemand | None = None
        self.error: str | None = None

    def _role(self, sample: MetricsSample, role: str) -> float | None:
        for name in self._roles[role]:
            v = sample.values.get(name)
            if v is not None:
                return v
        return None

    async def read(self) -> NodeDemand:
        """Read the endpoint; DeviceError (kept in ``error``) when it cannot say the demand."""
        try:
            sample = await self.endpoint.read(self.names)
            demand = self.meaning(sample)
        except DeviceError as e:
            self.error = str(e)
            raise
        self.last, self.error = demand, None
        return demand

    def meaning(self, sample: MetricsSample) -> NodeDemand:
        """What a sample of the endpoint's metrics says of demand; DeviceFaulted without
        the requests waiting and running."""
        waiting, running = self._role(sample, "waiting"), self._role(sample, "running")
        if waiting is None or running is None:
            missing = [r for r, v in (("waiting", waiting), ("running", running)) if v is None]
            raise DeviceFaulted(
                f"{self.endpoint.url}: no metric for {', '.join(missing)} "
                f"(looked for {', '.join(n for r in missing for n in self._roles[r])})"
            )
        kv = self._role(sample, "kv_cache_frac")
        counter = self._role(sample, "tokens_per_s")
        rate = None
        if counter is not None:
            last = self._tokens
            if last is not None and sample.timestamp_s > last[0] and counter >= last[1]:
                rate = (counter - last[1]) / (sample.timestamp_s - last[0])
            self._tokens = (sample.timestamp_s, counter)
        n = self.node
        d = demand_frac(waiting, running, kv, n.demand_capacity_requests)
        need = need_frac(d, n.latency_margin)
        if self.max_queue is not None and waiting > self.max_queue:
            # The service level is broken now: drain at full capacity, not at the margin.
            need = 1.0
        return NodeDemand(sample.timestamp_s, waiting, running, kv, rate, d, need)


@dataclass(frozen=True, slots=True)
class Contract:
    """A customer's contract on one GPU node."""

    node_id: str
    gpu_ids: tuple[str, ...]
    floor_w: float  # the whole node's contracted GPU power (W)
    max_queue: int | None
    gpu_max_power_w: float
    reads_demand: bool  # the node names a demand endpoint


class Contracts:
    """The configured contracts, and each tick's floors and fallbacks from a snapshot."""

    def __init__(self, cfg: Config, curve: GpuCurve | None = None) -> None:
        self.curve = curve or GpuCurve()
        self.stale_after_s = cfg.telemetry.stale_after_s
        self.contracts = tuple(c for n in cfg.gpu_nodes if (c := node_contract(cfg, n)) is not None)
        self.readers = {
            n.id: tuple(gpu_device_id(n.id, i) for i in range(n.gpus))
            for n in cfg.gpu_nodes
            if n.demand_endpoint is not None
        }

    def floors(self, snap: Snapshot) -> tuple[Floor, ...]:
        """Every contracted GPU's floor this tick (W): the larger of its share of the node's
        contracted watts and the power its demand needs (its full power where a node that
        reads its demand has none fresh)."""
        out: list[Floor] = []
        for c in self.contracts:
            share_w = c.floor_w / len(c.gpu_ids)
            for gid in c.gpu_ids:
                w = share_w
                if c.reads_demand:
                    need = self._need(snap, gid)
                    w = max(
                        w,
                        c.gpu_max_power_w
                        if need is None
                        else need_w(need, c.gpu_max_power_w, self.curve),
                    )
                if w > 0:
                    out.append(Floor(gid, w, c.node_id))
        return tuple(out)

    def _need(self, snap: Snapshot, gpu_id: str) -> float | None:
        """The GPU's fresh demand need (fraction of peak), or None."""
        tab = snap.table
        if tab is None:
            for d in snap.devices:
                if d.device_id == gpu_id:
                    r, age = d.reading, d.reading_age_s
                    if r is None or r.demand_frac is None or age is None:
                        return None
                    return r.demand_frac if age <= self.stale_after_s else None
            return None
        row = tab.statics.rows.get(gpu_id)
        if row is None or tab.demand_frac is None:
            return None
        demand, age = float(tab.demand_frac[row]), float(tab.reading_age_s[row])
        if math.isnan(demand) or math.isnan(age) or age > self.stale_after_s:
            return None
        return demand

    def node_floors_w(self, limits: Limits) -> dict[str, tuple[float, tuple[str, ...]]]:
        """Per contracted node: its floor this tick (W, summed over its GPUs) and its GPUs."""
        by_gpu = {f.device_id: f.power_w for f in limits.floors}
        return {
            c.node_id: (sum(by_gpu.get(g, 0.0) for g in c.gpu_ids), c.gpu_ids)
            for c in self.contracts
        }

    def fallback_reason(self, snap: Snapshot) -> str | None:
        """Which nodes' demand comes from busy % because their endpoint said nothing fresh,
        and why (None when every endpoint was read)."""
        parts = []
        for node, gpus in sorted(self.readers.items()):
            why = _fallback(snap, gpus, self.stale_after_s)
            if why is not None:
                parts.append(f"{node} ({why})")
        if not parts:
            return None
        return f"AI demand from busy % instead of the inference server: {', '.join(parts)}"


def node_contract(cfg: Config, n: GpuNodeConfig) -> Contract | None:
    """The node's contract: its own terms, and those of the priority class holding its GPUs
    (the first class that names them, as the economic policy serves them); None if neither."""
    floor_w, max_queue = n.contract_floor_w, n.contract_max_queue
    classes = cfg.policy.priority_classes
    gpu_ids = tuple(gpu_device_id(n.id, i) for i in range(n.gpus))
    if classes:
        ranks = PriorityClasses(
            PriorityClass(c.name, tuple(c.devices), tuple(c.domains)) for c in classes
        )
        k = ranks.class_of(gpu_ids[0], n.domain or SITE)
        if k < len(classes):
            c = classes[k]
            floor_w = max(floor_w, c.contract_floor_w_per_gpu * n.gpus)
            if c.contract_max_queue is not None:
                max_queue = (
                    c.contract_max_queue
                    if max_queue is None
                    else min(max_queue, c.contract_max_queue)
                )
    if floor_w <= 0 and max_queue is None:
        return None
    return Contract(
        n.id, gpu_ids, floor_w, max_queue, n.gpu_max_power_w, n.demand_endpoint is not None
    )


def _fallback(snap: Snapshot, gpus: Iterable[str], stale_after_s: float) -> str | None:
    """Why a node's freshly read GPUs carry no demand (None if one does, or none is fresh)."""
    rows: Mapping[str, int] = snap.table.statics.rows if snap.table is not None else {}
    for gid in gpus:
        d = None
        if snap.table is not None:
            row = rows.get(gid)
            d = None if row is None else snap.devices[row]
        else:
            d = next((x for x in snap.devices if x.device_id == gid), None)
        if d is None or d.reading is None or d.reading_age_s is None:
            continue
        if d.reading_age_s > stale_after_s:
            continue
        if d.reading.demand_frac is not None:
            return None
        said = [
            e[len(FALLBACK_PREFIX) :] for e in d.reading.errors if e.startswith(FALLBACK_PREFIX)
        ]
        return said[0] if said else "no fresh read"
    return None
